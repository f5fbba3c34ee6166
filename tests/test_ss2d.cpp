// VMamba's SS2D and VSSBlock: the golden files from VMamba's own code (output and every gradient,
// channel-first and channel-last, v0 / v05 / v05_noz), state_dict names and counts, strided vs
// copy cross scan inside the layer, finite differences of the layer backward, ragged images
// (H or W = 1, non-square), config errors naming the field, the shape trace.
#include <sstream>

#include "mamba/nn/ss2d.h"
#include "mamba/nn/vssblock.h"
#include "mamba/trace.h"
#include "test_util.h"

using namespace mamba;
using test::close_report;

namespace {

std::string names_of(const ParamList& ps) {
  std::string s;
  for (const auto& p : ps.all()) s += (s.empty() ? "" : ",") + p.name;
  return s;
}

}  // namespace

class SS2DGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(SS2DGolden, ForwardBackward) {
  const std::string name = GetParam();
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  const SS2DConfig cfg = SS2DConfig::from_json(f.meta("config"));
  for (SS2DScan scan : {SS2DScan::strided, SS2DScan::copy}) {
    SS2D layer(cfg);
    layer.set_scan_impl(scan);
    EXPECT_EQ(layer.params().count(), std::stoll(f.meta("param_count")));
    EXPECT_EQ(layer.config().d_inner(), std::stoll(f.meta("d_inner")));
    EXPECT_EQ(layer.config().rank(), std::stoll(f.meta("dt_rank")));
    EXPECT_EQ(names_of(layer.params()), f.meta("param_names"));
    layer.params().load(f, "params.");
    SS2DSaved saved;
    test::expect_golden_forward_backward(
        layer, f, name + (scan == SS2DScan::strided ? " strided" : " copy"), saved);
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, SS2DGolden,
                         ::testing::Values("ss2d_v05noz_d24_n4", "ss2d_v0_d16_n8",
                                           "ss2d_v05_d32_n4"));

// VMamba's Linear2d keeps nn.Linear's (out, in) weight but loads checkpoints that stored it as a
// 1x1 conv kernel (out, in, 1, 1): the golden block's Linear2d weights (in_proj / out_proj of the
// channel-first SS2D, mlp.fc1 / mlp.fc2) rewritten 4-D load to the same outputs; any other 4-D
// shape, or 4-D on a weight that is not a Linear2d, is refused with the shape.
TEST(VSSBlockGolden, Linear2dWeightsStoredFourDLoad) {
  const std::string name = "vssblock_v05noz_d24_n1";
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  const VSSBlockConfig cfg = VSSBlockConfig::from_json(f.meta("config"));
  // Writes the golden file again with the tensors chosen by `which` reshaped by `shape_of`.
  auto rewrite = [&](const std::string& path, auto which, auto shape_of) {
    std::vector<std::pair<std::string, Tensor>> ts;
    int n4 = 0;
    for (const auto& n : f.names()) {
      Tensor t = f.tensor(n);
      if (which(n)) {
        t = t.reshape(shape_of(t.shape()));
        ++n4;
      }
      ts.emplace_back(n, t);
    }
    save_safetensors(path, ts, f.metadata());
    return n4;
  };
  const std::string dir = ::testing::TempDir();
  VSSBlock ref(cfg), blk(cfg);
  ref.load(f, "params.");
  auto l2d = [](const std::string& n) {
    return n == "params.op.in_proj.weight" || n == "params.op.out_proj.weight" ||
           n == "params.mlp.fc1.weight" || n == "params.mlp.fc2.weight";
  };
  auto as_1x1 = [](const Shape& s) { return Shape{s[0], s[1], 1, 1}; };
  ASSERT_EQ(rewrite(dir + "/vss_4d.safetensors", l2d, as_1x1), 4);  // all four Linear2d weights
  blk.load(SafetensorsFile::open(dir + "/vss_4d.safetensors"), "params.");
  const Tensor x = f.tensor("x");
  const Tensor y0 = ref.forward(x), y1 = blk.forward(x);
  ASSERT_EQ(y0.shape(), y1.shape());
  for (int64_t i = 0; i < y0.numel(); ++i) ASSERT_EQ(y0.data()[i], y1.data()[i]) << i;
  EXPECT_TRUE(close_report(y1, f.tensor("y"), tol::kGoldenF32, name + " y (4-D Linear2d)"));

  VSSBlock bad(cfg);
  auto is = [](const char* key) { return [key](const std::string& n) { return n == key; }; };
  // (out, in / 2, 2, 1): 4-D but not a 1x1 kernel of this weight
  rewrite(dir + "/vss_4d_bad.safetensors", is("params.op.in_proj.weight"), [](const Shape& s) {
    return Shape{s[0], s[1] / 2, 2, 1};
  });
  EXPECT_THROW(bad.load(SafetensorsFile::open(dir + "/vss_4d_bad.safetensors"), "params."), Error);
  // a trailing 1 on a weight that is not a Linear2d
  rewrite(dir + "/vss_4d_notl2d.safetensors", is("params.op.x_proj_weight"), [](Shape s) {
    s.push_back(1);
    return s;
  });
  EXPECT_THROW(bad.load(SafetensorsFile::open(dir + "/vss_4d_notl2d.safetensors"), "params."),
               Error);
}

TEST(VSSBlockGolden, ForwardBackward) {
  const std::string name = "vssblock_v05noz_d24_n1";
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  const VSSBlockConfig cfg = VSSBlockConfig::from_json(f.meta("config"));
  VSSBlock blk(cfg);
  EXPECT_EQ(blk.param_count(), std::stoll(f.meta("param_count")));
  std::string names;
  for (const auto& [n, p] : blk.named_params()) names += (names.empty() ? "" : ",") + n;
  EXPECT_EQ(names, f.meta("param_names"));
  blk.load(f, "params.");
  Tensor x = f.tensor("x"), g = f.tensor("g");
  VSSBlockSaved saved;
  Tensor y = blk.forward(x, &saved);
  EXPECT_TRUE(close_report(y, f.tensor("y"), tol::kGoldenF32, name + " y"));
  blk.zero_grad();
  Tensor dx = blk.backward(saved, g);
  EXPECT_TRUE(close_report(dx, f.tensor("grad_x"), tol::kGoldenGradF32, name + " grad_x"));
  for (const auto& [n, p] : blk.named_params())
    EXPECT_TRUE(
        close_report(p->grad(), f.tensor("grad." + n), tol::kGoldenGradF32, name + " grad." + n));
}

// ---- layer properties on random weights ---------------------------------------------------

namespace {

SS2DConfig small_cfg(const std::string& ft, bool cf) {
  SS2DConfig c;
  c.d_model = 6;
  c.d_state = 2;
  c.ssm_ratio = 1.5;
  c.forward_type = ft;
  c.channel_first = cf;
  return c;
}

// Every parameter nudged so that nothing sits at its init symmetry (LayerNorm 1/0, D = 1).
void perturb(ParamList& ps, Rng& rng) {
  for (auto& p : ps.all()) {
    Tensor& v = p.value.f32();
    for (int64_t i = 0; i < v.numel(); ++i) v[i] += static_cast<float>(0.2 * rng.normal());
  }
}

}  // namespace

TEST(SS2D, BackwardMatchesDirectionalFiniteDifferences) {
  // Every forward type / layout on a ragged image: the layer backward against a central
  // difference of the fp32 layer forward along a random direction, for x and each parameter.
  // (Plain variables, not structured bindings: clang 14 cannot capture those in a lambda.)
  for (const auto& cfg : {std::pair<const char*, bool>{"v05_noz", true},
                          {"v0", false},
                          {"v05_oact", false},
                          {"v3_nozact", true},
                          {"v2_onnone", false}}) {
    const char* ft = cfg.first;
    const bool cf = cfg.second;
    Rng rng(21);
    SS2DConfig c = small_cfg(ft, cf);
    if (std::string(ft) == "v05_noz") c.d_conv = 1;  // also the no-conv path
    SS2D layer(c, 3);
    perturb(layer.params(), rng);
    const int64_t B = 2, H = 3, W = 5;
    Tensor x = cf ? test::randn({B, c.d_model, H, W}, rng) : test::randn({B, H, W, c.d_model}, rng);
    Tensor g = test::randn(x.shape(), rng);
    SS2DSaved s;
    layer.forward(x, &s);
    layer.params().zero_grad();
    Tensor dx = layer.backward(s, g);
    auto check = [&](Tensor& v, const Tensor& grad, const std::string& what) {
      Tensor dir = test::randn(v.shape(), rng);
      const double eps = 2e-3;
      Tensor orig = v.clone();
      auto at = [&](double sgn) {
        for (int64_t i = 0; i < v.numel(); ++i)
          v[i] = orig[i] + static_cast<float>(sgn * eps) * dir[i];
        return test::loss_dot(layer.forward(x), g);
      };
      const double fd = (at(1) - at(-1)) / (2 * eps);
      v.copy_from(orig);
      double an = 0;
      for (int64_t i = 0; i < v.numel(); ++i) an += (double)grad[i] * dir[i];
      EXPECT_NEAR(an, fd, tol::kLayerDirFD.atol + tol::kLayerDirFD.rtol * std::fabs(fd))
          << ft << " " << what;
    };
    check(x, dx, "x");
    for (auto& p : layer.params().all()) check(p.value.f32(), p.grad(), p.name);
  }
}

TEST(SS2D, RaggedImagesStridedEqualsCopy) {
  Rng rng(22);
  for (auto [H, W] : {std::pair<int64_t, int64_t>{1, 9}, {9, 1}, {1, 1}, {4, 7}, {7, 4}}) {
    SS2DConfig c = small_cfg("v05", false);
    SS2D a(c, 1), b(c, 1);
    b.set_scan_impl(SS2DScan::copy);
    Tensor x = test::randn({2, H, W, c.d_model}, rng), g = test::randn({2, H, W, c.d_model}, rng);
    SS2DSaved sa, sb;
    Tensor ya = a.forward(x, &sa), yb = b.forward(x, &sb);
    EXPECT_TRUE(test::all_close(ya, yb, tol::kFastVsRef, str("y H=", H, " W=", W)));
    Tensor da = a.backward(sa, g), db = b.backward(sb, g);
    EXPECT_TRUE(test::all_close(da, db, tol::kFastVsRefGrad, str("dx H=", H, " W=", W)));
    for (size_t i = 0; i < a.params().all().size(); ++i)
      EXPECT_TRUE(test::all_close(a.params().all()[i].grad(), b.params().all()[i].grad(),
                                  tol::kFastVsRefGrad, a.params().all()[i].name));
  }
}

TEST(SS2D, TransposedImageSwapsRowAndColumnScans) {
  // Transposing the image maps order 0 onto order 1 (and 2 onto 3): with direction parameters
  // swapped accordingly (0 <-> 1, 2 <-> 3) and the conv kernel transposed, the layer output is the
  // transpose of the original.
  Rng rng(23);
  SS2DConfig c = small_cfg("v05", false);
  SS2D a(c, 5), b(c, 5);
  perturb(a.params(), rng);
  for (size_t i = 0; i < a.params().all().size(); ++i) {
    const Param& pa = a.params().all()[i];
    Param& pb = b.params().all()[i];
    const Tensor& va = pa.value.f32();
    Tensor& vb = pb.value.f32();
    const bool per_dir = pa.name == "x_proj_weight" || pa.name == "dt_projs_weight" ||
                         pa.name == "dt_projs_bias" || pa.name == "A_logs" || pa.name == "Ds";
    if (pa.name == "conv2d.weight") {  // the kernel transposed with the image
      const int64_t k = va.dim(2);
      for (int64_t d = 0; d < va.dim(0); ++d)
        for (int64_t r = 0; r < k; ++r)
          for (int64_t q = 0; q < k; ++q) vb[(d * k + q) * k + r] = va[(d * k + r) * k + q];
      continue;
    }
    if (!per_dir) {
      vb.copy_from(va);
      continue;
    }
    const int64_t per = va.numel() / 4;  // each direction's block is contiguous
    const int64_t perm[4] = {1, 0, 3, 2};
    for (int64_t k = 0; k < 4; ++k)
      for (int64_t i2 = 0; i2 < per; ++i2) vb[perm[k] * per + i2] = va[k * per + i2];
  }
  const int64_t H = 3, W = 5;
  Tensor x = test::randn({1, H, W, c.d_model}, rng);
  Tensor xt = Tensor::empty({1, W, H, c.d_model});
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j)
      for (int64_t d = 0; d < c.d_model; ++d)
        xt[(j * H + i) * c.d_model + d] = x[(i * W + j) * c.d_model + d];
  Tensor y = a.forward(x), yt = b.forward(xt);
  double worst = 0;
  for (int64_t i = 0; i < H; ++i)
    for (int64_t j = 0; j < W; ++j)
      for (int64_t d = 0; d < c.d_model; ++d)
        worst = std::max(worst, (double)std::fabs(y[(i * W + j) * c.d_model + d] -
                                                  yt[(j * H + i) * c.d_model + d]));
  EXPECT_LT(worst, 1e-5);
}

TEST(SS2D, ParamNamesShapesAndInit) {
  SS2DConfig c;  // VMamba's defaults: d_model 96, d_state 16, ssm_ratio 2, forward_type v2
  SS2D m(c);
  EXPECT_EQ(names_of(m.params()),
            "x_proj_weight,A_logs,Ds,dt_projs_weight,dt_projs_bias,out_norm.weight,out_norm.bias,"
            "in_proj.weight,conv2d.weight,conv2d.bias,out_proj.weight");
  const auto& ps = m.params();
  EXPECT_EQ(ps.get("x_proj_weight").value.shape(), (Shape{4, 6 + 32, 192}));
  EXPECT_EQ(ps.get("A_logs").value.shape(), (Shape{768, 16}));
  EXPECT_EQ(ps.get("dt_projs_weight").value.shape(), (Shape{4, 192, 6}));
  EXPECT_EQ(ps.get("in_proj.weight").value.shape(), (Shape{384, 96}));
  EXPECT_EQ(ps.get("conv2d.weight").value.shape(), (Shape{192, 1, 3, 3}));
  const Tensor& A = ps.get("A_logs").value.f32();
  for (int64_t n = 0; n < 16; ++n) EXPECT_NEAR(A[767 * 16 + n], std::log(n + 1.0), 1e-6);
  const Tensor& dtb = ps.get("dt_projs_bias").value.f32();
  for (int64_t i = 0; i < dtb.numel(); ++i) {
    const double dt = std::log1p(std::exp((double)dtb[i]));
    EXPECT_GE(dt, 0.001 * (1 - 1e-4));
    EXPECT_LE(dt, 0.1 * (1 + 1e-4));
  }
  EXPECT_TRUE(ps.get("A_logs").no_weight_decay);
  EXPECT_TRUE(ps.get("Ds").no_weight_decay);
  // v05_noz without conv bias: in_proj has D rows and no z
  SS2DConfig n = small_cfg("v05_noz", true);
  n.conv_bias = false;
  SS2D mn(n);
  EXPECT_EQ(mn.params().get("in_proj.weight").value.shape(), (Shape{9, 6}));
  EXPECT_FALSE(mn.params().has("conv2d.bias"));
  SS2DConfig o = small_cfg("v2_onnone", false);
  o.d_conv = 0;
  SS2D mo(o);
  EXPECT_FALSE(mo.params().has("out_norm.weight"));
  EXPECT_FALSE(mo.params().has("conv2d.weight"));
}

TEST(SS2D, ConfigErrorsNameTheField) {
  auto bad = [](auto edit, const char* field) {
    SS2DConfig c = small_cfg("v05", false);
    edit(c);
    test::expect_config_error<SS2D>(c, field);
  };
  bad([](SS2DConfig& c) { c.d_model = 0; }, "d_model");
  bad([](SS2DConfig& c) { c.d_state = 0; }, "d_state");
  bad([](SS2DConfig& c) { c.ssm_ratio = 0; }, "ssm_ratio");
  bad([](SS2DConfig& c) { c.dt_rank = 0; }, "dt_rank");
  bad([](SS2DConfig& c) { c.d_conv = 4; }, "d_conv");
  bad([](SS2DConfig& c) { c.act_layer = "relu"; }, "act_layer");
  bad([](SS2DConfig& c) { c.dropout = 0.1; }, "dropout");
  bad([](SS2DConfig& c) { c.dt_init = "x"; }, "dt_init");
  bad([](SS2DConfig& c) { c.initialize = "v9"; }, "initialize");
  bad([](SS2DConfig& c) { c.forward_type = "v052d"; }, "forward_type");
  bad([](SS2DConfig& c) { c.forward_type = "v05_onsoftmax"; }, "forward_type");
  bad([](SS2DConfig& c) { c.forward_type = "v0", c.channel_first = true; }, "channel_first");
  bad([](SS2DConfig& c) { c.forward_type = "v0", c.d_conv = 5; }, "d_conv");
  test::expect_error([] { SS2DConfig::from_json(R"({"d_model": 8, "bogus": 1})"); }, {"bogus"});
  test::expect_error([] { SS2DConfig::from_json(R"({"d_model": 8, "dt_rank": "big"})"); },
                     {"dt_rank"});
  test::expect_error([] { SS2DConfig::from_json(R"({"d_model": "8"})"); }, {"d_model"});
  VSSBlockConfig v;
  v.hidden_dim = 8;
  v.drop_path = 0.1;
  test::expect_error([&] { v.validate(); }, {"drop_path"});
  v.drop_path = 0;
  v.ssm_conv = 2;
  test::expect_error([&] { VSSBlock{v}; }, {"d_conv"});
  test::expect_error([] { VSSBlockConfig::from_json(R"({"hidden_dim": 8, "norm": 1})"); },
                     {"norm"});
}

TEST(SS2D, ShapeErrorsAndTrace) {
  SS2D l(small_cfg("v05_noz", true));
  test::expect_error([&] { l.forward(Tensor::zeros({1, 5, 3, 3})); }, {"SS2D::forward: x", "6"});
  test::expect_error([&] { l.forward(Tensor::zeros({1, 6, 3})); }, {"(B, d_model=6, H, W)"});
  SS2DSaved s;
  l.forward(Tensor::zeros({1, 6, 3, 4}), &s);
  test::expect_error([&] { l.backward(s, Tensor::zeros({1, 6, 4, 3})); }, {"dy"});
  std::ostringstream os;
  trace::set_stream(&os);
  trace::set_enabled(true);
  l.forward(Tensor::zeros({2, 6, 3, 4}));
  trace::set_enabled(false);
  trace::set_stream(nullptr);
  const std::string t = os.str();
  EXPECT_NE(t.find("in_proj (2,3,4,6) -> (2,3,4,9)"), std::string::npos) << t;
  EXPECT_NE(t.find("conv2d (2,3,4,9) -> (2,3,4,9)"), std::string::npos) << t;
  EXPECT_NE(t.find("x_proj (2,3,4,9) -> (2,3,4,4,5)"), std::string::npos) << t;
  EXPECT_NE(t.find("out_proj (2,3,4,9) -> (2,3,4,6)"), std::string::npos) << t;
}

TEST(VSSBlock, PostNormAndBranchesMatchFiniteDifferences) {
  for (const auto& cfg : {std::tuple<bool, double, double>{false, 1.0, 2.0},
                          {true, 1.0, 2.0},
                          {false, 0.0, 2.0},
                          {false, 2.0, 0.0}}) {
    const bool post = std::get<0>(cfg);
    const double ssm_ratio = std::get<1>(cfg), mlp_ratio = std::get<2>(cfg);
    Rng rng(31);
    VSSBlockConfig c;
    c.hidden_dim = 5;
    c.ssm_d_state = 2;
    c.ssm_ratio = ssm_ratio;
    c.mlp_ratio = mlp_ratio;
    c.post_norm = post;
    c.forward_type = "v05";
    VSSBlock blk(c, 7);
    for (auto& [n, p] : blk.named_params()) {
      Tensor& v = p->value.f32();
      for (int64_t i = 0; i < v.numel(); ++i) v[i] += static_cast<float>(0.2 * rng.normal());
    }
    Tensor x = test::randn({2, 3, 4, 5}, rng), g = test::randn({2, 3, 4, 5}, rng);
    VSSBlockSaved s;
    blk.forward(x, &s);
    blk.zero_grad();
    Tensor dx = blk.backward(s, g);
    auto check = [&](Tensor& v, const Tensor& grad, const std::string& what) {
      Tensor dir = test::randn(v.shape(), rng);
      const double eps = 2e-3;
      Tensor orig = v.clone();
      auto at = [&](double sgn) {
        for (int64_t i = 0; i < v.numel(); ++i)
          v[i] = orig[i] + static_cast<float>(sgn * eps) * dir[i];
        return test::loss_dot(blk.forward(x), g);
      };
      const double fd = (at(1) - at(-1)) / (2 * eps);
      v.copy_from(orig);
      double an = 0;
      for (int64_t i = 0; i < v.numel(); ++i) an += (double)grad[i] * dir[i];
      EXPECT_NEAR(an, fd, tol::kLayerDirFD.atol + tol::kLayerDirFD.rtol * std::fabs(fd))
          << "post_norm " << post << " ssm_ratio " << ssm_ratio << " mlp_ratio " << mlp_ratio << " "
          << what;
    };
    check(x, dx, "x");
    for (auto& [n, p] : blk.named_params()) check(p->value.f32(), p->grad(), n);
  }
}

TEST(SS2D, CliShapes) {
  auto r = test::run_cli("shapes --layer ss2d --height 5 --width 3 --d_model 8 --d_state 2");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("x_proj_weight      (4,5,16)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("cross_scan(4 directions)+merge (2,5,3,16), (2,5,3,4,16) -> (2,5,3,16)"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("out_proj (2,5,3,16) -> (2,5,3,8)"), std::string::npos) << r.out;
  r = test::run_cli(
      "shapes --layer ss2d --forward_type v05_noz --channel_first --height 2 "
      "--width 4 --d_model 8");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("forward, x (2,8,2,4)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("in_proj (2,2,4,8) -> (2,2,4,16)"), std::string::npos) << r.out;
  r = test::run_cli("shapes --layer ss2d --d_conv 4");
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("d_conv must be odd"), std::string::npos) << r.out;
}
