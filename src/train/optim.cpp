// AdamW (decoupled weight decay), global-norm gradient clipping and the LR schedule.
#include <algorithm>
#include <cmath>

#include "core/os.h"
#include "mamba/parallel.h"
#include "mamba/train.h"

namespace mamba::train {

bool uses_weight_decay(const std::string& name, const Param& p) {
  if (p.no_weight_decay) return false;                    // A_log, D, dt biases, norms, biases
  if (p.value.shape().size() < 2) return false;           // any other vector (a bias or a scale)
  if (name == "backbone.embedding.weight") return false;  // embedding (and the tied head)
  return true;
}

AdamW::AdamW(std::vector<std::pair<std::string, Param*>> params, AdamWConfig cfg)
    : params_(std::move(params)), cfg_(cfg) {
  MAMBA_CHECK(cfg_.beta1 >= 0 && cfg_.beta1 < 1, "AdamW: beta1 must be in [0, 1), got ",
              cfg_.beta1);
  MAMBA_CHECK(cfg_.beta2 >= 0 && cfg_.beta2 < 1, "AdamW: beta2 must be in [0, 1), got ",
              cfg_.beta2);
  MAMBA_CHECK(cfg_.eps > 0, "AdamW: eps must be > 0, got ", cfg_.eps);
  MAMBA_CHECK(cfg_.weight_decay >= 0, "AdamW: weight_decay must be >= 0, got ", cfg_.weight_decay);
  // Training memory beyond the weights: a gradient and two moments per parameter (fp32). The
  // gradients are allocated here, not with the model (inference never holds them), after one
  // check of the whole, so a model too large to train fails before anything is taken.
  double n = 0;
  for (auto& [name, p] : params_) n += static_cast<double>(p->value.numel());
  const double bytes = n * 12.0;
  os::check_memory(
      bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes),
      str("training ", static_cast<int64_t>(n), " parameters (fp32 gradients and AdamW moments)"));
  for (auto& [name, p] : params_) {
    p->grad();  // throws "inference only" for 16-bit weights
    decay_.push_back(uses_weight_decay(name, *p));
    m_.push_back(Tensor::zeros(p->value.shape()));
    v_.push_back(Tensor::zeros(p->value.shape()));
  }
}

void AdamW::step(double lr) {
  ++t_;
  const double b1 = cfg_.beta1, b2 = cfg_.beta2;
  const double bc1 = 1.0 - std::pow(b1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(b2, static_cast<double>(t_));
  const float step_size = static_cast<float>(lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float eps = static_cast<float>(cfg_.eps);
  const float fb1 = static_cast<float>(b1), fb2 = static_cast<float>(b2);
  const float a1 = static_cast<float>(1.0 - b1), a2 = static_cast<float>(1.0 - b2);
  for (size_t i = 0; i < params_.size(); ++i) {
    Param& p = *params_[i].second;
    const float keep = decay_[i] ? static_cast<float>(1.0 - lr * cfg_.weight_decay) : 1.f;
    float* w = p.value.f32(p.name.c_str()).data();  // throws "inference only" for 16-bit weights
    const float* g = p.grad().data();
    float* m = m_[i].data();
    float* v = v_[i].data();
    // Element-wise: any split over threads gives the same bits.
    parallel_for(p.value.numel(), 16384, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) {
        w[j] *= keep;
        m[j] = fb1 * m[j] + a1 * g[j];
        v[j] = fb2 * v[j] + a2 * g[j] * g[j];
        w[j] -= step_size * m[j] / (std::sqrt(v[j]) * inv_sqrt_bc2 + eps);
      }
    });
  }
}

std::vector<std::pair<std::string, Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i)
    out.emplace_back("exp_avg." + params_[i].first, m_[i]);
  for (size_t i = 0; i < params_.size(); ++i)
    out.emplace_back("exp_avg_sq." + params_[i].first, v_[i]);
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, Tensor>>& tensors, int64_t steps) {
  MAMBA_CHECK(steps >= 0, "AdamW::load_state: step count must be >= 0, got ", steps);
  auto find = [&](const std::string& name, const Tensor& like) {
    for (const auto& [n, t] : tensors)
      if (n == name) {
        MAMBA_CHECK(t.shape() == like.shape(), "optimizer state: tensor '", name, "' has shape ",
                    t.shape_str(), ", expected ", like.shape_str());
        return t;
      }
    throw Error(str("optimizer state: missing tensor '", name, "'"));
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    m_[i].copy_from(find("exp_avg." + params_[i].first, m_[i]));
    v_[i].copy_from(find("exp_avg_sq." + params_[i].first, v_[i]));
  }
  t_ = steps;
}

double clip_grad_norm(const std::vector<std::pair<std::string, Param*>>& params, double max_norm) {
  double sq = 0;
  for (const auto& [name, p] : params) {
    const float* g = p->grad().data();
    double s = 0;
    for (int64_t j = 0; j < p->grad().numel(); ++j) s += static_cast<double>(g[j]) * g[j];
    sq += s;
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0 && norm > max_norm) {
    const float c = static_cast<float>(max_norm / (norm + 1e-6));
    for (const auto& [name, p] : params) {
      float* g = p->grad().data();
      for (int64_t j = 0; j < p->grad().numel(); ++j) g[j] *= c;
    }
  }
  return norm;
}

double lr_at(int64_t step, int64_t warmup, int64_t total, double lr, double min_lr) {
  if (warmup > 0 && step < warmup)
    return lr * static_cast<double>(step + 1) / static_cast<double>(warmup);
  const int64_t span = total - warmup;
  if (span <= 0) return lr;
  double progress = static_cast<double>(step - warmup) / static_cast<double>(span);
  progress = std::min(1.0, std::max(0.0, progress));
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(3.14159265358979323846 * progress));
}

}  // namespace mamba::train
