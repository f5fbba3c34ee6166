// Test helpers: golden-file lookup, tensor comparison with a stated tolerance, random tensors.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <string>

#include "core/os.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/tensor.h"
#include "mamba/weight.h"
#include "tolerances.h"

namespace mamba::test {

inline std::string golden_path(const std::string& file) {
  return std::string(MAMBA_TEST_DATA) + "/golden/" + file;
}
inline std::string data_path(const std::string& file) {
  return std::string(MAMBA_TEST_DATA) + "/" + file;
}
// Files in ../shared (e.g. the tokenizer) that are never committed; "" if absent.
inline std::string shared_path(const std::string& rel) {
  std::string p = std::string(MAMBA_SHARED_DIR) + "/" + rel;
  return os::exists(p) ? p : std::string();
}

// Compares element-wise; on failure reports the worst element, its index and values.
inline ::testing::AssertionResult all_close(const Tensor& actual, const Tensor& expected,
                                            tol::Tol t, const std::string& what = "") {
  if (!actual.defined() || !expected.defined())
    return ::testing::AssertionFailure() << what << ": undefined tensor";
  if (actual.shape() != expected.shape())
    return ::testing::AssertionFailure()
           << what << ": shape " << actual.shape_str() << " vs expected " << expected.shape_str();
  double worst = 0, max_abs = 0;
  int64_t wi = -1;
  for (int64_t i = 0; i < actual.numel(); ++i) {
    double a = actual[i], e = expected[i];
    if (std::isnan(a) != std::isnan(e))
      return ::testing::AssertionFailure()
             << what << ": NaN mismatch at " << i << " (" << a << " vs " << e << ")";
    if (std::isnan(a)) continue;
    double err = std::fabs(a - e);
    max_abs = std::max(max_abs, err);
    double ratio = err / (t.atol + t.rtol * std::fabs(e));
    if (ratio > worst) worst = ratio, wi = i;
  }
  if (worst > 1.0)
    return ::testing::AssertionFailure()
           << what << ": element " << wi << " = " << actual[wi] << ", expected " << expected[wi]
           << " (|err| exceeds atol " << t.atol << " + rtol " << t.rtol << " * |e| by " << worst
           << "x; max abs err " << max_abs << ")";
  return ::testing::AssertionSuccess() << what << ": max abs err " << max_abs;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

inline Tensor randn(Shape shape, Rng& rng, double std = 1.0) {
  Tensor t(std::move(shape));
  rng.fill_normal(t, 0, std);
  return t;
}
inline Tensor rand_uniform(Shape shape, Rng& rng, double lo, double hi) {
  Tensor t(std::move(shape));
  rng.fill_uniform(t, lo, hi);
  return t;
}

// (B, X, Y) -> (B, Y, X): converts between the reference's (B, D, L) and our (B, L, D).
inline Tensor transpose12(const Tensor& t) {
  int64_t B = t.dim(0), X = t.dim(1), Y = t.dim(2);
  Tensor o = Tensor::empty({B, Y, X});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t x = 0; x < X; ++x)
      for (int64_t y = 0; y < Y; ++y) o[(b * Y + y) * X + x] = t[(b * X + x) * Y + y];
  return o;
}

// Central differences of loss() w.r.t. every element of p, dividing by the actually
// representable step (x+) - (x-) of the float input.
inline Tensor finite_diff(Tensor& p, const std::function<double()>& loss, double eps = 1e-3) {
  Tensor fd = Tensor::empty(p.shape());
  for (int64_t i = 0; i < p.numel(); ++i) {
    const float orig = p[i];
    p[i] = static_cast<float>(orig + eps);
    const double hi = p[i], lp = loss();
    p[i] = static_cast<float>(orig - eps);
    const double lo = p[i], lm = loss();
    p[i] = orig;
    fd[i] = static_cast<float>((lp - lm) / (hi - lo));
  }
  return fd;
}

// sum_i a[i] * g[i]: the loss sum(out * g) from a double-precision reference output.
inline double dot(const std::vector<double>& a, const Tensor& g) {
  double s = 0;
  for (int64_t i = 0; i < g.numel(); ++i) s += a[i] * g[i];
  return s;
}

// Expects f() to throw mamba::Error whose message contains every fragment.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    ADD_FAILURE() << "no mamba::Error thrown";
  } catch (const Error& e) {
    std::string m = e.what();
    for (const char* frag : fragments)
      EXPECT_NE(m.find(frag), std::string::npos)
          << "expected '" << frag << "' in the message: " << m;
  }
}

// Runs the mambacpp binary built with the tests (MAMBA_CLI_PATH) with `args` appended (shell
// syntax); returns its exit status (-1 if it did not exit normally) and stdout + stderr.
struct CliRun {
  int status;
  std::string out;
};
#ifdef MAMBA_CLI_PATH
inline CliRun run_cli(const std::string& args) {
  const std::string cmd = std::string("\"") + MAMBA_CLI_PATH + "\" " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) return {-1, ""};
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : -1, out};
}
#endif

// all_close, and a line with the max abs error (for the record).
inline ::testing::AssertionResult close_report(const Tensor& a, const Tensor& e, tol::Tol t,
                                               const std::string& what) {
  auto r = all_close(a, e, t, what);
  if (r) std::printf("  %-40s max abs err %.3g\n", what.c_str(), max_abs_diff(a, e));
  return r;
}

// A layer against a golden file: forward of "x" vs "y" (kGoldenF32), then backward of "g" vs
// "grad_x" and every parameter's "grad.<name>" (kGoldenGradF32). Returns y and the saved
// activations for the caller's further checks.
template <class Layer>
Tensor expect_golden_forward_backward(Layer& layer, const SafetensorsFile& f,
                                      const std::string& name, typename Layer::Saved& saved) {
  Tensor x = f.tensor("x"), g = f.tensor("g");
  Tensor y = layer.forward(x, &saved);
  EXPECT_TRUE(close_report(y, f.tensor("y"), tol::kGoldenF32, name + " y"));
  layer.params().zero_grad();
  Tensor dx = layer.backward(saved, g);
  EXPECT_TRUE(close_report(dx, f.tensor("grad_x"), tol::kGoldenGradF32, name + " grad_x"));
  for (auto& p : layer.params().all())
    EXPECT_TRUE(close_report(p.grad(), f.tensor("grad." + p.name), tol::kGoldenGradF32,
                             name + " grad." + p.name));
  return y;
}

// sum(y * g) in double over a layer's fp32 output: the loss of the finite-difference tests.
inline double loss_dot(const Tensor& y, const Tensor& g) {
  double s = 0;
  for (int64_t i = 0; i < y.numel(); ++i) s += static_cast<double>(y[i]) * g[i];
  return s;
}

// Every parameter += 0.1 * N(0, 1), as the golden files' init rule: nothing degenerate (zero
// biases, identical rows) for the finite-difference tests.
template <class Layer>
void spread_params(Layer& m, Rng& rng) {
  for (auto& p : m.params().all())
    for (int64_t i = 0; i < p.value.numel(); ++i)
      p.value.f32()[i] += 0.1f * static_cast<float>(rng.normal());
}

// A layer's backward (dx and every parameter's gradient, from zeroed gradients) against central
// finite differences of loss_dot(forward(x), g) with step eps (finite_diff). The layer computes
// in fp32, hence tol::kLayerFiniteDiffF32. `tag` starts every message. Returns the saved
// activations of the forward, for further checks.
template <class Layer>
typename Layer::Saved expect_grads_match_finite_diff(Layer& m, Tensor& x, const Tensor& g,
                                                     double eps, const std::string& tag = "") {
  typename Layer::Saved saved;
  m.forward(x, &saved);
  m.params().zero_grad();
  Tensor dx = m.backward(saved, g);
  const auto loss = [&] { return loss_dot(m.forward(x), g); };
  const auto check = [&](const Tensor& analytic, Tensor& wrt, const std::string& what) {
    auto r = all_close(analytic, finite_diff(wrt, loss, eps), tol::kLayerFiniteDiffF32, tag + what);
    EXPECT_TRUE(r);
    if (r) std::printf("  %s\n", r.message());
  };
  check(dx, x, "dx");
  for (auto& p : m.params().all()) check(p.grad(), p.value.f32(), "grad." + p.name);
  return saved;
}

// Parameter gradients accumulate: a second backward of the same activations doubles the gradient
// of `param` (after expect_grads_match_finite_diff, which leaves one backward's gradients).
template <class Layer>
void expect_grads_accumulate(Layer& m, const typename Layer::Saved& saved, const Tensor& g,
                             const std::string& param) {
  Tensor g1 = m.params().get(param).grad().clone();
  m.backward(saved, g);
  Tensor g2 = m.params().get(param).grad();
  for (int64_t i = 0; i < g1.numel(); ++i) g1[i] *= 2;
  EXPECT_TRUE(all_close(g2, g1, {1e-6, 1e-6}, "accumulate " + param));
}

// A bad layer config: cfg.validate() and constructing the layer from it both throw mamba::Error,
// the message naming `field`.
template <class Layer, class Config>
void expect_config_error(const Config& cfg, const std::string& field) {
  try {
    cfg.validate();
    ADD_FAILURE() << "no error for bad " << field;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
  }
  EXPECT_THROW(Layer{cfg}, Error);
}

// The process-wide activation type (mamba::set_activation_type) / thread count for a scope.
struct ActivationScope {
  ActivationType saved = activation_type();
  explicit ActivationScope(ActivationType t) { set_activation_type(t); }
  ~ActivationScope() { set_activation_type(saved); }
};
struct ThreadScope {
  int saved = num_threads();
  explicit ThreadScope(int n) { set_num_threads(n); }
  ~ThreadScope() { set_num_threads(saved); }
};

}  // namespace mamba::test
