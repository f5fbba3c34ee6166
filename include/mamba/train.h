// Training: cross-entropy over the LM head, AdamW, gradient clipping, the LR schedule, data
// (text windows and the Mamba paper's synthetic tasks, section 4.1) and the trainer loop with
// exact, atomic checkpoints.
//
//   batch (ids, targets) -> MambaLM::forward -> logits (B, L, V_pad) -> cross_entropy -> dlogits
//   -> MambaLM::backward (grads +=) [x accum micro-batches] -> clip_grad_norm -> AdamW(lr(step))
//
// Determinism: the model is initialised from `seed`, the data come from their own Rng (seeded
// from `seed`), and every reduction in this file is summed in a fixed order. With a fixed thread
// count the kernels' parallel_for uses static scheduling, so a run is bitwise reproducible, and
// `resume` continues it bit for bit (the checkpoint holds weights, AdamW moments, step count,
// the data Rng state and the loss history).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mamba/config.h"
#include "mamba/lm.h"
#include "mamba/nn/param.h"
#include "mamba/rng.h"
#include "mamba/tensor.h"

namespace mamba::train {

class Dist;  // train_dist.h

constexpr int32_t kIgnoreIndex = -100;  // targets with this value are not counted (PyTorch's)

// ---- loss ---------------------------------------------------------------------------------------

struct LossResult {
  double loss = 0;      // sum_nll / denom (denom = counted unless given)
  double sum_nll = 0;   // sum over counted positions of -log softmax(logits)[target]
  int64_t counted = 0;  // positions whose target is not kIgnoreIndex
  int64_t correct = 0;  // counted positions where argmax(logits) == target (first max wins)
};

// logits: (B, L, V) (softmax over all V columns, the padded vocabulary included, as PyTorch's
// F.cross_entropy on the LM's logits); targets: B*L ids in [0, V) or kIgnoreIndex.
// If dlogits != nullptr it receives d(sum_nll / denom)/d logits, (B, L, V), zero rows at ignored
// positions. denom <= 0 means "the number of counted positions" (the mean). Pass the count of
// the whole accumulated batch to get the exact mean over several micro-batches.
LossResult cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets,
                         Tensor* dlogits = nullptr, double denom = 0);

// ---- optimiser ----------------------------------------------------------------------------------

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.95;  // the Mamba paper's training recipe (appendix E.2)
  double eps = 1e-8;
  double weight_decay = 0.1;
};

// Which parameters get weight decay. Our choice (the paper's GPT-3-style recipe as in the
// flash-attention trainer that mamba_ssm's experiments used): decay the matrices of the linear
// layers and the conv kernel; no decay where the layer marks Param::no_weight_decay (A_log, D,
// dt_proj.bias / dt_bias, norms, biases) nor on the embedding (tied to the LM head).
bool uses_weight_decay(const std::string& name, const Param& p);

// AdamW as torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps). Moments in fp32; scalars in double.
class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, Param*>> params, AdamWConfig cfg);
  void step(double lr);  // one update from the current grads; increments steps()
  int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return cfg_; }
  bool decays(size_t i) const { return decay_[i]; }
  size_t size() const { return params_.size(); }
  // Moments as tensors named "exp_avg.<param>" and "exp_avg_sq.<param>" (shared storage).
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;
  // Restores the moments (by name; throws naming a missing or mis-shaped one) and the step.
  void load_state(const std::vector<std::pair<std::string, Tensor>>& tensors, int64_t steps);

 private:
  std::vector<std::pair<std::string, Param*>> params_;
  std::vector<bool> decay_;
  std::vector<Tensor> m_, v_;
  AdamWConfig cfg_;
  int64_t t_ = 0;
};

// Global L2 norm of all gradients (summed in double, fixed order); if it exceeds max_norm > 0,
// scales every gradient by max_norm / (norm + 1e-6) as torch.nn.utils.clip_grad_norm_.
// Returns the norm before clipping.
double clip_grad_norm(const std::vector<std::pair<std::string, Param*>>& params, double max_norm);

// Linear warm-up from lr/warmup to lr over `warmup` steps, then cosine decay to min_lr at
// step `total`. step counts from 0 (the first update uses lr_at(0)).
double lr_at(int64_t step, int64_t warmup, int64_t total, double lr, double min_lr);

// ---- data ---------------------------------------------------------------------------------------

// One batch: ids and targets are (B, L) row-major; targets hold kIgnoreIndex where no loss is
// taken. The model at position t predicts targets[t].
struct Batch {
  int64_t B = 0, L = 0;
  std::vector<int32_t> ids, targets;
  int64_t counted() const;  // targets that are not kIgnoreIndex
};

enum class TaskKind { SelectiveCopy, Induction, Text };
TaskKind parse_task(const std::string& name);  // "selective-copy" | "induction" | "text"
std::string task_name(TaskKind k);

struct TaskConfig {
  TaskKind kind = TaskKind::SelectiveCopy;
  int64_t seqlen = 256;  // L: the whole sequence the model sees
  int64_t vocab = 16;    // synthetic tasks: token alphabet (specials included)
  int64_t n_copy = 16;   // selective copying: data tokens to memorise and copy
  // induction: train on the next-token loss at every position (how the H3 / safari code trains
  // these tasks) instead of the answer only; evaluations always count the answer only.
  bool all_positions = false;
  std::string text_path, tokenizer_path;  // text: a UTF-8 file; tokenizer.json ("" = bytes)
  void validate() const;                  // throws mamba::Error naming the option
};

// Selective Copying (Mamba paper, section 4.1 / appendix E.1): the first L - M positions are
// noise (token 0) with M data tokens (uniform in [1, V-2]) at random distinct positions, in
// order; the last M positions are markers (token V-1). At marker j the target is data token j.
Batch selective_copy_batch(int64_t B, int64_t L, int64_t V, int64_t M, Rng& rng);
// Induction Heads: tokens uniform in [0, V-2]; the special token V-1 appears at a random
// position p in [0, L-3], followed by the key token; the last position is the special token
// again and its target is the key. Only that position is counted, unless all_positions: then
// every position t < L-1 also has the next token ids[t+1] as its target (the same sequences:
// the random draws do not change).
Batch induction_batch(int64_t B, int64_t L, int64_t V, Rng& rng, bool all_positions = false);

// A tokenised text sampled as random windows of L+1 tokens (ids = w[0..L), targets = w[1..L]).
class TextData {
 public:
  // tokenizer_path "" = byte-level (ids are the UTF-8 bytes, vocab 256).
  static TextData load(const std::string& text_path, const std::string& tokenizer_path = "");
  static TextData from_tokens(std::vector<int32_t> tokens, int64_t vocab);
  Batch sample(int64_t B, int64_t L, Rng& rng) const;
  int64_t vocab() const { return vocab_; }
  size_t size() const { return tokens_.size(); }

 private:
  std::vector<int32_t> tokens_;
  int64_t vocab_ = 256;
};

// Draws one batch of the task (text needs `text`).
Batch make_batch(const TaskConfig& task, int64_t B, Rng& rng, const TextData* text = nullptr);

// ---- the trainer --------------------------------------------------------------------------------

struct TrainConfig {
  ModelConfig model;      // vocab_size must cover the task's tokens
  bool selective = true;  // false: the non-selective (LTI, S4-like) ablation, Mamba-1 only
  TaskConfig task;
  int64_t batch = 8, accum = 1, steps = 1000, warmup = 0;
  double lr = 1e-3, min_lr = 1e-5, clip = 1.0;
  AdamWConfig adamw;
  uint64_t seed = 0;
  // Multiplies every layer's initial A = -exp(A_log) by this factor (A_log += ln s) after the
  // standard initialisation; 1 = mamba_ssm's. A training choice, not part of config.json (the
  // trained A_log is in the checkpoint). Smaller |A| means slower state decay at the same delta.
  double A_init_scale = 1.0;
  // Per-layer initialisation (training choices like A_init_scale, not part of config.json):
  // empty = every layer uses ssm_cfg's dt_min / dt_max and A_init_scale; otherwise one entry per
  // layer, and A_init_scale must be 1 (each layer's scale is here). Lets a short-memory first
  // layer sit under a long-memory second one (docs/REPRODUCTION.md, Induction Heads).
  struct LayerInit {
    double dt_min = 0.001, dt_max = 0.1, A_init_scale = 1.0;
  };
  std::vector<LayerInit> layer_init;
  std::string save_dir;    // "" = no checkpoints
  int64_t save_every = 0;  // 0 = only at the end
  void validate() const;
  std::string to_json() const;  // everything but the model (that is config.json)
  static TrainConfig from_json(const std::string& text, const ModelConfig& model);
};

struct StepLog {
  int64_t step = 0;  // 1-based: the number of updates done after this one
  double loss = 0, lr = 0, grad_norm = 0, accuracy = 0;
  int64_t tokens = 0;  // tokens processed by this step (B * L * accum)
  double seconds = 0;  // wall time of this step
};

struct EvalResult {
  int64_t counted = 0, correct = 0;
  int64_t seq_total = 0, seq_correct = 0;  // sequences with every counted target right
  double loss = 0;
  double accuracy() const { return counted ? static_cast<double>(correct) / counted : 0; }
  double seq_accuracy() const {
    return seq_total ? static_cast<double>(seq_correct) / seq_total : 0;
  }
};

// Token accuracy of `lm` on freshly drawn task batches (no gradients). Batches come from
// Rng(seed), independent of the training stream.
EvalResult evaluate(MambaLM& lm, const TaskConfig& task, int64_t n_batches, int64_t batch,
                    uint64_t seed, const TextData* text = nullptr);

// Sets the non-selective ablation switch (Mamba1Config::selective) of the model config. Only the
// Mamba-1 mixer has it: selective = false on another mixer throws mamba::Error.
void set_selective(ModelConfig& cfg, bool selective);
bool get_selective(const ModelConfig& cfg);  // true for mixers without the switch

class Trainer {
 public:
  explicit Trainer(const TrainConfig& cfg);  // a fresh model from cfg.seed
  // Continues the run saved in `dir` (written by save()): weights, moments, step, data stream.
  // finish_pending = false: read only, for the ranks > 0 of a data-parallel job (rank 0 finishes
  // an interrupted save first, then the others read).
  static Trainer resume(const std::string& dir, bool finish_pending = true);
  Trainer(Trainer&&) noexcept;
  ~Trainer();

  // One optimiser update: accum micro-batches of `batch` sequences (the global batch is
  // batch * accum whatever the number of processes). With accum > 1 or a Dist of several ranks,
  // each micro-batch's gradient is computed from zero and the gradients are summed in fp32 in
  // micro-batch order (acc = g0; acc += g1; ...); over ranks, each rank sums its own contiguous
  // share of the micro-batches the same way and the ranks' partial sums are added in rank order.
  // So N ranks with accum = N give the bits of one process with the same accum.
  StepLog train_step();
  // Data-parallel training (train_dist.h): every rank draws the same micro-batches from the same
  // data stream and runs forward + backward on its own contiguous share (accum must be a multiple
  // of dist->size()); gradients are summed in buckets of about bucket_bytes, each started as soon
  // as the backward of its layers is done (overlap = false: all after the backward, for
  // measuring the overlap). nullptr = one process. The Dist must outlive the trainer's steps.
  void set_dist(Dist* dist, size_t bucket_bytes = 4u << 20, bool overlap = true);
  // Starts from the weights of a saved model folder (same config; e.g. a curriculum: train
  // short, continue at a longer length). Only before the first step; moments start at zero.
  void init_weights_from(const std::string& dir);
  // Writes config.json + model.safetensors (MambaLM::save), optimizer.safetensors and
  // trainer_state.json, crash-safe: the first three go to dir/.pending/ (each fsync'd), then the
  // state file is replaced atomically (the commit point; it names the step, which the optimiser
  // file must match on resume), then the pending files are renamed into place. A kill at any
  // moment leaves the previous or the new checkpoint for resume (which finishes an interrupted
  // rename); a failed write (disk full) throws and leaves the previous one intact.
  void save(const std::string& dir) const;

  MambaLM& model() { return lm_; }
  const TrainConfig& config() const { return cfg_; }
  TrainConfig& config() { return cfg_; }  // e.g. to change save_dir / steps after resume
  int64_t step() const { return opt_.steps(); }
  const std::vector<StepLog>& history() const { return history_; }
  const TextData* text() const { return text_.get(); }

 private:
  Trainer(const TrainConfig& cfg, MambaLM lm);
  TrainConfig cfg_;
  MambaLM lm_;
  std::vector<std::pair<std::string, Param*>> params_;
  AdamW opt_;
  Rng data_rng_;
  std::unique_ptr<TextData> text_;
  std::vector<StepLog> history_;
  // Data-parallel state (set_dist): gradient buckets, each a run of whole parameters.
  struct Bucket {
    std::vector<size_t> params;  // indices into params_
    int64_t ready_layer = -1;    // the bucket is final after this block's backward; -1: at the end
    std::vector<float> buf;      // packed gradients: the accumulator, then the sum over ranks
  };
  void plan_buckets();
  void pack_bucket(Bucket& b, bool first);
  Dist* dist_ = nullptr;
  size_t bucket_bytes_ = 4u << 20;
  bool overlap_ = true;
  std::vector<Bucket> buckets_;
};

// ---- curves -------------------------------------------------------------------------------------

// The loss history as CSV: step,loss,lr,grad_norm,accuracy,tokens,seconds.
std::string history_csv(const std::vector<StepLog>& h);

struct Series {
  std::string label;
  std::vector<double> x, y;
};
// A self-contained SVG line plot (axes, ticks, grid, legend); log_y plots log10 of y > 0.
std::string svg_line_plot(const std::vector<Series>& series, const std::string& title,
                          const std::string& xlabel, const std::string& ylabel, bool log_y);

}  // namespace mamba::train
