// Cross-entropy over the LM head with an ignore index; mean over the counted positions.
#include <algorithm>
#include <cmath>

#include "mamba/parallel.h"
#include "mamba/train.h"

namespace mamba::train {

LossResult cross_entropy(const Tensor& logits, const std::vector<int32_t>& targets, Tensor* dlogits,
                         double denom) {
  check_defined(logits, "cross_entropy: logits");
  MAMBA_CHECK(logits.ndim() >= 2, "cross_entropy: logits must be (B, L, V) or (M, V), got ",
              logits.shape_str());
  const int64_t V = logits.dim(-1), M = logits.numel() / V;
  MAMBA_CHECK(static_cast<int64_t>(targets.size()) == M, "cross_entropy: expected ", M,
              " targets (one per logits row of ", logits.shape_str(), "), got ", targets.size());
  int64_t counted = 0;
  for (int64_t i = 0; i < M; ++i) {
    const int32_t t = targets[i];
    MAMBA_CHECK(t == kIgnoreIndex || (t >= 0 && t < V), "cross_entropy: target ", t, " at row ", i,
                " is outside [0, ", V, ") and not the ignore index ", kIgnoreIndex);
    counted += t != kIgnoreIndex;
  }
  if (denom <= 0) denom = static_cast<double>(std::max<int64_t>(counted, 1));
  if (dlogits) {
    if (!dlogits->defined() || dlogits->shape() != logits.shape())
      *dlogits = Tensor::empty(logits.shape());
  }
  // Per-row results, summed afterwards in row order (deterministic for any thread count).
  std::vector<double> nll(M, 0.0);
  std::vector<uint8_t> hit(M, 0);
  const float* lg = logits.data();
  float* dl = dlogits ? dlogits->data() : nullptr;
  const double inv = 1.0 / denom;
  parallel_for(M, std::max<int64_t>(1, 4096 / std::max<int64_t>(V, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float* row = lg + i * V;
      const int32_t t = targets[i];
      if (t == kIgnoreIndex) {
        if (dl) std::fill(dl + i * V, dl + (i + 1) * V, 0.f);
        continue;
      }
      int64_t am = 0;
      double mx = row[0];
      for (int64_t j = 1; j < V; ++j)
        if (row[j] > mx) mx = row[j], am = j;
      double s = 0;
      for (int64_t j = 0; j < V; ++j) s += std::exp(static_cast<double>(row[j]) - mx);
      const double lse = mx + std::log(s);
      nll[i] = lse - row[t];
      hit[i] = am == t;
      if (dl) {
        for (int64_t j = 0; j < V; ++j)
          dl[i * V + j] =
              static_cast<float>((std::exp(static_cast<double>(row[j]) - lse) - (j == t)) * inv);
      }
    }
  });
  LossResult r;
  r.counted = counted;
  for (int64_t i = 0; i < M; ++i) {
    r.sum_nll += nll[i];
    r.correct += hit[i];
  }
  r.loss = r.sum_nll / denom;
  return r;
}

}  // namespace mamba::train
