// Linear (through mamba::gemm): fast vs reference, finite differences of the backward in
// double, gradient accumulation (+=) and shape errors.
#include <functional>

#include "ops/linear.h"
#include "test_util.h"

using namespace mamba;

namespace {

using test::dot;
using test::finite_diff;  // eps 1e-3

}  // namespace

TEST(Linear, FastMatchesReference) {
  Rng rng(1);
  for (int64_t in : {1, 15, 16, 17, 33})
    for (int64_t out : {1, 16, 17})
      for (bool has_b : {false, true}) {
        Tensor x = test::randn({2, 3, in}, rng), W = test::randn({out, in}, rng);
        Tensor b = has_b ? test::randn({out}, rng) : Tensor();
        Tensor y = ops::linear(x, Weight(W), b);
        EXPECT_EQ(y.shape(), (Shape{2, 3, out}));
        EXPECT_TRUE(test::all_close(y, ops::linear_ref(x, W, b), tol::kFastVsRef,
                                    str("in=", in, " out=", out, " b=", has_b)));
      }
}

TEST(Linear, BackwardFiniteDifferencesAndAccumulation) {
  Rng rng(2);
  for (int64_t in : {3, 17})
    for (int64_t out : {1, 5}) {
      Tensor x = test::randn({2, 3, in}, rng), W = test::randn({out, in}, rng);
      Tensor b = test::randn({out}, rng), g = test::randn({2, 3, out}, rng);
      Tensor dW = Tensor::full({out, in}, 0.25f), db = Tensor::full({out}, -0.5f);
      Tensor dx = ops::linear_bwd(x, Weight(W), g, &dW, &db);
      auto loss = [&] { return dot(ops::linear_ref_f64(x, W, b), g); };
      Tensor fdW = finite_diff(W, loss), fdb = finite_diff(b, loss);
      for (int64_t i = 0; i < fdW.numel(); ++i) fdW[i] += 0.25f;  // accumulated onto 0.25
      for (int64_t i = 0; i < fdb.numel(); ++i) fdb[i] -= 0.5f;
      std::string what = str("in=", in, " out=", out);
      EXPECT_TRUE(test::all_close(dx, finite_diff(x, loss), tol::kFiniteDiff, "dx " + what));
      EXPECT_TRUE(test::all_close(dW, fdW, tol::kFiniteDiff, "dW " + what));
      EXPECT_TRUE(test::all_close(db, fdb, tol::kFiniteDiff, "db " + what));
      // Without gradient pointers only dx is produced.
      EXPECT_TRUE(test::all_close(ops::linear_bwd(x, Weight(W), g, nullptr, nullptr), dx, {0, 0},
                                  "dx only"));
    }
}

TEST(Linear, ShapeErrors) {
  Tensor x({2, 4}), W({3, 4}), b({3});
  EXPECT_THROW(ops::linear(x, Weight(Tensor({3, 5})), b), Error);
  EXPECT_THROW(ops::linear(x, Weight(Tensor({12})), b), Error);
  EXPECT_THROW(ops::linear(x, Weight(W), Tensor({4})), Error);
  EXPECT_THROW(ops::linear(Tensor(), Weight(W), b), Error);
  EXPECT_THROW(ops::linear_bwd(x, Weight(W), Tensor({2, 4}), nullptr, nullptr), Error);
  Tensor bad_dW({4, 3});
  EXPECT_THROW(ops::linear_bwd(x, Weight(W), Tensor({2, 3}), &bad_dW, nullptr), Error);
  try {
    ops::linear(x, Weight(Tensor({3, 5})), b);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(3,5)"), std::string::npos) << e.what();
  }
}

// ops::linear on strided views (column blocks of a wider matrix) must give the bits of the same
// call on packed copies, for every kernel path (M = 1 and 2..16: streaming; > 16: gemm_nt)
// and every storage.
TEST(Linear, StridedViewsMatchCopiesBitwise) {
  Rng rng(5);
  const int64_t in = 19, out = 13;
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16})
    for (int64_t M : {1, 2, 7, 16, 17, 40})
      for (bool has_b : {false, true})
        for (bool acc : {false, true}) {
          const std::string what = str(weight_dtype_name(t), " M=", M, " b=", has_b, " acc=", acc);
          Weight W(test::randn({out, in}, rng), t);
          Tensor b = has_b ? test::randn({out}, rng) : Tensor();
          Tensor xw = test::randn({M, in + 7}, rng);   // x = columns [3, 3 + in)
          Tensor yw = test::randn({M, out + 5}, rng);  // y = columns [2, 2 + out)
          Tensor x = xw.cols(3, in), y = yw.cols(2, out);
          if (M > 1) {
            EXPECT_FALSE(x.is_contiguous());
            EXPECT_FALSE(y.is_contiguous());
          }
          Tensor yc = y.contiguous(), before = yw.clone();
          ops::linear_into(x, W, b, y, acc);
          ops::linear_into(x.contiguous(), W, b, yc, acc);
          EXPECT_TRUE(test::all_close(y.contiguous(), yc, {0, 0}, what));
          if (!acc) {
            EXPECT_TRUE(test::all_close(ops::linear(x, W, b), yc, {0, 0}, what + " linear"));
          }
          // the columns outside the view are untouched
          for (int64_t m = 0; m < M; ++m)
            for (int64_t j = 0; j < out + 5; ++j)
              if (j < 2 || j >= 2 + out) {
                ASSERT_EQ(yw[m * (out + 5) + j], before[m * (out + 5) + j]) << what;
              }
        }
}

// Backward through row blocks of W and strided x / dx / dy: the same bits as on copies.
TEST(Linear, BackwardOnRowBlocksAndViewsMatchesCopies) {
  Rng rng(6);
  const int64_t in = 11, out = 12;
  for (int64_t M : {1, 5, 33}) {
    Tensor Wt = test::randn({out, in}, rng);
    Weight W(Wt);
    Tensor xw = test::randn({M, in + 4}, rng), dyw = test::randn({M, out + 3}, rng);
    Tensor x = xw.cols(4, in), dy = dyw.cols(0, out);
    // two row blocks [0, 5) and [5, 12), dx accumulated
    Tensor dxw = Tensor::zeros({M, in + 2}), dx = dxw.cols(1, in);
    Tensor dW = Tensor::zeros({out, in}), db = Tensor::zeros({out});
    Tensor dW0 = dW.narrow(0, 5), dW1 = dW.narrow(5, out - 5), db0 = db.narrow(0, 5),
           db1 = db.narrow(5, out - 5);
    ops::linear_bwd_into(x, W.rows(0, 5), dy.cols(0, 5), dx, false, &dW0, &db0);
    ops::linear_bwd_into(x, W.rows(5, out - 5), dy.cols(5, out - 5), dx, true, &dW1, &db1);
    // on copies, the same two calls
    Tensor xc = x.contiguous(), dyc = dy.contiguous();
    Tensor dxc = Tensor::zeros({M, in}), dWc = Tensor::zeros({out, in}), dbc = Tensor::zeros({out});
    Tensor dWc0 = dWc.narrow(0, 5), dWc1 = dWc.narrow(5, out - 5), dbc0 = dbc.narrow(0, 5),
           dbc1 = dbc.narrow(5, out - 5);
    ops::linear_bwd_into(xc, Weight(Wt.narrow(0, 5).clone()), dyc.cols(0, 5).contiguous(), dxc,
                         false, &dWc0, &dbc0);
    ops::linear_bwd_into(xc, Weight(Wt.narrow(5, out - 5).clone()),
                         dyc.cols(5, out - 5).contiguous(), dxc, true, &dWc1, &dbc1);
    const std::string what = str("M=", M);
    EXPECT_TRUE(test::all_close(dx.contiguous(), dxc, {0, 0}, "dx " + what));
    EXPECT_TRUE(test::all_close(dW, dWc, {0, 0}, "dW " + what));
    EXPECT_TRUE(test::all_close(db, dbc, {0, 0}, "db " + what));
    // and close to the full-matrix backward
    Tensor dWf = Tensor::zeros({out, in}), dbf = Tensor::zeros({out});
    Tensor dxf = ops::linear_bwd(xc, W, dyc, &dWf, &dbf);
    EXPECT_TRUE(test::all_close(dxc, dxf, tol::kFastVsRef, "dx vs full " + what));
    EXPECT_TRUE(test::all_close(dWc, dWf, tol::kFastVsRef, "dW vs full " + what));
  }
}

TEST(Linear, SixteenBitWeightsRefuseBackward) {
  Tensor x({2, 4}), g({2, 3});
  Weight W(Tensor({3, 4}), WeightDType::bf16);
  test::expect_error([&] { ops::linear_bwd(x, W, g, nullptr, nullptr); },
                     {"bf16", "inference only"});
}
