// The ops of VMamba's SS2D: the 2-D cross scan (strided kernel and copy path vs the naive
// reference, forward and every gradient; finite differences in double), the depthwise conv2d,
// LayerNorm and exact-erf GELU (fast vs reference, finite differences in double), the layout
// transpose, ragged images (H or W = 1, non-square, channels around the vector width) and
// shape errors. The fast-vs-reference tests (Ss2dOpsPerTarget/...) run once per compiled SIMD
// target (hwy_gtest.h).
#include <hwy/tests/hwy_gtest.h>

#include <functional>

#include "mamba/parallel.h"
#include "ops/conv2d.h"
#include "ops/cross_scan.h"
#include "ops/gelu.h"
#include "ops/layernorm.h"
#include "ops/selective_scan.h"
#include "test_util.h"

using namespace mamba;

namespace {

using test::dot;
using test::finite_diff;  // eps 1e-3

struct XsCase {
  int64_t B, H, W, D, N, R;
};

ops::CrossScanArgs make_args(const XsCase& c, Rng& rng, bool with_D = true, bool with_bias = true) {
  ops::CrossScanArgs a;
  const int64_t K = ops::kCrossScanK, E = c.R + 2 * c.N;
  a.u = test::randn({c.B, c.H, c.W, c.D}, rng);
  a.delta = test::randn({c.B, c.H, c.W, K, c.D}, rng, 0.5);
  a.x_dbl = test::randn({c.B, c.H, c.W, K, E}, rng);
  a.A = test::rand_uniform({K * c.D, c.N}, rng, -2.0, -0.1);
  if (with_D) a.Ds = test::randn({K * c.D}, rng);
  if (with_bias) a.delta_bias = test::randn({K * c.D}, rng, 0.5);
  a.dt_rank = c.R;
  return a;
}

std::string name_of(const XsCase& c) {
  return str("B=", c.B, " H=", c.H, " W=", c.W, " D=", c.D, " N=", c.N, " R=", c.R);
}

// The B and C columns of x_dbl (B, H, W, K, R + 2N); the dt_r columns must be zero.
void expect_dt_cols_zero(const Tensor& dx, int64_t R, int64_t E) {
  for (int64_t i = 0; i < dx.numel() / E; ++i)
    for (int64_t r = 0; r < R; ++r) ASSERT_EQ(dx[i * E + r], 0.f);
}

}  // namespace

class Ss2dOpsPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(Ss2dOpsPerTarget);

TEST_P(Ss2dOpsPerTarget, CrossScanStridedAndCopyMatchReference) {
  Rng rng(3);
  const XsCase cases[] = {{2, 8, 7, 16, 4, 2},  {1, 5, 3, 19, 3, 1}, {2, 1, 9, 17, 2, 1},
                          {1, 9, 1, 33, 1, 2},  {1, 1, 1, 5, 2, 1},  {2, 4, 6, 8, 16, 3},
                          {1, 11, 13, 15, 1, 0}};
  for (const XsCase& c : cases)
    for (bool opt : {true, false}) {
      const ops::CrossScanArgs a = make_args(c, rng, opt, opt);
      const Tensor dy = test::randn({c.B, c.H, c.W, c.D}, rng);
      const std::string what = name_of(c) + (opt ? " D,bias" : " no D,bias");
      const Tensor yr = ops::cross_scan_ref(a);
      const ops::CrossScanGrads gr = ops::cross_scan_bwd_ref(a, dy);
      for (auto impl : {ops::CrossScanImpl::Strided, ops::CrossScanImpl::Copy}) {
        const std::string w = what + (impl == ops::CrossScanImpl::Strided ? " strided" : " copy");
        EXPECT_TRUE(test::all_close(ops::cross_scan_fwd(a, impl), yr, tol::kFastVsRef, "y " + w));
        const ops::CrossScanGrads g = ops::cross_scan_bwd(a, dy, impl);
        EXPECT_TRUE(test::all_close(g.du, gr.du, tol::kFastVsRefGrad, "du " + w));
        EXPECT_TRUE(test::all_close(g.ddelta, gr.ddelta, tol::kFastVsRefGrad, "ddelta " + w));
        EXPECT_TRUE(test::all_close(g.dx_dbl, gr.dx_dbl, tol::kFastVsRefGrad, "dx_dbl " + w));
        expect_dt_cols_zero(g.dx_dbl, c.R, c.R + 2 * c.N);
        EXPECT_TRUE(test::all_close(g.dA, gr.dA, tol::kFastVsRefGrad, "dA " + w));
        EXPECT_EQ(g.dDs.defined(), opt);
        EXPECT_EQ(g.ddelta_bias.defined(), opt);
        if (opt) {
          EXPECT_TRUE(test::all_close(g.dDs, gr.dDs, tol::kFastVsRefGrad, "dDs " + w));
          EXPECT_TRUE(
              test::all_close(g.ddelta_bias, gr.ddelta_bias, tol::kFastVsRefGrad, "dbias " + w));
        }
      }
    }
}

TEST(Ss2dOps, CrossScanPixelOrders) {
  // H = 2, W = 3: row-major 0 1 2 3 4 5; column-major 0 3 1 4 2 5; then the reverses.
  const int64_t H = 2, W = 3;
  const int64_t want[4][6] = {
      {0, 1, 2, 3, 4, 5}, {0, 3, 1, 4, 2, 5}, {5, 4, 3, 2, 1, 0}, {5, 2, 4, 1, 3, 0}};
  for (int64_t k = 0; k < 4; ++k)
    for (int64_t t = 0; t < H * W; ++t)
      EXPECT_EQ(ops::cross_scan_pixel(k, t, H, W), want[k][t]) << "k=" << k << " t=" << t;
}

TEST(Ss2dOps, CrossScanOneDirectionIsTheOneDScan) {
  // With only direction k's B non-zero, y is direction k's plain 1-D scan over its pixel order
  // (plus the four Ds terms): checked against ops::selective_scan_ref on that sequence.
  Rng rng(5);
  const XsCase c{1, 3, 4, 5, 2, 1};
  for (int64_t k = 0; k < 4; ++k) {
    ops::CrossScanArgs a = make_args(c, rng, false, true);
    const int64_t E = c.R + 2 * c.N, L = c.H * c.W;
    for (int64_t i = 0; i < a.x_dbl.numel(); ++i)
      if ((i / E) % 4 != k && (i % E) >= c.R && (i % E) < c.R + c.N) a.x_dbl[i] = 0.f;
    ops::ScanArgs s;
    s.u = Tensor::empty({1, L, c.D});
    s.delta = Tensor::empty({1, L, c.D});
    s.B = Tensor::empty({1, L, c.N});
    s.C = Tensor::empty({1, L, c.N});
    for (int64_t t = 0; t < L; ++t) {
      const int64_t p = ops::cross_scan_pixel(k, t, c.H, c.W);
      for (int64_t d = 0; d < c.D; ++d) {
        s.u[t * c.D + d] = a.u[p * c.D + d];
        s.delta[t * c.D + d] = a.delta[(p * 4 + k) * c.D + d];
      }
      for (int64_t n = 0; n < c.N; ++n) {
        s.B[t * c.N + n] = a.x_dbl[(p * 4 + k) * E + c.R + n];
        s.C[t * c.N + n] = a.x_dbl[(p * 4 + k) * E + c.R + c.N + n];
      }
    }
    s.A = a.A.narrow(k * c.D, c.D).contiguous();
    s.delta_bias = a.delta_bias.narrow(k * c.D, c.D).contiguous();
    s.delta_softplus = true;
    const Tensor y1 = ops::selective_scan_ref(s);
    const Tensor y = ops::cross_scan_fwd(a);
    Tensor yk = Tensor::empty(y.shape());
    for (int64_t t = 0; t < L; ++t) {
      const int64_t p = ops::cross_scan_pixel(k, t, c.H, c.W);
      for (int64_t d = 0; d < c.D; ++d) yk[p * c.D + d] = y1[t * c.D + d];
    }
    EXPECT_TRUE(test::all_close(y, yk, tol::kFastVsRef, str("direction ", k)));
  }
}

TEST(Ss2dOps, CrossScanBackwardFiniteDifferencesDouble) {
  Rng rng(7);
  for (const XsCase& c : {XsCase{1, 3, 2, 3, 2, 1}, XsCase{2, 1, 3, 2, 1, 1}}) {
    ops::CrossScanArgs a = make_args(c, rng);
    const Tensor g = test::randn({c.B, c.H, c.W, c.D}, rng);
    auto loss = [&] { return dot(ops::cross_scan_ref_f64(a), g); };
    const std::string w = name_of(c);
    for (auto impl : {ops::CrossScanImpl::Strided, ops::CrossScanImpl::Copy}) {
      const ops::CrossScanGrads gr = ops::cross_scan_bwd(a, g, impl);
      EXPECT_TRUE(test::all_close(gr.du, finite_diff(a.u, loss), tol::kFiniteDiff, "du " + w));
      EXPECT_TRUE(
          test::all_close(gr.ddelta, finite_diff(a.delta, loss), tol::kFiniteDiff, "ddelta " + w));
      // dt_r columns do not reach the scan: their finite differences are zero as well
      EXPECT_TRUE(
          test::all_close(gr.dx_dbl, finite_diff(a.x_dbl, loss), tol::kFiniteDiff, "dxdbl " + w));
      EXPECT_TRUE(test::all_close(gr.dA, finite_diff(a.A, loss), tol::kFiniteDiff, "dA " + w));
      EXPECT_TRUE(test::all_close(gr.dDs, finite_diff(a.Ds, loss), tol::kFiniteDiff, "dDs " + w));
      EXPECT_TRUE(test::all_close(gr.ddelta_bias, finite_diff(a.delta_bias, loss), tol::kFiniteDiff,
                                  "dbias " + w));
    }
  }
}

TEST(Ss2dOps, CrossScanBackwardRepeatsBitwise) {
  Rng rng(9);
  const XsCase c{2, 9, 8, 40, 4, 2};
  const ops::CrossScanArgs a = make_args(c, rng);
  const Tensor dy = test::randn({c.B, c.H, c.W, c.D}, rng);
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    const ops::CrossScanGrads g1 = ops::cross_scan_bwd(a, dy), g2 = ops::cross_scan_bwd(a, dy);
    for (auto [x, y] : {std::pair{g1.du, g2.du},
                        {g1.dx_dbl, g2.dx_dbl},
                        {g1.dA, g2.dA},
                        {g1.ddelta_bias, g2.ddelta_bias}})
      for (int64_t i = 0; i < x.numel(); ++i) ASSERT_EQ(x[i], y[i]) << "threads " << threads;
  }
  set_num_threads(0);
}

TEST(Ss2dOps, CrossScanShapeErrors) {
  Rng rng(1);
  const XsCase c{1, 3, 4, 5, 2, 1};
  ops::CrossScanArgs a = make_args(c, rng);
  auto bad = a;
  bad.delta = Tensor::zeros({1, 3, 4, 3, 5});
  test::expect_error([&] { ops::cross_scan_fwd(bad); }, {"cross_scan: delta", "(1,3,4,4,5)"});
  bad = a;
  bad.x_dbl = Tensor::zeros({1, 3, 4, 4, 6});
  test::expect_error([&] { ops::cross_scan_fwd(bad); }, {"x_dbl", "(1,3,4,4,5)"});
  bad = a;
  bad.A = Tensor::zeros({5, 2});
  test::expect_error([&] { ops::cross_scan_fwd(bad); }, {"A", "(20,2)"});
  bad = a;
  bad.Ds = Tensor::zeros({5});
  test::expect_error([&] { ops::cross_scan_fwd(bad); }, {"Ds"});
  bad = a;
  bad.u = Tensor::zeros({1, 12, 5});
  test::expect_error([&] { ops::cross_scan_fwd(bad); }, {"u must be (B, H, W, D)"});
  test::expect_error([&] { ops::cross_scan_bwd(a, Tensor::zeros({1, 4, 3, 5})); }, {"dy"});
}

// ---- depthwise conv2d ---------------------------------------------------------------------

TEST(Ss2dOps, DwConv2dFastMatchesReference) {
  Rng rng(11);
  for (int64_t k : {1, 3, 5})
    for (auto [H, W] : {std::pair<int64_t, int64_t>{8, 7}, {1, 6}, {5, 1}, {1, 1}, {2, 3}})
      for (int64_t D : {1, 17})
        for (bool has_bias : {false, true}) {
          Tensor x = test::randn({2, H, W, D}, rng), w = test::randn({D, k, k}, rng, 0.5);
          Tensor b = has_bias ? test::randn({D}, rng) : Tensor();
          Tensor dy = test::randn({2, H, W, D}, rng);
          const std::string what = str("k=", k, " H=", H, " W=", W, " D=", D, " bias=", has_bias);
          EXPECT_TRUE(test::all_close(ops::dwconv2d_fwd(x, w, b), ops::dwconv2d_ref(x, w, b),
                                      tol::kFastVsRef, "y " + what));
          auto g = ops::dwconv2d_bwd(x, w, b, dy);
          auto r = ops::dwconv2d_bwd_ref(x, w, b, dy);
          EXPECT_TRUE(test::all_close(g.dx, r.dx, tol::kFastVsRef, "dx " + what));
          EXPECT_TRUE(test::all_close(g.dweight, r.dweight, tol::kFastVsRef, "dw " + what));
          EXPECT_EQ(g.dbias.defined(), has_bias);
          if (has_bias) {
            EXPECT_TRUE(test::all_close(g.dbias, r.dbias, tol::kFastVsRef, "db " + what));
          }
        }
}

TEST(Ss2dOps, DwConv2dKnownValuesAndFiniteDifferences) {
  // One channel, 3x3 ones kernel on a 2x2 image of 1, 2, 3, 4: every output sums the whole image.
  Tensor x = Tensor::from({1, 2, 2, 1}, {1, 2, 3, 4}), w = Tensor::full({1, 3, 3}, 1.f);
  Tensor y = ops::dwconv2d_fwd(x, w, Tensor::from({1}, {0.5f}));
  for (int64_t i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(y[i], 10.5f);
  Rng rng(12);
  for (auto [H, W] : {std::pair<int64_t, int64_t>{3, 4}, {1, 3}}) {
    Tensor xx = test::randn({2, H, W, 3}, rng), ww = test::randn({3, 3, 3}, rng),
           bb = test::randn({3}, rng), g = test::randn({2, H, W, 3}, rng);
    auto loss = [&] { return dot(ops::dwconv2d_ref_f64(xx, ww, bb), g); };
    auto gr = ops::dwconv2d_bwd(xx, ww, bb, g);
    EXPECT_TRUE(test::all_close(gr.dx, finite_diff(xx, loss), tol::kFiniteDiff, "dx"));
    EXPECT_TRUE(test::all_close(gr.dweight, finite_diff(ww, loss), tol::kFiniteDiff, "dw"));
    EXPECT_TRUE(test::all_close(gr.dbias, finite_diff(bb, loss), tol::kFiniteDiff, "db"));
  }
  test::expect_error(
      [&] {
        ops::dwconv2d_fwd(x, Tensor::zeros({1, 2, 2}), Tensor());
      },
      {"odd", "2"});
  test::expect_error(
      [&] {
        ops::dwconv2d_fwd(x, Tensor::zeros({2, 3, 3}), Tensor());
      },
      {"dwconv2d: weight", "(1,3,3)"});
}

TEST(Ss2dOps, TransposeLast2) {
  Rng rng(13);
  Tensor x = test::randn({2, 37, 45}, rng);
  Tensor t = ops::transpose_last2(x);
  EXPECT_EQ(t.shape(), (Shape{2, 45, 37}));
  EXPECT_TRUE(test::all_close(t, test::transpose12(x), {0, 0}, "transpose"));
}

// ---- LayerNorm, GELU ----------------------------------------------------------------------

TEST(Ss2dOps, LayerNormMatchesReferenceAndFiniteDifferences) {
  Rng rng(14);
  for (int64_t d : {1, 7, 16, 33})
    for (bool affine : {true, false}) {
      Tensor x = test::randn({5, 3, d}, rng, 2.0);
      Tensor w = affine ? test::randn({d}, rng) : Tensor(),
             b = affine ? test::randn({d}, rng) : Tensor();
      Tensor dy = test::randn({5, 3, d}, rng);
      const std::string what = str("d=", d, " affine=", affine);
      EXPECT_TRUE(test::all_close(ops::layer_norm_fwd(x, w, b, 1e-5f),
                                  ops::layer_norm_ref(x, w, b, 1e-5f), tol::kFastVsRef,
                                  "y " + what));
      auto g = ops::layer_norm_bwd(x, w, b, 1e-5f, dy);
      auto r = ops::layer_norm_bwd_ref(x, w, b, 1e-5f, dy);
      EXPECT_TRUE(test::all_close(g.dx, r.dx, tol::kFastVsRef, "dx " + what));
      EXPECT_EQ(g.dweight.defined(), affine);
      if (affine) {
        EXPECT_TRUE(test::all_close(g.dweight, r.dweight, tol::kFastVsRef, "dw " + what));
        EXPECT_TRUE(test::all_close(g.dbias, r.dbias, tol::kFastVsRef, "db " + what));
      }
    }
  Tensor x = test::randn({4, 6}, rng), w = test::randn({6}, rng), b = test::randn({6}, rng),
         g = test::randn({4, 6}, rng);
  auto loss = [&] { return dot(ops::layer_norm_ref_f64(x, w, b, 1e-5f), g); };
  auto gr = ops::layer_norm_bwd(x, w, b, 1e-5f, g);
  EXPECT_TRUE(test::all_close(gr.dx, finite_diff(x, loss), tol::kFiniteDiff, "dx"));
  EXPECT_TRUE(test::all_close(gr.dweight, finite_diff(w, loss), tol::kFiniteDiff, "dw"));
  EXPECT_TRUE(test::all_close(gr.dbias, finite_diff(b, loss), tol::kFiniteDiff, "db"));
  test::expect_error([&] { ops::layer_norm_fwd(x, Tensor::zeros({5}), b, 1e-5f); },
                     {"layer_norm: weight", "(6)"});
}

TEST(Ss2dOps, GeluExactErf) {
  // Values of torch.nn.functional.gelu (approximate="none").
  Tensor x = Tensor::from({4}, {-3.f, -0.5f, 0.f, 1.f});
  Tensor y = ops::gelu(x);
  EXPECT_NEAR(y[0], -0.0040496935, 1e-7);
  EXPECT_NEAR(y[1], -0.15426877, 1e-7);
  EXPECT_EQ(y[2], 0.f);
  EXPECT_NEAR(y[3], 0.8413447, 1e-6);
  Rng rng(15);
  Tensor xx = test::randn({50}, rng, 2.0), g = test::randn({50}, rng);
  auto loss = [&] {
    double s = 0;
    for (int64_t i = 0; i < xx.numel(); ++i) s += ops::gelu_ref<double>(xx[i]) * g[i];
    return s;
  };
  EXPECT_TRUE(test::all_close(ops::gelu_bwd(xx, g), finite_diff(xx, loss), tol::kFiniteDiff, "dx"));
  Tensor n = Tensor::from({1}, {std::nanf("")});
  EXPECT_TRUE(std::isnan(ops::gelu(n)[0]));
}
