// The packed prefill GEMM y = x W^T (ops/gemm_nt.h) against its double reference, for fp32, bf16
// and f16 weights, on sizes that leave partial panels / weight blocks, with leading dimensions
// larger than the rows, accumulation onto y, and across thread counts. GemmNtPerTarget/... runs the
// packed kernel and the dispatching entry point (the packed kernel on 512-bit targets, the BLAS
// fallback on the others) once per compiled SIMD target (hwy_gtest.h). GemmF32... and
// GemmF32PerTarget/... do the same for the backward pass's fp32 products gemm_nn and gemm_tn.
#include <hwy/tests/hwy_gtest.h>

#include <cfloat>
#include <cstdlib>
#include <vector>

#include "mamba/parallel.h"
#include "ops/gemm_nt.h"
#include "test_util.h"

using namespace mamba;
using namespace mamba::ops;

namespace {

struct Case {
  int64_t M, N, K;
  WeightDType t;
  bool accumulate;
};

struct Data {
  int64_t ldx, ldw, ldy;
  std::vector<float> x, wf, y0;
  std::vector<uint16_t> wh;
  WeightRows W;
};

Data make(const Case& c, Rng& rng) {
  Data d;
  d.ldx = c.K + 3, d.ldw = c.K + 5, d.ldy = c.N + 2;
  d.x.resize(static_cast<size_t>(std::max<int64_t>(c.M * d.ldx, 1)));
  d.wf.resize(static_cast<size_t>(std::max<int64_t>(c.N * d.ldw, 1)));
  d.y0.resize(static_cast<size_t>(std::max<int64_t>(c.M * d.ldy, 1)));
  for (float& v : d.x) v = static_cast<float>(rng.normal());
  for (float& v : d.wf) v = static_cast<float>(rng.normal());
  for (float& v : d.y0) v = static_cast<float>(rng.normal());
  if (c.t == WeightDType::f32) {
    d.W = WeightRows{d.wf.data(), c.t, d.ldw};
  } else {
    d.wh.resize(d.wf.size());
    for (size_t i = 0; i < d.wf.size(); ++i) d.wh[i] = f32_to_half(d.wf[i], c.t);
    d.W = WeightRows{d.wh.data(), c.t, d.ldw};
  }
  return d;
}

double w_at(const Data& d, const Case& c, int64_t n, int64_t k) {
  return c.t == WeightDType::f32 ? d.wf[n * d.ldw + k] : half_to_f32(d.wh[n * d.ldw + k], c.t);
}

// |fp32 sum - exact| <= gamma_K * sum |x_k w_k| (+ |y0| when accumulating): the classical bound of
// a recursive fp32 sum of K products, which any summation order the kernel uses must meet.
::testing::AssertionResult within_bound(const Data& d, const Case& c, const std::vector<float>& y,
                                        const std::vector<float>& yref) {
  const double gamma = (c.K + 2) * static_cast<double>(FLT_EPSILON);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      double mag = c.accumulate ? std::fabs(d.y0[m * d.ldy + n]) : 0.0;
      for (int64_t k = 0; k < c.K; ++k) mag += std::fabs(d.x[m * d.ldx + k] * w_at(d, c, n, k));
      const double err = std::fabs(static_cast<double>(y[m * d.ldy + n]) - yref[m * d.ldy + n]);
      if (err > gamma * mag + 1e-30)
        return ::testing::AssertionFailure()
               << "M=" << c.M << " N=" << c.N << " K=" << c.K << " " << weight_dtype_name(c.t)
               << " acc=" << c.accumulate << ": y[" << m << "][" << n << "] = " << y[m * d.ldy + n]
               << ", reference " << yref[m * d.ldy + n] << ", error " << err << " > bound "
               << gamma * mag;
    }
    // the padding between N and ldy is never written
    for (int64_t n = c.N; n < d.ldy; ++n)
      if (y[m * d.ldy + n] != d.y0[m * d.ldy + n])
        return ::testing::AssertionFailure()
               << "padding column " << n << " of row " << m << " was written";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace

TEST(GemmNt, PackedKernelMatchesReferenceOnAwkwardSizes) {
  Rng rng(11);
  int checked = 0;
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16})
    for (int64_t M : {1, 17, 40, 70})
      for (int64_t N : {1, 5, 12, 13, 37})
        for (int64_t K : {1, 3, 16, 33, 130})
          for (bool acc : {false, true}) {
            const Case c{M, N, K, t, acc};
            Data d = make(c, rng);
            std::vector<float> y = d.y0, yr = d.y0;
            gemm_nt_packed(d.x.data(), M, d.ldx, d.W, N, K, y.data(), d.ldy, acc);
            gemm_nt_ref(d.x.data(), M, d.ldx, d.W, N, K, yr.data(), d.ldy, acc);
            ASSERT_TRUE(within_bound(d, c, y, yr));
            // The dispatching entry point (packed kernel or BLAS) meets the same bound.
            std::vector<float> yd = d.y0;
            gemm_nt(d.x.data(), M, d.ldx, d.W, N, K, yd.data(), d.ldy, acc);
            ASSERT_TRUE(within_bound(d, c, yd, yr))
                << "gemm_nt (packed active: " << gemm_nt_packed_active() << ")";
            ++checked;
          }
  EXPECT_EQ(checked, 3 * 4 * 5 * 5 * 2);
}

// y's columns in blocks (Mamba-2's in_proj: z | xBC | dt): each block equals gemm_nt on its
// weight rows, bit for bit on the packed kernel (the same sums; on the BLAS, one call per block,
// within the summation bound), for blocks that start and end inside the kernel's
// 12-row weight blocks, empty blocks, and every storage; the whole meets the reference's bound.
TEST(GemmNt, SplitOutputEqualsOneProductPerBlock) {
  Rng rng(13);
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16})
    for (int64_t M : {3, 40, 70})
      for (const std::vector<int64_t>& widths :
           {std::vector<int64_t>{37}, {5, 0, 19, 13}, {0, 24, 1, 11}, {12, 12, 7}}) {
        int64_t N = 0;
        for (int64_t w : widths) N += w;
        const Case c{M, N, 33, t, false};
        Data d = make(c, rng);
        std::vector<std::vector<float>> ys(widths.size());
        std::vector<GemmNtOut> outs;
        for (size_t i = 0; i < widths.size(); ++i) {
          ys[i].assign(static_cast<size_t>(std::max<int64_t>(M * (widths[i] + 1), 1)), -7.f);
          outs.push_back({widths[i], ys[i].data(), widths[i] + 1});  // a padding column each
        }
        gemm_nt_split(d.x.data(), M, d.ldx, d.W, c.K, outs.data(),
                      static_cast<int64_t>(outs.size()));
        std::vector<float> y = d.y0, yr = d.y0;
        gemm_nt(d.x.data(), M, d.ldx, d.W, N, c.K, y.data(), d.ldy, false);
        gemm_nt_ref(d.x.data(), M, d.ldx, d.W, N, c.K, yr.data(), d.ldy, false);
        ASSERT_TRUE(within_bound(d, c, y, yr));
        for (size_t i = 0, n0 = 0; i < widths.size(); n0 += widths[i++])
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t j = 0; j < widths[i]; ++j) {
              const float got = ys[i][m * (widths[i] + 1) + j], want = y[m * d.ldy + n0 + j];
              if (gemm_nt_packed_active()) {  // the packed kernel: bit for bit
                ASSERT_EQ(got, want) << weight_dtype_name(t) << " M=" << M << " block " << i
                                     << " row " << m << " col " << j;
              } else {  // one BLAS call per block: within twice the summation bound
                double mag = 0;
                for (int64_t k = 0; k < c.K; ++k)
                  mag += std::fabs(d.x[m * d.ldx + k] * w_at(d, c, n0 + j, k));
                ASSERT_LE(std::fabs(double(got) - want), 2 * (c.K + 2) * FLT_EPSILON * mag + 1e-30);
              }
            }
            ASSERT_EQ(ys[i][m * (widths[i] + 1) + widths[i]], -7.f) << "padding written";
          }
      }
}

TEST(GemmNt, PrefillSizedProductMatchesReferenceAndIsThreadIndependent) {
  // A projection-like shape: several x panels, several weight chunks per thread.
  Rng rng(12);
  const Case c{100, 300, 200, WeightDType::f32, false};
  Data d = make(c, rng);
  std::vector<float> yr = d.y0;
  gemm_nt_ref(d.x.data(), c.M, d.ldx, d.W, c.N, c.K, yr.data(), d.ldy, false);
  const int saved = num_threads();
  std::vector<float> y1 = d.y0, y2 = d.y0;
  set_num_threads(1);
  gemm_nt_packed(d.x.data(), c.M, d.ldx, d.W, c.N, c.K, y1.data(), d.ldy, false);
  set_num_threads(2);
  gemm_nt_packed(d.x.data(), c.M, d.ldx, d.W, c.N, c.K, y2.data(), d.ldy, false);
  set_num_threads(saved);
  EXPECT_TRUE(within_bound(d, c, y1, yr));
  // each y element is one sequential sum over k whatever the thread split: bitwise equal
  EXPECT_EQ(y1, y2);
}

TEST(GemmNt, RejectsBadSizes) {
  std::vector<float> x(64), w(64), y(64);
  const WeightRows W{w.data(), WeightDType::f32, 4};
  EXPECT_THROW(gemm_nt(x.data(), -1, 4, W, 4, 4, y.data(), 4, false), Error);
  EXPECT_THROW(gemm_nt(x.data(), 4, 3, W, 4, 4, y.data(), 4, false), Error);  // ldx < K
  EXPECT_THROW(
      gemm_nt(x.data(), 4, 4, WeightRows{w.data(), WeightDType::f32, 3}, 4, 4, y.data(), 4, false),
      Error);
  EXPECT_THROW(gemm_nt(x.data(), 4, 4, W, 4, 4, y.data(), 3, false), Error);  // ldy < N
  EXPECT_THROW(gemm_nt_packed(x.data(), 4, 4, W, 4, -2, y.data(), 4, false), Error);
  // K = 0: y = 0, or unchanged when accumulating
  std::vector<float> z(16, 7.f);
  gemm_nt(x.data(), 4, 4, W, 4, 0, z.data(), 4, true);
  EXPECT_EQ(z, std::vector<float>(16, 7.f));
  gemm_nt(x.data(), 4, 4, W, 4, 0, z.data(), 4, false);
  EXPECT_EQ(z, std::vector<float>(16, 0.f));
}

class GemmNtPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(GemmNtPerTarget);

TEST_P(GemmNtPerTarget, PackedKernelAndDispatchMatchReference) {
#if HWY_ARCH_X86
  // mamba::gemm_nt takes the packed kernel exactly on the 512-bit targets (unless MAMBA_GEMM=blas).
  int64_t wide_targets = HWY_AVX3 | HWY_AVX3_DL;
#ifdef HWY_AVX3_ZEN4
  wide_targets |= HWY_AVX3_ZEN4;
#endif
#ifdef HWY_AVX3_SPR
  wide_targets |= HWY_AVX3_SPR;
#endif
  const bool wide = (GetParam() & wide_targets) != 0;
  const char* env = std::getenv("MAMBA_GEMM");
  const bool blas_forced = env && std::string(env) == "blas";
  EXPECT_EQ(gemm_nt_packed_active(), wide && !blas_forced) << hwy::TargetName(GetParam());
#endif
  Rng rng(13);
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16})
    for (int64_t M : {1, 33})
      for (int64_t N : {5, 13})
        for (int64_t K : {3, 33})
          for (bool acc : {false, true}) {
            const Case c{M, N, K, t, acc};
            Data d = make(c, rng);
            std::vector<float> y = d.y0, yd = d.y0, yr = d.y0;
            gemm_nt_ref(d.x.data(), M, d.ldx, d.W, N, K, yr.data(), d.ldy, acc);
            gemm_nt_packed(d.x.data(), M, d.ldx, d.W, N, K, y.data(), d.ldy, acc);
            ASSERT_TRUE(within_bound(d, c, y, yr)) << "packed";
            gemm_nt(d.x.data(), M, d.ldx, d.W, N, K, yd.data(), d.ldy, acc);
            ASSERT_TRUE(within_bound(d, c, yd, yr))
                << "gemm_nt (packed active: " << gemm_nt_packed_active() << ")";
          }
}

// ---- gemm_nn / gemm_tn: the backward pass's fp32 products on the same tile ---------------------

namespace {

struct F32Case {
  bool trans_a;  // gemm_tn: A stored (K, M); gemm_nn: A stored (M, K)
  int64_t M, N, K;
  bool accumulate;
};

struct F32Data {
  int64_t lda, ldb, ldc;
  std::vector<float> a, b, c0;
};

F32Data make_f32(const F32Case& c, Rng& rng) {
  F32Data d;
  d.lda = (c.trans_a ? c.M : c.K) + 3, d.ldb = c.N + 5, d.ldc = c.N + 2;
  d.a.resize(static_cast<size_t>(std::max<int64_t>((c.trans_a ? c.K : c.M) * d.lda, 1)));
  d.b.resize(static_cast<size_t>(std::max<int64_t>(c.K * d.ldb, 1)));
  d.c0.resize(static_cast<size_t>(std::max<int64_t>(c.M * d.ldc, 1)));
  for (float& v : d.a) v = static_cast<float>(rng.normal());
  for (float& v : d.b) v = static_cast<float>(rng.normal());
  for (float& v : d.c0) v = static_cast<float>(rng.normal());
  return d;
}

float a_at(const F32Data& d, const F32Case& c, int64_t m, int64_t k) {
  return c.trans_a ? d.a[k * d.lda + m] : d.a[m * d.lda + k];
}

using F32Fn = void (*)(int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                       float*, int64_t, bool);

std::vector<float> run_f32(F32Fn nn, F32Fn tn, const F32Case& c, const F32Data& d) {
  std::vector<float> out = d.c0;
  (c.trans_a ? tn : nn)(c.M, c.N, c.K, d.a.data(), d.lda, d.b.data(), d.ldb, out.data(), d.ldc,
                        c.accumulate);
  return out;
}

// The same recursive-summation bound as within_bound above, and the padding of C untouched.
::testing::AssertionResult f32_within_bound(const F32Data& d, const F32Case& c,
                                            const std::vector<float>& y,
                                            const std::vector<float>& yref) {
  const double gamma = (c.K + 2) * static_cast<double>(FLT_EPSILON);
  for (int64_t m = 0; m < c.M; ++m) {
    for (int64_t n = 0; n < c.N; ++n) {
      double mag = c.accumulate ? std::fabs(d.c0[m * d.ldc + n]) : 0.0;
      for (int64_t k = 0; k < c.K; ++k) mag += std::fabs(a_at(d, c, m, k) * d.b[k * d.ldb + n]);
      const double err = std::fabs(static_cast<double>(y[m * d.ldc + n]) - yref[m * d.ldc + n]);
      if (err > gamma * mag + 1e-30)
        return ::testing::AssertionFailure()
               << (c.trans_a ? "gemm_tn" : "gemm_nn") << " M=" << c.M << " N=" << c.N
               << " K=" << c.K << " acc=" << c.accumulate << ": C[" << m << "][" << n
               << "] = " << y[m * d.ldc + n] << ", reference " << yref[m * d.ldc + n] << ", error "
               << err << " > bound " << gamma * mag;
    }
    for (int64_t n = c.N; n < d.ldc; ++n)
      if (y[m * d.ldc + n] != d.c0[m * d.ldc + n])
        return ::testing::AssertionFailure()
               << "padding column " << n << " of row " << m << " was written";
  }
  return ::testing::AssertionSuccess();
}

}  // namespace

TEST(GemmF32, PackedNnAndTnMatchReferenceOnAwkwardSizes) {
  // Sizes around the tile (2 vectors of rows by 12), 1, and a long contraction; either operand
  // may end up on the panels (the kernel picks), so both shapes of each product are covered.
  Rng rng(21);
  int checked = 0;
  for (bool ta : {false, true})
    for (int64_t M : {1, 13, 40, 70})
      for (int64_t N : {1, 5, 12, 37})
        for (int64_t K : {1, 3, 33, 130})
          for (bool acc : {false, true}) {
            const F32Case c{ta, M, N, K, acc};
            const F32Data d = make_f32(c, rng);
            const std::vector<float> yr = run_f32(gemm_nn_ref, gemm_tn_ref, c, d);
            ASSERT_TRUE(f32_within_bound(d, c, run_f32(gemm_nn_packed, gemm_tn_packed, c, d), yr));
            ASSERT_TRUE(f32_within_bound(d, c, run_f32(gemm_nn, gemm_tn, c, d), yr))
                << "dispatch (packed active: " << gemm_nt_packed_active() << ")";
            ++checked;
          }
  EXPECT_EQ(checked, 2 * 4 * 4 * 4 * 2);
}

TEST(GemmF32, ZeroSizesAndBadArguments) {
  std::vector<float> a(64, 1.f), b(64, 1.f), c(64, 7.f);
  for (F32Fn f : {gemm_nn, gemm_tn, gemm_nn_packed, gemm_tn_packed, gemm_nn_ref, gemm_tn_ref}) {
    // M = 0 or N = 0: nothing written; K = 0: C = 0, or unchanged when accumulating
    f(0, 4, 4, a.data(), 4, b.data(), 4, c.data(), 4, false);
    f(4, 0, 4, a.data(), 4, b.data(), 4, c.data(), 4, false);
    EXPECT_EQ(c, std::vector<float>(64, 7.f));
    f(4, 4, 0, a.data(), 4, b.data(), 4, c.data(), 4, true);
    EXPECT_EQ(c, std::vector<float>(64, 7.f));
    f(4, 4, 0, a.data(), 4, b.data(), 4, c.data(), 4, false);
    EXPECT_EQ(std::vector<float>(c.begin(), c.begin() + 16), std::vector<float>(16, 0.f));
    std::fill(c.begin(), c.end(), 7.f);
    EXPECT_THROW(f(-1, 4, 4, a.data(), 4, b.data(), 4, c.data(), 4, false), Error);
    EXPECT_THROW(f(4, 4, 4, a.data(), 3, b.data(), 4, c.data(), 4, false), Error);  // lda
    EXPECT_THROW(f(4, 4, 4, a.data(), 4, b.data(), 3, c.data(), 4, false), Error);  // ldb < N
    EXPECT_THROW(f(4, 4, 4, a.data(), 4, b.data(), 4, c.data(), 3, false), Error);  // ldc < N
    EXPECT_THROW(f(4, 4, 4, nullptr, 4, b.data(), 4, c.data(), 4, false), Error);
  }
  // gemm_tn's A is (K, M): lda must cover M, not K
  EXPECT_NO_THROW(gemm_tn(8, 4, 2, a.data(), 8, b.data(), 4, c.data(), 4, false));
  EXPECT_THROW(gemm_tn(8, 4, 2, a.data(), 4, b.data(), 4, c.data(), 4, false), Error);
}

TEST(GemmF32, BackwardSizedProductsAreThreadIndependent) {
  // Projection-backward-like shapes: several panels and several block chunks per thread, on
  // either side of the kernel's panel choice; each C element is one sequential sum over k, so
  // 1 and 2 threads agree bitwise.
  Rng rng(22);
  const int saved = num_threads();
  for (const F32Case& c : {F32Case{false, 100, 300, 70, false}, F32Case{true, 90, 200, 150, true},
                           F32Case{true, 300, 40, 64, false}}) {
    const F32Data d = make_f32(c, rng);
    const std::vector<float> yr = run_f32(gemm_nn_ref, gemm_tn_ref, c, d);
    set_num_threads(1);
    const std::vector<float> y1 = run_f32(gemm_nn_packed, gemm_tn_packed, c, d);
    set_num_threads(2);
    const std::vector<float> y2 = run_f32(gemm_nn_packed, gemm_tn_packed, c, d);
    set_num_threads(saved);
    EXPECT_TRUE(f32_within_bound(d, c, y1, yr));
    EXPECT_EQ(y1, y2) << "trans_a=" << c.trans_a << " M=" << c.M << " N=" << c.N;
  }
}

class GemmF32PerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(GemmF32PerTarget);

TEST_P(GemmF32PerTarget, PackedKernelAndDispatchMatchReference) {
  Rng rng(23);
  for (bool ta : {false, true})
    for (int64_t M : {1, 33})
      for (int64_t N : {5, 13})
        for (int64_t K : {3, 33})
          for (bool acc : {false, true}) {
            const F32Case c{ta, M, N, K, acc};
            const F32Data d = make_f32(c, rng);
            const std::vector<float> yr = run_f32(gemm_nn_ref, gemm_tn_ref, c, d);
            ASSERT_TRUE(f32_within_bound(d, c, run_f32(gemm_nn_packed, gemm_tn_packed, c, d), yr))
                << "packed, " << hwy::TargetName(GetParam());
            ASSERT_TRUE(f32_within_bound(d, c, run_f32(gemm_nn, gemm_tn, c, d), yr))
                << "dispatch, " << hwy::TargetName(GetParam());
          }
}
