// The Mamba-1 layer: golden files from mamba_ssm (forward, every gradient, step decode, prefill
// then decode), finite differences of the layer backward, forward == step on random inputs,
// the mamba_ssm init and parameter count, config and shape errors, the shape trace.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mamba/nn/mamba1.h"
#include "mamba/parallel.h"
#include "mamba/trace.h"
#include "test_util.h"

using namespace mamba;

namespace {

// (B, L, d) -> row t as (B, d)
Tensor token(const Tensor& x, int64_t t) {
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  Tensor o = Tensor::empty({B, d});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < d; ++i) o[b * d + i] = x[(b * L + t) * d + i];
  return o;
}
void put_token(Tensor& y, int64_t t, const Tensor& yt) {
  const int64_t B = y.dim(0), L = y.dim(1), d = y.dim(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < d; ++i) y[(b * L + t) * d + i] = yt[b * d + i];
}
// x[:, t0:t0+n]
Tensor slice_time(const Tensor& x, int64_t t0, int64_t n) {
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  Tensor o = Tensor::empty({B, n, d});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < d; ++i) o[(b * n + t) * d + i] = x[(b * L + t0 + t) * d + i];
  return o;
}

Mamba1Config config_from_json(const std::string& js) {
  auto j = nlohmann::json::parse(js);
  Mamba1Config c;
  c.d_model = j.at("d_model").get<int64_t>();
  if (j.contains("d_state")) c.d_state = j["d_state"].get<int64_t>();
  if (j.contains("d_conv")) c.d_conv = j["d_conv"].get<int64_t>();
  if (j.contains("expand")) c.expand = j["expand"].get<double>();
  if (j.contains("dt_rank") && !j["dt_rank"].is_string()) c.dt_rank = j["dt_rank"].get<int64_t>();
  if (j.contains("bias")) c.bias = j["bias"].get<bool>();
  if (j.contains("conv_bias")) c.conv_bias = j["conv_bias"].get<bool>();
  return c;
}

}  // namespace

using test::close_report;

class Mamba1Golden : public ::testing::TestWithParam<const char*> {};

TEST_P(Mamba1Golden, ForwardBackwardStepPrefill) {
  const std::string name = GetParam();
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  Mamba1Config cfg = config_from_json(f.meta("config"));
  Mamba1 layer(cfg);
  EXPECT_EQ(layer.params().count(), std::stoll(f.meta("param_count")));
  EXPECT_EQ(layer.config().d_inner(), std::stoll(f.meta("d_inner")));
  EXPECT_EQ(layer.config().rank(), std::stoll(f.meta("dt_rank")));
  // Every parameter, in mamba_ssm's state_dict order.
  std::string names;
  for (const auto& p : layer.params().all()) names += (names.empty() ? "" : ",") + p.name;
  EXPECT_EQ(names, f.meta("param_names"));
  layer.params().load(f, "params.");

  Tensor x = f.tensor("x");
  const int64_t B = x.dim(0), L = x.dim(1);

  // forward + backward
  Mamba1Saved saved;
  Tensor y = test::expect_golden_forward_backward(layer, f, name, saved);

  // step decode from zeroed states
  Mamba1State st = layer.new_state(B);
  Tensor ys = Tensor::empty(y.shape());
  for (int64_t t = 0; t < L; ++t) put_token(ys, t, layer.step(token(x, t), st));
  EXPECT_TRUE(close_report(ys, f.tensor("y_step"), tol::kGoldenF32, name + " y_step"));
  EXPECT_TRUE(
      close_report(st.conv_state, f.tensor("conv_state"), tol::kGoldenF32, name + " conv_state"));
  EXPECT_TRUE(
      close_report(st.ssm_state, f.tensor("ssm_state"), tol::kGoldenF32, name + " ssm_state"));

  // prefill over the first P tokens, then step the rest
  const int64_t P = std::stoll(f.meta("prefill_len"));
  Mamba1State ps;
  Tensor yp = layer.forward(slice_time(x, 0, P), nullptr, &ps);
  EXPECT_TRUE(close_report(ps.conv_state, f.tensor("prefill_conv_state"), tol::kGoldenF32,
                           name + " prefill_conv_state"));
  EXPECT_TRUE(close_report(ps.ssm_state, f.tensor("prefill_ssm_state"), tol::kGoldenF32,
                           name + " prefill_ssm_state"));
  Tensor ypd = Tensor::empty(y.shape());
  for (int64_t t = 0; t < P; ++t) put_token(ypd, t, token(yp, t));
  for (int64_t t = P; t < L; ++t) put_token(ypd, t, layer.step(token(x, t), ps));
  EXPECT_TRUE(
      close_report(ypd, f.tensor("y_prefill_decode"), tol::kGoldenF32, name + " y_prefill_decode"));
}

INSTANTIATE_TEST_SUITE_P(Golden, Mamba1Golden,
                         ::testing::Values("mamba1_d16_n64", "mamba1_d32_n16",
                                           "mamba1_d24_conv3_rank3", "mamba1_d12_bias_e3"));

TEST(Mamba1, ParamCountNamesAndInit) {
  Mamba1Config c;
  c.d_model = 16;
  c.d_state = 64;
  c.d_conv = 4;
  c.expand = 2;
  Mamba1 m(c);
  EXPECT_EQ(m.params().count(), 7968);
  EXPECT_EQ(m.config().rank(), 1);
  EXPECT_EQ(m.config().d_inner(), 32);
  const auto& ps = m.params();
  EXPECT_EQ(ps.get("in_proj.weight").value.shape(), (Shape{64, 16}));
  EXPECT_EQ(ps.get("conv1d.weight").value.shape(), (Shape{32, 1, 4}));
  EXPECT_EQ(ps.get("x_proj.weight").value.shape(), (Shape{1 + 128, 32}));
  EXPECT_EQ(ps.get("dt_proj.weight").value.shape(), (Shape{32, 1}));
  EXPECT_FALSE(ps.has("in_proj.bias"));
  EXPECT_FALSE(ps.has("out_proj.bias"));
  EXPECT_TRUE(ps.get("A_log").no_weight_decay);
  EXPECT_TRUE(ps.get("D").no_weight_decay);
  EXPECT_TRUE(ps.get("dt_proj.bias").no_weight_decay);
  EXPECT_FALSE(ps.get("in_proj.weight").no_weight_decay);
  // S4D-real A, D = 1, softplus(dt bias) in [dt_min, dt_max], weights inside their bounds.
  const Tensor& A_log = ps.get("A_log").value.f32();
  for (int64_t d = 0; d < 32; ++d)
    for (int64_t n = 0; n < 64; ++n) ASSERT_NEAR(A_log[d * 64 + n], std::log(n + 1.0), 1e-6);
  for (int64_t d = 0; d < 32; ++d) ASSERT_EQ(ps.get("D").value.f32()[d], 1.f);
  const Tensor& dtb = ps.get("dt_proj.bias").value.f32();
  for (int64_t d = 0; d < 32; ++d) {
    const double dt = std::log1p(std::exp((double)dtb[d]));
    EXPECT_GE(dt, 0.001 * (1 - 1e-4));
    EXPECT_LE(dt, 0.1 * (1 + 1e-4));
  }
  auto max_abs = [](const Tensor& t) {
    double m = 0;
    for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, (double)std::fabs(t[i]));
    return m;
  };
  EXPECT_LE(max_abs(ps.get("in_proj.weight").value.f32()), 1 / std::sqrt(16.0));
  EXPECT_GT(max_abs(ps.get("in_proj.weight").value.f32()), 0.5 / std::sqrt(16.0));
  EXPECT_LE(max_abs(ps.get("conv1d.weight").value.f32()), 0.5);
  EXPECT_LE(max_abs(ps.get("out_proj.weight").value.f32()), 1 / std::sqrt(32.0));
  EXPECT_LE(max_abs(ps.get("dt_proj.weight").value.f32()), 1.0);
  // Deterministic in the seed; a different seed gives different weights.
  Mamba1 m2(c), m3(c, 7);
  EXPECT_TRUE(test::all_close(m2.params().get("in_proj.weight").value.f32(),
                              ps.get("in_proj.weight").value.f32(), {0, 0}, "same seed"));
  EXPECT_GT(test::max_abs_diff(m3.params().get("in_proj.weight").value.f32(),
                               ps.get("in_proj.weight").value.f32()),
            0);
  // dt_init constant
  c.dt_init = "constant";
  c.dt_scale = 2.0;
  Mamba1 mc(c);
  EXPECT_FLOAT_EQ(mc.params().get("dt_proj.weight").value.f32()[5], 2.f);
  // Biases present when asked for.
  c.bias = true;
  c.conv_bias = false;
  Mamba1 mb(c);
  EXPECT_TRUE(mb.params().has("in_proj.bias"));
  EXPECT_TRUE(mb.params().has("out_proj.bias"));
  EXPECT_FALSE(mb.params().has("conv1d.bias"));
  EXPECT_EQ(mb.params().count(), 7968 - 32 + 64 + 16);
}

TEST(Mamba1, ForwardEqualsStepDecode) {
  Rng rng(11);
  Mamba1Config c;
  c.d_model = 17;
  c.d_state = 17;
  c.d_conv = 4;
  c.expand = 2;
  Mamba1 m(c, 3);
  for (int64_t L : {1, 2, 3, 9, 33}) {
    const int64_t B = 2;
    Tensor x = test::randn({B, L, 17}, rng);
    Mamba1State full;
    Tensor y = m.forward(x, nullptr, &full);
    Mamba1State st = m.new_state(B);
    Tensor ys = Tensor::empty(y.shape());
    for (int64_t t = 0; t < L; ++t) put_token(ys, t, m.step(token(x, t), st));
    EXPECT_TRUE(test::all_close(ys, y, tol::kStepVsFull, str("y L=", L)));
    // Not bit-exact: in_proj runs as one GEMM over B*L rows vs B rows per step (different
    // BLAS blocking), so x differs in the last bit.
    EXPECT_TRUE(
        test::all_close(full.conv_state, st.conv_state, tol::kStepVsFull, str("conv_state L=", L)));
    EXPECT_TRUE(
        test::all_close(full.ssm_state, st.ssm_state, tol::kStepVsFull, str("ssm_state L=", L)));
  }
}

TEST(Mamba1, BackwardFiniteDifferences) {
  // Tiny config with every optional parameter. The layer evaluates in fp32 only, so the loss
  // sum(y * g) is summed in double over fp32 outputs; see kLayerFiniteDiffF32 for the tolerance.
  Rng rng(5);
  Mamba1Config c;
  c.d_model = 4;
  c.d_state = 3;
  c.d_conv = 3;
  c.expand = 2;
  c.dt_rank = 2;
  c.bias = true;
  Mamba1 m(c, 9);
  test::spread_params(m, rng);
  const int64_t B = 2, L = 5;
  Tensor x = test::randn({B, L, 4}, rng), g = test::randn({B, L, 4}, rng);
  const Mamba1Saved saved = test::expect_grads_match_finite_diff(m, x, g, 3e-3);
  test::expect_grads_accumulate(m, saved, g, "x_proj.weight");
}

TEST(Mamba1, ConfigValidation) {
  auto expect_error = [](const Mamba1Config& c, const std::string& field) {
    test::expect_config_error<Mamba1>(c, field);
  };
  Mamba1Config ok;
  ok.d_model = 8;
  EXPECT_NO_THROW(ok.validate());
  EXPECT_EQ(ok.rank(), 1);
  Mamba1Config c = ok;
  c.d_conv = 0;
  expect_error(c, "d_conv");
  c = ok, c.d_model = 0;
  expect_error(c, "d_model");
  c = ok, c.d_state = 0;
  expect_error(c, "d_state");
  c = ok, c.expand = 0;
  expect_error(c, "expand");
  c = ok, c.expand = 0.05;  // int(0.4) = 0 channels
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
  c = ok, c.d_model = 33;
  EXPECT_EQ(c.rank(), 3);  // ceil(33 / 16)
  c.expand = 1.5;
  EXPECT_EQ(c.d_inner(), 49);  // int(49.5)
}

TEST(Mamba1, ShapeErrors) {
  Mamba1Config c;
  c.d_model = 8;
  c.d_state = 4;
  Mamba1 m(c);
  EXPECT_THROW(m.forward(Tensor({2, 8})), Error);
  EXPECT_THROW(m.forward(Tensor({2, 3, 7})), Error);
  EXPECT_THROW(m.forward(Tensor({2, 0, 8})), Error);
  EXPECT_THROW(m.forward(Tensor()), Error);
  Mamba1Saved saved;
  m.forward(Tensor({2, 3, 8}), &saved);
  EXPECT_THROW(m.backward(saved, Tensor({2, 4, 8})), Error);
  EXPECT_THROW(m.backward(Mamba1Saved{}, Tensor({2, 3, 8})), Error);
  Mamba1State st = m.new_state(2);
  EXPECT_THROW(m.step(Tensor({2, 7}), st), Error);
  EXPECT_THROW(m.step(Tensor({3, 8}), st), Error);  // batch differs from the state's
  EXPECT_THROW(m.step(Tensor({2, 1, 8}), st), Error);
  Mamba1State bad{Tensor({2, 16, 3}), Tensor({2, 16, 4})};
  EXPECT_THROW(m.step(Tensor({2, 8}), bad), Error);
  EXPECT_THROW(m.new_state(0), Error);
  try {
    m.forward(Tensor({2, 3, 7}));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("hidden"), std::string::npos) << e.what();
  }
}

TEST(Mamba1, ShapeTrace) {
  Mamba1Config c;
  c.d_model = 16;
  Mamba1 m(c);
  std::ostringstream os;
  trace::set_stream(&os);
  trace::set_enabled(true);
  m.forward(Tensor({2, 32, 16}));
  Mamba1State st = m.new_state(2);
  m.step(Tensor({2, 16}), st);
  trace::set_enabled(false);
  trace::set_stream(nullptr);
  const std::string s = os.str();
  const char* expected[] = {"in_proj (2,32,16) -> (2,32,64)",
                            "conv1d (2,32,32) -> (2,32,32)",
                            "x_proj (2,32,32) -> (2,32,33)",
                            "dt_proj (2,32,1) -> (2,32,32)",
                            "selective_scan ",
                            "out_proj (2,32,32) -> (2,32,16)",
                            "in_proj (2,16) -> (2,64)",
                            "conv1d_update ",
                            "x_proj (2,32) -> (2,33)",
                            "dt_proj (2,1) -> (2,32)",
                            "selective_state_update ",
                            "out_proj (2,32) -> (2,16)"};
  size_t pos = 0;
  for (const char* e : expected) {
    size_t at = s.find(e, pos);
    ASSERT_NE(at, std::string::npos) << "missing or out of order: " << e << "\n" << s;
    pos = at + 1;
  }
}

// A single sequence's step (B = 1) runs its own passes (Mamba1::step_one: the per-channel work of
// in_proj + conv and of dt_proj + A + state update split by channels in one hand-off each); the
// general step (what B > 1 runs, and B = 1 while the shape trace is on) is the reference: outputs
// and both states must be the same bits, for every weight storage, d_inner not a multiple of the
// 64-channel pieces, d_state with a vector tail, biases, at 1, 2 and 3 threads.
TEST(Mamba1, SingleSequenceStepEqualsGeneralStepBitForBit) {
  auto same_bits = [](const Tensor& a, const Tensor& b) {
    return a.numel() == b.numel() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<size_t>(a.numel())) == 0;
  };
  const int saved_threads = num_threads();
  struct Case {
    int64_t d_model, d_state, dt_rank;
    bool bias;
    WeightDType dt;
  };
  const Case cases[] = {{50, 17, -1, true, WeightDType::f32},    // D = 100: pieces 64 + 36
                        {50, 16, -1, false, WeightDType::bf16},  // N = 16: no tail
                        {48, 16, -1, true, WeightDType::f16},
                        {96, 16, 32, false, WeightDType::q8_0},  // D = 192: three pieces
                        {96, 16, 32, true, WeightDType::q4_0}};
  for (const Case& k : cases) {
    Mamba1Config c;
    c.d_model = k.d_model, c.d_state = k.d_state, c.dt_rank = k.dt_rank, c.bias = k.bias;
    Mamba1 m(c, 5);
    m.params().set_weight_dtype(k.dt);
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      Rng rng(21);
      Mamba1State fast = m.new_state(1), ref = m.new_state(1);
      for (int t = 0; t < 5; ++t) {
        const Tensor x = test::randn({1, k.d_model}, rng);
        const Tensor yf = m.step(x, fast);
        std::ostringstream sink;
        trace::set_stream(&sink);
        trace::set_enabled(true);  // the general path
        const Tensor yr = m.step(x, ref);
        trace::set_enabled(false);
        trace::set_stream(nullptr);
        const std::string what = str(weight_dtype_name(k.dt), " threads=", threads, " t=", t);
        EXPECT_TRUE(same_bits(yf, yr)) << what << " y";
        EXPECT_TRUE(same_bits(fast.conv_state, ref.conv_state)) << what << " conv_state";
        EXPECT_TRUE(same_bits(fast.ssm_state, ref.ssm_state)) << what << " ssm_state";
      }
    }
  }
  set_num_threads(saved_threads);
}
