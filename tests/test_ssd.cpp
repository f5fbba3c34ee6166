// SSD (Mamba-2 scan): chunked == sequential reference (forward, final states, every gradient)
// over awkward sizes and ragged chunks; finite differences of the reference backward in double;
// the single-token update == the full forward; shape errors; the backward repeats bit for bit at
// a fixed thread count. The chunked-vs-reference tests (SsdPerTarget/...) run once per compiled
// SIMD target (hwy_gtest.h).
#include <hwy/tests/hwy_gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include "mamba/ops/ssd.h"
#include "mamba/parallel.h"
#include "ops/ssd_kernels.h"
#include "test_util.h"

using namespace mamba;
using ops::SsdArgs;
using ops::SsdGrads;

namespace {

struct Case {
  int64_t B, L, H, P, G, N, chunk;
  int dkind;  // 0 none, 1 (H), 2 (H, P)
  bool z, init, softplus_bias, limit;
};

std::string name_of(const Case& c) {
  return str("B", c.B, " L", c.L, " H", c.H, " P", c.P, " G", c.G, " N", c.N, " chunk", c.chunk,
             " D", c.dkind, " z", c.z, " init", c.init, " sp", c.softplus_bias, " lim", c.limit);
}

SsdArgs make_args(const Case& c, Rng& rng) {
  SsdArgs a;
  a.x = test::randn({c.B, c.L, c.H, c.P}, rng);
  a.A = test::rand_uniform({c.H}, rng, -3.0, -0.3);
  a.B = test::randn({c.B, c.L, c.G, c.N}, rng, 0.5);
  a.C = test::randn({c.B, c.L, c.G, c.N}, rng, 0.5);
  if (c.softplus_bias) {
    a.dt = test::randn({c.B, c.L, c.H}, rng, 1.0);
    a.dt_bias = test::rand_uniform({c.H}, rng, -3.0, -1.0);
    a.dt_softplus = true;
  } else {
    a.dt = test::rand_uniform({c.B, c.L, c.H}, rng, 0.01, 0.5);
  }
  if (c.limit) a.dt_min = 0.05f, a.dt_max = 0.3f;
  if (c.dkind == 1) a.D = test::randn({c.H}, rng);
  if (c.dkind == 2) a.D = test::randn({c.H, c.P}, rng);
  if (c.z) a.z = test::randn({c.B, c.L, c.H, c.P}, rng);
  if (c.init) a.initial_states = test::randn({c.B, c.H, c.P, c.N}, rng, 0.5);
  a.chunk_size = c.chunk;
  return a;
}

// Gradients are sums over B*L*P*N terms: the absolute tolerance scales with the tensor's size
// (max |expected|), the relative part is kSsdChunkedVsRef's.
::testing::AssertionResult grad_close(const Tensor& a, const Tensor& e, const std::string& what) {
  double m = 0;
  for (int64_t i = 0; i < e.numel(); ++i) m = std::max(m, (double)std::fabs(e[i]));
  return test::all_close(
      a, e, {tol::kSsdChunkedVsRef.atol * std::max(1.0, m), tol::kSsdChunkedVsRef.rtol}, what);
}

void compare_grads(const SsdGrads& g, const SsdGrads& r, const std::string& n) {
  EXPECT_TRUE(grad_close(g.dx, r.dx, n + " dx"));
  EXPECT_TRUE(grad_close(g.ddt, r.ddt, n + " ddt"));
  EXPECT_TRUE(grad_close(g.dA, r.dA, n + " dA"));
  EXPECT_TRUE(grad_close(g.dB, r.dB, n + " dB"));
  EXPECT_TRUE(grad_close(g.dC, r.dC, n + " dC"));
  EXPECT_EQ(g.dD.defined(), r.dD.defined()) << n;
  if (r.dD.defined()) {
    EXPECT_TRUE(grad_close(g.dD, r.dD, n + " dD"));
  }
  EXPECT_EQ(g.dz.defined(), r.dz.defined()) << n;
  if (r.dz.defined()) {
    EXPECT_TRUE(grad_close(g.dz, r.dz, n + " dz"));
  }
  EXPECT_EQ(g.ddt_bias.defined(), r.ddt_bias.defined()) << n;
  if (r.ddt_bias.defined()) {
    EXPECT_TRUE(grad_close(g.ddt_bias, r.ddt_bias, n + " ddt_bias"));
  }
  EXPECT_EQ(g.dinitial_states.defined(), r.dinitial_states.defined()) << n;
  if (r.dinitial_states.defined()) {
    EXPECT_TRUE(grad_close(g.dinitial_states, r.dinitial_states, n + " dinitial_states"));
  }
}

// clang-format off
const Case kCases[] = {
    // B  L   H  P   G  N   chunk D  z      init   sp     limit
    {1, 1, 2, 4, 1, 4, 8, 1, false, false, true, false},     // L = 1
    {2, 5, 2, 3, 1, 4, 8, 0, false, true, true, false},      // L < chunk
    {1, 16, 4, 16, 2, 16, 8, 1, true, false, true, false},   // chunks divide L
    {2, 21, 4, 15, 2, 17, 8, 2, false, true, true, false},   // ragged 8+8+5, D (H,P)
    {1, 33, 2, 17, 1, 1, 16, 1, true, true, false, false},   // N = 1, no softplus
    {2, 31, 6, 5, 3, 16, 4, 2, true, true, true, true},      // G = 3, dt_limit
    {1, 32, 2, 33, 2, 8, 32, 0, false, false, true, false},  // one full chunk
    {1, 19, 2, 4, 1, 4, 1, 1, true, true, true, false},      // chunk 1
    {1, 40, 2, 8, 1, 8, 7, 1, false, true, true, true},      // chunk 7 (prime), limit
    {3, 13, 2, 5, 1, 6, 4, 1, true, true, true, false},      // B = 3: thread ranges split batches
};
// clang-format on

}  // namespace

class SsdPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(SsdPerTarget);

TEST_P(SsdPerTarget, ChunkedForwardMatchesSequentialReference) {
  Rng rng(11);
  for (const Case& c : kCases) {
    SsdArgs a = make_args(c, rng);
    Tensor fr, fc, fs;
    Tensor yr = ops::ssd_ref(a, &fr);
    Tensor yc = ops::ssd_chunked(a, &fc);
    Tensor ys = ops::ssd_sequential_f32(a, &fs);
    EXPECT_TRUE(test::all_close(yc, yr, tol::kFastVsRef, name_of(c) + " y"));
    EXPECT_TRUE(test::all_close(fc, fr, tol::kFastVsRef, name_of(c) + " final_states"));
    EXPECT_TRUE(test::all_close(ys, yr, tol::kFastVsRef, name_of(c) + " y (seq f32)"));
    EXPECT_TRUE(test::all_close(fs, fr, tol::kFastVsRef, name_of(c) + " final (seq f32)"));
  }
}

// The prefill's chunk kernels (ops::ssd_chunk_y / ssd_chunk_state, register tiles with row and
// column tails) against their plain-loop references: every row count up to past two tiles, column
// counts with and without whole vectors and tails, strided operands, with and without the
// entering state; nothing written outside the output's rows and columns.
TEST_P(SsdPerTarget, ChunkKernelsMatchReference) {
  Rng rng(23);
  struct Shape3 {
    int64_t Q, P, N;
  };
  const Shape3 shapes[] = {{64, 64, 128}, {1, 1, 1},  {7, 17, 5},  {13, 33, 16}, {6, 16, 6},
                           {12, 48, 20},  {5, 80, 3}, {64, 8, 64}, {25, 100, 7}, {3, 128, 13}};
  for (const Shape3& sh : shapes) {
    const int64_t Q = sh.Q, P = sh.P, N = sh.N;
    const int64_t ldc = N + 3, ldm = Q + 2, ldx = 3 * P + 1, ldy = P + 5, ldb = N + 1;
    Tensor C = test::randn({Q, ldc}, rng, 0.5), ST = test::randn({N, P}, rng, 0.5);
    Tensor ecs = test::rand_uniform({Q}, rng, 0.0, 1.0), X = test::randn({Q, ldx}, rng);
    Tensor M = test::randn({Q, ldm}, rng, 0.3);
    for (int64_t i = 0; i < Q; ++i)
      for (int64_t j = i + 1; j < Q; ++j) M[i * ldm + j] = 0.f;  // the contract: zero above
    for (bool with_state : {true, false}) {
      const std::string name = str("Q", Q, " P", P, " N", N, " state ", with_state);
      Tensor Y = Tensor::full({Q, ldy}, 7.f), Yr = Tensor::full({Q, ldy}, 7.f);
      const float* st = with_state ? ST.data() : nullptr;
      ops::ssd_chunk_y(Q, P, N, C.data(), ldc, st, ecs.data(), M.data(), ldm, X.data(), ldx,
                       Y.data(), ldy);
      ops::ssd_chunk_y_ref(Q, P, N, C.data(), ldc, st, ecs.data(), M.data(), ldm, X.data(), ldx,
                           Yr.data(), ldy);
      EXPECT_TRUE(test::all_close(Y, Yr, tol::kFastVsRef, name + " y"));
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t p = P; p < ldy; ++p) ASSERT_EQ(Y[i * ldy + p], 7.f) << name << " y pad";
    }
    Tensor Bm = test::randn({Q, ldb}, rng, 0.5), Xw = test::randn({Q, ldx}, rng);
    Tensor S = ST.clone(), Sr = ST.clone();
    ops::ssd_chunk_state(Q, P, N, Bm.data(), ldb, Xw.data(), ldx, 0.75f, S.data());
    ops::ssd_chunk_state_ref(Q, P, N, Bm.data(), ldb, Xw.data(), ldx, 0.75f, Sr.data());
    EXPECT_TRUE(test::all_close(S, Sr, tol::kFastVsRef, str("Q", Q, " P", P, " N", N, " state")));

    // decay factors: cs from dt A (A in -3..-0.3 as make_args; one head with large |cs|)
    std::vector<double> cs(Q + ops::kSsdPad, 0.0);
    std::vector<float> dt(Q + ops::kSsdPad, 0.f);
    const double A = Q == 64 ? -8.0 : -1.3;
    double acc = 0;
    for (int64_t j = 0; j < Q; ++j) {
      dt[j] = static_cast<float>(0.01 + 0.2 * std::fabs(std::sin(0.7 * double(j + P))));
      acc += double(dt[j]) * A, cs[j] = acc;
    }
    Tensor cb = test::randn({Q * ldm + ops::kSsdPad}, rng);
    for (float dself : {0.f, 1.5f}) {
      const std::string name = str("Q", Q, " dself ", dself, " decay");
      Tensor Md = Tensor::full({Q * ldm + ops::kSsdPad}, 7.f), Mr = Md.clone();
      Tensor w = Tensor::zeros({Q + ops::kSsdPad}), wr = w.clone();
      Tensor e = Tensor::zeros({Q + ops::kSsdPad}), er = e.clone();
      ops::ssd_chunk_decay(Q, cs.data(), dt.data(), cb.data(), ldm, dself, Md.data(), ldm, w.data(),
                           e.data());
      ops::ssd_chunk_decay_ref(Q, cs.data(), dt.data(), cb.data(), ldm, dself, Mr.data(), ldm,
                               wr.data(), er.data());
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t j = i + 1; j < Q; ++j) ASSERT_EQ(Md[i * ldm + j], 0.f) << name << " above";
      auto head = [&](const Tensor& t, int64_t rows, int64_t cols, int64_t ld) {
        Tensor o = Tensor::empty({rows, cols});
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < cols; ++j) o[i * cols + j] = t[i * ld + j];
        return o;
      };
      EXPECT_TRUE(
          test::all_close(head(Md, Q, Q, ldm), head(Mr, Q, Q, ldm), tol::kFastVsRef, name + " M"));
      EXPECT_TRUE(
          test::all_close(head(w, 1, Q, Q), head(wr, 1, Q, Q), tol::kFastVsRef, name + " w"));
      EXPECT_TRUE(
          test::all_close(head(e, 1, Q, Q), head(er, 1, Q, Q), tol::kFastVsRef, name + " ecs"));
    }
  }
}

// The prefill's shapes (P = 64, N = 128, 64-token chunks) over several chunks, with an entering
// state and D per head: the chunked forward against the double reference.
TEST_P(SsdPerTarget, ChunkedForwardAtMamba2Shapes) {
  Rng rng(29);
  const Case c{1, 200, 4, 64, 1, 128, 64, 1, false, true, true, false};
  SsdArgs a = make_args(c, rng);
  Tensor fr, fc;
  Tensor yr = ops::ssd_ref(a, &fr);
  Tensor yc = ops::ssd_chunked(a, &fc);
  EXPECT_TRUE(test::all_close(yc, yr, tol::kFastVsRef, name_of(c) + " y"));
  EXPECT_TRUE(test::all_close(fc, fr, tol::kFastVsRef, name_of(c) + " final_states"));
}

TEST(Ssd, ChunkSizeDoesNotChangeTheResult) {
  Rng rng(12);
  Case c{2, 23, 4, 8, 2, 8, 8, 1, true, true, true, false};
  SsdArgs a = make_args(c, rng);
  Tensor fr;
  Tensor yr = ops::ssd_ref(a, &fr);
  for (int64_t cs : {1, 2, 5, 8, 22, 23, 24, 256}) {
    a.chunk_size = cs;
    Tensor fc;
    Tensor yc = ops::ssd_chunked(a, &fc);
    EXPECT_TRUE(test::all_close(yc, yr, tol::kFastVsRef, str("chunk ", cs, " y")));
    EXPECT_TRUE(test::all_close(fc, fr, tol::kFastVsRef, str("chunk ", cs, " final")));
  }
}

TEST_P(SsdPerTarget, ChunkedBackwardMatchesReferenceBackward) {
  Rng rng(13);
  for (const Case& c : kCases) {
    SsdArgs a = make_args(c, rng);
    Tensor dout = test::randn(a.x.shape(), rng);
    Tensor dfin = test::randn({c.B, c.H, c.P, c.N}, rng);
    compare_grads(ops::ssd_chunked_bwd(a, dout), ops::ssd_bwd_ref(a, dout), name_of(c));
    compare_grads(ops::ssd_chunked_bwd(a, dout, dfin), ops::ssd_bwd_ref(a, dout, dfin),
                  name_of(c) + " +dfinal");
  }
}

// Central differences of the double reference loss against the reference backward.
TEST(Ssd, ReferenceBackwardMatchesFiniteDifferences) {
  Rng rng(14);
  const Case cases[] = {
      {2, 7, 4, 3, 2, 3, 4, 1, true, true, true, false},
      {1, 6, 2, 2, 1, 5, 4, 2, false, true, true, true},
      {1, 5, 2, 3, 2, 2, 2, 1, false, false, false, false},
  };
  for (const Case& c : cases) {
    SsdArgs a = make_args(c, rng);
    if (c.limit) a.dt_min = 0.2f, a.dt_max = 0.6f;  // some steps clamp, some do not
    Tensor g = test::randn(a.x.shape(), rng);
    Tensor gf = test::randn({c.B, c.H, c.P, c.N}, rng);
    SsdGrads gr = ops::ssd_bwd_ref(a, g, gf);
    auto check = [&](Tensor& in, const Tensor& grad, const char* nm) {
      if (!in.defined()) return;
      // every element of small tensors, about 24 spread-out elements of the larger ones
      const int64_t stride = std::max<int64_t>(1, in.numel() / 24);
      for (int64_t i = (in.numel() - 1) % stride; i < in.numel(); i += stride) {
        const float orig = in[i];
        const float eps = 1e-3f * std::max(1.f, std::fabs(orig));
        in[i] = orig + eps;
        const double hi = in[i];
        const double lp = ops::ssd_ref_loss(a, g, gf);
        in[i] = orig - eps;
        const double lo = in[i];
        const double lm = ops::ssd_ref_loss(a, g, gf);
        in[i] = orig;
        const double fd = (lp - lm) / (hi - lo);
        const double an = grad[i];
        EXPECT_LE(std::fabs(fd - an), tol::kFiniteDiff.atol + tol::kFiniteDiff.rtol * std::fabs(fd))
            << name_of(c) << " " << nm << "[" << i << "] fd " << fd << " analytic " << an;
      }
    };
    check(a.x, gr.dx, "x");
    check(a.dt, gr.ddt, "dt");
    check(a.A, gr.dA, "A");
    check(a.B, gr.dB, "B");
    check(a.C, gr.dC, "C");
    check(a.D, gr.dD, "D");
    check(a.z, gr.dz, "z");
    check(a.dt_bias, gr.ddt_bias, "dt_bias");
    check(a.initial_states, gr.dinitial_states, "initial_states");
  }
}

TEST_P(SsdPerTarget, StateUpdateMatchesFullForward) {
  Rng rng(15);
  for (const Case& c : kCases) {
    SsdArgs a = make_args(c, rng);
    Tensor fr;
    Tensor yr = ops::ssd_ref(a, &fr);
    Tensor state =
        a.initial_states.defined() ? a.initial_states.clone() : Tensor::zeros({c.B, c.H, c.P, c.N});
    Tensor ys = Tensor::empty(a.x.shape());
    for (int64_t t = 0; t < c.L; ++t) {
      Tensor xt({c.B, c.H, c.P}), zt, dtt({c.B, c.H}), Bt({c.B, c.G, c.N}), Ct({c.B, c.G, c.N});
      if (a.z.defined()) zt = Tensor({c.B, c.H, c.P});
      for (int64_t b = 0; b < c.B; ++b) {
        for (int64_t i = 0; i < c.H * c.P; ++i) {
          xt[b * c.H * c.P + i] = a.x[(b * c.L + t) * c.H * c.P + i];
          if (zt.defined()) zt[b * c.H * c.P + i] = a.z[(b * c.L + t) * c.H * c.P + i];
        }
        for (int64_t h = 0; h < c.H; ++h) dtt[b * c.H + h] = a.dt[(b * c.L + t) * c.H + h];
        for (int64_t i = 0; i < c.G * c.N; ++i) {
          Bt[b * c.G * c.N + i] = a.B[(b * c.L + t) * c.G * c.N + i];
          Ct[b * c.G * c.N + i] = a.C[(b * c.L + t) * c.G * c.N + i];
        }
      }
      Tensor yt = ops::ssd_state_update(state, xt, dtt, a.A, Bt, Ct, a.D, zt, a.dt_bias,
                                        a.dt_softplus, a.dt_min, a.dt_max);
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t i = 0; i < c.H * c.P; ++i)
          ys[(b * c.L + t) * c.H * c.P + i] = yt[b * c.H * c.P + i];
    }
    EXPECT_TRUE(test::all_close(ys, yr, tol::kStepVsFull, name_of(c) + " step y"));
    EXPECT_TRUE(test::all_close(state, fr, tol::kStepVsFull, name_of(c) + " step state"));
  }
}

TEST(Ssd, ShapeErrorsNameTheTensor) {
  Rng rng(16);
  Case c{1, 5, 4, 3, 2, 4, 4, 1, false, false, true, false};
  auto expect_msg = [](const SsdArgs& a, const char* needle) {
    try {
      ops::ssd_chunked(a);
      ADD_FAILURE() << "no throw for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  {
    SsdArgs a = make_args(c, rng);
    a.dt = Tensor({1, 5, 3});
    expect_msg(a, "dt");
  }
  {
    SsdArgs a = make_args(c, rng);
    a.B = Tensor({1, 5, 3, 4});  // 3 groups do not divide 4 heads
    expect_msg(a, "ngroups");
  }
  {
    SsdArgs a = make_args(c, rng);
    a.C = Tensor({1, 5, 2, 5});
    expect_msg(a, "ssd: C");
  }
  {
    SsdArgs a = make_args(c, rng);
    a.D = Tensor({3});
    expect_msg(a, "ssd: D");
  }
  {
    SsdArgs a = make_args(c, rng);
    a.initial_states = Tensor({1, 4, 3, 5});
    expect_msg(a, "initial_states");
  }
  {
    SsdArgs a = make_args(c, rng);
    a.chunk_size = 0;
    expect_msg(a, "chunk_size");
  }
  {
    SsdArgs a = make_args(c, rng);
    EXPECT_THROW(ops::ssd_chunked_bwd(a, Tensor({1, 5, 4, 2})), Error);
    Tensor st({1, 4, 3, 4});
    EXPECT_THROW(
        ops::ssd_state_update(st, Tensor({1, 4, 3}), Tensor({1, 4}), a.A, Tensor({1, 3, 4}),
                              Tensor({1, 3, 4}), Tensor(), Tensor(), Tensor(), true),
        Error);
  }
}

// The per-thread accumulation of dB / dC over heads must not depend on how the (batch, head)
// range is split: 1 thread vs 5 threads (12 (batch, head) pairs: ranges that cut through a
// batch). L * P * N = 32768 makes the grain 1, so the work really is split.
TEST(Ssd, ThreadCountDoesNotChangeTheResult) {
  Rng rng(17);
  Case c{3, 64, 4, 16, 2, 32, 16, 2, true, true, true, false};
  SsdArgs a = make_args(c, rng);
  Tensor dout = test::randn(a.x.shape(), rng);
  const int saved = num_threads();
  set_num_threads(1);
  Tensor f1;
  Tensor y1 = ops::ssd_chunked(a, &f1);
  SsdGrads g1 = ops::ssd_chunked_bwd(a, dout);
  set_num_threads(5);
  Tensor f3;
  Tensor y3 = ops::ssd_chunked(a, &f3);
  SsdGrads g3 = ops::ssd_chunked_bwd(a, dout);
  set_num_threads(saved);
  EXPECT_TRUE(test::all_close(y3, y1, {0, 0}, "y"));
  EXPECT_TRUE(test::all_close(f3, f1, {0, 0}, "final"));
  compare_grads(g3, g1, "threads 5 vs 1");
}

// The backward's dB / dC sum over the heads of a group. With B = 1, H = 12 and 6 threads every
// thread's part adds into the same rows; the parts are summed in part order, so repeats are the
// same bits (an arrival-order sum, as before, differed in most repeats).
TEST(Ssd, BackwardRepeatsBitForBitAtAFixedThreadCount) {
  Rng rng(18);
  Case c{1, 64, 12, 16, 1, 32, 16, 1, true, true, true, false};
  SsdArgs a = make_args(c, rng);
  Tensor dout = test::randn(a.x.shape(), rng);
  const int saved = num_threads();
  for (int threads : {3, 6}) {
    set_num_threads(threads);
    const SsdGrads first = ops::ssd_chunked_bwd(a, dout);
    for (int rep = 0; rep < 4; ++rep) {
      const SsdGrads g = ops::ssd_chunked_bwd(a, dout);
      for (const auto& [name, x, y] :
           {std::tuple<const char*, const Tensor*, const Tensor*>{"dB", &g.dB, &first.dB},
            {"dC", &g.dC, &first.dC},
            {"dx", &g.dx, &first.dx},
            {"ddt", &g.ddt, &first.ddt},
            {"dA", &g.dA, &first.dA}})
        EXPECT_EQ(
            std::memcmp(x->data(), y->data(), static_cast<size_t>(x->numel()) * sizeof(float)), 0)
            << name << " at " << threads << " threads, repeat " << rep + 1;
    }
  }
  set_num_threads(saved);
}
