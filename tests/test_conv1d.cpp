// Causal depthwise conv1d (channel-last): fast vs reference on awkward sizes, finite
// differences of every backward in double, decode update vs full forward, the prefill final
// state (zero left pad when L < K), and shape errors. The fast-vs-reference tests
// (Conv1dPerTarget/...) run once per compiled SIMD target (hwy_gtest.h).
#include <hwy/tests/hwy_gtest.h>

#include <functional>

#include "ops/conv1d.h"
#include "test_util.h"

using namespace mamba;

namespace {

using test::dot;
using test::finite_diff;  // eps 1e-3

}  // namespace

class Conv1dPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(Conv1dPerTarget);

TEST_P(Conv1dPerTarget, FastMatchesReferenceOnAwkwardSizes) {
  Rng rng(1);
  // D = 130 spans three 64-channel blocks of the weight-gradient split (the last one ragged);
  // L = 1 and 5 are shorter than K = 3, 4 (and 1 is shorter than every K > 1).
  for (int64_t D : {1, 15, 16, 17, 33, 130})
    for (int64_t K : {1, 3, 4})
      for (int64_t L : {1, 5, 19})
        for (bool has_bias : {false, true})
          for (bool silu : {false, true}) {
            const int64_t B = 2;
            Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
            Tensor b = has_bias ? test::randn({D}, rng) : Tensor();
            Tensor dy = test::randn({B, L, D}, rng);
            std::string what = str("D=", D, " K=", K, " L=", L, " bias=", has_bias, " silu=", silu);
            EXPECT_TRUE(test::all_close(ops::causal_conv1d_fwd(x, w, b, silu),
                                        ops::causal_conv1d_ref(x, w, b, silu), tol::kFastVsRef,
                                        "y " + what));
            auto g = ops::causal_conv1d_bwd(x, w, b, silu, dy);
            auto r = ops::causal_conv1d_bwd_ref(x, w, b, silu, dy);
            EXPECT_TRUE(test::all_close(g.dx, r.dx, tol::kFastVsRef, "dx " + what));
            EXPECT_TRUE(test::all_close(g.dweight, r.dweight, tol::kFastVsRef, "dw " + what));
            EXPECT_EQ(g.dbias.defined(), has_bias);
            if (has_bias) {
              EXPECT_TRUE(test::all_close(g.dbias, r.dbias, tol::kFastVsRef, "db " + what));
            }
          }
}

TEST(Conv1d, KnownValues) {
  // One channel, K = 3, weights (1, 2, 3), x = 1, 2, 3, 4: y_t = x_{t-2} + 2 x_{t-1} + 3 x_t.
  Tensor x = Tensor::from({1, 4, 1}, {1, 2, 3, 4}), w = Tensor::from({1, 3}, {1, 2, 3});
  Tensor y = ops::causal_conv1d_fwd(x, w, Tensor::from({1}, {0.5f}), false);
  EXPECT_FLOAT_EQ(y[0], 3.5f);
  EXPECT_FLOAT_EQ(y[1], 2 + 6 + 0.5f);
  EXPECT_FLOAT_EQ(y[2], 1 + 4 + 9 + 0.5f);
  EXPECT_FLOAT_EQ(y[3], 2 + 6 + 12 + 0.5f);
}

TEST(Conv1d, BackwardFiniteDifferencesDouble) {
  Rng rng(2);
  for (int64_t K : {1, 3, 4})
    for (int64_t L : {2, 6})
      for (bool silu : {false, true}) {
        const int64_t B = 2, D = 5;
        Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
        Tensor b = test::randn({D}, rng), g = test::randn({B, L, D}, rng);
        auto loss = [&] { return dot(ops::causal_conv1d_ref_f64(x, w, b, silu), g); };
        auto grads = ops::causal_conv1d_bwd(x, w, b, silu, g);
        std::string what = str("K=", K, " L=", L, " silu=", silu);
        EXPECT_TRUE(
            test::all_close(grads.dx, finite_diff(x, loss), tol::kFiniteDiff, "dx " + what));
        EXPECT_TRUE(
            test::all_close(grads.dweight, finite_diff(w, loss), tol::kFiniteDiff, "dw " + what));
        EXPECT_TRUE(
            test::all_close(grads.dbias, finite_diff(b, loss), tol::kFiniteDiff, "db " + what));
      }
}

TEST_P(Conv1dPerTarget, UpdateMatchesFullForwardAndFinalState) {
  Rng rng(3);
  for (int64_t D : {15, 17})
    for (int64_t K : {1, 2, 4})
      for (int64_t L : {1, 3, 9})
        for (bool silu : {false, true}) {
          const int64_t B = 2;
          Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
          Tensor b = test::randn({D}, rng);
          Tensor y = ops::causal_conv1d_fwd(x, w, b, silu);
          Tensor state({B, D, K});
          Tensor ys({B, L, D});
          for (int64_t t = 0; t < L; ++t) {
            Tensor xt({B, D});
            for (int64_t bb = 0; bb < B; ++bb)
              for (int64_t d = 0; d < D; ++d) xt[bb * D + d] = x[(bb * L + t) * D + d];
            Tensor yt = ops::causal_conv1d_update(state, xt, w, b, silu);
            for (int64_t bb = 0; bb < B; ++bb)
              for (int64_t d = 0; d < D; ++d) ys[(bb * L + t) * D + d] = yt[bb * D + d];
          }
          std::string what = str("D=", D, " K=", K, " L=", L);
          EXPECT_TRUE(test::all_close(ys, y, tol::kStepVsFull, "step " + what));
          // The prefill's final state is exactly the state stepping leaves (zero left pad).
          Tensor fin = Tensor::full({B, D, K}, 7.f);
          ops::causal_conv1d_final_state(x, fin);
          EXPECT_TRUE(test::all_close(fin, state, {0, 0}, "final_state " + what));
        }
}

// The decode update's vectorised K = 4 path (Update4Kernel, every compiled target) and its
// scalar rest against a naive double reference: y = bias + sum_k w[d, k] s'[k] over the rolled
// state s' = [s1, s2, s3, x]; the state itself exactly. Several steps, B = 2 (segments that start
// mid-vector in the second batch row), D of a vector plus a tail, and the row-range entry
// (causal_conv1d_update_rows) on ranges that start and end inside a batch row.
TEST_P(Conv1dPerTarget, UpdateK4MatchesNaiveReference) {
  Rng rng(5);
  const int64_t K = 4;
  for (int64_t D : {3, 16, 37})
    for (bool with_bias : {false, true}) {
      const int64_t B = 2;
      Tensor w = test::randn({D, K}, rng, 0.5), b = with_bias ? test::randn({D}, rng) : Tensor();
      Tensor st = test::randn({B, D, K}, rng), st2 = st.clone();
      for (int t = 0; t < 3; ++t) {
        Tensor xt = test::randn({B, D}, rng);
        std::vector<double> yref(static_cast<size_t>(B * D));
        std::vector<float> sref(static_cast<size_t>(B * D * K));
        for (int64_t i = 0; i < B * D; ++i) {
          const int64_t d = i % D;
          for (int64_t k = 0; k < K; ++k) sref[i * K + k] = k + 1 < K ? st[i * K + k + 1] : xt[i];
          double acc = with_bias ? b[d] : 0.0;
          for (int64_t k = 0; k < K; ++k)
            acc += static_cast<double>(w[d * K + k]) * sref[i * K + k];
          yref[i] = acc;
        }
        const Tensor y = ops::causal_conv1d_update(st, xt, w, b, false);
        // The same through the row-range entry, in three ranges cut inside the batch rows.
        Tensor y2({B, D});
        const int64_t cuts[] = {0, D / 2 + 1, D + D / 3 + 1, B * D};
        for (int c = 0; c < 3; ++c)
          ops::causal_conv1d_update_rows(st2.data(), xt.data(), w.data(),
                                         with_bias ? b.data() : nullptr, y2.data(), D, K, cuts[c],
                                         cuts[c + 1], false);
        const std::string what = str("D=", D, " bias=", with_bias, " t=", t);
        for (int64_t i = 0; i < B * D * K; ++i) {
          ASSERT_EQ(st[i], sref[i]) << what << " state " << i;
          ASSERT_EQ(st2[i], sref[i]) << what << " state (rows) " << i;
        }
#ifndef __FMA__
        // Built without FMA contraction (the default): the scalar loop's float arithmetic, the
        // same bits (products and sums rounded one by one, in tap order).
        for (int64_t i = 0; i < B * D; ++i) {
          const int64_t d = i % D;
          float acc = with_bias ? b[d] : 0.f;
          for (int64_t k = 0; k < K; ++k) acc += w[d * K + k] * sref[i * K + k];
          ASSERT_EQ(y[i], acc) << what << " y bits " << i;
          ASSERT_EQ(y2[i], acc) << what << " y bits (rows) " << i;
        }
#endif
        for (int64_t i = 0; i < B * D; ++i) {
          const double tolv = tol::kFastVsRef.atol + tol::kFastVsRef.rtol * std::abs(yref[i]);
          EXPECT_NEAR(y[i], yref[i], tolv) << what << " y " << i;
          EXPECT_NEAR(y2[i], yref[i], tolv) << what << " y (rows) " << i;
        }
      }
    }
}

TEST(Conv1d, FinalStateZeroPadsShortInput) {
  Tensor x = Tensor::from({1, 2, 1}, {5, 6});
  Tensor st = Tensor::full({1, 1, 4}, 9.f);
  ops::causal_conv1d_final_state(x, st);
  EXPECT_EQ(st[0], 0.f);
  EXPECT_EQ(st[1], 0.f);
  EXPECT_EQ(st[2], 5.f);
  EXPECT_EQ(st[3], 6.f);
}

TEST(Conv1d, ShapeErrors) {
  Tensor x({2, 5, 4}), w({4, 3}), b({4});
  EXPECT_THROW(ops::causal_conv1d_fwd(Tensor({2, 5}), w, b, true), Error);
  EXPECT_THROW(ops::causal_conv1d_fwd(x, Tensor({5, 3}), b, true), Error);
  EXPECT_THROW(ops::causal_conv1d_fwd(x, Tensor({4, 3, 1}), b, true), Error);
  EXPECT_THROW(ops::causal_conv1d_fwd(x, w, Tensor({3}), true), Error);
  EXPECT_THROW(ops::causal_conv1d_fwd(x, Tensor(), b, true), Error);
  EXPECT_THROW(ops::causal_conv1d_bwd(x, w, b, true, Tensor({2, 4, 4})), Error);
  try {
    ops::causal_conv1d_fwd(x, Tensor({4, 0}), b, true);
    FAIL() << "K = 0 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("K must be >= 1"), std::string::npos) << e.what();
  }
  Tensor st({2, 4, 3});
  EXPECT_THROW(ops::causal_conv1d_update(st, Tensor({2, 5}), w, b, true), Error);
  Tensor bad_state({2, 4, 2});
  EXPECT_THROW(ops::causal_conv1d_update(bad_state, Tensor({2, 4}), w, b, true), Error);
  Tensor bad_state2({3, 4, 3});
  EXPECT_THROW(ops::causal_conv1d_final_state(x, bad_state2), Error);
}

// The anti-causal conv (reverse = true, Vim's backward direction): it is flip(conv(flip(x)))
// over time, fast == reference (every target), and finite differences of its backward in double.
namespace {
Tensor flip_time(const Tensor& t) {
  const int64_t B = t.dim(0), L = t.dim(1), D = t.dim(2);
  Tensor o(t.shape());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      for (int64_t d = 0; d < D; ++d) o[(b * L + s) * D + d] = t[(b * L + L - 1 - s) * D + d];
  return o;
}
}  // namespace

TEST_P(Conv1dPerTarget, ReverseEqualsFlippedCausalConv) {
  Rng rng(3);
  for (int64_t D : {1, 17, 130})
    for (int64_t K : {1, 3, 4})
      for (int64_t L : {1, 5, 19})
        for (bool silu : {false, true}) {
          const int64_t B = 2;
          Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
          Tensor b = test::randn({D}, rng), dy = test::randn({B, L, D}, rng);
          std::string what = str("D=", D, " K=", K, " L=", L, " silu=", silu);
          Tensor yr = ops::causal_conv1d_ref(x, w, b, silu, true);
          EXPECT_TRUE(test::all_close(yr,
                                      flip_time(ops::causal_conv1d_ref(flip_time(x), w, b, silu)),
                                      {1e-6, 1e-6}, "ref reverse vs flipped " + what));
          EXPECT_TRUE(test::all_close(ops::causal_conv1d_fwd(x, w, b, silu, true), yr,
                                      tol::kFastVsRef, "y " + what));
          auto g = ops::causal_conv1d_bwd(x, w, b, silu, dy, true);
          auto r = ops::causal_conv1d_bwd_ref(x, w, b, silu, dy, true);
          auto f = ops::causal_conv1d_bwd_ref(flip_time(x), w, b, silu, flip_time(dy));
          EXPECT_TRUE(
              test::all_close(r.dx, flip_time(f.dx), {1e-6, 1e-5}, "ref dx flipped " + what));
          EXPECT_TRUE(
              test::all_close(r.dweight, f.dweight, {1e-6, 1e-5}, "ref dw flipped " + what));
          EXPECT_TRUE(test::all_close(g.dx, r.dx, tol::kFastVsRef, "dx " + what));
          EXPECT_TRUE(test::all_close(g.dweight, r.dweight, tol::kFastVsRef, "dw " + what));
          EXPECT_TRUE(test::all_close(g.dbias, r.dbias, tol::kFastVsRef, "db " + what));
        }
}

TEST(Conv1d, ReverseBackwardFiniteDifferencesDouble) {
  Rng rng(4);
  for (int64_t K : {1, 3, 4})
    for (int64_t L : {2, 6})
      for (bool silu : {false, true}) {
        const int64_t B = 2, D = 5;
        Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
        Tensor b = test::randn({D}, rng), g = test::randn({B, L, D}, rng);
        auto loss = [&] { return dot(ops::causal_conv1d_ref_f64(x, w, b, silu, true), g); };
        auto grads = ops::causal_conv1d_bwd(x, w, b, silu, g, true);
        std::string what = str("reverse K=", K, " L=", L, " silu=", silu);
        EXPECT_TRUE(
            test::all_close(grads.dx, finite_diff(x, loss), tol::kFiniteDiff, "dx " + what));
        EXPECT_TRUE(
            test::all_close(grads.dweight, finite_diff(w, loss), tol::kFiniteDiff, "dw " + what));
        EXPECT_TRUE(
            test::all_close(grads.dbias, finite_diff(b, loss), tol::kFiniteDiff, "db " + what));
      }
}

// Continuing from a conv_state (chunked prefill): the taps before t = 0 read the state's last K-1
// inputs. Fast == reference (every target); the forward of x[s:] from the state advanced over
// x[:s] equals the whole forward's rows [s, L); advancing a zero state equals final_state, and
// advancing piece by piece equals the whole sequence's final state (also for pieces shorter than
// K, where part of the old window is kept).
namespace {
Tensor rows(const Tensor& x, int64_t t0, int64_t n) {
  const int64_t B = x.dim(0), L = x.dim(1), D = x.dim(2);
  return x.reshape({B, L * D}).cols(t0 * D, n * D).contiguous().reshape({B, n, D});
}
}  // namespace

TEST_P(Conv1dPerTarget, InitialStateFastMatchesReference) {
  Rng rng(5);
  for (int64_t D : {1, 17, 33})
    for (int64_t K : {1, 3, 4})
      for (int64_t L : {1, 2, 7})
        for (bool silu : {false, true}) {
          const int64_t B = 2;
          Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
          Tensor b = test::randn({D}, rng), st = test::randn({B, D, K}, rng);
          EXPECT_TRUE(test::all_close(ops::causal_conv1d_fwd(x, w, b, silu, false, st),
                                      ops::causal_conv1d_ref(x, w, b, silu, false, st),
                                      tol::kFastVsRef, str("D=", D, " K=", K, " L=", L)));
        }
}

// The forward written to column blocks (Mamba-2's x | B | C): each block equals the reference's
// columns, with and without an initial state, for blocks of awkward widths (a vector's tail in
// each) and empty ones; widths that do not sum to D are an error.
TEST_P(Conv1dPerTarget, SplitOutputMatchesReference) {
  Rng rng(7);
  for (const std::vector<int64_t>& widths :
       {std::vector<int64_t>{33}, {17, 16}, {5, 0, 19, 9}, {16, 1, 16}})
    for (int64_t K : {1, 4})
      for (int64_t L : {1, 7})
        for (bool init : {false, true}) {
          int64_t D = 0;
          for (int64_t w : widths) D += w;
          const int64_t B = 2;
          Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
          Tensor b = test::randn({D}, rng);
          Tensor st = init ? test::randn({B, D, K}, rng) : Tensor();
          Tensor ref = ops::causal_conv1d_ref(x, w, b, true, false, st);
          std::vector<Tensor> out = ops::causal_conv1d_fwd_split(x, w, b, true, st, widths);
          ASSERT_EQ(out.size(), widths.size());
          int64_t c0 = 0;
          for (size_t i = 0; i < widths.size(); ++i) {
            const Tensor want = ref.reshape({B * L, D}).cols(c0, widths[i]).contiguous();
            EXPECT_TRUE(
                test::all_close(out[i].reshape({B * L, widths[i]}), want, tol::kFastVsRef,
                                str("block ", i, " D=", D, " K=", K, " L=", L, " init=", init)));
            c0 += widths[i];
          }
        }
  Tensor x({2, 3, 8}), w({8, 4});
  EXPECT_THROW(ops::causal_conv1d_fwd_split(x, w, Tensor(), true, Tensor(), {4, 3}), Error);
}

TEST(Conv1d, ContinuedFromStateEqualsWholeSequence) {
  Rng rng(6);
  for (int64_t K : {1, 2, 4})
    for (int64_t L : {1, 3, 9}) {
      const int64_t B = 2, D = 17;
      Tensor x = test::randn({B, L, D}, rng), w = test::randn({D, K}, rng, 0.5);
      Tensor b = test::randn({D}, rng);
      Tensor y = ops::causal_conv1d_ref(x, w, b, true);
      Tensor fin = Tensor::zeros({B, D, K});
      ops::causal_conv1d_final_state(x, fin);
      Tensor adv = Tensor::zeros({B, D, K});
      ops::causal_conv1d_advance_state(adv, x);
      const std::string what = str("K=", K, " L=", L);
      EXPECT_TRUE(test::all_close(adv, fin, {0, 0}, "advance from zeros " + what));
      for (int64_t s = 1; s < L; ++s) {
        Tensor st = Tensor::zeros({B, D, K});
        ops::causal_conv1d_advance_state(st, rows(x, 0, s));
        EXPECT_TRUE(
            test::all_close(ops::causal_conv1d_fwd(rows(x, s, L - s), w, b, true, false, st),
                            rows(y, s, L - s), tol::kFastVsRef, "rest " + what));
        EXPECT_TRUE(
            test::all_close(ops::causal_conv1d_ref(rows(x, s, L - s), w, b, true, false, st),
                            rows(y, s, L - s), tol::kFastVsRef, "rest (ref) " + what));
        // One token at a time from s on: the window kept across pieces shorter than K.
        for (int64_t t = s; t < L; ++t) ops::causal_conv1d_advance_state(st, rows(x, t, 1));
        EXPECT_TRUE(test::all_close(st, fin, {0, 0}, str("advanced in pieces ", what, " s=", s)));
      }
    }
}

TEST(Conv1d, InitialStateErrors) {
  Tensor x({2, 5, 4}), w({4, 3}), b({4});
  test::expect_error(
      [&] {
        ops::causal_conv1d_fwd(x, w, b, true, false, Tensor({2, 4, 2}));
      },
      {"causal_conv1d_fwd: initial_state", "expected shape (2,4,3)"});
  test::expect_error(
      [&] {
        ops::causal_conv1d_fwd(x, w, b, true, true, Tensor({2, 4, 3}));
      },
      {"initial state needs the causal direction"});
  Tensor st({1, 4, 3});
  test::expect_error([&] { ops::causal_conv1d_advance_state(st, x); },
                     {"causal_conv1d_advance_state: conv_state", "expected shape (2,4,3)"});
}
