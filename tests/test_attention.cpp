// ops/attention: the blocked online-softmax forward and its backward against the naive references
// (awkward sizes around the 32-query / 64-key blocks, GQA / MQA, causal with Lk > L, non-causal),
// the references' gradients against finite differences in double, the KV-cache decode step against
// the forward, rotary (interleaved / not, partial) against its reference, its backward by finite
// differences in double, determinism, shape errors.
#include <cmath>
#include <vector>

#include "ops/attention.h"
#include "test_util.h"

using namespace mamba;
using ops::AttnDims;
using ops::AttnOpts;

namespace {

struct Case {
  int64_t B, L, Lk, H, KV, P;
  bool causal;
};

const Case kCases[] = {{1, 1, 1, 1, 1, 4, true},     {2, 19, 19, 4, 2, 16, true},
                       {1, 33, 33, 2, 1, 15, true},  {2, 70, 70, 3, 3, 17, true},
                       {1, 31, 97, 4, 2, 8, true},   {2, 65, 65, 6, 1, 8, false},
                       {1, 5, 130, 2, 2, 32, false}, {1, 129, 129, 2, 2, 24, true}};

std::vector<double> f64(const Tensor& t) {
  return std::vector<double>(t.data(), t.data() + t.numel());
}

}  // namespace

TEST(Attention, FastForwardMatchesReference) {
  Rng rng(1);
  for (const Case& c : kCases) {
    Tensor q = test::randn({c.B, c.L, c.H, c.P}, rng), k = test::randn({c.B, c.Lk, c.KV, c.P}, rng),
           v = test::randn({c.B, c.Lk, c.KV, c.P}, rng);
    AttnOpts o{c.causal, 0};
    Tensor lse;
    Tensor y = ops::attention_fwd(q, k, v, o, &lse);
    EXPECT_TRUE(test::all_close(y, ops::attention_ref(q, k, v, o), tol::kFastVsRef, "out"))
        << c.B << "," << c.L << "," << c.Lk << "," << c.H << "," << c.KV << "," << c.P;
    EXPECT_EQ(lse.shape(), (Shape{c.B, c.H, c.L}));
  }
  // An explicit softmax scale.
  Tensor q = test::randn({1, 9, 2, 8}, rng), k = test::randn({1, 9, 1, 8}, rng),
         v = test::randn({1, 9, 1, 8}, rng);
  AttnOpts o{true, 0.7f};
  EXPECT_TRUE(test::all_close(ops::attention_fwd(q, k, v, o), ops::attention_ref(q, k, v, o),
                              tol::kFastVsRef, "scale 0.7"));
}

TEST(Attention, FastBackwardMatchesReference) {
  Rng rng(2);
  for (const Case& c : kCases) {
    Tensor q = test::randn({c.B, c.L, c.H, c.P}, rng), k = test::randn({c.B, c.Lk, c.KV, c.P}, rng),
           v = test::randn({c.B, c.Lk, c.KV, c.P}, rng), dy = test::randn(q.shape(), rng);
    AttnOpts o{c.causal, 0};
    Tensor lse;
    Tensor y = ops::attention_fwd(q, k, v, o, &lse);
    ops::AttnGrads g = ops::attention_bwd(q, k, v, y, lse, dy, o);
    ops::AttnGrads r = ops::attention_bwd_ref(q, k, v, dy, o);
    EXPECT_TRUE(test::all_close(g.dq, r.dq, tol::kFastVsRefGrad, "dq")) << c.L << " " << c.Lk;
    EXPECT_TRUE(test::all_close(g.dk, r.dk, tol::kFastVsRefGrad, "dk")) << c.L << " " << c.Lk;
    EXPECT_TRUE(test::all_close(g.dv, r.dv, tol::kFastVsRefGrad, "dv")) << c.L << " " << c.Lk;
  }
}

// The reference backward against central differences of the reference forward, all in double.
TEST(Attention, ReferenceGradientsMatchFiniteDifferencesInDouble) {
  Rng rng(3);
  for (const Case& c : {Case{2, 5, 5, 4, 2, 3, true}, Case{1, 3, 6, 2, 1, 4, true},
                        Case{1, 4, 4, 3, 3, 2, false}}) {
    const AttnDims d{c.B, c.L, c.Lk, c.H, c.KV, c.P};
    Tensor q = test::randn({c.B, c.L, c.H, c.P}, rng), k = test::randn({c.B, c.Lk, c.KV, c.P}, rng),
           v = test::randn({c.B, c.Lk, c.KV, c.P}, rng), g = test::randn(q.shape(), rng);
    AttnOpts o{c.causal, 0};
    ops::AttnGrads r = ops::attention_bwd_ref(q, k, v, g, o);
    std::vector<double> Q = f64(q), K = f64(k), V = f64(v);
    auto loss = [&] { return test::dot(ops::attention_ref_f64(Q, K, V, d, o), g); };
    auto fd = [&](std::vector<double>& x) {
      Tensor out = Tensor::empty({static_cast<int64_t>(x.size())});
      for (size_t i = 0; i < x.size(); ++i) {
        const double x0 = x[i], eps = 1e-6;
        x[i] = x0 + eps;
        const double lp = loss();
        x[i] = x0 - eps;
        const double lm = loss();
        x[i] = x0;
        out[static_cast<int64_t>(i)] = static_cast<float>((lp - lm) / (2 * eps));
      }
      return out;
    };
    EXPECT_TRUE(test::all_close(r.dq.reshape({-1}), fd(Q), tol::kFiniteDiff, "dq"));
    EXPECT_TRUE(test::all_close(r.dk.reshape({-1}), fd(K), tol::kFiniteDiff, "dk"));
    EXPECT_TRUE(test::all_close(r.dv.reshape({-1}), fd(V), tol::kFiniteDiff, "dv"));
  }
}

TEST(Attention, DecodeOverCacheEqualsForwardRow) {
  Rng rng(4);
  const int64_t B = 3, H = 4, KV = 2, P = 16, cap = 80;
  Tensor kc = test::randn({B, cap, KV, P}, rng), vc = test::randn({B, cap, KV, P}, rng);
  Tensor q = test::randn({B, H, P}, rng);
  const std::vector<int64_t> lens = {1, 37, 80};
  Tensor y = ops::attention_decode(q, kc, vc, lens, {true, 0});
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lens[b];
    Tensor qb = q.select(b).clone().reshape({1, 1, H, P});
    Tensor kb = kc.select(b).narrow(0, n).clone().reshape({1, n, KV, P});
    Tensor vb = vc.select(b).narrow(0, n).clone().reshape({1, n, KV, P});
    Tensor want = ops::attention_ref(qb, kb, vb, {true, 0}).reshape({H, P});
    EXPECT_TRUE(test::all_close(y.select(b).clone(), want, tol::kFastVsRef, "decode row"));
  }
  test::expect_error(
      [&] {
        ops::attention_decode(q, kc, vc, std::vector<int64_t>{1, 0, 3}, {});
      },
      {"lens[1] = 0"});
  test::expect_error(
      [&] {
        ops::attention_decode(q, kc, vc, std::vector<int64_t>{1, 81, 3}, {});
      },
      {"lens[1] = 81"});
}

TEST(Attention, BackwardIsDeterministic) {
  Rng rng(5);
  Tensor q = test::randn({2, 50, 6, 8}, rng), k = test::randn({2, 50, 2, 8}, rng),
         v = test::randn({2, 50, 2, 8}, rng), dy = test::randn(q.shape(), rng);
  Tensor lse;
  Tensor y = ops::attention_fwd(q, k, v, {true, 0}, &lse);
  ops::AttnGrads a = ops::attention_bwd(q, k, v, y, lse, dy, {true, 0});
  for (int rep = 0; rep < 3; ++rep) {
    ops::AttnGrads b = ops::attention_bwd(q, k, v, y, lse, dy, {true, 0});
    EXPECT_EQ(test::max_abs_diff(a.dq, b.dq), 0.0);
    EXPECT_EQ(test::max_abs_diff(a.dk, b.dk), 0.0);
    EXPECT_EQ(test::max_abs_diff(a.dv, b.dv), 0.0);
  }
}

TEST(Attention, ShapeErrors) {
  Rng rng(6);
  Tensor q = test::randn({1, 4, 3, 8}, rng), k = test::randn({1, 4, 2, 8}, rng);
  test::expect_error([&] { ops::attention_fwd(q, k, k, {}); }, {"kv heads", "query heads"});
  Tensor q2 = test::randn({1, 5, 2, 8}, rng);
  test::expect_error([&] { ops::attention_fwd(q2, k, k, {true, 0}); }, {"Lk", ">= L"});
  Tensor k3 = test::randn({1, 4, 2, 7}, rng);
  test::expect_error([&] { ops::attention_fwd(q2, k3, k3, {false, 0}); }, {"attention: k"});
}

// ---- rotary -------------------------------------------------------------------------------------

TEST(Rotary, FastMatchesReferenceAndInverts) {
  Rng rng(7);
  for (bool inter : {false, true})
    for (int64_t R : {0, 8, 16}) {
      Tensor x = test::randn({2, 13, 3, 16}, rng);
      const std::vector<int64_t> pos = {0, 1000};
      ops::RotaryOpts ro{R, 10000.0, inter};
      Tensor y = x.clone();
      ops::rotary_inplace(y, pos, ro);
      std::vector<double> want = ops::rotary_ref_f64(f64(x), x.shape(), pos, ro);
      Tensor w = Tensor::empty(x.shape());
      for (int64_t i = 0; i < w.numel(); ++i) w[i] = static_cast<float>(want[i]);
      EXPECT_TRUE(test::all_close(y, w, tol::kFastVsRef, "rotary")) << R << " " << inter;
      // The dims past R are untouched; the inverse restores x.
      if (R < 16) {
        EXPECT_EQ(y[15], x[15]);
      }
      ops::rotary_inplace(y, pos, ro, true);
      EXPECT_TRUE(test::all_close(y, x, tol::kFastVsRef, "inverse"));
    }
  // Position 0 is the identity.
  Tensor x = test::randn({1, 1, 2, 8}, rng), y = x.clone();
  const int64_t zero = 0;
  ops::rotary_inplace(y, {&zero, 1}, {8, 10000.0, false});
  EXPECT_EQ(test::max_abs_diff(x, y), 0.0);
  test::expect_error(
      [&] {
        ops::rotary_inplace(y, {&zero, 1}, {7, 10000.0, false});
      },
      {"rot_dim", "even"});
}

// The backward (the inverse rotation applied to the output gradient) against central differences
// of sum(rotary_ref(x) * g) in double.
TEST(Rotary, BackwardMatchesFiniteDifferencesInDouble) {
  Rng rng(8);
  for (bool inter : {false, true}) {
    const Shape s{2, 5, 2, 8};
    Tensor x = test::randn(s, rng), g = test::randn(s, rng);
    const std::vector<int64_t> pos = {3, 11};
    ops::RotaryOpts ro{6, 10000.0, inter};
    Tensor dx = g.clone();
    ops::rotary_inplace(dx, pos, ro, true);
    std::vector<double> X = f64(x);
    Tensor fd = Tensor::empty(s);
    for (int64_t i = 0; i < x.numel(); ++i) {
      const double x0 = X[i], eps = 1e-6;
      X[i] = x0 + eps;
      const double lp = test::dot(ops::rotary_ref_f64(X, s, pos, ro), g);
      X[i] = x0 - eps;
      const double lm = test::dot(ops::rotary_ref_f64(X, s, pos, ro), g);
      X[i] = x0;
      fd[i] = static_cast<float>((lp - lm) / (2 * eps));
    }
    EXPECT_TRUE(test::all_close(dx, fd, tol::kFiniteDiff, "rotary dx")) << inter;
  }
}
