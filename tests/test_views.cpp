// Strided views (Tensor::cols), contiguous(), the data() guard on views, Tensor::wrap.
#include <cstring>

#include "test_util.h"

using namespace mamba;

namespace {
Tensor iota(Shape s) {
  Tensor t(std::move(s));
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(i);
  return t;
}
}  // namespace

TEST(Views, ColsIsAStridedViewSharingStorage) {
  Tensor t = iota({2, 3, 5});  // 6 rows of 5
  Tensor c = t.cols(1, 3);     // (2, 3, 3)
  EXPECT_EQ(c.shape(), (Shape{2, 3, 3}));
  EXPECT_FALSE(c.is_contiguous());
  EXPECT_EQ(c.rows(), 6);
  EXPECT_EQ(c.row_len(), 3);
  EXPECT_EQ(c.row_stride(), 5);
  EXPECT_EQ(c.numel(), 18);
  const float* p = c.view_data();
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t j = 0; j < 3; ++j) ASSERT_EQ(p[r * 5 + j], t[r * 5 + 1 + j]);
  // contiguous() packs exactly; the view writes through to the storage
  Tensor k = c.contiguous();
  EXPECT_TRUE(k.is_contiguous());
  for (int64_t r = 0; r < 6; ++r)
    for (int64_t j = 0; j < 3; ++j) ASSERT_EQ(k[r * 3 + j], t[r * 5 + 1 + j]);
  c.fill(-1.f);
  for (int64_t r = 0; r < 6; ++r) {
    EXPECT_EQ(t[r * 5], r * 5.f);
    EXPECT_EQ(t[r * 5 + 1], -1.f);
    EXPECT_EQ(t[r * 5 + 4], r * 5.f + 4);
  }
  // copy_from into a view (put_cols) and from a view
  c.copy_from(k);
  EXPECT_EQ(test::max_abs_diff(t, iota({2, 3, 5})), 0.0);
  Tensor k2 = Tensor::empty({2, 3, 3});
  k2.copy_from(c);
  EXPECT_EQ(test::max_abs_diff(k2, k), 0.0);
  // a view of a view; the full width is the tensor itself; one row is contiguous
  Tensor cc = c.cols(1, 1);
  EXPECT_EQ(cc.row_stride(), 5);
  EXPECT_EQ(cc.contiguous()[4], t[4 * 5 + 2]);
  EXPECT_TRUE(t.cols(0, 5).is_contiguous());
  EXPECT_TRUE(iota({1, 7}).cols(2, 3).is_contiguous());
  // narrow / select along dim 0 keep the stride; reshape keeps whole rows
  Tensor n = c.narrow(1, 1);  // (1, 3, 3): rows 3..5
  EXPECT_EQ(n.contiguous()[0], t[3 * 5 + 1]);
  Tensor s = c.select(1).select(2);  // one row: contiguous
  EXPECT_TRUE(s.is_contiguous());
  EXPECT_EQ(s[0], t[5 * 5 + 1]);
  Tensor rs = c.reshape({6, 3});
  EXPECT_EQ(rs.row_stride(), 5);
  EXPECT_EQ(rs.contiguous()[3], t[5 + 1]);
  Tensor split = t.cols(0, 4).reshape({2, 3, 2, 2});  // rows of 4 = (2, 2): still whole rows
  EXPECT_EQ(split.contiguous()[4], t[5]);
  test::expect_error([&] { t.cols(0, 4).reshape({4, 6}); }, {"strided view", "contiguous()"});
  test::expect_error([&] { split.cols(0, 1); }, {"cols", "contiguous()"});
  test::expect_error([&] { t.cols(3, 3); }, {"cols [3, 6)", "(2,3,5)"});
}

TEST(Views, DataOnAStridedViewThrows) {
  Tensor t = iota({4, 6});
  Tensor c = t.cols(2, 2);
  test::expect_error([&] { (void)c.data(); }, {"strided view", "(4,2)", "contiguous()"});
  test::expect_error([&] { (void)c[0]; }, {"strided view"});
  const Tensor& cc = c;
  test::expect_error([&] { (void)cc.data(); }, {"strided view"});
  // an op that has not been taught strides refuses rather than reading the wrong memory
  test::expect_error([&] { check_finite(Tensor(), "x"); }, {"x"});
  check_finite(c, "view");  // check_finite packs a view itself
  test::expect_error([&] { (void)Tensor().data(); }, {"undefined"});
  EXPECT_NO_THROW((void)c.contiguous().data());
}

TEST(Views, WrapUsesExternalMemoryAndRunsTheDeleterOnce) {
  int deleted = 0;
  float* buf = new float[6]{1, 2, 3, 4, 5, 6};
  {
    Tensor w = Tensor::wrap(buf, {2, 3}, [&](float* p) {
      ++deleted;
      delete[] p;
    });
    EXPECT_EQ(w.data(), buf);  // no copy
    EXPECT_EQ(w[4], 5.f);
    Tensor v = w.cols(1, 2);  // views keep the memory alive
    w = Tensor();
    EXPECT_EQ(deleted, 0);
    EXPECT_EQ(v.contiguous()[2], 5.f);
  }
  EXPECT_EQ(deleted, 1);
  // without a deleter the caller keeps ownership
  float local[4] = {1, 2, 3, 4};
  {
    Tensor w = Tensor::wrap(local, {4});
    w[1] = 20.f;
  }
  EXPECT_EQ(local[1], 20.f);
  test::expect_error([] { Tensor::wrap(nullptr, {2}); }, {"wrap", "null"});
}
