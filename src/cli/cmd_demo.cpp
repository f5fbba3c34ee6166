// mambacpp demo: a short tour that shows the layers working end to end — parameter counts
// that match mamba_ssm, the shape trace, full-sequence forward == step-by-step decode,
// backward checked by finite differences, and the speed of a mamba-130m-sized layer.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/trace.h"

namespace mamba::cli {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Full forward vs one token at a time through step(): max |difference|.
template <class Layer>
double step_vs_full(Layer& layer, const Tensor& x) {
  const int64_t B = x.dim(0), L = x.dim(1), C = x.dim(2);
  Tensor y = layer.forward(x);
  auto state = layer.new_state(B);
  double worst = 0;
  for (int64_t t = 0; t < L; ++t) {
    Tensor xt({B, C});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c) xt[b * C + c] = x[(b * L + t) * C + c];
    Tensor yt = layer.step(xt, state);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < C; ++c)
        worst = std::max(worst, (double)std::fabs(yt[b * C + c] - y[(b * L + t) * C + c]));
  }
  return worst;
}

// d sum(y*g) / d param[idx]: backward vs central finite difference.
template <class Layer, class Saved>
void grad_check(Layer& layer, const Tensor& x, const char* pname, int64_t idx) {
  Rng rng(7);
  Tensor g(x.shape());
  rng.fill_normal(g);
  auto loss = [&] {
    Tensor y = layer.forward(x);
    double s = 0;
    for (int64_t i = 0; i < y.numel(); ++i) s += (double)y[i] * g[i];
    return s;
  };
  layer.params().zero_grad();
  Saved saved;
  layer.forward(x, &saved);
  layer.backward(saved, g);
  Param& p = layer.params().get(pname);
  const float orig = p.value[idx], eps = 1e-2f;
  p.value[idx] = orig + eps;
  double lp = loss();
  float hi = p.value[idx];
  p.value[idx] = orig - eps;
  double lm = loss();
  float lo = p.value[idx];
  p.value[idx] = orig;
  std::printf("  d loss / d %s[%lld]: backward %.6f, finite difference %.6f\n", pname,
              (long long)idx, p.grad[idx], (lp - lm) / ((double)hi - lo));
}
}  // namespace

Command add_demo(CLI::App& app) {
  auto threads = std::make_shared<int>(0);
  auto* sub = app.add_subcommand("demo", "A short tour: parameter counts, shape trace, decode == forward, "
                                         "gradients, speed");
  sub->add_option("--threads", *threads, "threads (0 = all cores)")->capture_default_str();
  return {sub, [threads] {
            set_num_threads(*threads);
            Rng rng(0);
            std::printf("== 1. Mamba-1 layer, mamba_ssm's Mamba(d_model=16, d_state=64, d_conv=4, expand=2)\n");
            Mamba1Config c1;
            c1.d_model = 16, c1.d_state = 64;
            Mamba1 m1(c1, 0);
            std::printf("  parameters: %lld (mamba_ssm: 7968)\n", (long long)m1.params().count());
            Tensor x({2, 32, 16});
            rng.fill_normal(x);
            std::printf("\n== 2. Shape trace of its forward over x %s\n", x.shape_str().c_str());
            trace::set_stream(&std::cout);
            trace::set_enabled(true);
            {
              trace::Scope s("  ");
              m1.forward(x);
            }
            trace::set_enabled(false);
            std::printf("\n== 3. Full-sequence forward vs step-by-step decode (constant-size state)\n");
            std::printf("  Mamba-1: max |y_full - y_step| = %.2e\n", step_vs_full(m1, x));
            Mamba2Config c2;
            c2.d_model = 64, c2.d_state = 16, c2.headdim = 16, c2.chunk_size = 8;
            Mamba2 m2(c2, 0);
            Tensor x2({2, 21, 64});
            rng.fill_normal(x2);
            std::printf("  Mamba-2 (d_model 64, %lld parameters, chunk 8, L 21): max |y_full - y_step| = %.2e\n",
                        (long long)m2.params().count(), step_vs_full(m2, x2));
            std::printf("\n== 4. Backward vs finite differences (loss = sum(y * g))\n");
            grad_check<Mamba1, Mamba1Saved>(m1, x, "A_log", 5);
            grad_check<Mamba1, Mamba1Saved>(m1, x, "in_proj.weight", 17);
            grad_check<Mamba2, Mamba2Saved>(m2, x2, "dt_bias", 3);
            std::printf("\n== 5. Speed: one mamba-130m layer (d_model 768, d_state 16), B=1, L=2048, %d threads\n",
                        num_threads());
            Mamba1Config cb;
            cb.d_model = 768;
            Mamba1 big(cb, 0);
            Tensor xb({1, 2048, 768});
            rng.fill_normal(xb);
            big.forward(xb);
            auto t0 = std::chrono::steady_clock::now();
            big.forward(xb);
            double s = seconds_since(t0);
            std::printf("  forward: %.1f ms, %.0f tokens/s\n", s * 1e3, 2048 / s);
            auto st = big.new_state(1);
            Tensor xt({1, 768});
            rng.fill_normal(xt);
            t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < 200; ++i) big.step(xt, st);
            s = seconds_since(t0);
            std::printf("  decode step: %.1f us/token\n", s / 200 * 1e6);
            return 0;
          }};
}

}  // namespace mamba::cli
