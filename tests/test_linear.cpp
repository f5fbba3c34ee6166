// Linear (through mamba::gemm): fast vs reference, finite differences of the backward in
// double, gradient accumulation (+=) and shape errors.
#include <functional>

#include "mamba/ops/linear.h"
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
        Tensor y = ops::linear_fwd(x, W, b);
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
      Tensor dx = ops::linear_bwd(x, W, g, &dW, &db);
      auto loss = [&] { return dot(ops::linear_ref_f64(x, W, b), g); };
      Tensor fdW = finite_diff(W, loss), fdb = finite_diff(b, loss);
      for (int64_t i = 0; i < fdW.numel(); ++i) fdW[i] += 0.25f;  // accumulated onto 0.25
      for (int64_t i = 0; i < fdb.numel(); ++i) fdb[i] -= 0.5f;
      std::string what = str("in=", in, " out=", out);
      EXPECT_TRUE(test::all_close(dx, finite_diff(x, loss), tol::kFiniteDiff, "dx " + what));
      EXPECT_TRUE(test::all_close(dW, fdW, tol::kFiniteDiff, "dW " + what));
      EXPECT_TRUE(test::all_close(db, fdb, tol::kFiniteDiff, "db " + what));
      // Without gradient pointers only dx is produced.
      EXPECT_TRUE(test::all_close(ops::linear_bwd(x, W, g, nullptr, nullptr), dx, {0, 0}, "dx only"));
    }
}

TEST(Linear, ShapeErrors) {
  Tensor x({2, 4}), W({3, 4}), b({3});
  EXPECT_THROW(ops::linear_fwd(x, Tensor({3, 5}), b), Error);
  EXPECT_THROW(ops::linear_fwd(x, Tensor({12}), b), Error);
  EXPECT_THROW(ops::linear_fwd(x, W, Tensor({4})), Error);
  EXPECT_THROW(ops::linear_fwd(Tensor(), W, b), Error);
  EXPECT_THROW(ops::linear_bwd(x, W, Tensor({2, 4}), nullptr, nullptr), Error);
  Tensor bad_dW({4, 3});
  EXPECT_THROW(ops::linear_bwd(x, W, Tensor({2, 3}), &bad_dW, nullptr), Error);
  try {
    ops::linear_fwd(x, Tensor({3, 5}), b);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(3,5)"), std::string::npos) << e.what();
  }
}
