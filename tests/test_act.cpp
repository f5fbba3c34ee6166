// Element-wise activations (Highway kernels) against the scalar references and finite
// differences, on lengths around the vector width, including softplus's threshold of 20, and the
// NaN rule (NaN in -> NaN out, in vector lanes and scalar tails alike). The kernel tests run once
// per compiled SIMD target (hwy_gtest.h: ActPerTarget/...).
#include <hwy/tests/hwy_gtest.h>

#include <cmath>
#include <limits>

#include "ops/act.h"
#include "test_util.h"

using namespace mamba;

namespace {
double silu_d(double x) { return x / (1.0 + std::exp(-x)); }
double softplus_d(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
}  // namespace

class ActPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(ActPerTarget);

TEST_P(ActPerTarget, KernelsMatchScalarReferences) {
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

TEST_P(ActPerTarget, BackwardFiniteDifferencesDouble) {
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

TEST_P(ActPerTarget, InPlaceAndTensorForms) {
  Rng rng(3);
  Tensor x = test::randn({3, 17}, rng);
  Tensor y = ops::silu(x);
  EXPECT_EQ(y.shape(), x.shape());
  Tensor z = x.clone();
  ops::silu(z.data(), z.data(), z.numel());  // aliasing in and out is allowed
  EXPECT_TRUE(test::all_close(z, y, {0, 0}, "in place"));
}

// NaN in -> NaN out for every function, at every position: lanes of full vectors and the scalar
// tail (n = 33 covers both for every vector width up to 16 lanes). Before the shared helpers,
// the vector softplus gave 20 for NaN and the vector exp gave 0. Finite neighbours stay finite.
TEST_P(ActPerTarget, NaNInNaNOut) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t n = 33;
  for (int64_t pos = 0; pos < n; ++pos) {
    Tensor x({n}), dy({n});
    for (int64_t i = 0; i < n; ++i) x[i] = 0.25f * static_cast<float>(i % 7) - 0.5f, dy[i] = 1.f;
    x[pos] = nan;
    Tensor s = ops::silu(x), sp = ops::softplus(x), e = x.clone(), ds({n}), dsp({n});
    ops::exp_inplace(e.data(), n);
    ops::silu_bwd(x.data(), dy.data(), ds.data(), n);
    ops::softplus_bwd(x.data(), dy.data(), dsp.data(), n);
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"silu", &s},
                                  {"softplus", &sp},
                                  {"exp", &e},
                                  {"silu'", &ds},
                                  {"softplus'", &dsp}})
      for (int64_t i = 0; i < n; ++i)
        EXPECT_EQ(std::isnan((*t)[i]), i == pos)
            << name << "[" << i << "] = " << (*t)[i] << " with NaN at " << pos;
  }
}

// exp and the clamps at the ends of the range, in lanes and tail: +-inf, past fp32 overflow,
// far below underflow (the kernels' exp is valid for any input, like std::exp).
TEST_P(ActPerTarget, ExpAndActivationsAtTheEndsOfTheRange) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> v = {inf,   -inf,  88.5f,  95.f,   100.f, 104.f,
                                200.f, -90.f, -104.f, -200.f, 30.f,  -30.f};
  for (int64_t n : {static_cast<int64_t>(v.size()), int64_t{33}}) {
    Tensor x({n});
    for (int64_t i = 0; i < n; ++i) x[i] = v[i % v.size()];
    Tensor e = x.clone();
    ops::exp_inplace(e.data(), n);
    Tensor sp = ops::softplus(x), s = ops::silu(x);
    for (int64_t i = 0; i < n; ++i) {
      const float want = std::exp(x[i]);
      if (std::isinf(want) || want == 0.f)
        EXPECT_EQ(e[i], want) << "exp(" << x[i] << ")";
      else
        EXPECT_NEAR(e[i], want, 1e-6 * want) << "exp(" << x[i] << ")";
      EXPECT_EQ(sp[i], x[i] > 20.f ? x[i] : std::log1p(std::exp(x[i])))
          << "softplus(" << x[i] << ")";
      if (std::isfinite(x[i])) {
        EXPECT_FALSE(std::isnan(s[i])) << "silu(" << x[i] << ")";
      }
    }
  }
}
