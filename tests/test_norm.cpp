// RMSNorm, fused add + RMSNorm, gated RMSNorm (Mamba-2): fast vs reference on awkward sizes,
// finite differences of every backward in double, known values and errors.
#include <cmath>
#include <functional>

#include "ops/act.h"
#include "ops/norm.h"
#include "test_util.h"

using namespace mamba;

namespace {

// eps 1e-4 (not 1e-3): a normalised group of 1 or 2 small values is sharply curved, and the
// loss is evaluated in double, so a smaller step costs nothing in round-off.
// Finite differences use test::finite_diff (eps 1e-4) and test::dot from test_util.h.
Tensor finite_diff(Tensor& p, const std::function<double()>& loss, double eps = 1e-4) {
  return test::finite_diff(p, loss, eps);
}
using test::dot;

}  // namespace

TEST(RmsNorm, FastMatchesReference) {
  Rng rng(1);
  for (int64_t d : {1, 15, 16, 17, 33, 64})
    for (int64_t M : {1, 3, 130}) {
      Tensor x = test::randn({M, d}, rng), w = test::randn({d}, rng);
      Tensor rstd;
      Tensor y = ops::rms_norm_fwd(x, w, 1e-5f, &rstd);
      EXPECT_TRUE(test::all_close(y, ops::rms_norm_ref(x, w, 1e-5f), tol::kFastVsRef,
                                  str("y d=", d, " M=", M)));
      ASSERT_EQ(rstd.shape(), (Shape{M}));
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += (double)x[i] * x[i];
      EXPECT_NEAR(rstd[0], 1.0 / std::sqrt(ss / d + 1e-5), 1e-5 / std::sqrt(ss / d + 1e-5));
    }
  // Leading dimensions are flattened.
  Tensor x3 = test::randn({2, 3, 17}, rng), w = test::randn({17}, rng);
  Tensor y3 = ops::rms_norm_fwd(x3, w, 1e-6f);
  EXPECT_EQ(y3.shape(), x3.shape());
  EXPECT_TRUE(test::all_close(y3, ops::rms_norm_ref(x3, w, 1e-6f), tol::kFastVsRef, "3d"));
}

TEST(RmsNorm, BackwardFiniteDifferencesDouble) {
  Rng rng(2);
  for (int64_t d : {1, 5, 17}) {
    const float eps = 1e-5f;
    Tensor x = test::randn({3, d}, rng), w = test::randn({d}, rng), g = test::randn({3, d}, rng);
    auto loss = [&] { return dot(ops::rms_norm_ref_f64(x, w, eps), g); };
    auto gr = ops::rms_norm_bwd(x, w, eps, g);
    EXPECT_TRUE(test::all_close(gr.dx, finite_diff(x, loss), tol::kFiniteDiff, str("dx d=", d)));
    EXPECT_TRUE(
        test::all_close(gr.dweight, finite_diff(w, loss), tol::kFiniteDiff, str("dw d=", d)));
  }
}

TEST(RmsNorm, AddRmsNormUpdatesResidual) {
  Rng rng(3);
  Tensor x = test::randn({4, 17}, rng), w = test::randn({17}, rng);
  Tensor residual;  // undefined: becomes a copy of x
  Tensor y = ops::add_rms_norm_fwd(x, residual, w, 1e-5f);
  EXPECT_TRUE(test::all_close(residual, x, {0, 0}, "first residual"));
  EXPECT_TRUE(test::all_close(y, ops::rms_norm_ref(x, w, 1e-5f), tol::kFastVsRef, "first y"));
  residual[0] += 1.f;  // must be a copy, not x itself
  EXPECT_NE(residual[0], x[0]);
  Tensor x2 = test::randn({4, 17}, rng);
  Tensor expect_res = residual.clone();
  for (int64_t i = 0; i < x2.numel(); ++i) expect_res[i] += x2[i];
  Tensor y2 = ops::add_rms_norm_fwd(x2, residual, w, 1e-5f);
  EXPECT_TRUE(test::all_close(residual, expect_res, {0, 0}, "residual"));
  EXPECT_TRUE(test::all_close(y2, ops::rms_norm_ref(expect_res, w, 1e-5f), tol::kFastVsRef, "y"));
  Tensor bad({4, 16});
  EXPECT_THROW(ops::add_rms_norm_fwd(x2, bad, w, 1e-5f), Error);
}

TEST(GatedRmsNorm, FastMatchesReference) {
  Rng rng(4);
  for (int64_t d : {16, 17, 33, 64})
    for (int64_t gs : {int64_t{1}, d})
      for (bool nbg : {false, true})
        for (bool has_z : {true, false}) {
          const int64_t M = 5;
          Tensor x = test::randn({M, d}, rng), z = has_z ? test::randn({M, d}, rng) : Tensor();
          Tensor w = test::randn({d}, rng), dy = test::randn({M, d}, rng);
          std::string what = str("d=", d, " gs=", gs, " nbg=", nbg, " z=", has_z);
          EXPECT_TRUE(test::all_close(ops::gated_rms_norm_fwd(x, z, w, 1e-5f, gs, nbg),
                                      ops::gated_rms_norm_ref(x, z, w, 1e-5f, gs, nbg),
                                      tol::kFastVsRef, "y " + what));
        }
  // Groups of 16 in 64 channels (Mamba-2 with ngroups = 4).
  Tensor x = test::randn({2, 3, 64}, rng), z = test::randn({2, 3, 64}, rng),
         w = test::randn({64}, rng);
  EXPECT_TRUE(test::all_close(ops::gated_rms_norm_fwd(x, z, w, 1e-5f, 16, false),
                              ops::gated_rms_norm_ref(x, z, w, 1e-5f, 16, false), tol::kFastVsRef,
                              "groups of 16"));
}

TEST(GatedRmsNorm, KnownValuesPerGroup) {
  // Two groups of 2, no gate, unit weight: each group is normalised on its own.
  Tensor x = Tensor::from({1, 4}, {3, 4, 1, 1}), w = Tensor::full({4}, 1.f);
  Tensor y = ops::gated_rms_norm_fwd(x, Tensor(), w, 0.f, 2, false);
  const float r1 = std::sqrt(12.5f), r2 = 1.f;
  EXPECT_NEAR(y[0], 3 / r1, 1e-6);
  EXPECT_NEAR(y[1], 4 / r1, 1e-6);
  EXPECT_NEAR(y[2], 1 / r2, 1e-6);
  EXPECT_NEAR(y[3], 1 / r2, 1e-6);
  // Gate after the norm (norm_before_gate) multiplies by silu(z).
  Tensor z = Tensor::from({1, 4}, {0, 1, 2, -1});
  Tensor yg = ops::gated_rms_norm_fwd(x, z, w, 0.f, 2, true);
  EXPECT_NEAR(yg[0], 0.f, 1e-7);
  EXPECT_NEAR(yg[1], 4 / r1 * ops::silu_ref(1.f), 1e-6);
}

TEST(GatedRmsNorm, BackwardFiniteDifferencesDouble) {
  Rng rng(5);
  for (int64_t gs : {2, 3, 6})
    for (bool nbg : {false, true})
      for (bool has_z : {true, false}) {
        const int64_t M = 3, d = 6;
        const float eps = 1e-5f;
        Tensor x = test::randn({M, d}, rng), z = has_z ? test::randn({M, d}, rng) : Tensor();
        Tensor w = test::randn({d}, rng), g = test::randn({M, d}, rng);
        auto loss = [&] { return dot(ops::gated_rms_norm_ref_f64(x, z, w, eps, gs, nbg), g); };
        auto gr = ops::gated_rms_norm_bwd(x, z, w, eps, gs, nbg, g);
        std::string what = str("gs=", gs, " nbg=", nbg, " z=", has_z);
        EXPECT_TRUE(test::all_close(gr.dx, finite_diff(x, loss), tol::kFiniteDiff, "dx " + what));
        EXPECT_TRUE(
            test::all_close(gr.dweight, finite_diff(w, loss), tol::kFiniteDiff, "dw " + what));
        EXPECT_EQ(gr.dz.defined(), has_z);
        if (has_z) {
          EXPECT_TRUE(test::all_close(gr.dz, finite_diff(z, loss), tol::kFiniteDiff, "dz " + what));
        }
      }
}

TEST(GatedRmsNorm, BackwardFastMatchesReferenceAtMamba2Size) {
  // The fast backward at a bigger size against finite differences is too slow; instead check
  // it against the fp64 reference through a directional derivative: <grad, v> vs
  // (L(x + h v) - L(x - h v)) / 2h for a random direction v.
  Rng rng(6);
  const int64_t M = 7, d = 64, gs = 32;
  for (bool nbg : {false, true}) {
    Tensor x = test::randn({M, d}, rng), z = test::randn({M, d}, rng), w = test::randn({d}, rng);
    Tensor g = test::randn({M, d}, rng);
    auto gr = ops::gated_rms_norm_bwd(x, z, w, 1e-5f, gs, nbg, g);
    for (Tensor* p : {&x, &z, &w}) {
      Tensor* grad = p == &x ? &gr.dx : p == &z ? &gr.dz : &gr.dweight;
      Tensor v = test::randn(p->shape(), rng), base = p->clone();
      const double h = 1e-3;
      double analytic = 0;
      for (int64_t i = 0; i < v.numel(); ++i) analytic += (double)(*grad)[i] * v[i];
      auto eval = [&](double s) {
        for (int64_t i = 0; i < v.numel(); ++i) (*p)[i] = (float)(base[i] + s * v[i]);
        return dot(ops::gated_rms_norm_ref_f64(x, z, w, 1e-5f, gs, nbg), g);
      };
      // The float rounding of base + s v is part of the step; keep it small relative to h.
      const double fd = (eval(h) - eval(-h)) / (2 * h);
      p->copy_from(base);
      EXPECT_NEAR(analytic, fd, 1e-3 * (1 + std::fabs(fd))) << "nbg=" << nbg;
    }
  }
}

TEST(Norm, Errors) {
  Tensor x({3, 8}), w({8}), z({3, 8});
  EXPECT_THROW(ops::rms_norm_fwd(x, Tensor({7}), 1e-5f), Error);
  EXPECT_THROW(ops::rms_norm_fwd(x, w, -1.f), Error);
  EXPECT_THROW(ops::rms_norm_bwd(x, w, 1e-5f, Tensor({3, 7})), Error);
  EXPECT_THROW(ops::gated_rms_norm_fwd(x, z, w, 1e-5f, 3, false), Error);  // 3 does not divide 8
  EXPECT_THROW(ops::gated_rms_norm_fwd(x, z, w, 1e-5f, 0, false), Error);
  EXPECT_THROW(ops::gated_rms_norm_fwd(x, Tensor({3, 4}), w, 1e-5f, 4, false), Error);
  EXPECT_THROW(ops::gated_rms_norm_bwd(x, z, w, 1e-5f, 4, false, Tensor({2, 8})), Error);
  EXPECT_THROW(ops::rms_norm_fwd(Tensor(), w, 1e-5f), Error);
}
