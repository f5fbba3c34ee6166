// Vim's bidirectional Mamba (bimamba v2): both golden files from Vim's own module (output and
// every gradient), the layer equal to a forward Mamba1 plus a Mamba1 run on the time-flipped
// input and flipped back (output, dx and every gradient), finite differences of the backward,
// Vim's parameter names / shapes / count and init, config and shape errors, the shape trace.
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mamba/nn/bimamba.h"
#include "mamba/nn/mamba1.h"
#include "mamba/trace.h"
#include "test_util.h"

using namespace mamba;
using test::close_report;

namespace {

BiMambaConfig config_from_json(const std::string& js) {
  auto j = nlohmann::json::parse(js);
  BiMambaConfig c;
  c.d_model = j.at("d_model").get<int64_t>();
  if (j.contains("d_state")) c.d_state = j["d_state"].get<int64_t>();
  if (j.contains("d_conv")) c.d_conv = j["d_conv"].get<int64_t>();
  if (j.contains("expand")) c.expand = j["expand"].get<double>();
  if (j.contains("bias")) c.bias = j["bias"].get<bool>();
  if (j.contains("conv_bias")) c.conv_bias = j["conv_bias"].get<bool>();
  if (j.contains("bimamba_type")) c.bimamba_type = j["bimamba_type"].get<std::string>();
  if (j.contains("if_divide_out")) c.if_divide_out = j["if_divide_out"].get<bool>();
  if (j.contains("init_layer_scale") && !j["init_layer_scale"].is_null())
    c.init_layer_scale = j["init_layer_scale"].get<double>();
  return c;
}

// (B, L, d) with time reversed.
Tensor flip_time(const Tensor& t) {
  const int64_t B = t.dim(0), L = t.dim(1), d = t.dim(2);
  Tensor o(t.shape());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      for (int64_t i = 0; i < d; ++i) o[(b * L + s) * d + i] = t[(b * L + L - 1 - s) * d + i];
  return o;
}

}  // namespace

class BiMambaGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(BiMambaGolden, ForwardBackward) {
  const std::string name = GetParam();
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  BiMambaConfig cfg = config_from_json(f.meta("config"));
  BiMamba layer(cfg);
  EXPECT_EQ(layer.params().count(), std::stoll(f.meta("param_count")));
  EXPECT_EQ(layer.config().d_inner(), std::stoll(f.meta("d_inner")));
  EXPECT_EQ(layer.config().rank(), std::stoll(f.meta("dt_rank")));
  EXPECT_EQ(layer.config().if_divide_out, f.meta("if_divide_out") == "True");
  // Every parameter, in Vim's state_dict order.
  std::string names;
  for (const auto& p : layer.params().all()) names += (names.empty() ? "" : ",") + p.name;
  EXPECT_EQ(names, f.meta("param_names"));
  layer.params().load(f, "params.");
  BiMambaSaved saved;
  test::expect_golden_forward_backward(layer, f, name, saved);
}

INSTANTIATE_TEST_SUITE_P(Golden, BiMambaGolden,
                         ::testing::Values("vim_bimamba_v2_d16_div",
                                           "vim_bimamba_v2_d24_n8_nodiv_ls"));

TEST(BiMamba, EqualsForwardMambaPlusFlippedMamba) {
  // Without out_proj bias, divide and gamma, out_proj is linear, so the layer is exactly
  //   Mamba1_f(x) + flip(Mamba1_b(flip(x)))
  // with Mamba1_f holding the forward set and Mamba1_b the "_b" set (in_proj / out_proj shared).
  // The same holds for dx and, summed over both, for the shared parameters' gradients.
  Rng rng(21);
  for (int64_t L : {1, 3, 13, 70}) {
    BiMambaConfig c;
    c.d_model = 17, c.d_state = 5, c.d_conv = 3, c.dt_rank = 2;
    BiMamba bi(c, 4);
    test::spread_params(bi, rng);
    Mamba1Config mc;
    mc.d_model = 17, mc.d_state = 5, mc.d_conv = 3, mc.dt_rank = 2;
    Mamba1 mf(mc), mb(mc);
    auto& P = bi.params();
    auto set = [&](Mamba1& m, const std::string& dst, const std::string& src) {
      m.params().get(dst).value.f32().copy_from(P.get(src).value.f32());
    };
    for (auto [m, sfx] : {std::pair{&mf, std::string()}, std::pair{&mb, std::string("_b")}}) {
      set(*m, "A_log", sfx.empty() ? "A_log" : "A_b_log");
      set(*m, "D", sfx.empty() ? "D" : "D_b");
      set(*m, "in_proj.weight", "in_proj.weight");
      set(*m, "out_proj.weight", "out_proj.weight");
      for (const char* n :
           {"conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"}) {
        std::string s = n;
        set(*m, s, s.substr(0, s.find('.')) + sfx + s.substr(s.find('.')));
      }
    }
    const int64_t B = 2;
    Tensor x = test::randn({B, L, 17}, rng), g = test::randn({B, L, 17}, rng);
    BiMambaSaved sv;
    Tensor y = bi.forward(x, &sv);
    Mamba1Saved sf, sb;
    Tensor yf = mf.forward(x, &sf), yb = flip_time(mb.forward(flip_time(x), &sb));
    Tensor expect = yf.clone();
    for (int64_t i = 0; i < expect.numel(); ++i) expect[i] += yb[i];
    const std::string tag = str("L=", L);
    EXPECT_TRUE(close_report(y, expect, tol::kFastVsRef, tag + " y"));

    P.zero_grad();
    mf.params().zero_grad();
    mb.params().zero_grad();
    Tensor dx = bi.backward(sv, g);
    Tensor dxf = mf.backward(sf, g), dxb = flip_time(mb.backward(sb, flip_time(g)));
    for (int64_t i = 0; i < dxf.numel(); ++i) dxf[i] += dxb[i];
    EXPECT_TRUE(close_report(dx, dxf, tol::kFastVsRefGrad, tag + " dx"));
    for (auto& p : P.all()) {
      const std::string& n = p.name;
      Tensor expect_g;
      if (n == "in_proj.weight" || n == "out_proj.weight") {
        expect_g = mf.params().get(n).grad().clone();
        for (int64_t i = 0; i < expect_g.numel(); ++i) expect_g[i] += mb.params().get(n).grad()[i];
      } else if (n == "A_b_log") {
        expect_g = mb.params().get("A_log").grad();
      } else if (n == "D_b") {
        expect_g = mb.params().get("D").grad();
      } else if (n.find("_b.") != std::string::npos) {
        std::string m = n;
        m.erase(m.find("_b."), 2);
        expect_g = mb.params().get(m).grad();
      } else {
        expect_g = mf.params().get(n).grad();
      }
      EXPECT_TRUE(close_report(p.grad(), expect_g, tol::kFastVsRefGrad, tag + " grad." + n));
    }
  }
}

TEST(BiMamba, BackwardFiniteDifferences) {
  // Tiny config with every optional parameter (biases, divide, gamma); the layer evaluates in
  // fp32, so see kLayerFiniteDiffF32 for the tolerance.
  Rng rng(5);
  BiMambaConfig c;
  c.d_model = 4, c.d_state = 3, c.d_conv = 3, c.expand = 2, c.dt_rank = 2;
  c.bias = true, c.if_divide_out = true, c.init_layer_scale = 0.7;
  BiMamba m(c, 9);
  test::spread_params(m, rng);
  const int64_t B = 2, L = 5;
  Tensor x = test::randn({B, L, 4}, rng), g = test::randn({B, L, 4}, rng);
  const BiMambaSaved saved = test::expect_grads_match_finite_diff(m, x, g, 3e-3);
  test::expect_grads_accumulate(m, saved, g, "x_proj_b.weight");
}

TEST(BiMamba, FutureTokensReachThePast) {
  // Bidirectional: changing the last token changes the first output (a causal layer could not).
  BiMambaConfig c;
  c.d_model = 8;
  BiMamba m(c, 1);
  Rng rng(2);
  Tensor x = test::randn({1, 6, 8}, rng);
  Tensor y0 = m.forward(x);
  x[5 * 8 + 3] += 1.f;
  Tensor y1 = m.forward(x);
  double d = 0;
  for (int64_t i = 0; i < 8; ++i) d = std::max(d, (double)std::fabs(y1[i] - y0[i]));
  EXPECT_GT(d, 1e-6);
}

TEST(BiMamba, ParamNamesShapesAndInit) {
  BiMambaConfig c;
  c.d_model = 16;
  c.if_divide_out = true;
  BiMamba m(c);
  EXPECT_EQ(m.params().count(), 5184);  // vim_bimamba_v2_d16_div
  const auto& ps = m.params();
  EXPECT_FALSE(ps.has("gamma"));
  EXPECT_EQ(ps.get("x_proj_b.weight").value.shape(), (Shape{33, 32}));
  EXPECT_EQ(ps.get("conv1d_b.weight").value.shape(), (Shape{32, 1, 4}));
  EXPECT_TRUE(ps.get("A_b_log").no_weight_decay);
  EXPECT_TRUE(ps.get("D_b").no_weight_decay);
  for (const char* a : {"A_log", "A_b_log"})
    for (int64_t d = 0; d < 32; ++d)
      for (int64_t n = 0; n < 16; ++n)
        ASSERT_NEAR(ps.get(a).value.f32()[d * 16 + n], std::log(n + 1.0), 1e-6) << a;
  for (int64_t d = 0; d < 32; ++d) ASSERT_EQ(ps.get("D_b").value.f32()[d], 1.f);
  // dt_proj.bias: softplus in [dt_min, dt_max]; dt_proj_b: nn.Linear's default (|b| <= 1/sqrt(R)).
  for (int64_t d = 0; d < 32; ++d) {
    const double dt = std::log1p(std::exp((double)ps.get("dt_proj.bias").value.f32()[d]));
    EXPECT_GE(dt, 0.001 * (1 - 1e-4));
    EXPECT_LE(dt, 0.1 * (1 + 1e-4));
    EXPECT_LE(std::fabs(ps.get("dt_proj_b.bias").value.f32()[d]), 1.0);
  }
  c.init_layer_scale = 0.25;
  c.bias = true;
  BiMamba mg(c);
  EXPECT_EQ(mg.params().all().front().name, "gamma");
  EXPECT_FLOAT_EQ(mg.params().get("gamma").value.f32()[7], 0.25f);
  EXPECT_EQ(mg.params().count(), 5184 + 16 + 64 + 16);
}

TEST(BiMamba, ConfigValidation) {
  auto expect_error = [](const BiMambaConfig& c, const std::string& field) {
    test::expect_config_error<BiMamba>(c, field);
  };
  BiMambaConfig ok;
  ok.d_model = 8;
  EXPECT_NO_THROW(ok.validate());
  BiMambaConfig c = ok;
  c.d_model = 0;
  expect_error(c, "d_model");
  c = ok, c.d_state = 0;
  expect_error(c, "d_state");
  c = ok, c.d_conv = 0;
  expect_error(c, "d_conv");
  c = ok, c.expand = -1;
  expect_error(c, "expand");
  c = ok, c.expand = 0.05;
  expect_error(c, "d_inner");
  c = ok, c.dt_rank = 0;
  expect_error(c, "dt_rank");
  c = ok, c.dt_init = "xavier";
  expect_error(c, "dt_init");
  c = ok, c.dt_min = 0;
  expect_error(c, "dt_min");
  c = ok, c.dt_max = 1e-4;
  expect_error(c, "dt_max");
  c = ok, c.dt_init_floor = -1;
  expect_error(c, "dt_init_floor");
  c = ok, c.bimamba_type = "v1";
  expect_error(c, "bimamba_type");
  c = ok, c.init_layer_scale = std::nan("");
  expect_error(c, "init_layer_scale");
}

TEST(BiMamba, ShapeErrors) {
  BiMambaConfig c;
  c.d_model = 8;
  c.d_state = 4;
  BiMamba m(c);
  EXPECT_THROW(m.forward(Tensor({2, 8})), Error);
  EXPECT_THROW(m.forward(Tensor({2, 3, 7})), Error);
  EXPECT_THROW(m.forward(Tensor({2, 0, 8})), Error);
  EXPECT_THROW(m.forward(Tensor()), Error);
  BiMambaSaved saved;
  m.forward(Tensor({2, 3, 8}), &saved);
  EXPECT_THROW(m.backward(saved, Tensor({2, 4, 8})), Error);
  EXPECT_THROW(m.backward(BiMambaSaved{}, Tensor({2, 3, 8})), Error);
  test::expect_error([&] { m.forward(Tensor({2, 3, 7})); }, {"BiMamba", "hidden"});
}

TEST(BiMamba, ShapeTrace) {
  BiMambaConfig c;
  c.d_model = 16;
  c.if_divide_out = true;
  BiMamba m(c);
  std::ostringstream os;
  trace::set_stream(&os);
  trace::set_enabled(true);
  m.forward(Tensor({2, 32, 16}));
  trace::set_enabled(false);
  trace::set_stream(nullptr);
  const std::string s = os.str();
  const char* expected[] = {"in_proj (2,32,16) -> (2,32,64)",
                            "conv1d (2,32,32) -> (2,32,32)",
                            "x_proj (2,32,32) -> (2,32,33)",
                            "dt_proj (2,32,1) -> (2,32,32)",
                            "selective_scan ",
                            "conv1d_b (reverse) (2,32,32) -> (2,32,32)",
                            "x_proj_b (2,32,32) -> (2,32,33)",
                            "dt_proj_b (2,32,1) -> (2,32,32)",
                            "selective_scan_b (reverse) ",
                            "merge (y_f + y_b) / 2",
                            "out_proj (2,32,32) -> (2,32,16)"};
  size_t pos = 0;
  for (const char* e : expected) {
    size_t at = s.find(e, pos);
    ASSERT_NE(at, std::string::npos) << "missing or out of order: " << e << "\n" << s;
    pos = at + 1;
  }
}
