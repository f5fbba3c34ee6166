// GatedMLP (mamba_ssm.modules.mlp.GatedMLP): golden files from mamba_ssm (forward and every
// gradient), the hidden-size rounding and parameter counts, finite differences in double, the
// decode call on (B, in), bf16 weights, config and shape errors.
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <type_traits>
#include <vector>

#include "mamba/nn/mlp.h"
#include "test_util.h"

using namespace mamba;

namespace {

GatedMLPConfig config_from_json(const std::string& js) {
  auto j = nlohmann::json::parse(js);
  GatedMLPConfig c;
  c.in_features = j.at("in_features").get<int64_t>();
  if (j.contains("hidden_features")) c.hidden_features = j["hidden_features"].get<int64_t>();
  if (j.contains("out_features")) c.out_features = j["out_features"].get<int64_t>();
  if (j.contains("bias")) c.bias = j["bias"].get<bool>();
  if (j.contains("multiple_of")) c.multiple_of = j["multiple_of"].get<int64_t>();
  return c;
}

using test::close_report;

// The spec in double: y = fc2(value * silu(gate)), [value | gate] = fc1(x); x (M, in) row-major.
struct RefMLP {
  int64_t in, H, out;
  std::vector<double> w1, b1, w2, b2;  // (2H, in), (2H) or empty, (out, H), (out) or empty
  std::vector<double> forward(const std::vector<double>& x) const {
    const int64_t M = static_cast<int64_t>(x.size()) / in;
    std::vector<double> y(M * out);
    std::vector<double> h(H);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < H; ++j) {
        double v = b1.empty() ? 0 : b1[j], g = b1.empty() ? 0 : b1[H + j];
        for (int64_t k = 0; k < in; ++k) {
          v += w1[j * in + k] * x[m * in + k];
          g += w1[(H + j) * in + k] * x[m * in + k];
        }
        h[j] = v * g / (1 + std::exp(-g));
      }
      for (int64_t o = 0; o < out; ++o) {
        double s = b2.empty() ? 0 : b2[o];
        for (int64_t j = 0; j < H; ++j) s += w2[o * H + j] * h[j];
        y[m * out + o] = s;
      }
    }
    return y;
  }
};

std::vector<double> to_f64(const Tensor& t) {
  std::vector<double> v(t.numel());
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = t[i];
  return v;
}

}  // namespace

class GatedMLPGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(GatedMLPGolden, ForwardAndEveryGradient) {
  const std::string name = GetParam();
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  GatedMLP layer(config_from_json(f.meta("config")));
  EXPECT_EQ(layer.params().count(), std::stoll(f.meta("param_count")));
  EXPECT_EQ(layer.hidden(), std::stoll(f.meta("hidden_rounded")));
  std::string names;
  for (const auto& p : layer.params().all()) names += (names.empty() ? "" : ",") + p.name;
  EXPECT_EQ(names, f.meta("param_names"));
  layer.params().load(f, "params.");

  // kGoldenF32: fp32 on both sides, sums in another order (64..128-term dots here);
  // kGoldenGradF32: parameter gradients sum over the B*L = 22 rows as well.
  GatedMLPSaved saved;
  test::expect_golden_forward_backward(layer, f, name, saved);
}

INSTANTIATE_TEST_SUITE_P(Golden, GatedMLPGolden,
                         ::testing::Values("gated_mlp_d64_i96", "gated_mlp_d40_i72_bias_m16_o24"));

TEST(GatedMLP, ParamCountsAndShapes) {
  GatedMLPConfig a;
  a.in_features = 64;
  a.hidden_features = 96;
  GatedMLP m(a);
  EXPECT_EQ(m.hidden(), 128);
  EXPECT_EQ(m.params().count(), 24576);
  EXPECT_EQ(m.params().get("fc1.weight").value.shape(), (Shape{256, 64}));
  EXPECT_EQ(m.params().get("fc2.weight").value.shape(), (Shape{64, 128}));
  EXPECT_FALSE(m.params().has("fc1.bias"));
  EXPECT_TRUE(m.params().get("fc1.weight").matrix);
  EXPECT_TRUE(m.params().get("fc2.weight").matrix);

  GatedMLPConfig b;
  b.in_features = 40;
  b.hidden_features = 72;
  b.out_features = 24;
  b.bias = true;
  b.multiple_of = 16;
  GatedMLP n(b);
  EXPECT_EQ(n.hidden(), 80);
  EXPECT_EQ(n.params().count(), 8504);
  EXPECT_EQ(n.params().get("fc1.bias").value.shape(), (Shape{160}));
  EXPECT_EQ(n.params().get("fc2.weight").value.shape(), (Shape{24, 80}));
  EXPECT_EQ(n.params().get("fc2.bias").value.shape(), (Shape{24}));
  EXPECT_FALSE(n.params().get("fc2.bias").matrix);

  // nn.Linear's init: |w| <= 1/sqrt(fan_in), not all zero; a seed gives the same values again.
  const Tensor& w1 = n.params().get("fc1.weight").value.f32();
  const Tensor& w2 = n.params().get("fc2.weight").value.f32();
  double m1 = 0, m2 = 0;
  for (int64_t i = 0; i < w1.numel(); ++i) m1 = std::max(m1, (double)std::fabs(w1[i]));
  for (int64_t i = 0; i < w2.numel(); ++i) m2 = std::max(m2, (double)std::fabs(w2[i]));
  EXPECT_LE(m1, 1 / std::sqrt(40.0));
  EXPECT_GT(m1, 0.5 / std::sqrt(40.0));
  EXPECT_LE(m2, 1 / std::sqrt(80.0));
  EXPECT_GT(m2, 0.5 / std::sqrt(80.0));
  GatedMLP n2(b);
  EXPECT_EQ(test::max_abs_diff(n2.params().get("fc1.weight").value.f32(), w1), 0.0);
}

TEST(GatedMLP, HiddenRounding) {
  auto hidden = [](int64_t in, int64_t hf, int64_t mult) {
    GatedMLPConfig c;
    c.in_features = in;
    c.hidden_features = hf;
    c.multiple_of = mult;
    return c.hidden();
  };
  // default int(8 * in / 3): 64 -> 170 -> 256; 48 -> 128 -> 128; 2560 -> 6826 -> 6912
  EXPECT_EQ(hidden(64, 0, 128), 256);
  EXPECT_EQ(hidden(48, 0, 128), 128);
  EXPECT_EQ(hidden(2560, 0, 128), 6912);
  EXPECT_EQ(hidden(64, 0, 1), 170);
  EXPECT_EQ(hidden(3, 0, 1), 8);
  EXPECT_EQ(hidden(1, 0, 1), 2);
  // explicit hidden_features, rounded up (never down)
  EXPECT_EQ(hidden(64, 96, 128), 128);
  EXPECT_EQ(hidden(40, 72, 16), 80);
  EXPECT_EQ(hidden(40, 80, 16), 80);
  EXPECT_EQ(hidden(40, 81, 16), 96);
  EXPECT_EQ(hidden(40, 7, 1), 7);
  EXPECT_EQ(hidden(8, 129, 128), 256);
  GatedMLPConfig c;
  c.in_features = 12;
  EXPECT_EQ(c.out(), 12);
  c.out_features = 5;
  EXPECT_EQ(c.out(), 5);
}

TEST(GatedMLP, BackwardFiniteDifferencesInDouble) {
  // A tiny layer with biases and out != in. The loss sum(y * g) is evaluated by the double
  // reference above (the spec), differenced centrally with eps 1e-3 (kFiniteDiff); the layer's
  // fp32 backward must match those gradients, and its forward the reference's output.
  Rng rng(7);
  GatedMLPConfig c;
  c.in_features = 5;
  c.hidden_features = 6;
  c.multiple_of = 4;  // H = 8
  c.out_features = 3;
  c.bias = true;
  GatedMLP m(c, 3);
  for (auto& p : m.params().all())
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.f32()[i] += 0.3f * (float)rng.normal();
  const int64_t B = 2, L = 3;
  Tensor x = test::randn({B, L, 5}, rng), g = test::randn({B, L, 3}, rng);
  GatedMLPSaved saved;
  Tensor y = m.forward(x, &saved);
  m.params().zero_grad();
  Tensor dx = m.backward(saved, g);

  auto& ps = m.params();
  RefMLP ref{5,
             m.hidden(),
             3,
             to_f64(ps.get("fc1.weight").value.f32()),
             to_f64(ps.get("fc1.bias").value.f32()),
             to_f64(ps.get("fc2.weight").value.f32()),
             to_f64(ps.get("fc2.bias").value.f32())};
  std::vector<double> xd = to_f64(x), gd = to_f64(g);
  {
    std::vector<double> yr = ref.forward(xd);
    Tensor yt = Tensor::empty(y.shape());
    for (int64_t i = 0; i < yt.numel(); ++i) yt[i] = (float)yr[i];
    EXPECT_TRUE(close_report(y, yt, tol::kFastVsRef, "forward vs double reference"));
  }
  auto loss = [&]() {
    std::vector<double> yr = ref.forward(xd);
    double s = 0;
    for (size_t i = 0; i < yr.size(); ++i) s += yr[i] * gd[i];
    return s;
  };
  const double eps = 1e-3;
  auto fd_of = [&](std::vector<double>& v) {
    Tensor fd = Tensor::empty({static_cast<int64_t>(v.size())});
    for (size_t i = 0; i < v.size(); ++i) {
      const double orig = v[i];
      v[i] = orig + eps;
      const double lp = loss();
      v[i] = orig - eps;
      const double lm = loss();
      v[i] = orig;
      fd[static_cast<int64_t>(i)] = (float)((lp - lm) / (2 * eps));
    }
    return fd;
  };
  auto check = [&](const Tensor& analytic, std::vector<double>& wrt, const std::string& what) {
    EXPECT_TRUE(
        close_report(analytic.reshape({analytic.numel()}), fd_of(wrt), tol::kFiniteDiff, what));
  };
  check(dx, xd, "dx");
  check(ps.get("fc1.weight").grad(), ref.w1, "grad.fc1.weight");
  check(ps.get("fc1.bias").grad(), ref.b1, "grad.fc1.bias");
  check(ps.get("fc2.weight").grad(), ref.w2, "grad.fc2.weight");
  check(ps.get("fc2.bias").grad(), ref.b2, "grad.fc2.bias");

  // Parameter gradients accumulate: a second backward doubles them; dx is written, not added.
  Tensor g1 = m.params().get("fc1.weight").grad().clone();
  Tensor dx2 = m.backward(saved, g);
  EXPECT_EQ(test::max_abs_diff(dx2, dx), 0.0);
  Tensor g2 = m.params().get("fc1.weight").grad();
  for (int64_t i = 0; i < g1.numel(); ++i) g1[i] *= 2;
  EXPECT_TRUE(test::all_close(g2, g1, {1e-6, 1e-6}, "accumulate"));
}

TEST(GatedMLP, DecodeCallOnBatchRowsEqualsSequenceOfOne) {
  // The MLP has no state: decode is forward on (B, in); it must equal forward on (B, 1, in)
  // (same rows, same kernels: bit for bit), and each row alone equals its row in the batch up
  // to the kernel's summation order (kStepVsFull).
  Rng rng(11);
  GatedMLPConfig c;
  c.in_features = 24;
  c.hidden_features = 40;
  c.multiple_of = 16;
  c.bias = true;
  GatedMLP m(c, 5);
  const int64_t B = 3;
  Tensor x = test::randn({B, 24}, rng);
  Tensor y2 = m.forward(x);
  ASSERT_EQ(y2.shape(), (Shape{B, 24}));
  Tensor y3 = m.forward(x.reshape({B, 1, 24}));
  ASSERT_EQ(y3.shape(), (Shape{B, 1, 24}));
  EXPECT_EQ(test::max_abs_diff(y2, y3.reshape({B, 24})), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    Tensor yb = m.forward(x.select(b));  // (in) -> (out)
    ASSERT_EQ(yb.shape(), (Shape{24}));
    EXPECT_TRUE(test::all_close(yb, y2.select(b), tol::kStepVsFull, "row"));
  }
  // A longer sequence: rows of (B, L, in) equal the same rows as a (B * L, in) batch.
  Tensor xs = test::randn({2, 20, 24}, rng);
  EXPECT_EQ(test::max_abs_diff(m.forward(xs).reshape({40, 24}), m.forward(xs.reshape({40, 24}))),
            0.0);
}

TEST(GatedMLP, Bf16WeightsAreInferenceOnly) {
  auto f = SafetensorsFile::open(test::golden_path("gated_mlp_d64_i96.safetensors"));
  GatedMLP m(config_from_json(f.meta("config")));
  m.params().load(f, "params.");
  Tensor x = f.tensor("x");
  GatedMLPSaved saved;
  Tensor y32 = m.forward(x, &saved);

  GatedMLP rounded(config_from_json(f.meta("config")));
  rounded.params().load(f, "params.");
  rounded.params().set_weight_dtype(WeightDType::bf16);
  rounded.params().set_weight_dtype(WeightDType::f32);  // fp32 storage of the rounded values

  m.params().set_weight_dtype(WeightDType::bf16);
  EXPECT_EQ(m.params().weight_dtype(), WeightDType::bf16);
  Tensor y16 = m.forward(x);
  // Against fp32 holding the same rounded weights: only the summation order differs.
  EXPECT_TRUE(close_report(y16, rounded.forward(x), tol::kHalfVsRoundedF32, "bf16 vs rounded"));
  // Against the original fp32 weights: 2^-8 relative per weight (kBf16VsF32Logits's argument;
  // here |y| up to 3.3 through two 64..128-term dots).
  EXPECT_TRUE(close_report(y16, y32, tol::kBf16VsF32Logits, "bf16 vs f32"));
  // Decode rows on bf16 weights (the streaming kernel) agree with the prefill GEMM.
  Tensor row = x.reshape({22, 64}).narrow(0, 2);
  EXPECT_TRUE(test::all_close(m.forward(row), y16.reshape({22, 64}).narrow(0, 2),
                              tol::kHalfVsRoundedF32, "bf16 decode rows"));

  test::expect_error([&] { m.backward(saved, f.tensor("g")); },
                     {"GatedMLP::backward", "weights are bf16", "inference only"});
  GatedMLPSaved s2;
  test::expect_error([&] { m.forward(x, &s2); }, {"GatedMLP::forward", "inference only"});
  // Back to f32: trainable again.
  m.params().set_weight_dtype(WeightDType::f32);
  GatedMLPSaved s3;
  m.forward(x, &s3);
  EXPECT_NO_THROW(m.backward(s3, f.tensor("g")));
}

TEST(GatedMLP, ConfigValidation) {
  auto expect_error = [](const GatedMLPConfig& c, const std::string& field) {
    test::expect_config_error<GatedMLP>(c, field);
  };
  GatedMLPConfig ok;
  ok.in_features = 8;
  EXPECT_NO_THROW(ok.validate());
  GatedMLPConfig c = ok;
  c.in_features = 0;
  expect_error(c, "in_features");
  c = ok;
  c.hidden_features = -1;
  expect_error(c, "hidden_features");
  c = ok;
  c.out_features = -3;
  expect_error(c, "out_features");
  c = ok;
  c.multiple_of = 0;
  expect_error(c, "multiple_of");
  c = ok;
  c.in_features = int64_t{1} << 62;  // 8 * in would overflow: refused before any arithmetic
  expect_error(c, "in_features");
  c = ok;
  c.multiple_of = INT64_MAX;
  expect_error(c, "multiple_of");
  // The smallest default: in_features 1, multiple_of 1 gives int(8 / 3) = 2.
  c = ok;
  c.in_features = 1;
  c.multiple_of = 1;
  EXPECT_EQ(GatedMLP(c).hidden(), 2);
}

TEST(GatedMLP, ShapeErrorsNameTheTensor) {
  GatedMLPConfig c;
  c.in_features = 8;
  c.hidden_features = 16;
  c.multiple_of = 8;
  c.out_features = 4;
  GatedMLP m(c);
  test::expect_error([&] { m.forward(Tensor({2, 7})); }, {"GatedMLP::forward: x", "(2,7)"});
  test::expect_error([&] { m.forward(Tensor({2, 3, 4})); }, {"GatedMLP::forward: x"});
  test::expect_error([&] { m.forward(Tensor()); }, {"GatedMLP::forward: x"});
  test::expect_error([&] { m.forward(Tensor({0, 8})); }, {"GatedMLP::forward: x"});
  GatedMLPSaved saved;
  m.forward(Tensor({2, 3, 8}), &saved);
  test::expect_error([&] { m.backward(saved, Tensor({2, 3, 8})); }, {"GatedMLP::backward: dy"});
  test::expect_error([&] { m.backward(saved, Tensor({2, 4, 4})); }, {"GatedMLP::backward: dy"});
  test::expect_error(
      [&] {
        m.backward(GatedMLPSaved{}, Tensor({2, 3, 4}));
      },
      {"GatedMLP::backward: saved.x"});
  EXPECT_NO_THROW(m.backward(saved, Tensor({2, 3, 4})));
}

TEST(GatedMLP, MovedLayerKeepsItsParameters) {
  GatedMLPConfig c;
  c.in_features = 6;
  c.hidden_features = 8;
  c.multiple_of = 4;
  c.bias = true;
  GatedMLP a(c, 1);
  Rng rng(2);
  Tensor x = test::randn({3, 6}, rng);
  Tensor y = a.forward(x);
  GatedMLP b = std::move(a);
  EXPECT_EQ(test::max_abs_diff(b.forward(x), y), 0.0);
  GatedMLPSaved s;
  b.forward(x, &s);
  b.params().zero_grad();
  b.backward(s, Tensor::full({3, 6}, 1.f));
  double n = 0;
  for (auto& p : b.params().all())
    for (int64_t i = 0; i < p.grad().numel(); ++i) n += std::fabs(p.grad()[i]);
  EXPECT_GT(n, 0.0);
  static_assert(!std::is_copy_constructible_v<GatedMLP>);
}
