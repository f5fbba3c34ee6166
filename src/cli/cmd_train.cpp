// mambacpp train: train a Mamba LM on a synthetic task of the Mamba paper or a text file, with
// a progress line, checkpoints, a loss curve (CSV + SVG) and a task-accuracy eval at the end.
// mambacpp eval-task: the token accuracy of a trained checkpoint on a task at any length.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#if defined(__GLIBC__)
#endif

#include "cli/commands.h"
#include "core/os.h"
#include "mamba/parallel.h"
#include "mamba/train.h"
#include "mamba/train_dist.h"

namespace mamba::cli {

namespace {
namespace fs = std::filesystem;
using train::TaskConfig;

struct TrainOpts {
  std::string layer = "mamba1";
  int64_t d_model = 64, n_layer = 2, d_state = 16, d_conv = 4, headdim = 32, chunk = 64, vocab = 0;
  double expand = 2;
  // one value for every layer, or one per layer (comma-separated)
  std::vector<double> dt_min{0.001}, dt_max{0.1}, A_init_scale{1.0};
  bool no_selective = false;
  std::string task = "selective-copy", text, tokenizer;
  int64_t seqlen = 256, task_vocab = 16, n_copy = 16;
  bool all_positions = false;
  int64_t batch = 8, steps = 1000, warmup = 50, accum = 1, save_every = 0, log_every = 0;
  double lr = 1e-3, min_lr = 1e-5, weight_decay = 0.1, clip = 1.0, beta1 = 0.9, beta2 = 0.95;
  uint64_t seed = 0;
  std::string save = "train-out", resume, init;
  int threads = 0;
  int64_t eval_batches = 8, eval_batch = 16;
  // data-parallel (mpirun): peer timeout, gradient bucket size, overlap with the backward
  double dist_timeout = 120, bucket_mib = 4;
  bool no_overlap = false;
};

std::string hms(double s) {
  char buf[64];
  if (!std::isfinite(s) || s < 0) return "?";
  const long t = std::lround(s);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, (t / 60) % 60);
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  else
    std::snprintf(buf, sizeof buf, "%lds", t);
  return buf;
}

// The model config as mamba_ssm's config.json text, parsed by ModelConfig (which resolves
// every default of the chosen layer).
ModelConfig model_config(const TrainOpts& o, int64_t vocab) {
  const char* layer = o.layer == "mamba2" ? "Mamba2" : o.layer == "mamba3" ? "Mamba3" : "Mamba1";
  nlohmann::json ssm = {{"layer", layer}, {"d_state", o.d_state}, {"expand", o.expand}};
  if (o.layer != "mamba3") ssm["d_conv"] = o.d_conv;  // Mamba-3 has no conv
  if (o.layer != "mamba1") ssm["headdim"] = o.headdim, ssm["chunk_size"] = o.chunk;
  // With per-layer ranges config.json records the range over all layers (the per-layer values are
  // in the train config); each layer's dt_proj.bias is drawn from its own range.
  const double lo = *std::min_element(o.dt_min.begin(), o.dt_min.end());
  const double hi = *std::max_element(o.dt_max.begin(), o.dt_max.end());
  if (lo != 0.001 || hi != 0.1) {
    ssm["dt_min"] = lo, ssm["dt_max"] = hi;
    // mamba_ssm clamps the initial delta to dt_init_floor (1e-4); a lower --dt-min lowers it too
    if (lo < 1e-4) ssm["dt_init_floor"] = lo;
  }
  nlohmann::json j = {{"d_model", o.d_model},   {"n_layer", o.n_layer},
                      {"vocab_size", vocab},    {"ssm_cfg", ssm},
                      {"rms_norm", true},       {"residual_in_fp32", true},
                      {"fused_add_norm", true}, {"pad_vocab_size_multiple", 8},
                      {"tie_embeddings", true}};
  return ModelConfig::parse(j.dump(), "train options");
}

// --dt-min / --dt-max / --A-init-scale: one value each = the same for every layer (A_init_scale);
// otherwise one value per layer (a single value is repeated) = TrainConfig::layer_init.
void set_layer_init(const TrainOpts& o, train::TrainConfig& c) {
  const size_t n = static_cast<size_t>(o.n_layer);
  auto check = [&](const char* opt, const std::vector<double>& v) {
    MAMBA_CHECK(v.size() == 1 || v.size() == n, opt,
                ": give one value for every layer or one per layer (n_layer = ", n, "), got ",
                v.size(), " values");
  };
  check("--dt-min", o.dt_min), check("--dt-max", o.dt_max), check("--A-init-scale", o.A_init_scale);
  if (o.dt_min.size() == 1 && o.dt_max.size() == 1 && o.A_init_scale.size() == 1) {
    c.A_init_scale = o.A_init_scale[0];
    return;
  }
  auto at = [](const std::vector<double>& v, size_t i) { return v.size() == 1 ? v[0] : v[i]; };
  c.A_init_scale = 1.0;
  for (size_t i = 0; i < n; ++i)
    c.layer_init.push_back({at(o.dt_min, i), at(o.dt_max, i), at(o.A_init_scale, i)});
}

// Writes loss.csv and loss.svg (raw loss and its 20-step running mean) into dir.
void write_curves(const std::string& dir, const std::vector<train::StepLog>& h,
                  const std::string& title) {
  fs::create_directories(dir);
  const std::string csv = train::history_csv(h);
  os::write_file_atomic((fs::path(dir) / "loss.csv").string(), csv.data(), csv.size());
  train::Series raw{"loss", {}, {}}, avg{"20-step mean", {}, {}};
  double run = 0;
  for (size_t i = 0; i < h.size(); ++i) {
    raw.x.push_back(static_cast<double>(h[i].step));
    raw.y.push_back(h[i].loss);
    run += h[i].loss;
    if (i >= 20) run -= h[i - 20].loss;
    avg.x.push_back(static_cast<double>(h[i].step));
    avg.y.push_back(run / static_cast<double>(std::min<size_t>(i + 1, 20)));
  }
  const std::string svg =
      train::svg_line_plot({raw, avg}, title, "step", "cross-entropy loss", true);
  os::write_file_atomic((fs::path(dir) / "loss.svg").string(), svg.data(), svg.size());
}

void print_eval(const char* what, const TaskConfig& t, const train::EvalResult& r) {
  std::printf(
      "%s %s, seqlen %lld: token accuracy %.2f%% (%lld/%lld), sequence accuracy %.2f%%, loss "
      "%.4f\n",
      what, train::task_name(t.kind).c_str(), static_cast<long long>(t.seqlen), 100 * r.accuracy(),
      static_cast<long long>(r.correct), static_cast<long long>(r.counted), 100 * r.seq_accuracy(),
      r.loss);
}
// The body of `mambacpp train` (below add_train); dist = nullptr: one process.
int run_train(const TrainOpts& opts, CLI::App* sub, train::Dist* dist);
}  // namespace

Command add_train(CLI::App& app) {
  auto o = std::make_shared<TrainOpts>();
  auto* sub = app.add_subcommand(
      "train", "Train a Mamba LM on Selective Copying, Induction Heads or a text file");
  auto* g = "Model";
  sub->add_option("--layer", o->layer, "mixer: mamba1 | mamba2 | mamba3 (SISO)")
      ->check(CLI::IsMember({"mamba1", "mamba2", "mamba3"}))
      ->capture_default_str()
      ->group(g);
  sub->add_option("--d_model,--d-model", o->d_model, "model width")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--n_layer,--n-layer", o->n_layer, "number of blocks")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--d_state,--d-state", o->d_state, "SSM state size N")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--d_conv,--d-conv", o->d_conv, "conv width K (Mamba-1/2; Mamba-3 has no conv)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--expand", o->expand, "d_inner = expand * d_model")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--headdim", o->headdim, "Mamba-2 / Mamba-3 head dimension P")
      ->capture_default_str()
      ->group(g);
  sub->add_option(
         "--chunk", o->chunk,
         "Mamba-2 SSD chunk size (the CPU kernel uses min(chunk, 64); same result up to rounding); "
         "Mamba-3 scan chunk size (same result)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--vocab", o->vocab, "model vocabulary (0 = the task's or the tokenizer's)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--dt-min", o->dt_min,
                  "initial delta range, low end (mamba_ssm's dt_min; below 1e-4 it also lowers "
                  "dt_init_floor); "
                  "one value, or one per layer: 1e-3,1e-4")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->group(g);
  sub->add_option("--dt-max", o->dt_max,
                  "initial delta range, high end (mamba_ssm's dt_max); one value or one per layer")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->group(g);
  sub->add_option("--A-init-scale", o->A_init_scale,
                  "multiply the initial A = -exp(A_log) by this (1 = mamba_ssm's init); one value "
                  "or one per layer")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->group(g);
  sub->add_flag("--no-selective", o->no_selective,
                "ablation: delta, B and C do not depend on the input (LTI, S4-like; Mamba-1)")
      ->group(g);
  g = "Data";
  sub->add_option("--task", o->task, "selective-copy | induction | text")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--seqlen", o->seqlen, "sequence length L")->capture_default_str()->group(g);
  sub->add_option("--task-vocab", o->task_vocab,
                  "synthetic tasks: alphabet size (specials included)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--n-copy", o->n_copy, "selective-copy: data tokens to copy")
      ->capture_default_str()
      ->group(g);
  sub->add_flag("--loss-all-positions", o->all_positions,
                "induction: train on the next-token loss at every position, not only the answer "
                "(evals count the answer)")
      ->group(g);
  sub->add_option("--text", o->text, "text task: a UTF-8 file")->group(g);
  sub->add_option("--tokenizer", o->tokenizer,
                  "text task: tokenizer.json (default: bytes, vocab 256)")
      ->group(g);
  g = "Optimisation";
  sub->add_option("--batch", o->batch, "sequences per micro-batch")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--accum", o->accum, "micro-batches per update (gradient accumulation)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--steps", o->steps, "optimiser updates")->capture_default_str()->group(g);
  sub->add_option("--lr", o->lr, "peak learning rate")->capture_default_str()->group(g);
  sub->add_option("--min-lr", o->min_lr, "learning rate at the end of the cosine decay")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--warmup", o->warmup, "linear warm-up steps")->capture_default_str()->group(g);
  sub->add_option("--weight-decay", o->weight_decay, "AdamW decoupled weight decay")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--clip", o->clip, "gradient clipping by global norm (0 = off)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--beta1", o->beta1, "AdamW beta1")->capture_default_str()->group(g);
  sub->add_option("--beta2", o->beta2, "AdamW beta2")->capture_default_str()->group(g);
  sub->add_option("--seed", o->seed, "seed of the initialisation and the data stream")
      ->capture_default_str()
      ->group(g);
  g = "Run";
  sub->add_option("--save", o->save, "folder for checkpoints, loss.csv and loss.svg")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--save-every", o->save_every, "checkpoint every N steps (0 = only at the end)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--resume", o->resume,
                  "continue the run saved in this folder exactly (its options win)")
      ->group(g);
  sub->add_option("--init", o->init,
                  "start from the weights of this model folder (same model options)")
      ->group(g);
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--log-every", o->log_every, "progress line every N steps (0 = about every 2 s)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--eval-batches", o->eval_batches, "batches of the final task eval (0 = none)")
      ->capture_default_str()
      ->group(g);
  sub->add_option("--eval-batch", o->eval_batch, "sequences per eval batch")
      ->capture_default_str()
      ->group(g);
  g = "Data-parallel (under mpirun -np N; accum must be a multiple of N)";
  sub->add_option("--dist-timeout", o->dist_timeout,
                  "seconds to wait for a peer process before ending the whole job")
      ->capture_default_str()
      ->check(CLI::PositiveNumber)
      ->group(g);
  sub->add_option("--bucket-mib", o->bucket_mib,
                  "gradient all-reduce bucket size in MiB (one collective per bucket)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber)
      ->group(g);
  sub->add_flag("--no-overlap", o->no_overlap,
                "start the gradient all-reduce only after the whole backward (to measure the "
                "overlap)")
      ->group(g);
  return {sub, [o, sub] {
            // Under mpirun: one rank per process; rank 0 alone prints and writes files.
            std::unique_ptr<train::Dist> dist = train::make_mpi_dist(o->dist_timeout);
            const int rank = dist ? dist->rank() : 0, nproc = dist ? dist->size() : 1;
            if (rank > 0 && !std::freopen("/dev/null", "w", stdout))
              throw Error("cannot silence stdout on rank > 0");
            try {
              return run_train(*o, sub, dist.get());
            } catch (const std::exception& e) {
              if (nproc > 1) dist->abort(e.what());  // ends every rank, no peer left waiting
              throw;
            }
          }};
}

namespace {
int run_train(const TrainOpts& opts, CLI::App* sub, train::Dist* dist) {
  const TrainOpts* o = &opts;
  const int rank = dist ? dist->rank() : 0, nproc = dist ? dist->size() : 1;
  // Ranks sharing a machine share its cores (0 = all cores: split between them).
  if (o->threads == 0 && dist && dist->local_size() > 1)
    set_num_threads(
        std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / dist->local_size()));
  else
    set_num_threads(o->threads);
  os::keep_freed_memory();
  std::unique_ptr<train::Trainer> tr;
  std::string save = o->save;
  if (!o->resume.empty()) {
    // Rank 0 finishes an interrupted save first; then the others read the checkpoint.
    if (rank == 0) tr = std::make_unique<train::Trainer>(train::Trainer::resume(o->resume));
    if (dist) dist->barrier();
    if (rank != 0) tr = std::make_unique<train::Trainer>(train::Trainer::resume(o->resume, false));
    if (sub->get_option("--save")->count() == 0) save = o->resume;
    if (sub->get_option("--steps")->count()) tr->config().steps = o->steps;
    if (sub->get_option("--save-every")->count()) tr->config().save_every = o->save_every;
    std::printf("resumed %s at step %lld\n", o->resume.c_str(), static_cast<long long>(tr->step()));
  } else {
    train::TrainConfig c;
    c.task.kind = train::parse_task(o->task);
    c.task.seqlen = o->seqlen, c.task.vocab = o->task_vocab, c.task.n_copy = o->n_copy;
    c.task.all_positions = o->all_positions;
    c.task.text_path = o->text, c.task.tokenizer_path = o->tokenizer;
    int64_t vocab = o->vocab;
    if (vocab <= 0) {
      if (c.task.kind != train::TaskKind::Text)
        vocab = o->task_vocab;
      else
        vocab = o->tokenizer.empty() ? 256 : -1;  // -1: from the tokenizer below
    }
    if (vocab < 0)
      vocab = static_cast<int64_t>(train::TextData::load(o->text, o->tokenizer).vocab());
    set_layer_init(*o, c);  // checks the per-layer lists before model_config reads them
    c.model = model_config(*o, vocab);
    c.selective = !o->no_selective;
    c.batch = o->batch, c.accum = o->accum, c.steps = o->steps, c.warmup = o->warmup;
    c.lr = o->lr, c.min_lr = std::min(o->min_lr, o->lr), c.clip = o->clip;
    c.adamw.beta1 = o->beta1, c.adamw.beta2 = o->beta2, c.adamw.weight_decay = o->weight_decay;
    c.seed = o->seed, c.save_every = o->save_every;
    tr = std::make_unique<train::Trainer>(c);
    if (!o->init.empty()) {
      tr->init_weights_from(o->init);
      std::printf("initialised from %s\n", o->init.c_str());
    }
  }
  if (dist) tr->set_dist(dist, static_cast<size_t>(o->bucket_mib * (1 << 20)), !o->no_overlap);
  const train::TrainConfig& c = tr->config();
  const ModelConfig& mc = tr->model().config();
  std::printf(
      "model: %s%s, d_model %lld, n_layer %lld, d_state %lld, vocab %lld, %lld parameters\n",
      mixer_name(mc.ssm_cfg), c.selective ? "" : " (non-selective ablation)",
      static_cast<long long>(mc.d_model), static_cast<long long>(mc.n_layer),
      static_cast<long long>(std::visit(
          [](const auto& m) -> int64_t {
            if constexpr (requires { m.d_state; })
              return m.d_state;
            else
              return 0;  // ssm_cfg never holds the attention mixer
          },
          mc.ssm_cfg)),
      static_cast<long long>(mc.vocab_size), static_cast<long long>(tr->model().num_parameters()));
  std::printf(
      "task: %s, seqlen %lld | batch %lld x accum %lld, %lld steps, lr %g (warm-up %lld, "
      "cosine to %g), "
      "wd %g, clip %g, seed %llu, %d threads x %d processes\n",
      train::task_name(c.task.kind).c_str(), static_cast<long long>(c.task.seqlen),
      static_cast<long long>(c.batch), static_cast<long long>(c.accum),
      static_cast<long long>(c.steps), c.lr, static_cast<long long>(c.warmup), c.min_lr,
      c.adamw.weight_decay, c.clip, static_cast<unsigned long long>(c.seed), num_threads(), nproc);
  if (!c.layer_init.empty()) {
    std::printf("init per layer:");
    for (size_t i = 0; i < c.layer_init.size(); ++i)
      std::printf("%s layer %zu delta %g..%g, A x%g", i ? " |" : "", i, c.layer_init[i].dt_min,
                  c.layer_init[i].dt_max, c.layer_init[i].A_init_scale);
    std::printf("\n");
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto last_print = t0;
  const int64_t first = tr->step();
  int64_t tokens = 0;
  while (tr->step() < c.steps) {
    train::StepLog l = tr->train_step();
    tokens += l.tokens;
    const auto now = std::chrono::steady_clock::now();
    const double el = std::chrono::duration<double>(now - t0).count();
    const bool due = o->log_every > 0
                         ? l.step % o->log_every == 0
                         : std::chrono::duration<double>(now - last_print).count() >= 2.0;
    if (due || l.step == c.steps || l.step == first + 1) {
      last_print = now;
      const double per = el / static_cast<double>(l.step - first);
      std::printf(
          "step %6lld/%lld  loss %.4f  acc %5.1f%%  lr %.2e  |g| %.3f  %8.0f tok/s  ETA %s\n",
          static_cast<long long>(l.step), static_cast<long long>(c.steps), l.loss, 100 * l.accuracy,
          l.lr, l.grad_norm, static_cast<double>(tokens) / el,
          hms(per * static_cast<double>(c.steps - l.step)).c_str());
      std::fflush(stdout);
    }
    if (rank == 0 && c.save_every > 0 && l.step % c.save_every == 0 && l.step < c.steps) {
      tr->save(save);
      write_curves(save, tr->history(), "training loss");
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (rank == 0) {
    tr->save(save);
    write_curves(save, tr->history(),
                 str(mixer_name(mc.ssm_cfg), c.selective ? "" : " (non-selective)", " on ",
                     train::task_name(c.task.kind), ", L=", c.task.seqlen));
  }
  std::printf(
      "trained %lld steps in %.1f s (%.0f tok/s, peak memory %.0f MiB); checkpoint, loss.csv "
      "and "
      "loss.svg in %s\n",
      static_cast<long long>(tr->step() - first), secs,
      secs > 0 ? static_cast<double>(tokens) / secs : 0.0,
      static_cast<double>(os::peak_rss_bytes()) / (1024.0 * 1024.0), save.c_str());
  if (dist && nproc > 1 && tr->step() > first) {
    const train::Dist::Stats st = dist->take_stats();
    const double n = static_cast<double>(tr->step() - first);
    std::printf(
        "gradient all-reduce per step: %.2f MiB sent + %.2f MiB received in %.1f calls; "
        "%.2f ms not hidden behind the backward (waiting), %.2f ms packing/summing/MPI "
        "calls%s\n",
        static_cast<double>(st.bytes_sent) / n / (1 << 20),
        static_cast<double>(st.bytes_received) / n / (1 << 20), static_cast<double>(st.sums) / n,
        1e3 * st.wait_s / n, 1e3 * st.busy_s / n, o->no_overlap ? " (--no-overlap)" : "");
  }
  if (rank == 0 && o->eval_batches > 0) {
    train::EvalResult r = train::evaluate(tr->model(), c.task, o->eval_batches, o->eval_batch,
                                          c.seed + 1000003, tr->text());
    print_eval("eval:", c.task, r);
  }
  return 0;
}
}  // namespace

Command add_eval_task(CLI::App& app) {
  struct EvalOpts {
    std::string model, task, text, tokenizer;
    int64_t seqlen = 0, task_vocab = 0, n_copy = 0, batches = 4, batch = 8;
    uint64_t seed = 1;
    int threads = 0;
  };
  auto o = std::make_shared<EvalOpts>();
  auto* sub = app.add_subcommand("eval-task",
                                 "Token accuracy of a trained checkpoint on a task at any length");
  sub->add_option("--model", o->model, "checkpoint folder (written by `mambacpp train`)")
      ->required();
  sub->add_option("--task", o->task,
                  "selective-copy | induction | text (default: the one it was trained on)");
  sub->add_option("--seqlen", o->seqlen, "sequence length (default: the training length)");
  sub->add_option("--task-vocab", o->task_vocab, "alphabet size (default: the training one)");
  sub->add_option("--n-copy", o->n_copy,
                  "selective-copy: tokens to copy (default: the training one)");
  sub->add_option("--text", o->text, "text task: a UTF-8 file");
  sub->add_option("--tokenizer", o->tokenizer, "text task: tokenizer.json (default: bytes)");
  sub->add_option("--batches", o->batches, "number of batches")->capture_default_str();
  sub->add_option("--batch", o->batch, "sequences per batch")->capture_default_str();
  sub->add_option("--seed", o->seed, "seed of the eval data")->capture_default_str();
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  return {sub, [o] {
            set_num_threads(o->threads);
            os::keep_freed_memory();
            MambaLM lm = MambaLM::load(o->model);
            TaskConfig t;
            const std::string sp = (fs::path(o->model) / "trainer_state.json").string();
            if (os::exists(sp)) {
              auto bytes = os::read_file(sp, 1ull << 30);
              auto j = nlohmann::json::parse(bytes.begin(), bytes.end(), nullptr, false);
              if (!j.is_discarded() && j.contains("train"))
                t = train::TrainConfig::from_json(j["train"].dump(), lm.config()).task;
            }
            if (!o->task.empty()) t.kind = train::parse_task(o->task);
            if (o->seqlen > 0) t.seqlen = o->seqlen;
            if (o->task_vocab > 0) t.vocab = o->task_vocab;
            if (o->n_copy > 0) t.n_copy = o->n_copy;
            if (!o->text.empty()) t.text_path = o->text;
            if (!o->tokenizer.empty()) t.tokenizer_path = o->tokenizer;
            std::unique_ptr<train::TextData> text;
            if (t.kind == train::TaskKind::Text)
              text = std::make_unique<train::TextData>(
                  train::TextData::load(t.text_path, t.tokenizer_path));
            const auto t0 = std::chrono::steady_clock::now();
            train::EvalResult r = train::evaluate(lm, t, o->batches, o->batch, o->seed, text.get());
            const double s =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            print_eval("", t, r);
            std::printf("(%lld sequences in %.1f s)\n",
                        static_cast<long long>(o->batches * o->batch), s);
            return 0;
          }};
}

}  // namespace mamba::cli
