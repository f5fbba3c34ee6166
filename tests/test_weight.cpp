// Weight (fp32 / bf16 / f16 storage of one parameter) and ParamList's storage handling.
#include <cstring>
#include <type_traits>

#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/param.h"
#include "mamba/weight.h"
#include "test_util.h"

using namespace mamba;

namespace {
const WeightDType kAll[] = {WeightDType::f32, WeightDType::bf16, WeightDType::f16};
float rounded(float v, WeightDType t) {
  return t == WeightDType::f32 ? v : half_to_f32(f32_to_half(v, t), t);
}
}  // namespace

TEST(Weight, EveryDtypeHoldsTheRoundedValues) {
  Rng rng(1);
  const Tensor v = test::randn({7, 5}, rng);
  for (WeightDType t : kAll) {
    Weight w(v, t);
    const std::string what = weight_dtype_name(t);
    EXPECT_EQ(w.dtype(), t);
    EXPECT_EQ(w.is_f32(), t == WeightDType::f32);
    EXPECT_EQ(w.shape(), (Shape{7, 5}));
    EXPECT_EQ(w.numel(), 35);
    EXPECT_EQ(w.rows(), 7);
    EXPECT_EQ(w.cols(), 5);
    EXPECT_EQ(w.bytes(), 35 * (t == WeightDType::f32 ? 4 : 2));
    Tensor f = w.to_f32();
    for (int64_t i = 0; i < 35; ++i) ASSERT_EQ(f[i], rounded(v[i], t)) << what;
    std::vector<float> row(5);
    w.row_to_f32(3, row.data());
    for (int64_t j = 0; j < 5; ++j) ASSERT_EQ(row[j], f[3 * 5 + j]) << what;
    if (t == WeightDType::f32) {
      EXPECT_EQ(w.f32().data(), v.data());  // shares the tensor
      EXPECT_EQ(w.to_f32().data(), v.data());
    } else {
      const std::string are = str("weights are ", what);
      test::expect_error([&] { (void)w.f32("in_proj.weight"); },
                         {"in_proj.weight", are.c_str(), "inference only", "load in f32 to train"});
    }
    test::expect_error([&] { w.row_to_f32(7, row.data()); }, {"row 7"});
  }
}

TEST(Weight, AssignSetDtypeRoundTripAndRowViews) {
  Rng rng(2);
  const Tensor v = test::randn({6, 4}, rng), v2 = test::randn({6, 4}, rng);
  for (WeightDType t : kAll) {
    const std::string what = weight_dtype_name(t);
    Weight w(v.clone());
    w.set_dtype(t);
    w.assign(v2);  // rounds into the storage
    Tensor f = w.to_f32();
    for (int64_t i = 0; i < 24; ++i) ASSERT_EQ(f[i], rounded(v2[i], t)) << what;
    test::expect_error([&] { w.assign(Tensor({4, 6})); }, {"assign", "(4,6)", "(6,4)"});
    // rows view shares storage: a later assign shows through it
    Weight r = w.rows(2, 3);
    EXPECT_EQ(r.shape(), (Shape{3, 4}));
    Tensor rf = r.to_f32();
    for (int64_t i = 0; i < 12; ++i) ASSERT_EQ(rf[i], f[8 + i]) << what;
    w.assign(v);
    rf = r.to_f32();
    for (int64_t i = 0; i < 12; ++i)
      ASSERT_EQ(rf[i], rounded(v[8 + i], t)) << what << " view shares storage";
    test::expect_error([&] { w.rows(4, 3); }, {"[4, 7)", "(6,4)"});
    // back to f32 exactly, then to another kind and back
    w.set_dtype(WeightDType::f32);
    f = w.f32();
    for (int64_t i = 0; i < 24; ++i) ASSERT_EQ(f[i], rounded(v[i], t)) << what;
    for (WeightDType u : kAll) {
      Weight x(f.clone(), t);
      x.set_dtype(u);
      x.set_dtype(t);
      Tensor xf = x.to_f32();
      for (int64_t i = 0; i < 24; ++i)
        ASSERT_EQ(xf[i], rounded(rounded(f[i], u), t)) << what << "->" << weight_dtype_name(u);
    }
  }
}

TEST(ParamList, StorageCountAndStableAddresses) {
  static_assert(!std::is_copy_constructible_v<ParamList>);
  static_assert(std::is_nothrow_move_constructible_v<ParamList>);
  static_assert(!std::is_copy_constructible_v<Mamba1> && std::is_move_constructible_v<Mamba1>);
  static_assert(!std::is_copy_constructible_v<Mamba2> && std::is_move_constructible_v<Mamba2>);
  ParamList ps;
  Param* w = &ps.add_matrix("proj.weight", {8, 4});
  Param* b = &ps.add("proj.bias", {8}, true);
  for (int i = 0; i < 100; ++i) ps.add(str("p", i), {1});  // add never moves the earlier ones
  EXPECT_EQ(&ps.get("proj.weight"), w);
  EXPECT_EQ(&ps.get("proj.bias"), b);
  EXPECT_TRUE(w->matrix);
  EXPECT_FALSE(b->matrix);
  ParamList moved = std::move(ps);  // moving the list keeps the elements where they are
  EXPECT_EQ(&moved.get("proj.weight"), w);
  const int64_t n = moved.count();
  EXPECT_EQ(n, 32 + 8 + 100);
  w->grad().fill(1.f);
  for (WeightDType t : {WeightDType::bf16, WeightDType::f16}) {
    moved.set_weight_dtype(t);
    EXPECT_EQ(moved.weight_dtype(), t);
    EXPECT_EQ(w->value.dtype(), t);
    EXPECT_FALSE(w->has_grad());     // released
    EXPECT_TRUE(b->value.is_f32());  // biases stay fp32
    EXPECT_EQ(moved.count(), n);     // every scalar, whatever the storage
    moved.zero_grad();               // skips the undefined gradient
    const std::string are = str("weights are ", weight_dtype_name(t));
    test::expect_error([&] { moved.check_f32("Layer::backward"); },
                       {"Layer::backward", are.c_str(), "proj.weight"});
  }
  moved.set_weight_dtype(WeightDType::f32);
  EXPECT_TRUE(w->value.is_f32());
  EXPECT_FALSE(w->has_grad());  // allocated again on first use, zeroed
  EXPECT_EQ(test::max_abs_diff(w->grad(), Tensor({8, 4})), 0.0);  // zero gradient
  moved.check_f32("ok");
  // Layers keep pointers into their list: a moved layer still computes.
  Mamba1Config c;
  c.d_model = 8, c.d_state = 4;
  Mamba1 a(c, 3), ref(c, 3);
  Mamba1 m = std::move(a);
  Rng rng(4);
  Tensor h = test::randn({1, 3, 8}, rng);
  EXPECT_EQ(test::max_abs_diff(m.forward(h), ref.forward(h)), 0.0);
}
