// Mamba-2 layer: parameter counts, golden forward / backward / step / prefill+decode against the
// official mamba_ssm (tests/data/golden/mamba2_d64_g{1,2}), forward == step decode on other
// configurations (d_mlp > 0, D_has_hdim, no rmsnorm, biases, dt_limit), directional finite
// differences of the backward on the paths the golden files do not cover, config errors, trace.
#include <cmath>
#include <cstring>
#include <sstream>
#include <string>

#include "mamba/nn/mamba2.h"
#include "mamba/parallel.h"
#include "mamba/trace.h"
#include "test_util.h"

using namespace mamba;

namespace {

Mamba2Config golden_config(int64_t ngroups) {
  Mamba2Config c;
  c.d_model = 64, c.d_state = 16, c.d_conv = 4, c.expand = 2, c.headdim = 16;
  c.ngroups = ngroups, c.chunk_size = 8;
  return c;
}

// Runs the layer one token at a time from a given state; returns (B, L, d_model).
Tensor decode(Mamba2& m, const Tensor& x, Mamba2State& st, int64_t from = 0) {
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  Tensor y = Tensor::zeros({B, L, d});
  for (int64_t t = from; t < L; ++t) {
    Tensor xt({B, d});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < d; ++i) xt[b * d + i] = x[(b * L + t) * d + i];
    Tensor yt = m.step(xt, st);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < d; ++i) y[(b * L + t) * d + i] = yt[b * d + i];
  }
  return y;
}

Tensor rows(const Tensor& x, int64_t from, int64_t len) {  // x (B, L, d) -> (B, len, d)
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  Tensor o({B, len, d});
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < d; ++i) o[(b * len + t) * d + i] = x[(b * L + from + t) * d + i];
  return o;
}

void run_golden(int64_t ngroups, const std::string& file, int64_t params) {
  SafetensorsFile f = SafetensorsFile::open(test::golden_path(file));
  Mamba2 m(golden_config(ngroups));
  EXPECT_EQ(m.params().count(), params);
  EXPECT_EQ(std::to_string(params), f.meta("param_count"));
  m.params().load(f, "params.");
  Tensor x = f.tensor("x"), g = f.tensor("g");
  Mamba2Saved sv;
  Tensor y = m.forward(x, &sv);
  EXPECT_TRUE(test::all_close(y, f.tensor("y"), tol::kGoldenF32, file + " y"));
  m.params().zero_grad();
  Tensor dx = m.backward(sv, g);
  EXPECT_TRUE(test::all_close(dx, f.tensor("grad_x"), tol::kGoldenGradF32, file + " grad_x"));
  for (Param& p : m.params().all())
    EXPECT_TRUE(test::all_close(p.grad(), f.tensor("grad." + p.name), tol::kGoldenGradF32,
                                file + " grad." + p.name));
  // step from zero states over every token
  Mamba2State st = m.new_state(x.dim(0));
  Tensor ys = decode(m, x, st);
  EXPECT_TRUE(test::all_close(ys, f.tensor("y_step"), tol::kGoldenF32, file + " y_step"));
  EXPECT_TRUE(test::all_close(st.conv_state, f.tensor("conv_state"), tol::kGoldenF32,
                              file + " conv_state"));
  EXPECT_TRUE(
      test::all_close(st.ssm_state, f.tensor("ssm_state"), tol::kGoldenF32, file + " ssm_state"));
  // prefill over P tokens, then decode
  const int64_t P = std::stoll(f.meta("prefill_len"));
  Mamba2State ps;
  Tensor yp = m.forward(rows(x, 0, P), nullptr, &ps);
  EXPECT_TRUE(test::all_close(ps.conv_state, f.tensor("prefill_conv_state"), tol::kGoldenF32,
                              file + " prefill_conv_state"));
  EXPECT_TRUE(test::all_close(ps.ssm_state, f.tensor("prefill_ssm_state"), tol::kGoldenF32,
                              file + " prefill_ssm_state"));
  Tensor yd = decode(m, x, ps, P);
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < P; ++t)
      for (int64_t i = 0; i < d; ++i) yd[(b * L + t) * d + i] = yp[(b * P + t) * d + i];
  EXPECT_TRUE(test::all_close(yd, f.tensor("y_prefill_decode"), tol::kGoldenF32,
                              file + " y_prefill_decode"));
}

// Perturbs every parameter to hide nothing behind D = 1 and norm weight = 1 (as the golden
// files do).
void perturb(Mamba2& m, Rng& rng) {
  for (Param& p : m.params().all())
    for (int64_t i = 0; i < p.value.numel(); ++i)
      p.value.f32()[i] += static_cast<float>(0.1 * rng.normal());
}

struct Variant {
  const char* name;
  Mamba2Config cfg;
};

std::vector<Variant> variants() {
  std::vector<Variant> v;
  Mamba2Config base;
  base.d_model = 24, base.d_state = 8, base.d_conv = 4, base.expand = 2, base.headdim = 8;
  base.ngroups = 2, base.chunk_size = 4;
  v.push_back({"base g2", base});
  Mamba2Config c = base;
  c.d_ssm = 32;  // d_inner 48: d_mlp = 16
  v.push_back({"d_mlp 16", c});
  c = base, c.D_has_hdim = true, c.bias = true, c.conv_bias = false, c.d_conv = 3;
  v.push_back({"D_has_hdim bias conv3", c});
  c = base, c.rmsnorm = false, c.ngroups = 1, c.headdim = 6;  // 8 heads of 6
  v.push_back({"no rmsnorm", c});
  c = base, c.dt_limit = {0.02, 0.5}, c.norm_before_gate = true, c.chunk_size = 5;
  v.push_back({"dt_limit norm_before_gate", c});
  return v;
}

}  // namespace

TEST(Mamba2, ParameterCounts) {
  Mamba2Config c;
  c.d_model = 1024, c.d_state = 64, c.d_conv = 4, c.expand = 2;
  Mamba2 m(c);
  EXPECT_EQ(m.params().count(), 6468320);
  EXPECT_EQ(c.nheads(), 32);
  EXPECT_EQ(c.d_inner(), 2048);
  EXPECT_EQ(m.params().get("in_proj.weight").value.shape(), (Shape{4256, 1024}));
  EXPECT_TRUE(m.params().get("A_log").no_weight_decay);
  EXPECT_TRUE(m.params().get("D").no_weight_decay);
  EXPECT_TRUE(m.params().get("dt_bias").no_weight_decay);
  EXPECT_TRUE(m.params().get("norm.weight").no_weight_decay);
  EXPECT_FALSE(m.params().get("in_proj.weight").no_weight_decay);
}

TEST(Mamba2, InitFollowsTheReferenceDistributions) {
  Mamba2Config c = golden_config(1);
  Mamba2 m(c, 3);
  const Tensor& dtb = m.params().get("dt_bias").value.f32();
  const Tensor& alog = m.params().get("A_log").value.f32();
  for (int64_t h = 0; h < c.nheads(); ++h) {
    const double dt = std::log1p(std::exp(double(dtb[h])));  // softplus(dt_bias) = dt
    EXPECT_GE(dt, c.dt_min * 0.999);
    EXPECT_LE(dt, c.dt_max * 1.001);
    EXPECT_GE(std::exp(alog[h]), 1.0 - 1e-5);
    EXPECT_LE(std::exp(alog[h]), 16.0 + 1e-4);
    EXPECT_EQ(m.params().get("D").value.f32()[h], 1.f);
  }
  const Tensor& w = m.params().get("in_proj.weight").value.f32();
  for (int64_t i = 0; i < w.numel(); ++i) ASSERT_LE(std::fabs(w[i]), 1.0 / 8.0);
}

TEST(Mamba2, GoldenG1) { run_golden(1, "mamba2_d64_g1.safetensors", 28088); }
TEST(Mamba2, GoldenG2) { run_golden(2, "mamba2_d64_g2.safetensors", 30296); }

TEST(Mamba2, ForwardEqualsStepDecodeAndPrefill) {
  Rng rng(21);
  for (const Variant& v : variants()) {
    Mamba2 m(v.cfg, 5);
    perturb(m, rng);
    Tensor x = test::randn({2, 11, v.cfg.d_model}, rng);
    Mamba2State full;
    Tensor y = m.forward(x, nullptr, &full);
    Mamba2State st = m.new_state(2);
    Tensor ys = decode(m, x, st);
    EXPECT_TRUE(test::all_close(ys, y, tol::kStepVsFull, std::string(v.name) + " step y"));
    EXPECT_TRUE(test::all_close(st.ssm_state, full.ssm_state, tol::kStepVsFull,
                                std::string(v.name) + " ssm_state"));
    EXPECT_TRUE(test::all_close(st.conv_state, full.conv_state, tol::kStepVsFull,
                                std::string(v.name) + " conv_state"));
    for (int64_t P : {1, 2, 6}) {  // prefill shorter and longer than d_conv
      Mamba2State ps;
      m.forward(rows(x, 0, P), nullptr, &ps);
      Tensor yd = decode(m, x, ps, P);
      Tensor tail = rows(yd, P, 11 - P), ref = rows(y, P, 11 - P);
      EXPECT_TRUE(test::all_close(tail, ref, tol::kStepVsFull, str(v.name, " prefill ", P)));
    }
  }
}

// d/de loss(theta + e v) by central differences (fp32 forward) against <grad, v>.
TEST(Mamba2, BackwardMatchesDirectionalFiniteDifferences) {
  Rng rng(22);
  for (const Variant& v : variants()) {
    Mamba2 m(v.cfg, 6);
    perturb(m, rng);
    Tensor x = test::randn({2, 9, v.cfg.d_model}, rng);
    Tensor g = test::randn({2, 9, v.cfg.d_model}, rng);
    Mamba2Saved sv;
    m.forward(x, &sv);
    m.params().zero_grad();
    Tensor dx = m.backward(sv, g);
    auto loss = [&]() {
      Tensor y = m.forward(x);
      double s = 0;
      for (int64_t i = 0; i < y.numel(); ++i) s += double(y[i]) * g[i];
      return s;
    };
    // one direction per parameter, and one for the input
    for (Param& p : m.params().all()) {
      Tensor dir = test::randn(p.value.shape(), rng);
      Tensor orig = p.value.f32().clone();
      const double eps = 2e-3;
      for (int64_t i = 0; i < dir.numel(); ++i) p.value.f32()[i] = orig[i] + float(eps * dir[i]);
      const double lp = loss();
      for (int64_t i = 0; i < dir.numel(); ++i) p.value.f32()[i] = orig[i] - float(eps * dir[i]);
      const double lm = loss();
      p.value.f32().copy_from(orig);
      double an = 0;
      for (int64_t i = 0; i < dir.numel(); ++i) an += double(p.grad()[i]) * dir[i];
      const double fd = (lp - lm) / (2 * eps);
      EXPECT_NEAR(fd, an, tol::kLayerDirFD.atol + tol::kLayerDirFD.rtol * std::fabs(an))
          << v.name << " " << p.name;
    }
    Tensor dir = test::randn(x.shape(), rng), x0 = x.clone();
    const double eps = 2e-3;
    for (int64_t i = 0; i < x.numel(); ++i) x[i] = x0[i] + float(eps * dir[i]);
    const double lp = loss();
    for (int64_t i = 0; i < x.numel(); ++i) x[i] = x0[i] - float(eps * dir[i]);
    const double lm = loss();
    x.copy_from(x0);
    double an = 0;
    for (int64_t i = 0; i < x.numel(); ++i) an += double(dx[i]) * dir[i];
    EXPECT_NEAR((lp - lm) / (2 * eps), an,
                tol::kLayerDirFD.atol + tol::kLayerDirFD.rtol * std::fabs(an))
        << v.name << " x";
  }
}

TEST(Mamba2, BackwardAccumulatesParameterGradients) {
  Rng rng(23);
  Mamba2 m(golden_config(2), 1);
  Tensor x = test::randn({1, 5, 64}, rng), g = test::randn({1, 5, 64}, rng);
  Mamba2Saved sv;
  m.forward(x, &sv);
  m.params().zero_grad();
  m.backward(sv, g);
  Tensor once = m.params().get("A_log").grad().clone();
  m.backward(sv, g);
  for (int64_t i = 0; i < once.numel(); ++i)
    EXPECT_NEAR(m.params().get("A_log").grad()[i], 2 * once[i], 1e-5 + 1e-5 * std::fabs(once[i]));
}

TEST(Mamba2, ConfigErrorsNameTheField) {
  auto expect_msg = [](Mamba2Config c, const char* needle) {
    try {
      c.validate();
      ADD_FAILURE() << "no throw for " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  Mamba2Config c = golden_config(1);
  EXPECT_NO_THROW(c.validate());
  Mamba2Config b = c;
  b.headdim = 48;  // d_inner 128 not divisible by 48
  expect_msg(b, "headdim");
  b = c, b.ngroups = 3;  // 8 heads
  expect_msg(b, "ngroups");
  b = c, b.d_model = 0;
  expect_msg(b, "d_model");
  b = c, b.d_ssm = 256;
  expect_msg(b, "d_ssm");
  b = c, b.chunk_size = 0;
  expect_msg(b, "chunk_size");
  b = c, b.A_init_range = {0, 16};
  expect_msg(b, "A_init_range");
  b = c, b.dt_limit = {1, 0.5};
  expect_msg(b, "dt_limit");
  b = c, b.d_state = 0;
  expect_msg(b, "d_state");
  EXPECT_THROW(Mamba2 bad(b), Error);
  Mamba2 m(c);
  EXPECT_THROW(m.forward(Tensor({2, 5, 63})), Error);
  Mamba2State st = m.new_state(2);
  EXPECT_THROW(m.step(Tensor({3, 64}), st), Error);
}

TEST(Mamba2, TraceListsEveryOpInOrder) {
  Mamba2 m(golden_config(2));
  std::ostringstream os;
  trace::set_stream(&os);
  trace::set_enabled(true);
  Mamba2State st = m.new_state(2);
  m.forward(Tensor({2, 5, 64}));
  m.step(Tensor({2, 64}), st);
  trace::set_enabled(false);
  trace::set_stream(nullptr);
  const std::string s = os.str();
  const char* order[] = {"in_proj (2,5,64) -> (2,5,328)",
                         "conv1d_silu (2,5,192) -> (2,5,192)",
                         "ssd[chunk=8] (2,5,8,16)",  // the CPU tile: min(chunk_size, 64)
                         "norm (2,5,128), (2,5,128) -> (2,5,128)",
                         "out_proj (2,5,128) -> (2,5,64)",
                         "in_proj (2,64) -> (2,328)",
                         "conv1d_update_silu",
                         "ssd_update",
                         "norm (2,128)",
                         "out_proj (2,128) -> (2,64)"};
  size_t pos = 0;
  for (const char* o : order) {
    size_t p = s.find(o, pos);
    EXPECT_NE(p, std::string::npos) << "missing or out of order: " << o << "\n" << s;
    if (p != std::string::npos) pos = p;
  }
}

// A single sequence's step (B = 1) runs in_proj and the conv update in one pass over the threads
// (Mamba2::in_proj_conv_one: the conv channels split in 64-channel pieces, the other in_proj rows
// shared in proportion); the general step (what B > 1 runs, and B = 1 while the shape trace is
// on) is the reference: outputs and both states must be the same bits, for every weight storage,
// a conv width not a multiple of 64, an MLP part (d_ssm < d_inner), two groups, biases, at 1, 2
// and 3 threads.
TEST(Mamba2, SingleSequenceStepEqualsGeneralStepBitForBit) {
  auto same_bits = [](const Tensor& a, const Tensor& b) {
    return a.numel() == b.numel() &&
           std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<size_t>(a.numel())) == 0;
  };
  const int saved_threads = num_threads();
  struct Case {
    int64_t d_model, d_state, headdim, d_ssm, ngroups;
    bool bias;
    WeightDType dt;
  };
  const Case cases[] = {{40, 12, 16, 0, 1, true, WeightDType::f32},     // conv 80 + 24 = 104
                        {48, 16, 16, 64, 2, false, WeightDType::bf16},  // d_mlp 32, G = 2
                        {48, 16, 16, 0, 1, true, WeightDType::f16},
                        {64, 16, 32, 64, 1, false, WeightDType::q8_0},
                        {64, 16, 32, 0, 2, true, WeightDType::q4_0}};
  for (const Case& k : cases) {
    Mamba2Config c;
    c.d_model = k.d_model, c.d_state = k.d_state, c.headdim = k.headdim, c.d_ssm = k.d_ssm;
    c.ngroups = k.ngroups, c.bias = k.bias;
    Mamba2 m(c, 5);
    m.params().set_weight_dtype(k.dt);
    for (int threads : {1, 2, 3}) {
      set_num_threads(threads);
      Rng rng(21);
      Mamba2State fast = m.new_state(1), ref = m.new_state(1);
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
