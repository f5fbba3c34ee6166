// The small ops of ops/elementwise.h against plain loops, on contiguous tensors and strided views.
#include "ops/elementwise.h"
#include "test_util.h"

using namespace mamba;

TEST(Elementwise, AddMulCopyAndNegExp) {
  Rng rng(1);
  Tensor a = test::randn({3, 7}, rng), b = test::randn({3, 7}, rng), d = test::randn({3, 7}, rng);
  Tensor e = d.clone();
  ops::add_into(e, a);
  for (int64_t i = 0; i < 21; ++i) ASSERT_EQ(e[i], d[i] + a[i]);
  e = d.clone();
  ops::add_mul_into(e, a, b);
  for (int64_t i = 0; i < 21; ++i) ASSERT_EQ(e[i], d[i] + a[i] * b[i]);
  Tensor m = ops::mul(a, b);
  for (int64_t i = 0; i < 21; ++i) ASSERT_EQ(m[i], a[i] * b[i]);
  Tensor ne = ops::neg_exp(a), nf = ops::neg_exp_fast(a);
  for (int64_t i = 0; i < 21; ++i) ASSERT_EQ(ne[i], -std::exp(a[i]));
  EXPECT_TRUE(test::all_close(nf, ne, tol::kFastVsRef, "neg_exp_fast"));
  // into strided views: dst columns [2, 5) of a (3, 9) matrix
  Tensor wide = test::randn({3, 9}, rng), before = wide.clone();
  Tensor src = test::randn({3, 3}, rng);
  ops::add_into(wide.cols(2, 3), src);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t j = 0; j < 9; ++j)
      ASSERT_EQ(wide[r * 9 + j],
                j >= 2 && j < 5 ? before[r * 9 + j] + src[r * 3 + j - 2] : before[r * 9 + j]);
  ops::copy_into(wide.cols(6, 3), src);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t j = 0; j < 3; ++j) ASSERT_EQ(wide[r * 9 + 6 + j], src[r * 3 + j]);
  test::expect_error([&] { ops::add_into(a, Tensor({7, 3})); }, {"add_into", "(7,3)"});
}

TEST(Elementwise, BiasOpsMatchLoopsOnViews) {
  Rng rng(2);
  for (int64_t M : {1, 5, 33}) {
    Tensor y = test::randn({M, 10}, rng), b = test::randn({4}, rng);
    Tensor v = y.cols(3, 4), expect = y.clone();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < 4; ++j) expect[m * 10 + 3 + j] += b[j];
    ops::bias_add(v, b);
    EXPECT_EQ(test::max_abs_diff(y, expect), 0.0);
    ops::bias_fill(v, b);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < 4; ++j) ASSERT_EQ(y[m * 10 + 3 + j], b[j]);
    Tensor db = test::randn({4}, rng), dbr = db.clone();
    Tensor dy = test::randn({M, 4}, rng);
    ops::bias_grad(db, dy);
    ops::bias_grad_ref(dbr, dy);
    EXPECT_EQ(test::max_abs_diff(db, dbr), 0.0);  // the same order of sums
    Tensor db2 = Tensor::zeros({4});
    ops::bias_grad(db2, y.cols(3, 4));
    for (int64_t j = 0; j < 4; ++j) EXPECT_FLOAT_EQ(db2[j], M * b[j]);
  }
  test::expect_error([] { ops::bias_add(Tensor({2, 3}), Tensor({4})); }, {"bias_add", "(4)"});
}

TEST(Elementwise, EmbeddingForwardAnyDtypeAndDeterministicBackward) {
  Rng rng(3);
  const Tensor W = test::randn({11, 6}, rng);
  const std::vector<int32_t> ids = {3, 0, 10, 3, 3, 7};
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16}) {
    Weight w(W.clone(), t);
    Tensor out = ops::embedding_fwd(w, ids), ref = ops::embedding_fwd_ref(w.to_f32(), ids);
    EXPECT_EQ(out.shape(), (Shape{6, 6}));
    EXPECT_EQ(test::max_abs_diff(out, ref), 0.0) << weight_dtype_name(t);
  }
  test::expect_error(
      [&] {
        ops::embedding_fwd(Weight(W.clone()), std::vector<int32_t>{1, 11});
      },
      {"id 11", "position 1", "[0, 11)"});
  Tensor dy = test::randn({6, 6}, rng), g = test::randn({11, 6}, rng), gr = g.clone();
  ops::embedding_bwd(g, ids, dy);
  ops::embedding_bwd_ref(gr, ids, dy);
  EXPECT_EQ(test::max_abs_diff(g, gr), 0.0);  // repeated ids add in sequence order
  test::expect_error(
      [&] {
        ops::embedding_bwd(g, std::vector<int32_t>{-1}, Tensor({1, 6}));
      },
      {"id -1"});
}

TEST(Elementwise, ScaleAndLayerScaleMatchLoops) {
  Rng rng(3);
  for (int64_t M : {1, 5, 33}) {
    Tensor y = test::randn({M, 6}, rng), s = test::randn({6}, rng), before = y.clone();
    ops::scale_inplace(y, 0.5f);
    for (int64_t i = 0; i < y.numel(); ++i) ASSERT_EQ(y[i], before[i] * 0.5f);
    ops::mul_cols_inplace(y, s);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < 6; ++j) ASSERT_EQ(y[m * 6 + j], before[m * 6 + j] * 0.5f * s[j]);
    // gradient: ds += sum_m dy[m, j] * x[m, j], in row order
    Tensor dy = test::randn({M, 6}, rng), ds = test::randn({6}, rng), expect = ds.clone();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < 6; ++j) expect[j] += dy[m * 6 + j] * before[m * 6 + j];
    ops::mul_cols_grad(ds, dy, before);
    EXPECT_EQ(test::max_abs_diff(ds, expect), 0.0);
    // on a strided view: columns [1, 4) of an (M, 6) matrix
    Tensor w = before.clone(), s3 = test::randn({3}, rng);
    ops::mul_cols_inplace(w.cols(1, 3), s3);
    ops::scale_inplace(w.cols(1, 3), 2.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < 6; ++j)
        ASSERT_EQ(w[m * 6 + j],
                  j >= 1 && j < 4 ? before[m * 6 + j] * s3[j - 1] * 2.f : before[m * 6 + j]);
  }
  test::expect_error(
      [] {
        ops::mul_cols_inplace(Tensor({2, 3}), Tensor({4}));
      },
      {"mul_cols_inplace", "(4)"});
  test::expect_error(
      [] {
        ops::mul_cols_grad(Tensor({3}), Tensor({2, 3}), Tensor({3, 3}));
      },
      {"mul_cols_grad"});
}

// log_neg inverts neg_exp (GGUF stores A = -exp(A_log)); anything not finite and negative is
// refused with the element named.
TEST(Elementwise, LogNegInvertsNegExpAndRefusesBadA) {
  const Tensor x = Tensor::from({5}, {-3.f, -0.5f, 0.f, 0.7f, 2.5f});
  const Tensor back = ops::log_neg(ops::neg_exp(x), "A");
  for (int64_t i = 0; i < 5; ++i) EXPECT_NEAR(back[i], x[i], 1e-6f) << i;
  for (float bad : {0.f, 1.f, -INFINITY, NAN}) {
    try {
      ops::log_neg(Tensor::from({2}, {-1.f, bad}), "ssm_a");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("ssm_a[1]"), std::string::npos) << e.what();
    }
  }
}
