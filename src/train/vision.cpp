// The image-classification example: data generator, the two classifiers (VSSBlock backbone and
// the Mamba-1 baseline over the flattened image), training with AdamW and evaluation.
#include "mamba/vision.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <optional>

#include "mamba/nn/mamba1.h"
#include "mamba/nn/param.h"
#include "mamba/nn/vssblock.h"
#include "mamba/train.h"
#include "ops/elementwise.h"
#include "ops/layernorm.h"
#include "ops/linear.h"

namespace mamba::vision {

ImageBatch bars_batch(int64_t B, int64_t S, int64_t bar_len, double noise, Rng& rng) {
  MAMBA_CHECK(B >= 1, "bars_batch: batch must be >= 1, got ", B);
  MAMBA_CHECK(bar_len >= 2 && S >= bar_len, "bars_batch: need 2 <= bar_len <= image, got bar_len ",
              bar_len, ", image ", S);
  MAMBA_CHECK(std::isfinite(noise) && noise >= 0, "bars_batch: noise must be >= 0, got ", noise);
  ImageBatch out;
  out.images = Tensor::empty({B, S, S, 1});
  float* im = out.images.data();
  auto pick = [&](int64_t n) {
    return static_cast<int64_t>(rng.uniform() * static_cast<double>(n));
  };
  static const int64_t di[kClasses] = {0, 1, 1, 1}, dj[kClasses] = {1, 0, 1, -1};
  for (int64_t b = 0; b < B; ++b) {
    float* img = im + b * S * S;
    for (int64_t p = 0; p < S * S; ++p) img[p] = static_cast<float>(noise * rng.normal());
    const int32_t c = static_cast<int32_t>(pick(kClasses));
    // start so that every pixel of the bar lies inside the image
    const int64_t span = bar_len - 1;
    const int64_t i0 = pick(S - di[c] * span);
    const int64_t j0 = dj[c] >= 0 ? pick(S - dj[c] * span) : span + pick(S - span);
    for (int64_t s = 0; s < bar_len; ++s) img[(i0 + di[c] * s) * S + j0 + dj[c] * s] += 1.f;
    out.labels.push_back(c);
  }
  return out;
}

namespace {

constexpr float kEps = 1e-5f;

// Stem, final norm and head, shared by both classifiers: per-pixel linear 1 -> C, LayerNorm,
// mean over the L positions, linear C -> classes.
struct Shell {
  ParamList ps;
  Param *stem_w, *stem_b, *norm_w, *norm_b, *head_w, *head_b;
  Shell(int64_t C, Rng& rng) {
    stem_w = &ps.add("stem.weight", {C, 1});
    stem_b = &ps.add("stem.bias", {C}, true);
    norm_w = &ps.add("norm_f.weight", {C}, true);
    norm_b = &ps.add("norm_f.bias", {C}, true);
    head_w = &ps.add("head.weight", {kClasses, C});
    head_b = &ps.add("head.bias", {kClasses}, true);
    rng.fill_uniform(stem_w->value.f32(), -1, 1);
    rng.fill_uniform(stem_b->value.f32(), -1, 1);
    norm_w->value.f32().fill(1.f);
    const double b = 1.0 / std::sqrt(static_cast<double>(C));
    rng.fill_uniform(head_w->value.f32(), -b, b);
  }
  Tensor stem(const Tensor& img) const {  // (B, S, S, 1) -> (B, S, S, C)
    return ops::linear(img, stem_w->value, stem_b->value.f32());
  }
  // feats (B, L, C) -> logits (B, 1, classes); keeps what backward needs
  Tensor head(const Tensor& feats, Tensor* pooled_out) const {
    const int64_t B = feats.dim(0), L = feats.dim(1), C = feats.dim(2);
    Tensor xn = ops::layer_norm_fwd(feats, norm_w->value.f32(), norm_b->value.f32(), kEps);
    Tensor pooled = Tensor::zeros({B, C});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t c = 0; c < C; ++c) pooled[b * C + c] += xn[(b * L + l) * C + c] / L;
    if (pooled_out) *pooled_out = pooled;
    return ops::linear(pooled, head_w->value, head_b->value.f32()).reshape({B, 1, kClasses});
  }
  // dlogits (B, 1, classes) -> dfeats (B, L, C)
  Tensor head_bwd(const Tensor& feats, const Tensor& pooled, const Tensor& dlogits) {
    const int64_t B = feats.dim(0), L = feats.dim(1), C = feats.dim(2);
    Tensor dp = ops::linear_bwd(pooled, head_w->value, dlogits.reshape({B, kClasses}),
                                &head_w->grad(), &head_b->grad());
    Tensor dxn = Tensor::empty(feats.shape());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t c = 0; c < C; ++c) dxn[(b * L + l) * C + c] = dp[b * C + c] / L;
    ops::LayerNormGrads g =
        ops::layer_norm_bwd(feats, norm_w->value.f32(), norm_b->value.f32(), kEps, dxn);
    ops::add_into(norm_w->grad(), g.dweight);
    ops::add_into(norm_b->grad(), g.dbias);
    return g.dx;
  }
  void stem_bwd(const Tensor& img, const Tensor& dx) {
    ops::linear_bwd(img, stem_w->value, dx, &stem_w->grad(), &stem_b->grad());
  }
};

// The model interface the trainer uses.
struct Classifier {
  virtual ~Classifier() = default;
  virtual std::string name() const = 0;
  virtual Tensor forward(const Tensor& img, bool train) = 0;  // logits (B, 1, classes)
  virtual void backward(const Tensor& dlogits) = 0;
  virtual std::vector<std::pair<std::string, Param*>> params() = 0;
  virtual std::string shapes(const Tensor& img) = 0;
};

struct VssClassifier : Classifier {
  std::unique_ptr<Shell> shell;
  std::vector<VSSBlock> blocks;
  // saved
  Tensor img, feats, pooled;
  std::vector<VSSBlockSaved> saved;
  VssClassifier(const ExampleConfig& c, Rng& rng) {
    shell = std::make_unique<Shell>(c.dim, rng);
    VSSBlockConfig b;
    b.hidden_dim = c.dim;
    b.ssm_d_state = 4;
    b.ssm_ratio = 2.0;
    b.forward_type = "v05";
    b.mlp_ratio = 2.0;
    for (int64_t i = 0; i < c.vss_depth; ++i) blocks.emplace_back(b, c.seed + 100 + i);
  }
  std::string name() const override { return "VSSBlock (2-D scan)"; }
  Tensor forward(const Tensor& x, bool train) override {
    Tensor h = shell->stem(x);
    saved.assign(blocks.size(), {});
    for (size_t i = 0; i < blocks.size(); ++i)
      h = blocks[i].forward_cl(h, train ? &saved[i] : nullptr);
    const int64_t B = h.dim(0), L = h.dim(1) * h.dim(2), C = h.dim(3);
    feats = h.reshape({B, L, C});
    img = x;
    return shell->head(feats, &pooled);
  }
  void backward(const Tensor& dlogits) override {
    Tensor d = shell->head_bwd(feats, pooled, dlogits);
    d = d.reshape({img.dim(0), img.dim(1), img.dim(2), feats.dim(2)});
    for (size_t i = blocks.size(); i-- > 0;) d = blocks[i].backward_cl(saved[i], d);
    shell->stem_bwd(img, d);
  }
  std::vector<std::pair<std::string, Param*>> params() override {
    std::vector<std::pair<std::string, Param*>> v;
    for (auto& p : shell->ps.all()) v.emplace_back(p.name, &p);
    for (size_t i = 0; i < blocks.size(); ++i)
      for (auto& [n, p] : blocks[i].named_params()) v.emplace_back(str("layers.", i, ".", n), p);
    return v;
  }
  std::string shapes(const Tensor& x) override {
    const int64_t B = x.dim(0), S = x.dim(1),
                  C = blocks.empty() ? 0 : blocks[0].config().hidden_dim;
    return str("  ", name(), ": images ", x.shape_str(), " -> stem ", shape_str({B, S, S, C}),
               " -> VSSBlock x", blocks.size(), " (SS2D: 4 scan orders over ", S, "x", S,
               ", d_inner ", 2 * C, ", d_state 4; MLP ", 2 * C, ") ", shape_str({B, S, S, C}),
               " -> LayerNorm + mean over pixels ", shape_str({B, C}), " -> head ",
               shape_str({B, kClasses}));
  }
};

struct Mamba1Classifier : Classifier {
  std::unique_ptr<Shell> shell;
  std::vector<Mamba1> layers;
  ParamList norms;
  std::vector<Param*> nw, nb;
  Tensor img, feats, pooled;
  std::vector<Tensor> ins, normed;
  std::vector<Mamba1Saved> saved;
  Mamba1Classifier(const ExampleConfig& c, Rng& rng) {
    shell = std::make_unique<Shell>(c.dim, rng);
    Mamba1Config m;
    m.d_model = c.dim;
    m.d_state = 16;
    m.expand = 2;
    for (int64_t i = 0; i < c.mamba_depth; ++i) {
      layers.emplace_back(m, c.seed + 200 + i);
      nw.push_back(&norms.add(str("layers.", i, ".norm.weight"), {c.dim}, true));
      nb.push_back(&norms.add(str("layers.", i, ".norm.bias"), {c.dim}, true));
      nw.back()->value.f32().fill(1.f);
    }
  }
  std::string name() const override { return "Mamba-1 (row-major 1-D)"; }
  Tensor forward(const Tensor& x, bool train) override {
    Tensor h = shell->stem(x);
    const int64_t B = h.dim(0), L = h.dim(1) * h.dim(2), C = h.dim(3);
    h = h.reshape({B, L, C});  // row-major flattening: pixel (i, j) is step i S + j
    saved.assign(layers.size(), {});
    ins.assign(layers.size(), {});
    normed.assign(layers.size(), {});
    for (size_t i = 0; i < layers.size(); ++i) {
      Tensor n = ops::layer_norm_fwd(h, nw[i]->value.f32(), nb[i]->value.f32(), kEps);
      Tensor o = layers[i].forward(n, train ? &saved[i] : nullptr);
      ins[i] = h;
      h = h.clone();
      ops::add_into(h, o);
    }
    feats = h;
    img = x;
    return shell->head(feats, &pooled);
  }
  void backward(const Tensor& dlogits) override {
    Tensor d = shell->head_bwd(feats, pooled, dlogits);
    for (size_t i = layers.size(); i-- > 0;) {
      Tensor dn = layers[i].backward(saved[i], d);
      ops::LayerNormGrads g =
          ops::layer_norm_bwd(ins[i], nw[i]->value.f32(), nb[i]->value.f32(), kEps, dn);
      ops::add_into(nw[i]->grad(), g.dweight);
      ops::add_into(nb[i]->grad(), g.dbias);
      ops::add_into(d, g.dx);
    }
    shell->stem_bwd(img, d.reshape({img.dim(0), img.dim(1), img.dim(2), d.dim(2)}));
  }
  std::vector<std::pair<std::string, Param*>> params() override {
    std::vector<std::pair<std::string, Param*>> v;
    for (auto& p : shell->ps.all()) v.emplace_back(p.name, &p);
    for (auto& p : norms.all()) v.emplace_back(p.name, &p);
    for (size_t i = 0; i < layers.size(); ++i)
      for (auto& p : layers[i].params().all())
        v.emplace_back(str("layers.", i, ".mixer.", p.name), &p);
    return v;
  }
  std::string shapes(const Tensor& x) override {
    const int64_t B = x.dim(0), S = x.dim(1), C = layers.empty() ? 0 : layers[0].config().d_model;
    return str("  ", name(), ": images ", x.shape_str(), " -> stem ", shape_str({B, S, S, C}),
               " -> row-major sequence ", shape_str({B, S * S, C}), " -> (LayerNorm + Mamba-1 + ",
               "residual) x", layers.size(), " (d_inner ", 2 * C, ", d_state 16) ",
               shape_str({B, S * S, C}), " -> LayerNorm + mean over steps ", shape_str({B, C}),
               " -> head ", shape_str({B, kClasses}));
  }
};

void zero_grads(const std::vector<std::pair<std::string, Param*>>& ps) {
  for (auto& [n, p] : ps) p->grad().zero();
}

int64_t count(const std::vector<std::pair<std::string, Param*>>& ps) {
  int64_t n = 0;
  for (auto& [k, p] : ps) n += p->value.numel();
  return n;
}

}  // namespace

std::vector<ModelResult> run_example(const ExampleConfig& cfg,
                                     const std::function<void(const std::string&)>& log) {
  MAMBA_CHECK(cfg.steps >= 1 && cfg.batch >= 1 && cfg.eval_images >= 1,
              "vision example: steps, batch and eval_images must be >= 1");
  MAMBA_CHECK(cfg.dim >= 1 && cfg.vss_depth >= 1 && cfg.mamba_depth >= 1,
              "vision example: dim and depths must be >= 1");
  MAMBA_CHECK(std::isfinite(cfg.lr) && cfg.lr > 0, "vision example: lr must be > 0, got ", cfg.lr);
  Rng init(cfg.seed);
  std::vector<std::unique_ptr<Classifier>> models;
  models.push_back(std::make_unique<VssClassifier>(cfg, init));
  models.push_back(std::make_unique<Mamba1Classifier>(cfg, init));
  {
    Rng r(1);
    ImageBatch b = bars_batch(cfg.batch, cfg.image, cfg.bar_len, cfg.noise, r);
    log(str("shapes (batch ", cfg.batch, ", ", cfg.image, "x", cfg.image, " images, ", kClasses,
            " classes: horizontal, vertical, diagonal, anti-diagonal bars of ", cfg.bar_len,
            " px in noise std ", cfg.noise, "):"));
    for (auto& m : models) log(m->shapes(b.images));
  }
  std::vector<ModelResult> results;
  for (auto& m : models) {
    auto ps = m->params();
    train::AdamWConfig ac;
    ac.weight_decay = 0.01;
    train::AdamW opt(ps, ac);
    Rng data(cfg.seed + 12345);  // the same batches for both models
    ModelResult r;
    r.name = m->name();
    r.params = count(ps);
    const auto t0 = std::chrono::steady_clock::now();
    double tail = 0;
    int64_t tail_n = 0;
    for (int64_t s = 0; s < cfg.steps; ++s) {
      ImageBatch b = bars_batch(cfg.batch, cfg.image, cfg.bar_len, cfg.noise, data);
      zero_grads(ps);
      Tensor logits = m->forward(b.images, true);
      Tensor dlogits;
      train::LossResult lr = train::cross_entropy(logits, b.labels, &dlogits);
      m->backward(dlogits);
      train::clip_grad_norm(ps, 1.0);
      opt.step(
          train::lr_at(s, std::min<int64_t>(20, cfg.steps / 10), cfg.steps, cfg.lr, cfg.lr * 0.1));
      if (s >= cfg.steps - 20) tail += lr.loss, ++tail_n;
      if ((s + 1) % std::max<int64_t>(1, cfg.steps / 5) == 0)
        log(str("  ", r.name, " step ", s + 1, "/", cfg.steps, " loss ", lr.loss, " batch acc ",
                static_cast<double>(lr.correct) / static_cast<double>(lr.counted)));
    }
    r.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.final_train_loss = tail / static_cast<double>(std::max<int64_t>(tail_n, 1));
    Rng ev(cfg.seed + 999);  // the same held-out images for both models
    int64_t correct = 0, seen = 0;
    while (seen < cfg.eval_images) {
      const int64_t n = std::min<int64_t>(cfg.batch * 4, cfg.eval_images - seen);
      ImageBatch b = bars_batch(n, cfg.image, cfg.bar_len, cfg.noise, ev);
      train::LossResult lr = train::cross_entropy(m->forward(b.images, false), b.labels);
      correct += lr.correct;
      seen += n;
    }
    r.accuracy = static_cast<double>(correct) / static_cast<double>(seen);
    results.push_back(r);
  }
  return results;
}

}  // namespace mamba::vision
