// The training loop: micro-batches -> forward -> cross-entropy -> backward -> clip -> AdamW,
// with exact checkpoints (weights, moments, step, data stream, history) written atomically.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/json_reader.h"
#include "core/os.h"
#include "mamba/safetensors.h"
#include "mamba/train.h"
#include "mamba/train_dist.h"

namespace mamba::train {

namespace {
using json = nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimFile = "optimizer.safetensors";
constexpr const char* kStateFormat = "mambacpp-train-1";
// save() writes the new files here first; see save() for the protocol.
constexpr const char* kPendingDir = ".pending";
constexpr uint64_t kDataSalt = 0xD1B54A32D192ED03ull;  // the data stream's seed is seed ^ salt

template <class T>
T get_or(const json& j, const char* key, T def) {
  auto it = j.find(key);
  if (it == j.end()) return def;
  try {
    return it->get<T>();
  } catch (const std::exception& e) {
    throw Error(str("train config: key '", key, "' has the wrong type: ", e.what()));
  }
}

MambaLM make_model(const TrainConfig& cfg) {
  cfg.validate();
  ModelConfig m = cfg.model;
  set_selective(m, cfg.selective);
  std::vector<std::pair<double, double>> dt_init;
  for (const auto& li : cfg.layer_init) dt_init.emplace_back(li.dt_min, li.dt_max);
  MambaLM lm(m, cfg.seed, WeightDType::f32, dt_init);
  // A_init_scale (or layer i's scale): A_log += ln s after the standard initialisation.
  for (auto& [name, p] : lm.named_parameters())
    for (int64_t layer = 0; layer < m.n_layer; ++layer) {
      const double scale =
          cfg.layer_init.empty() ? cfg.A_init_scale : cfg.layer_init[layer].A_init_scale;
      if (scale == 1.0 || name != str("backbone.layers.", layer, ".mixer.A_log")) continue;
      const float shift = static_cast<float>(std::log(scale));
      Tensor& v = p->value.f32();
      for (int64_t i = 0; i < v.numel(); ++i) v[i] += shift;
    }
  return lm;
}
}  // namespace

void LocalDist::abort(const std::string& message) {
  std::fprintf(stderr, "error: %s\n", message.c_str());
  std::exit(1);
}

void set_selective(ModelConfig& cfg, bool selective) {
  if (Mamba1Config* m1 = cfg.mixer_if<Mamba1Config>()) {
    m1->selective = selective;
    return;
  }
  MAMBA_CHECK(
      selective,
      "--no-selective: the non-selective ablation is a Mamba1 switch; this model's mixer is ",
      mixer_name(cfg.ssm_cfg));
}

bool get_selective(const ModelConfig& cfg) {
  const Mamba1Config* m1 = cfg.mixer_if<Mamba1Config>();
  return !m1 || m1->selective;
}

// ---- config
// ---------------------------------------------------------------------------------------

void TrainConfig::validate() const {
  task.validate();
  MAMBA_CHECK(batch >= 1, "train: batch must be >= 1, got ", batch);
  MAMBA_CHECK(accum >= 1, "train: accum must be >= 1, got ", accum);
  MAMBA_CHECK(steps >= 0, "train: steps must be >= 0, got ", steps);
  MAMBA_CHECK(warmup >= 0, "train: warmup must be >= 0, got ", warmup);
  MAMBA_CHECK(A_init_scale > 0 && std::isfinite(A_init_scale),
              "train: A_init_scale must be > 0, got ", A_init_scale);
  if (!layer_init.empty()) {
    MAMBA_CHECK(static_cast<int64_t>(layer_init.size()) == model.n_layer,
                "train: layer_init needs one entry per layer (n_layer = ", model.n_layer, "), got ",
                layer_init.size());
    MAMBA_CHECK(A_init_scale == 1.0,
                "train: with layer_init the A scales are per layer; A_init_scale must be 1, got ",
                A_init_scale);
    for (size_t i = 0; i < layer_init.size(); ++i) {
      const LayerInit& li = layer_init[i];
      MAMBA_CHECK(std::isfinite(li.dt_min) && std::isfinite(li.dt_max) && li.dt_min > 0 &&
                      li.dt_max >= li.dt_min,
                  "train: layer ", i, ": the initial delta range needs 0 < dt_min <= dt_max, got ",
                  li.dt_min, " .. ", li.dt_max);
      MAMBA_CHECK(std::isfinite(li.A_init_scale) && li.A_init_scale > 0, "train: layer ", i,
                  ": A_init_scale must be > 0, got ", li.A_init_scale);
    }
  }
  MAMBA_CHECK(std::isfinite(lr) && lr > 0, "train: lr must be > 0, got ", lr);
  MAMBA_CHECK(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= lr,
              "train: min_lr must be in [0, lr], got ", min_lr);
  MAMBA_CHECK(std::isfinite(clip) && clip >= 0, "train: clip must be >= 0 (0 = off), got ", clip);
  MAMBA_CHECK(save_every >= 0, "train: save_every must be >= 0, got ", save_every);
  if (task.kind != TaskKind::Text)
    MAMBA_CHECK(model.padded_vocab() >= task.vocab, "train: the model's vocabulary (",
                model.padded_vocab(), ") is smaller than the task's (", task.vocab, ")");
}

std::string TrainConfig::to_json() const {
  json j;
  j["task"] = {{"kind", task_name(task.kind)},
               {"seqlen", task.seqlen},
               {"vocab", task.vocab},
               {"n_copy", task.n_copy},
               {"text", task.text_path},
               {"tokenizer", task.tokenizer_path},
               {"all_positions", task.all_positions}};
  j["selective"] = selective;
  j["batch"] = batch, j["accum"] = accum, j["steps"] = steps, j["warmup"] = warmup;
  j["lr"] = lr, j["min_lr"] = min_lr, j["clip"] = clip;
  j["beta1"] = adamw.beta1, j["beta2"] = adamw.beta2, j["eps"] = adamw.eps,
  j["weight_decay"] = adamw.weight_decay;
  j["seed"] = seed, j["save_every"] = save_every, j["A_init_scale"] = A_init_scale;
  j["layer_init"] = json::array();
  for (const LayerInit& li : layer_init)
    j["layer_init"].push_back(
        {{"dt_min", li.dt_min}, {"dt_max", li.dt_max}, {"A_init_scale", li.A_init_scale}});
  return j.dump(2);
}

TrainConfig TrainConfig::from_json(const std::string& text, const ModelConfig& model) {
  json j;
  try {
    j = json_io::parse_depth_limited(text.data(), text.data() + text.size());
  } catch (const std::exception& e) {
    throw Error(str("train config: invalid JSON: ", e.what()));
  }
  MAMBA_CHECK(j.is_object() && j.contains("task") && j["task"].is_object(),
              "train config: missing 'task' object");
  TrainConfig c;
  c.model = model;
  const json& t = j["task"];
  c.task.kind = parse_task(get_or<std::string>(t, "kind", "selective-copy"));
  c.task.seqlen = get_or<int64_t>(t, "seqlen", c.task.seqlen);
  c.task.vocab = get_or<int64_t>(t, "vocab", c.task.vocab);
  c.task.n_copy = get_or<int64_t>(t, "n_copy", c.task.n_copy);
  c.task.all_positions = get_or<bool>(t, "all_positions", false);
  c.task.text_path = get_or<std::string>(t, "text", "");
  c.task.tokenizer_path = get_or<std::string>(t, "tokenizer", "");
  c.selective = get_or<bool>(j, "selective", true);
  c.batch = get_or<int64_t>(j, "batch", c.batch);
  c.accum = get_or<int64_t>(j, "accum", c.accum);
  c.steps = get_or<int64_t>(j, "steps", c.steps);
  c.warmup = get_or<int64_t>(j, "warmup", c.warmup);
  c.lr = get_or<double>(j, "lr", c.lr);
  c.min_lr = get_or<double>(j, "min_lr", c.min_lr);
  c.clip = get_or<double>(j, "clip", c.clip);
  c.adamw.beta1 = get_or<double>(j, "beta1", c.adamw.beta1);
  c.adamw.beta2 = get_or<double>(j, "beta2", c.adamw.beta2);
  c.adamw.eps = get_or<double>(j, "eps", c.adamw.eps);
  c.adamw.weight_decay = get_or<double>(j, "weight_decay", c.adamw.weight_decay);
  c.seed = get_or<uint64_t>(j, "seed", 0);
  c.A_init_scale = get_or<double>(j, "A_init_scale", 1.0);
  c.save_every = get_or<int64_t>(j, "save_every", 0);
  if (auto it = j.find("layer_init"); it != j.end()) {
    MAMBA_CHECK(it->is_array(), "train config: 'layer_init' must be an array");
    for (const json& e : *it) {
      MAMBA_CHECK(e.is_object(), "train config: every 'layer_init' entry must be an object");
      LayerInit li;
      li.dt_min = get_or<double>(e, "dt_min", li.dt_min);
      li.dt_max = get_or<double>(e, "dt_max", li.dt_max);
      li.A_init_scale = get_or<double>(e, "A_init_scale", li.A_init_scale);
      c.layer_init.push_back(li);
    }
  }
  return c;
}

// ---- trainer
// --------------------------------------------------------------------------------------

Trainer::Trainer(const TrainConfig& cfg) : Trainer(cfg, make_model(cfg)) {}

Trainer::Trainer(const TrainConfig& cfg, MambaLM lm)
    : cfg_(cfg),
      lm_(std::move(lm)),
      params_(lm_.named_parameters()),
      opt_(params_, cfg.adamw),
      data_rng_(cfg.seed ^ kDataSalt) {
  cfg_.validate();
  cfg_.model = lm_.config();
  if (cfg_.task.kind == TaskKind::Text) {
    text_ =
        std::make_unique<TextData>(TextData::load(cfg_.task.text_path, cfg_.task.tokenizer_path));
    MAMBA_CHECK(lm_.vocab() >= text_->vocab(), "train: the model's vocabulary (", lm_.vocab(),
                ") is smaller than the text's tokenizer (", text_->vocab(), ")");
  }
}

Trainer::Trainer(Trainer&&) noexcept = default;
Trainer::~Trainer() = default;

void Trainer::set_dist(Dist* dist, size_t bucket_bytes, bool overlap) {
  MAMBA_CHECK(bucket_bytes >= sizeof(float), "train: the gradient bucket size must be >= 4 bytes");
  dist_ = dist;
  bucket_bytes_ = bucket_bytes;
  overlap_ = overlap;
  buckets_.clear();
}

// Buckets of whole parameters: the blocks' from the last layer down (a bucket closes once it holds
// bucket_bytes_, and is final when the backward of its lowest layer is done), then one bucket of
// everything outside the blocks (embedding / LM head, norm_f: final only at the end of backward).
// The order is the same on every rank, so the ranks' collectives match.
void Trainer::plan_buckets() {
  buckets_.clear();
  const int64_t n_layer = lm_.config().n_layer;
  std::vector<std::vector<size_t>> by_layer(static_cast<size_t>(n_layer));
  Bucket rest;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    const std::string prefix = "backbone.layers.";
    int64_t layer = -1;
    if (name.rfind(prefix, 0) == 0) {
      size_t end = 0;
      layer = std::stoll(name.substr(prefix.size()), &end);
      MAMBA_CHECK(layer >= 0 && layer < n_layer && name[prefix.size() + end] == '.',
                  "train: unexpected parameter name '", name, "'");
    }
    if (layer < 0)
      rest.params.push_back(i);
    else
      by_layer[static_cast<size_t>(layer)].push_back(i);
  }
  Bucket cur;
  size_t bytes = 0;
  for (int64_t layer = n_layer - 1; layer >= 0; --layer) {
    for (size_t i : by_layer[static_cast<size_t>(layer)]) {
      cur.params.push_back(i);
      bytes += static_cast<size_t>(params_[i].second->value.numel()) * sizeof(float);
    }
    if (!cur.params.empty() && (bytes >= bucket_bytes_ || layer == 0)) {
      cur.ready_layer = layer;
      buckets_.push_back(std::move(cur));
      cur = Bucket{};
      bytes = 0;
    }
  }
  if (!rest.params.empty()) buckets_.push_back(std::move(rest));
  for (Bucket& b : buckets_) {
    int64_t n = 0;
    for (size_t i : b.params) n += params_[i].second->value.numel();
    b.buf.assign(static_cast<size_t>(n), 0.0f);
  }
}

// first: buf = the gradients; otherwise buf += the gradients (fp32, element by element).
void Trainer::pack_bucket(Bucket& b, bool first) {
  float* out = b.buf.data();
  for (size_t i : b.params) {
    const Tensor& g = params_[i].second->grad();
    const float* src = g.data();
    const int64_t n = g.numel();
    if (first)
      std::copy(src, src + n, out);
    else
      for (int64_t k = 0; k < n; ++k) out[k] += src[k];
    out += n;
  }
}

StepLog Trainer::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t s = opt_.steps();
  LocalDist local;
  Dist& dist = dist_ ? *dist_ : local;
  const int64_t nproc = dist.size(), rank = dist.rank();
  MAMBA_CHECK(cfg_.accum % nproc == 0, "train: accum (", cfg_.accum,
              ") must be a multiple of the number of processes (", nproc,
              "): the global batch is batch x accum micro-batches, split evenly over them");
  // Draw every micro-batch first, so the loss is the exact mean over the whole update. Every
  // rank draws all of them (the same stream), then works on its own share.
  std::vector<Batch> mbs;
  int64_t total = 0, tokens = 0;
  for (int64_t a = 0; a < cfg_.accum; ++a) {
    mbs.push_back(make_batch(cfg_.task, cfg_.batch, data_rng_, text_.get()));
    total += mbs.back().counted();
    tokens += mbs.back().B * mbs.back().L;
  }
  MAMBA_CHECK(total > 0, "train: a batch has no counted target positions");
  double sum_nll = 0;
  int64_t correct = 0;
  Tensor dlogits;
  if (nproc == 1 && cfg_.accum == 1) {
    lm_.zero_grad();
    LMSaved saved;
    Tensor logits = lm_.forward(mbs[0].ids, mbs[0].B, mbs[0].L, &saved);
    LossResult r = cross_entropy(logits, mbs[0].targets, &dlogits, static_cast<double>(total));
    lm_.backward(saved, dlogits);
    sum_nll = r.sum_nll;
    correct = r.correct;
  } else {
    if (buckets_.empty()) plan_buckets();
    const int64_t per = cfg_.accum / nproc, lo = rank * per;
    // Per micro-batch: sum_nll at [i], correct at [accum + i]; zero where another rank works.
    std::vector<double> parts(static_cast<size_t>(2 * cfg_.accum), 0.0);
    for (int64_t j = 0; j < per; ++j) {
      const Batch& mb = mbs[static_cast<size_t>(lo + j)];
      const bool first = j == 0, last = j == per - 1;
      lm_.zero_grad();
      LMSaved saved;
      Tensor logits = lm_.forward(mb.ids, mb.B, mb.L, &saved);
      LossResult r = cross_entropy(logits, mb.targets, &dlogits, static_cast<double>(total));
      logits = Tensor();
      auto ready = [&](int64_t layer) {
        for (Bucket& b : buckets_)
          if (b.ready_layer == layer) {
            pack_bucket(b, first);
            if (last && overlap_) dist.start_sum(b.buf);
          }
        dist.progress();
      };
      lm_.backward(saved, dlogits, ready);
      ready(-1);
      if (last && !overlap_)
        for (Bucket& b : buckets_) dist.start_sum(b.buf);
      parts[static_cast<size_t>(lo + j)] = r.sum_nll;
      parts[static_cast<size_t>(cfg_.accum + lo + j)] = static_cast<double>(r.correct);
    }
    dist.wait_all();
    for (Bucket& b : buckets_) {  // the sums back into the gradients
      const float* in = b.buf.data();
      for (size_t i : b.params) {
        Tensor& g = params_[i].second->grad();
        std::copy(in, in + g.numel(), g.data());
        in += g.numel();
      }
    }
    dist.sum_disjoint(parts);
    for (int64_t i = 0; i < cfg_.accum; ++i) {
      sum_nll += parts[static_cast<size_t>(i)];
      correct += static_cast<int64_t>(parts[static_cast<size_t>(cfg_.accum + i)]);
    }
  }
  StepLog log;
  log.loss = sum_nll / static_cast<double>(total);
  MAMBA_CHECK(std::isfinite(log.loss), "train: the loss became ", log.loss, " at step ", s + 1,
              " (try a lower --lr or --clip)");
  log.grad_norm = clip_grad_norm(params_, cfg_.clip);
  log.lr = lr_at(s, cfg_.warmup, cfg_.steps, cfg_.lr, cfg_.min_lr);
  opt_.step(log.lr);
  log.step = opt_.steps();
  log.accuracy = static_cast<double>(correct) / static_cast<double>(total);
  log.tokens = tokens;
  log.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  history_.push_back(log);
  return log;
}

void Trainer::init_weights_from(const std::string& dir) {
  MAMBA_CHECK(opt_.steps() == 0,
              "init_weights_from: only before the first step (this run is at step ", opt_.steps(),
              ")");
  MambaLM src = MambaLM::load(dir);
  auto from = src.named_parameters();
  MAMBA_CHECK(from.size() == params_.size(), dir, ": the model has ", from.size(),
              " parameter tensors, this run's has ", params_.size(), " (a different config)");
  for (size_t i = 0; i < params_.size(); ++i) {
    MAMBA_CHECK(from[i].first == params_[i].first &&
                    from[i].second->value.shape() == params_[i].second->value.shape(),
                dir, ": parameter '", from[i].first, "' ", from[i].second->value.shape_str(),
                " does not match '", params_[i].first, "' ", params_[i].second->value.shape_str());
    params_[i].second->value.assign(from[i].second->value.to_f32());
  }
}

namespace {
// The step a saved file names: trainer_state.json's "step", or an optimiser file's "step" metadata;
// -1 when the file is missing or unreadable (an interrupted save is not an error here).
int64_t saved_step(const fs::path& p, bool state_file) {
  try {
    if (!fs::exists(p)) return -1;
    if (!state_file) {
      auto f = SafetensorsFile::open(p.string());
      return f.metadata().count("step") ? std::stoll(f.meta("step")) : -1;
    }
    json j = json_io::parse_depth_limited(os::read_file(p.string(), 1ull << 30));
    return j.is_object() && j.contains("step") && j["step"].is_number_integer()
               ? j["step"].get<int64_t>()
               : -1;
  } catch (const std::exception&) {
    return -1;
  }
}

// Finishes a save that was interrupted (killed, power cut): if the state file (the commit point)
// names the step of the pending optimiser file, the save was committed and the pending files still
// there are moved into place; otherwise it was not, and the pending folder is dropped. Either way
// the folder then holds one complete checkpoint.
void finish_pending_save(const fs::path& dir) {
  const fs::path pend = dir / kPendingDir;
  if (!fs::exists(pend)) return;
  const int64_t committed = saved_step(dir / kStateFile, true);
  if (committed >= 0 && saved_step(pend / kOptimFile, false) == committed)
    for (const char* f : {"config.json", "model.safetensors", kOptimFile})  // the optimiser last
      if (fs::exists(pend / f)) os::rename_durable((pend / f).string(), (dir / f).string());
  fs::remove_all(pend);
}
}  // namespace

// Crash-safe: the new config.json, model.safetensors and optimizer.safetensors are written (each
// fsync'd) into dir/.pending/; then trainer_state.json is replaced atomically: that is the commit
// point; then the pending files are renamed into place. Killed before the commit, the folder still
// holds the previous checkpoint (the pending folder is dropped on the next resume or save); killed
// after it, resume finishes the renames (finish_pending_save). A failed write (disk full) throws
// before the commit, leaving the previous checkpoint as it was.
void Trainer::save(const std::string& dir) const {
  const fs::path d(dir), pend = fs::path(dir) / kPendingDir;
  fs::create_directories(d);
  finish_pending_save(d);
  try {
    fs::create_directories(pend);
    lm_.save(pend.string());
    save_safetensors((pend / kOptimFile).string(), opt_.state_tensors(),
                     {{"step", std::to_string(opt_.steps())}, {"format", kStateFormat}});
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(pend, ec);
    throw Error(str("saving the checkpoint of step ", opt_.steps(), " to '", dir,
                    "' failed (the previous checkpoint there is intact): ", e.what()));
  }
  json j;
  j["format"] = kStateFormat;
  j["step"] = opt_.steps();
  uint64_t rs[4];
  data_rng_.get_state(rs);
  j["data_rng"] = {rs[0], rs[1], rs[2], rs[3]};
  j["train"] = json::parse(cfg_.to_json());
  json h = json::array();
  for (const StepLog& l : history_)
    h.push_back({l.step, l.loss, l.lr, l.grad_norm, l.accuracy, l.tokens, l.seconds});
  j["history"] = std::move(h);
  const std::string text = j.dump(1);
  try {
    os::write_file_atomic((d / kStateFile).string(), text.data(), text.size());  // the commit
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(pend, ec);
    throw Error(str("saving the checkpoint of step ", opt_.steps(), " to '", dir,
                    "' failed (the previous checkpoint there is intact): ", e.what()));
  }
  finish_pending_save(d);
}

Trainer Trainer::resume(const std::string& dir, bool finish_pending) {
  if (finish_pending && fs::is_directory(dir))
    finish_pending_save(dir);  // a save that was interrupted
  const std::string sp = (fs::path(dir) / kStateFile).string();
  MAMBA_CHECK(os::exists(sp), "resume: '", dir, "' has no ", kStateFile,
              " (not a training checkpoint)");
  std::vector<uint8_t> bytes = os::read_file(sp, 1ull << 30);
  json j;
  try {
    j = json_io::parse_depth_limited(bytes);
  } catch (const std::exception& e) {
    throw Error(str(sp, ": invalid JSON: ", e.what()));
  }
  MAMBA_CHECK(j.is_object() && j.value("format", "") == kStateFormat, sp, ": not a ", kStateFormat,
              " file");
  MAMBA_CHECK(j.contains("step") && j["step"].is_number_integer(), sp, ": missing integer 'step'");
  const int64_t step = j["step"].get<int64_t>();
  MambaLM lm = MambaLM::load(dir);
  TrainConfig cfg = TrainConfig::from_json(j.at("train").dump(), lm.config());
  MAMBA_CHECK(cfg.selective == get_selective(lm.config()), sp, ": selective = ", cfg.selective,
              " but the model's config.json says ", get_selective(lm.config()));
  Trainer tr(cfg, std::move(lm));
  auto of = SafetensorsFile::open((fs::path(dir) / kOptimFile).string());
  MAMBA_CHECK(of.metadata().count("step") && of.meta("step") == std::to_string(step), dir, ": ",
              kOptimFile, " is for step ", of.metadata().count("step") ? of.meta("step") : "?",
              " but ", kStateFile, " for step ", step, " (an interrupted save?)");
  std::vector<std::pair<std::string, Tensor>> st;
  for (const auto& n : of.names()) st.emplace_back(n, of.tensor(n));
  tr.opt_.load_state(st, step);
  MAMBA_CHECK(j.contains("data_rng") && j["data_rng"].is_array() && j["data_rng"].size() == 4, sp,
              ": 'data_rng' must be 4 integers");
  uint64_t rs[4];
  for (int i = 0; i < 4; ++i) rs[i] = j["data_rng"][i].get<uint64_t>();
  tr.data_rng_.set_state(rs);
  if (j.contains("history"))
    for (const auto& e : j["history"]) {
      MAMBA_CHECK(e.is_array() && e.size() == 7, sp, ": a history entry must have 7 fields");
      StepLog l;
      l.step = e[0].get<int64_t>(), l.loss = e[1].get<double>(), l.lr = e[2].get<double>();
      l.grad_norm = e[3].get<double>(), l.accuracy = e[4].get<double>(),
      l.tokens = e[5].get<int64_t>();
      l.seconds = e[6].get<double>();
      tr.history_.push_back(l);
    }
  return tr;
}

// ---- evaluation
// -----------------------------------------------------------------------------------

EvalResult evaluate(MambaLM& lm, const TaskConfig& task, int64_t n_batches, int64_t batch,
                    uint64_t seed, const TextData* text) {
  task.validate();
  TaskConfig answer_only = task;  // an evaluation counts the task's answers only
  answer_only.all_positions = false;
  MAMBA_CHECK(n_batches >= 1 && batch >= 1, "evaluate: batches and batch must be >= 1, got ",
              n_batches, " and ", batch);
  Rng rng(seed);
  EvalResult r;
  double sum_nll = 0;
  for (int64_t i = 0; i < n_batches; ++i) {
    Batch bt = make_batch(answer_only, batch, rng, text);
    Tensor logits = lm.forward(bt.ids, bt.B, bt.L);
    LossResult lr = cross_entropy(logits, bt.targets);
    sum_nll += lr.sum_nll;
    r.counted += lr.counted;
    r.correct += lr.correct;
    const int64_t V = logits.dim(-1);
    for (int64_t b = 0; b < bt.B; ++b) {
      bool all = true, any = false;
      for (int64_t t = 0; t < bt.L; ++t) {
        const int32_t tg = bt.targets[b * bt.L + t];
        if (tg == kIgnoreIndex) continue;
        any = true;
        const float* row = logits.data() + (b * bt.L + t) * V;
        all = all && (std::max_element(row, row + V) - row) == tg;
      }
      if (any) r.seq_total += 1, r.seq_correct += all;
    }
  }
  r.loss = r.counted ? sum_nll / static_cast<double>(r.counted) : 0;
  return r;
}

}  // namespace mamba::train
