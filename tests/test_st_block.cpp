// The spatio-temporal block (nn/st_block.h): backward against directional finite differences for
// every parameter and the input (Mamba-1, Mamba-2 and causal-MHA temporal mixers), the streaming
// step against the forward (from zero and after a prefill), ragged shapes T = 1 and N = 1, the
// gated fusion op against finite differences in double, config and shape errors.
#include <cmath>

#include "mamba/nn/st_block.h"
#include "mamba/st_forecast.h"
#include "ops/gated_fusion.h"
#include "test_util.h"

using namespace mamba;

namespace {

STBlockConfig make_cfg(int kind, int64_t N, int64_t C) {
  STBlockConfig c;
  c.num_nodes = N, c.d_model = C, c.num_heads = 2;
  if (kind == 0) {
    Mamba1Config m;
    m.d_state = 4;
    c.temporal = m;
  } else if (kind == 1) {
    Mamba2Config m;
    m.d_state = 8, m.headdim = 4, m.chunk_size = 4;
    c.temporal = m;
  } else {
    MHAConfig m;
    m.num_heads = 2, m.causal = true, m.rotary_emb_dim = 2;
    c.temporal = m;
  }
  return c;
}

const char* kKinds[] = {"Mamba1", "Mamba2", "MHA"};

// Time step t of (B, T, N, C) as (B, N, C).
Tensor at_time(const Tensor& x, int64_t t) {
  const int64_t B = x.dim(0), T = x.dim(1), NC = x.dim(2) * x.dim(3);
  return x.reshape({B, T * NC}).cols(t * NC, NC).contiguous().reshape({B, x.dim(2), x.dim(3)});
}

}  // namespace

TEST(STBlock, BackwardMatchesDirectionalFiniteDifferences) {
  for (int kind = 0; kind < 3; ++kind) {
    STBlock blk(make_cfg(kind, 3, 8), 11);
    Rng rng(5);
    Tensor x = test::randn({2, 5, 3, 8}, rng), g = test::randn({2, 5, 3, 8}, rng);
    STBlockSaved sv;
    blk.forward(x, &sv);
    for (auto& [n, p] : blk.named_parameters()) p->grad().zero();
    Tensor dx = blk.backward(sv, g);
    auto loss = [&] {
      Tensor y = blk.forward(x);
      double s = 0;
      for (int64_t i = 0; i < y.numel(); ++i) s += (double)y[i] * g[i];
      return s;
    };
    auto check = [&](Tensor& p, const Tensor& grad, const std::string& what) {
      Tensor u = test::randn(p.shape(), rng);
      const double eps = 2e-3;
      Tensor p0 = p.clone();
      for (int64_t i = 0; i < p.numel(); ++i) p[i] = p0[i] + (float)eps * u[i];
      const double lp = loss();
      for (int64_t i = 0; i < p.numel(); ++i) p[i] = p0[i] - (float)eps * u[i];
      const double lm = loss();
      p.copy_from(p0);
      double an = 0;
      for (int64_t i = 0; i < p.numel(); ++i) an += (double)grad[i] * u[i];
      const double fd = (lp - lm) / (2 * eps);
      EXPECT_NEAR(an, fd, tol::kLayerDirFD.atol + tol::kLayerDirFD.rtol * std::fabs(fd))
          << kKinds[kind] << " " << what;
    };
    check(x, dx, "x");
    for (auto& [n, p] : blk.named_parameters()) check(p->value.f32(), p->grad(), n);
  }
}

TEST(STBlock, StreamingStepEqualsForward) {
  for (int kind = 0; kind < 3; ++kind)
    for (auto [N, T] : {std::pair<int64_t, int64_t>{4, 9}, {1, 6}, {3, 1}}) {
      STBlock blk(make_cfg(kind, N, 8), 3);
      Rng rng(7);
      const int64_t B = 2;
      Tensor x = test::randn({B, T, N, 8}, rng);
      Tensor y = blk.forward(x);
      STBlockState st = blk.new_state(B);
      for (int64_t t = 0; t < T; ++t) {
        Tensor yt = blk.step(at_time(x, t), st);
        EXPECT_TRUE(test::all_close(yt, at_time(y, t), tol::kStepVsFull, "step"))
            << kKinds[kind] << " N=" << N << " T=" << T << " t=" << t;
      }
      // Prefill the first steps, then stream the rest.
      if (T > 2) {
        const int64_t P = T / 2;
        STBlockState sp;
        Tensor xp = x.reshape({B, T * N * 8}).cols(0, P * N * 8).contiguous().reshape({B, P, N, 8});
        blk.forward(xp, nullptr, &sp);
        for (int64_t t = P; t < T; ++t)
          EXPECT_TRUE(test::all_close(blk.step(at_time(x, t), sp), at_time(y, t), tol::kStepVsFull,
                                      "prefill + step"))
              << kKinds[kind] << " t=" << t;
      }
    }
}

TEST(STBlock, GatedFusionMatchesFiniteDifferencesInDouble) {
  Rng rng(2);
  const Shape s{3, 5};
  Tensor pre = test::randn(s, rng), hs = test::randn(s, rng), ht = test::randn(s, rng),
         g = test::randn(s, rng);
  ops::FusionOut fo = ops::gated_fusion_fwd(pre, hs, ht);
  auto f64 = [](const Tensor& t) { return std::vector<double>(t.data(), t.data() + t.numel()); };
  std::vector<double> P = f64(pre), A = f64(hs), Bv = f64(ht);
  std::vector<double> want = ops::gated_fusion_ref_f64(P, A, Bv);
  for (int64_t i = 0; i < fo.h.numel(); ++i) EXPECT_NEAR(fo.h[i], want[i], 1e-6);
  ops::FusionGrads gr = ops::gated_fusion_bwd(fo.z, hs, ht, g);
  auto fd = [&](std::vector<double>& v) {
    Tensor out = Tensor::empty(s);
    for (size_t i = 0; i < v.size(); ++i) {
      const double v0 = v[i], eps = 1e-6;
      v[i] = v0 + eps;
      const double lp = test::dot(ops::gated_fusion_ref_f64(P, A, Bv), g);
      v[i] = v0 - eps;
      const double lm = test::dot(ops::gated_fusion_ref_f64(P, A, Bv), g);
      v[i] = v0;
      out[static_cast<int64_t>(i)] = static_cast<float>((lp - lm) / (2 * eps));
    }
    return out;
  };
  EXPECT_TRUE(test::all_close(gr.dpre, fd(P), tol::kFiniteDiff, "dpre"));
  EXPECT_TRUE(test::all_close(gr.dhs, fd(A), tol::kFiniteDiff, "dhs"));
  EXPECT_TRUE(test::all_close(gr.dht, fd(Bv), tol::kFiniteDiff, "dht"));
  // swap_dims12 twice is the identity and moves element (b, i, j, c) to (b, j, i, c).
  Tensor x = test::randn({2, 3, 4, 5}, rng);
  Tensor y = ops::swap_dims12(x);
  EXPECT_EQ(y.shape(), (Shape{2, 4, 3, 5}));
  EXPECT_EQ(y[((1 * 4 + 2) * 3 + 1) * 5 + 3], x[((1 * 3 + 1) * 4 + 2) * 5 + 3]);
  EXPECT_EQ(test::max_abs_diff(ops::swap_dims12(y), x), 0.0);
}

TEST(STBlock, ConfigAndShapeErrors) {
  STBlockConfig c = make_cfg(0, 3, 8);
  c.num_heads = 3;
  test::expect_error([&] { STBlock{c}; }, {"num_heads"});
  c = make_cfg(0, 0, 8);
  test::expect_error([&] { STBlock{c}; }, {"num_nodes"});
  c = make_cfg(2, 3, 8);
  std::get<MHAConfig>(c.temporal).causal = false;
  test::expect_error([&] { STBlock{c}; }, {"temporal.causal"});
  STBlock blk(make_cfg(0, 3, 8));
  Rng rng(1);
  test::expect_error([&] { blk.forward(test::randn({2, 4, 2, 8}, rng)); }, {"STBlock::forward"});
  STBlockState st = blk.new_state(2);
  test::expect_error([&] { blk.step(test::randn({1, 3, 8}, rng), st); }, {"STBlock::step"});
}

// The forecasting example's machinery on a short run: the series is deterministic, training and
// evaluation run, and the same seed gives the same result bit for bit.
TEST(STForecast, ShortRunIsDeterministic) {
  train::TrafficSeries a = train::make_traffic_series(5, 200, 3),
                       b = train::make_traffic_series(5, 200, 3);
  EXPECT_EQ(a.v, b.v);
  EXPECT_EQ(a.v.size(), 1000u);
  train::STForecastConfig c;
  c.nodes = 4, c.d_model = 8, c.seqlen = 8, c.batch = 4, c.steps = 6, c.series_len = 200;
  train::STForecastResult r1 = train::run_st_forecast(c), r2 = train::run_st_forecast(c);
  EXPECT_TRUE(std::isfinite(r1.mae_model) && r1.mae_model > 0);
  EXPECT_GT(r1.mae_persistence, 0);
  EXPECT_EQ(r1.mae_model, r2.mae_model);
  EXPECT_EQ(r1.final_loss, r2.final_loss);
  c.temporal = "transformer";
  test::expect_error([&] { train::run_st_forecast(c); }, {"temporal", "transformer"});
}
