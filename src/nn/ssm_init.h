// mamba_ssm's initialisation of the selective-scan parameters, shared by every layer that has
// them (Mamba1, BiMamba's two directions, SS2D's four): dt_proj's weight, dt_proj's bias
// (softplus^-1 of a log-uniform dt) and the S4D-real A_log. Each draws from the caller's Rng in
// the order mamba_ssm does, so the layers' inits stay equal to the reference's.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "mamba/rng.h"
#include "mamba/tensor.h"

namespace mamba::nn_init {

// dt_proj.weight: constant or uniform(+-dt_rank^-0.5 * dt_scale).
inline void dt_proj_weight(Rng& rng, Tensor& w, int64_t dt_rank, double dt_scale,
                           const std::string& dt_init) {
  const double dt_std = std::pow(static_cast<double>(dt_rank), -0.5) * dt_scale;
  if (dt_init == "constant")
    w.fill(static_cast<float>(dt_std));
  else
    rng.fill_uniform(w, -dt_std, dt_std);
}

// dt_proj.bias (n entries from `b`): dt ~ exp(U(log dt_min, log dt_max)) clamped below at floor;
// bias = softplus^-1(dt).
inline void dt_bias(Rng& rng, float* b, int64_t n, double dt_min, double dt_max, double floor) {
  const double lmin = std::log(dt_min), lmax = std::log(dt_max);
  for (int64_t d = 0; d < n; ++d) {
    const double dt = std::max(std::exp(rng.uniform() * (lmax - lmin) + lmin), floor);
    b[d] = static_cast<float>(dt + std::log(-std::expm1(-dt)));
  }
}

// S4D-real A_log: row r, column n = log(n + 1), for `rows` rows of N.
inline void a_log_s4d(float* a, int64_t rows, int64_t N) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t n = 0; n < N; ++n) a[r * N + n] = static_cast<float>(std::log(double(n + 1)));
}

}  // namespace mamba::nn_init
