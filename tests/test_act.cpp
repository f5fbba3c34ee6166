// Element-wise activations (Highway kernels) against the scalar references and finite
// differences, on lengths around the vector width, including softplus's threshold of 20.
#include <cmath>

#include "mamba/ops/act.h"
#include "test_util.h"

using namespace mamba;

namespace {
double silu_d(double x) { return x / (1.0 + std::exp(-x)); }
double softplus_d(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
}  // namespace

TEST(Act, KernelsMatchScalarReferences) {
  Rng rng(1);
  for (int64_t n : {1, 7, 15, 16, 17, 31, 32, 33, 100}) {
    Tensor x = test::randn({n}, rng, 8.0);  // spreads over the softplus threshold too
    if (n > 2) x[0] = 20.5f, x[1] = -100.f, x[2] = 95.f;
    Tensor es({n}), ep({n}), ee({n});
    for (int64_t i = 0; i < n; ++i) {
      es[i] = (float)silu_d(x[i]);
      ep[i] = (float)softplus_d(x[i]);
      ee[i] = (float)std::exp((double)std::min(x[i], 80.f));
    }
    EXPECT_TRUE(test::all_close(ops::silu(x), es, tol::kFastVsRef, str("silu n=", n)));
    EXPECT_TRUE(test::all_close(ops::softplus(x), ep, tol::kFastVsRef, str("softplus n=", n)));
    Tensor xe = x.clone();
    for (int64_t i = 0; i < n; ++i) xe[i] = std::min(xe[i], 80.f);
    ops::exp_inplace(xe.data(), n);
    EXPECT_TRUE(test::all_close(xe, ee, {0, 1e-6}, str("exp n=", n)));
  }
}

TEST(Act, BackwardFiniteDifferencesDouble) {
  Rng rng(2);
  for (int64_t n : {15, 16, 17, 33}) {
    Tensor x = test::randn({n}, rng, 4.0), dy = test::randn({n}, rng);
    x[0] = 25.f;  // above the softplus threshold: derivative is exactly 1
    Tensor ds({n}), dp({n}), fs({n}), fp({n});
    ops::silu_bwd(x.data(), dy.data(), ds.data(), n);
    ops::softplus_bwd(x.data(), dy.data(), dp.data(), n);
    const double h = 1e-3;
    for (int64_t i = 0; i < n; ++i) {
      const float hi = x[i] + (float)h, lo = x[i] - (float)h;
      const double step = (double)hi - lo;
      fs[i] = (float)(dy[i] * (silu_d(hi) - silu_d(lo)) / step);
      fp[i] = (float)(dy[i] * (softplus_d(hi) - softplus_d(lo)) / step);
    }
    EXPECT_TRUE(test::all_close(ds, fs, tol::kFiniteDiff, str("silu' n=", n)));
    EXPECT_TRUE(test::all_close(dp, fp, tol::kFiniteDiff, str("softplus' n=", n)));
    EXPECT_FLOAT_EQ(dp[0], dy[0]);
  }
}

TEST(Act, InPlaceAndTensorForms) {
  Rng rng(3);
  Tensor x = test::randn({3, 17}, rng);
  Tensor y = ops::silu(x);
  EXPECT_EQ(y.shape(), x.shape());
  Tensor z = x.clone();
  ops::silu(z.data(), z.data(), z.numel());  // aliasing in and out is allowed
  EXPECT_TRUE(test::all_close(z, y, {0, 0}, "in place"));
}
