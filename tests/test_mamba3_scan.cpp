// The Mamba-3 scan reference (ops/mamba3_scan.h): against the scan kernel's own inputs and output
// in every golden file (scan.*: SISO, SISO with 2 groups, MIMO rank 2 and rank 4 with the fused
// head-wise norm) and the states after the last token; its backward against finite differences
// in double (SISO, groups, MIMO, norm, every input); the chunked forward, the decode step and the
// two fp32 backwards (the chunked one at ragged chunk sizes, and the token-by-token recurrence)
// against it; determinism; argument errors.
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <numbers>

#include "mamba/parallel.h"
#include "ops/mamba3_scan.h"
#include "test_util.h"

using namespace mamba;
using ops::Mamba3ScanArgs;

namespace {

// (B, H, L) -> (B, L, H)
Tensor bhl_to_blh(const Tensor& t) { return test::transpose12(t); }

// Golden scan.Angles (B, L, H, S) repeats the (B, L, S) projections over the heads: head 0,
// after checking the others equal it.
Tensor angles_of(const Tensor& a4) {
  const int64_t B = a4.dim(0), L = a4.dim(1), H = a4.dim(2), S = a4.dim(3);
  Tensor o = Tensor::empty({B, L, S});
  for (int64_t bl = 0; bl < B * L; ++bl)
    for (int64_t j = 0; j < S; ++j) {
      o[bl * S + j] = a4[(bl * H) * S + j];
      for (int64_t h = 1; h < H; ++h) EXPECT_EQ(a4[(bl * H + h) * S + j], o[bl * S + j]);
    }
  return o;
}

double max_abs(const Tensor& t) {
  double m = 0;
  for (int64_t i = 0; i < t.numel(); ++i) m = std::max(m, (double)std::fabs(t[i]));
  return m;
}

// kGoldenF32 with its absolute part scaled by max(1, max|expected|) (golden README, case 5).
tol::Tol scaled(tol::Tol t, const Tensor& expected) {
  return {t.atol * std::max(1.0, max_abs(expected)), t.rtol};
}

// Phases compared modulo 2 pi: the difference wrapped into (-pi, pi].
Tensor wrap_diff(const Tensor& a, const Tensor& b) {
  Tensor d = Tensor::empty(a.shape());
  const double two_pi = 2 * std::numbers::pi;
  for (int64_t i = 0; i < a.numel(); ++i) {
    double x = std::fmod((double)a[i] - b[i], two_pi);
    if (x > std::numbers::pi) x -= two_pi;
    if (x <= -std::numbers::pi) x += two_pi;
    d[i] = static_cast<float>(x);
  }
  return d;
}

}  // namespace

class Mamba3ScanGolden : public ::testing::TestWithParam<const char*> {};

TEST_P(Mamba3ScanGolden, ReferenceMatchesTheKernelOutputAndFinalStates) {
  const std::string name = GetParam();
  auto f = SafetensorsFile::open(test::golden_path(name + ".safetensors"));
  auto cfg = nlohmann::json::parse(f.meta("config"));
  const bool mimo = cfg.value("is_mimo", false);
  Mamba3ScanArgs a;
  Tensor Q = f.tensor("scan.Q"), K = f.tensor("scan.K");
  if (!mimo) {  // (B, L, G, N) -> (B, L, 1, G, N)
    Q = Q.reshape({Q.dim(0), Q.dim(1), 1, Q.dim(2), Q.dim(3)});
    K = K.reshape({K.dim(0), K.dim(1), 1, K.dim(2), K.dim(3)});
  }
  a.Q = Q, a.K = K, a.V = f.tensor("scan.V");
  a.ADT = bhl_to_blh(f.tensor("scan.ADT"));
  a.DT = bhl_to_blh(f.tensor("scan.DT"));
  a.Trap = bhl_to_blh(f.tensor("scan.Trap"));
  a.Angles = angles_of(f.tensor("scan.Angles"));
  a.Q_bias = f.tensor("params.C_bias"), a.K_bias = f.tensor("params.B_bias");
  a.D = f.tensor("params.D");
  if (f.has("scan.Z")) a.Z = f.tensor("scan.Z");
  if (mimo) {
    a.mimo_x = f.tensor("params.mimo_x"), a.mimo_o = f.tensor("params.mimo_o");
    if (a.Z.defined()) a.mimo_z = f.tensor("params.mimo_z");
    if (f.meta("fuse_pregate_headwise_norm") == "True")
      a.norm_weight = f.tensor("params.norm.weight");
  }
  a.rotate_pairwise = !mimo;
  ops::Mamba3States st;
  Tensor out = ops::mamba3_scan_ref(a, &st);
  const Tensor expect = f.tensor("scan.out");
  EXPECT_TRUE(test::close_report(out, expect, scaled(tol::kGoldenF32, expect), name + " scan.out"));
  // The chunked fp32 kernel at the file's chunk size (37 tokens: ragged last chunk).
  const int64_t cs = cfg.at("chunk_size").get<int64_t>();
  EXPECT_TRUE(test::close_report(ops::mamba3_scan_fwd(a, cs), expect,
                                 scaled(tol::kGoldenF32, expect), name + " scan.out (chunked)"));
  if (!f.has("ssm_state")) return;  // the ngroups=2 file has no step data
  // The golden states are those after stepping all 37 tokens (equal to a cached forward's to
  // <= 4.5e-6, golden README).
  Tensor ssm = f.tensor("ssm_state"), k = f.tensor("k_state"), v = f.tensor("v_state");
  EXPECT_TRUE(test::close_report(st.ssm, ssm, scaled(tol::kGoldenF32, ssm), name + " ssm_state"));
  EXPECT_TRUE(test::close_report(st.k, k, scaled(tol::kGoldenF32, k), name + " k_state"));
  EXPECT_TRUE(test::close_report(st.v, v, {0, 0}, name + " v_state"));
  Tensor dphase = wrap_diff(st.angle, f.tensor("angle_state"));
  EXPECT_TRUE(test::close_report(dphase, Tensor::zeros(dphase.shape()), {1e-5, 0},
                                 name + " angle_state (mod 2 pi)"));
}

INSTANTIATE_TEST_SUITE_P(Golden, Mamba3ScanGolden,
                         ::testing::Values("mamba3_siso_d32_n16", "mamba3_siso_d48_n32_rope1_norm",
                                           "mamba3_siso_d32_g2", "mamba3_mimo_d32_r2",
                                           "mamba3_mimo_d32_r4_rope1_norm"));

namespace {

struct Cfg {
  int64_t B = 2, L = 5, R = 1, G = 1, N = 4, H = 2, P = 3, S = 1;
  bool mimo = false, z = true, D = true, norm = false;
};

Mamba3ScanArgs make_args(const Cfg& c, Rng& rng) {
  Mamba3ScanArgs a;
  a.Q = test::randn({c.B, c.L, c.R, c.G, c.N}, rng);
  a.K = test::randn({c.B, c.L, c.R, c.G, c.N}, rng);
  a.V = test::randn({c.B, c.L, c.H, c.P}, rng);
  a.DT = test::rand_uniform({c.B, c.L, c.H}, rng, 0.05, 0.6);
  a.ADT = test::rand_uniform({c.B, c.L, c.H}, rng, -0.8, -0.05);
  a.Trap = test::randn({c.B, c.L, c.H}, rng);
  a.Q_bias = test::randn({c.H, c.R, c.N}, rng, 0.5);
  a.K_bias = test::randn({c.H, c.R, c.N}, rng, 0.5);
  a.Angles = test::randn({c.B, c.L, c.S}, rng);
  if (c.D) a.D = test::randn({c.H}, rng);
  if (c.z) a.Z = test::randn({c.B, c.L, c.H, c.P}, rng);
  if (c.mimo) {
    a.mimo_x = test::randn({c.H, c.R, c.P}, rng, 0.7);
    a.mimo_o = test::randn({c.H, c.R, c.P}, rng, 0.7);
    if (c.z) a.mimo_z = test::randn({c.H, c.R, c.P}, rng, 0.7);
  }
  if (c.norm) a.norm_weight = test::rand_uniform({c.H * c.P}, rng, 0.5, 1.5);
  a.rotate_pairwise = !c.mimo;
  return a;
}

// Every gradient of a fast backward against the reference's (kFastVsRefGrad scaled by the
// reference's magnitude); each defined exactly when the reference's is.
void expect_grads_close(ops::Mamba3ScanGrads& f, ops::Mamba3ScanGrads& r, const std::string& tag) {
  const std::tuple<const char*, Tensor*, Tensor*> gs[] = {
      {"Q", &f.dQ, &r.dQ},
      {"K", &f.dK, &r.dK},
      {"V", &f.dV, &r.dV},
      {"ADT", &f.dADT, &r.dADT},
      {"DT", &f.dDT, &r.dDT},
      {"Trap", &f.dTrap, &r.dTrap},
      {"Q_bias", &f.dQ_bias, &r.dQ_bias},
      {"K_bias", &f.dK_bias, &r.dK_bias},
      {"Angles", &f.dAngles, &r.dAngles},
      {"D", &f.dD, &r.dD},
      {"Z", &f.dZ, &r.dZ},
      {"mimo_x", &f.dmimo_x, &r.dmimo_x},
      {"mimo_z", &f.dmimo_z, &r.dmimo_z},
      {"mimo_o", &f.dmimo_o, &r.dmimo_o},
      {"norm_weight", &f.dnorm_weight, &r.dnorm_weight}};
  for (auto& [nm, fast, ref] : gs) {
    ASSERT_EQ(fast->defined(), ref->defined()) << tag << " " << nm;
    if (ref->defined()) {
      EXPECT_TRUE(test::all_close(*fast, *ref, scaled(tol::kFastVsRefGrad, *ref),
                                  tag + " d" + std::string(nm)));
    }
  }
}

// Every gradient of two runs bit-identical.
void expect_grads_identical(const ops::Mamba3ScanGrads& x, const ops::Mamba3ScanGrads& y,
                            const std::string& tag) {
  const std::tuple<const char*, const Tensor*, const Tensor*> gs[] = {
      {"Q", &x.dQ, &y.dQ},
      {"K", &x.dK, &y.dK},
      {"V", &x.dV, &y.dV},
      {"ADT", &x.dADT, &y.dADT},
      {"DT", &x.dDT, &y.dDT},
      {"Trap", &x.dTrap, &y.dTrap},
      {"Q_bias", &x.dQ_bias, &y.dQ_bias},
      {"K_bias", &x.dK_bias, &y.dK_bias},
      {"Angles", &x.dAngles, &y.dAngles},
      {"D", &x.dD, &y.dD},
      {"Z", &x.dZ, &y.dZ},
      {"mimo_x", &x.dmimo_x, &y.dmimo_x},
      {"mimo_z", &x.dmimo_z, &y.dmimo_z},
      {"mimo_o", &x.dmimo_o, &y.dmimo_o},
      {"norm_weight", &x.dnorm_weight, &y.dnorm_weight}};
  for (auto& [nm, u, v] : gs) {
    ASSERT_EQ(u->defined(), v->defined()) << tag << " " << nm;
    if (u->defined()) {
      ASSERT_EQ(u->shape(), v->shape()) << tag << " " << nm;
      EXPECT_EQ(std::memcmp(u->data(), v->data(), u->numel() * sizeof(float)), 0)
          << tag << " d" << nm << " differs between runs";
    }
  }
}

void check_fd(const Cfg& c, uint64_t seed, const std::string& tag) {
  Rng rng(seed);
  Mamba3ScanArgs a = make_args(c, rng);
  Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
  auto loss = [&] { return test::dot(ops::mamba3_scan_ref_f64(a), g); };
  ops::Mamba3ScanGrads gr = ops::mamba3_scan_bwd_ref(a, g);
  const std::tuple<const char*, Tensor*, Tensor*> ins[] = {
      {"Q", &a.Q, &gr.dQ},
      {"K", &a.K, &gr.dK},
      {"V", &a.V, &gr.dV},
      {"ADT", &a.ADT, &gr.dADT},
      {"DT", &a.DT, &gr.dDT},
      {"Trap", &a.Trap, &gr.dTrap},
      {"Q_bias", &a.Q_bias, &gr.dQ_bias},
      {"K_bias", &a.K_bias, &gr.dK_bias},
      {"Angles", &a.Angles, &gr.dAngles},
      {"D", &a.D, &gr.dD},
      {"Z", &a.Z, &gr.dZ},
      {"mimo_x", &a.mimo_x, &gr.dmimo_x},
      {"mimo_z", &a.mimo_z, &gr.dmimo_z},
      {"mimo_o", &a.mimo_o, &gr.dmimo_o},
      {"norm_weight", &a.norm_weight, &gr.dnorm_weight}};
  int checked = 0;
  for (auto& [nm, x, dx] : ins) {
    if (!x->defined()) continue;
    ASSERT_TRUE(dx->defined()) << tag << " " << nm;
    EXPECT_TRUE(
        test::all_close(*dx, test::finite_diff(*x, loss), tol::kFiniteDiff, tag + " d" + nm));
    ++checked;
  }
  EXPECT_GE(checked, 9);
}

}  // namespace

TEST(Mamba3Scan, BackwardFiniteDifferencesDouble) {
  Cfg siso;
  check_fd(siso, 1, "siso");
  Cfg groups;  // 4 heads over 2 groups, 2 angles of N = 6 (one pair left unrotated)
  groups.H = 4, groups.G = 2, groups.N = 6, groups.S = 2, groups.D = false;
  check_fd(groups, 2, "siso G=2");
  Cfg nz;  // no gate, with the head-wise norm, L = 1
  nz.z = false, nz.norm = true, nz.L = 1;
  check_fd(nz, 3, "siso no z, norm, L=1");
  Cfg mimo;
  mimo.mimo = true, mimo.R = 2, mimo.N = 6, mimo.S = 2;
  check_fd(mimo, 4, "mimo R=2");
  Cfg mimo_norm = mimo;
  mimo_norm.R = 3, mimo_norm.norm = true, mimo_norm.G = 2, mimo_norm.H = 4;
  check_fd(mimo_norm, 5, "mimo R=3 norm G=2");
  Cfg mimo_noz = mimo;
  mimo_noz.z = false;
  check_fd(mimo_noz, 6, "mimo no z");
}

TEST(Mamba3Scan, SplitSequenceWithInitialStatesEqualsFull) {
  // Running the first T tokens, then the rest from the returned states, equals one run (this is
  // what prefill + decode relies on); SISO and MIMO.
  for (bool mimo : {false, true}) {
    Cfg c;
    c.L = 9, c.mimo = mimo, c.R = mimo ? 2 : 1, c.N = 6, c.S = 2;
    Rng rng(10 + mimo);
    Mamba3ScanArgs a = make_args(c, rng);
    ops::Mamba3States full_st;
    Tensor full = ops::mamba3_scan_ref(a, &full_st);
    for (int64_t T : {1, 4, 8}) {
      auto part = [&](int64_t t0, int64_t n) {
        Mamba3ScanArgs p = a;
        for (Tensor* x : {&p.Q, &p.K, &p.V, &p.ADT, &p.DT, &p.Trap, &p.Angles, &p.Z}) {
          if (!x->defined()) continue;
          Shape s = x->shape();
          const int64_t inner = x->numel() / (s[0] * s[1]);
          s[1] = n;
          Tensor o = Tensor::empty(s);
          for (int64_t b = 0; b < s[0]; ++b)
            for (int64_t t = 0; t < n; ++t)
              for (int64_t i = 0; i < inner; ++i)
                o[(b * n + t) * inner + i] = (*x)[(b * c.L + t0 + t) * inner + i];
          *x = o;
        }
        return p;
      };
      ops::Mamba3States s1, s2;
      Tensor y1 = ops::mamba3_scan_ref(part(0, T), &s1);
      Mamba3ScanArgs second = part(T, c.L - T);
      second.initial = s1;
      Tensor y2 = ops::mamba3_scan_ref(second, &s2);
      const int64_t HP = c.H * c.P;
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t t = 0; t < c.L; ++t)
          for (int64_t i = 0; i < HP; ++i) {
            const float got =
                t < T ? y1[(b * T + t) * HP + i] : y2[(b * (c.L - T) + t - T) * HP + i];
            ASSERT_NEAR(got, full[(b * c.L + t) * HP + i], 1e-5) << "mimo " << mimo << " T " << T;
          }
      EXPECT_TRUE(test::all_close(s2.ssm, full_st.ssm, tol::kStepVsFull, "ssm state"));
      EXPECT_TRUE(test::all_close(s2.k, full_st.k, tol::kStepVsFull, "k state"));
      EXPECT_TRUE(test::all_close(s2.v, full_st.v, {0, 0}, "v state"));
      EXPECT_TRUE(test::all_close(wrap_diff(s2.angle, full_st.angle),
                                  Tensor::zeros(s2.angle.shape()), {1e-5, 0}, "angle state"));
    }
  }
}

TEST(Mamba3Scan, ChunkedEqualsReferenceAnyChunkSize) {
  // The chunked fp32 forward against the sequential double reference: chunk sizes 1, ragged,
  // equal to and longer than L; SISO, groups, MIMO with the norm, without the gate; with initial
  // states (output and final states).
  uint64_t seed = 300;
  std::vector<Cfg> cfgs(5);
  cfgs[1].H = 4, cfgs[1].G = 2, cfgs[1].N = 6, cfgs[1].S = 2;
  cfgs[2].mimo = true, cfgs[2].R = 2, cfgs[2].N = 6, cfgs[2].S = 2, cfgs[2].norm = true;
  cfgs[3].mimo = true, cfgs[3].R = 3, cfgs[3].z = false, cfgs[3].D = false;
  cfgs[4].z = false, cfgs[4].norm = true;
  for (Cfg c : cfgs) {
    c.L = 19, c.P = 5;
    for (bool init : {false, true})
      for (int64_t cs : {1, 4, 7, 19, 64}) {
        Rng rng(seed++);
        Mamba3ScanArgs a = make_args(c, rng);
        if (init) {
          a.initial.angle = test::randn({c.B, c.H, c.S}, rng);
          a.initial.ssm = test::randn({c.B, c.H, c.P, c.N}, rng, 0.5);
          a.initial.k = test::randn({c.B, c.R, c.H, c.N}, rng);
          a.initial.v = test::randn({c.B, c.H, c.P}, rng);
        }
        ops::Mamba3States sr, sf;
        Tensor yr = ops::mamba3_scan_ref(a, &sr), yf = ops::mamba3_scan_fwd(a, cs, &sf);
        const std::string tag =
            str("R=", c.R, " G=", c.G, " norm=", c.norm, " z=", c.z, " init=", init, " chunk=", cs);
        EXPECT_TRUE(test::all_close(yf, yr, tol::kFastVsRef, tag + " y"));
        EXPECT_TRUE(test::all_close(sf.ssm, sr.ssm, tol::kFastVsRef, tag + " ssm"));
        EXPECT_TRUE(test::all_close(sf.k, sr.k, tol::kFastVsRef, tag + " k"));
        EXPECT_TRUE(test::all_close(sf.v, sr.v, {0, 0}, tag + " v"));
        EXPECT_TRUE(test::all_close(wrap_diff(sf.angle, sr.angle), Tensor::zeros(sr.angle.shape()),
                                    {1e-5, 0}, tag + " angle"));
      }
  }
}

TEST(Mamba3Scan, FastBackwardEqualsReference) {
  // The fp32 backwards against the double reference, every gradient, on the configs of the
  // chunked test (and the reference is checked against finite differences above): the
  // token-by-token recurrence and the chunked backward at chunk sizes 1, ragged, L and > L.
  uint64_t seed = 500;
  std::vector<Cfg> cfgs(5);
  cfgs[1].H = 4, cfgs[1].G = 2, cfgs[1].N = 6, cfgs[1].S = 2;
  cfgs[2].mimo = true, cfgs[2].R = 2, cfgs[2].N = 6, cfgs[2].S = 2, cfgs[2].norm = true;
  cfgs[3].mimo = true, cfgs[3].R = 3, cfgs[3].z = false, cfgs[3].D = false;
  cfgs[4].z = false, cfgs[4].norm = true;
  for (Cfg c : cfgs) {
    c.L = 19, c.P = 5;
    Rng rng(seed++);
    Mamba3ScanArgs a = make_args(c, rng);
    Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
    ops::Mamba3ScanGrads r = ops::mamba3_scan_bwd_ref(a, g), f = ops::mamba3_scan_bwd_seq(a, g);
    const std::string tag = str("R=", c.R, " G=", c.G, " norm=", c.norm, " z=", c.z);
    expect_grads_close(f, r, tag + " (recurrence)");
    for (int64_t cs : {1, 4, 7, 19, 64}) {
      ops::Mamba3ScanGrads fc = ops::mamba3_scan_bwd(a, g, cs);
      expect_grads_close(fc, r, tag + str(" (chunked ", cs, ")"));
    }
  }
}

TEST(Mamba3Scan, ChunkedAndFastBackwardIndependentOfThreadCount) {
  Cfg c;
  c.B = 3, c.H = 4, c.L = 40, c.N = 8, c.S = 2, c.P = 8;
  Rng rng(77);
  Mamba3ScanArgs a = make_args(c, rng);
  const int saved = num_threads();
  set_num_threads(1);
  Tensor y1 = ops::mamba3_scan_fwd(a, 16);
  set_num_threads(2);
  Tensor y2 = ops::mamba3_scan_fwd(a, 16);
  Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
  set_num_threads(1);
  ops::Mamba3ScanGrads g1 = ops::mamba3_scan_bwd_seq(a, g);
  ops::Mamba3ScanGrads c1 = ops::mamba3_scan_bwd(a, g, 16);
  set_num_threads(2);
  ops::Mamba3ScanGrads g2 = ops::mamba3_scan_bwd_seq(a, g);
  ops::Mamba3ScanGrads c2 = ops::mamba3_scan_bwd(a, g, 16);
  set_num_threads(saved);
  expect_grads_identical(c1, c2, "chunked backward, 1 vs 2 threads");
  EXPECT_EQ(test::max_abs_diff(y1, y2), 0.0);  // each (batch, head) is computed alone
  // backward: shared gradients added in (batch, head) order after the parallel region
  for (auto [x, y] : {std::pair{&g1.dQ, &g2.dQ},
                      {&g1.dK, &g2.dK},
                      {&g1.dAngles, &g2.dAngles},
                      {&g1.dQ_bias, &g2.dQ_bias},
                      {&g1.dD, &g2.dD},
                      {&g1.dV, &g2.dV}})
    EXPECT_EQ(test::max_abs_diff(*x, *y), 0.0);
}

namespace {

// Tokens [t0, t0 + n) of every (B, L, ...) input of a.
Mamba3ScanArgs slice_tokens(const Mamba3ScanArgs& a, int64_t L, int64_t t0, int64_t n) {
  Mamba3ScanArgs p = a;
  for (Tensor* x : {&p.Q, &p.K, &p.V, &p.ADT, &p.DT, &p.Trap, &p.Angles, &p.Z}) {
    if (!x->defined()) continue;
    Shape s = x->shape();
    const int64_t inner = x->numel() / (s[0] * s[1]);
    s[1] = n;
    Tensor o = Tensor::empty(s);
    for (int64_t b = 0; b < s[0]; ++b)
      for (int64_t t = 0; t < n; ++t)
        for (int64_t i = 0; i < inner; ++i)
          o[(b * n + t) * inner + i] = (*x)[(b * L + t0 + t) * inner + i];
    *x = o;
  }
  return p;
}

void random_initial(Mamba3ScanArgs& a, const Cfg& c, Rng& rng) {
  a.initial.angle = test::rand_uniform({c.B, c.H, c.S}, rng, 0.0, 6.0);
  a.initial.ssm = test::randn({c.B, c.H, c.P, c.N}, rng, 0.5);
  a.initial.k = test::randn({c.B, c.R, c.H, c.N}, rng);
  a.initial.v = test::randn({c.B, c.H, c.P}, rng);
}

// Configs whose N and P cover whole SIMD vectors and a tail (N = 20, 37: 16 + 4, 32 + 5 lanes).
std::vector<Cfg> wide_cfgs() {
  std::vector<Cfg> cfgs(5);
  for (Cfg& c : cfgs) c.N = 20, c.S = 5, c.P = 9, c.L = 23;
  cfgs[1].H = 4, cfgs[1].G = 2;  // groups
  cfgs[2].H = 4, cfgs[2].G = 4, cfgs[2].N = 37, cfgs[2].S = 18, cfgs[2].z = false;
  cfgs[3].mimo = true, cfgs[3].R = 2, cfgs[3].norm = true, cfgs[3].H = 4, cfgs[3].G = 2;
  cfgs[4].mimo = true, cfgs[4].R = 4, cfgs[4].z = false, cfgs[4].D = false;
  return cfgs;
}

}  // namespace

TEST(Mamba3Scan, StepEqualsForwardTokenByToken) {
  // The decode step, token by token from random initial states, updating them in place, against
  // the chunked forward over the whole sequence from the same states and the double reference:
  // SISO, groups (G = 2 and G = H of 4 heads), MIMO rank 2 with the norm and rank 4.
  uint64_t seed = 900;
  for (Cfg c : wide_cfgs()) {
    c.L = 7;
    Rng rng(seed++);
    Mamba3ScanArgs a = make_args(c, rng);
    random_initial(a, c, rng);
    ops::Mamba3States sf, sr;
    const Tensor yf = ops::mamba3_scan_fwd(a, 3, &sf), yr = ops::mamba3_scan_ref(a, &sr);
    ops::Mamba3States st = {a.initial.angle.clone(), a.initial.ssm.clone(), a.initial.k.clone(),
                            a.initial.v.clone()};
    const std::string tag = str("R=", c.R, " G=", c.G, " H=", c.H, " N=", c.N, " norm=", c.norm);
    const int64_t HP = c.H * c.P;
    Tensor ys = Tensor::empty(yf.shape());
    for (int64_t t = 0; t < c.L; ++t) {
      Mamba3ScanArgs one = slice_tokens(a, c.L, t, 1);
      one.initial = st;
      const float* ssm_before = st.ssm.data();
      Tensor y = ops::mamba3_scan_step(one, st);
      ASSERT_EQ(st.ssm.data(), ssm_before) << tag << ": the state is updated in place";
      ASSERT_EQ(y.shape(), (Shape{c.B, 1, c.H, c.P}));
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t i = 0; i < HP; ++i) ys[(b * c.L + t) * HP + i] = y[b * HP + i];
    }
    EXPECT_TRUE(test::all_close(ys, yf, tol::kStepVsFull, tag + " y vs chunked"));
    EXPECT_TRUE(test::all_close(ys, yr, tol::kFastVsRef, tag + " y vs reference"));
    EXPECT_TRUE(test::all_close(st.ssm, sf.ssm, tol::kStepVsFull, tag + " ssm"));
    EXPECT_TRUE(test::all_close(st.ssm, sr.ssm, tol::kFastVsRef, tag + " ssm vs reference"));
    EXPECT_TRUE(test::all_close(st.k, sr.k, tol::kFastVsRef, tag + " k"));
    EXPECT_TRUE(test::all_close(st.v, sr.v, {0, 0}, tag + " v"));
    EXPECT_TRUE(test::all_close(wrap_diff(st.angle, sr.angle), Tensor::zeros(sr.angle.shape()),
                                {1e-5, 0}, tag + " angle"));
  }
}

TEST(Mamba3Scan, StepArgumentErrors) {
  Cfg c;
  Rng rng(3);
  Mamba3ScanArgs a = make_args(c, rng);
  ops::Mamba3States st;
  test::expect_error([&] { ops::mamba3_scan_step(a, st); }, {"mamba3_scan_step", "L = 1"});
  Mamba3ScanArgs one = slice_tokens(a, c.L, 0, 1);
  test::expect_error([&] { ops::mamba3_scan_step(one, st); }, {"mamba3_scan_step", "initial"});
}

TEST(Mamba3Scan, FastPathsFullVectorsEqualReference) {
  // N, P wide enough for whole SIMD vectors plus tails: the chunked forward (ragged chunks of
  // 8 over 23 tokens, with and without initial states) and the fp32 backward against the double
  // reference.
  uint64_t seed = 950;
  for (const Cfg& c : wide_cfgs()) {
    const std::string tag = str("R=", c.R, " G=", c.G, " H=", c.H, " N=", c.N, " norm=", c.norm);
    for (bool init : {false, true}) {
      Rng rng(seed++);
      Mamba3ScanArgs a = make_args(c, rng);
      if (init) random_initial(a, c, rng);
      ops::Mamba3States sr, sf;
      Tensor yr = ops::mamba3_scan_ref(a, &sr), yf = ops::mamba3_scan_fwd(a, 8, &sf);
      EXPECT_TRUE(test::all_close(yf, yr, tol::kFastVsRef, tag + " y"));
      EXPECT_TRUE(test::all_close(sf.ssm, sr.ssm, tol::kFastVsRef, tag + " ssm"));
    }
    Rng rng(seed++);
    Mamba3ScanArgs a = make_args(c, rng);
    Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
    ops::Mamba3ScanGrads r = ops::mamba3_scan_bwd_ref(a, g), f = ops::mamba3_scan_bwd_seq(a, g);
    expect_grads_close(f, r, tag + " (recurrence)");
    ops::Mamba3ScanGrads fc = ops::mamba3_scan_bwd(a, g, 8);
    expect_grads_close(fc, r, tag + " (chunked 8)");
  }
}

TEST(Mamba3Scan, ChunkedBackwardRaggedChunksEqualReference) {
  // The chunked backward against the double reference over 23 tokens: chunks of 1, 5 and 8
  // (ragged last chunk), 23 (one chunk) and 64 (> L); SISO with G = 1, 2 (of 4 heads) and G = H
  // without the gate, MIMO R = 2 (groups, norm) and R = 4; N = 20 / 37 and P = 9 (whole SIMD
  // vectors plus tails); batch 2.
  uint64_t seed = 1200;
  for (const Cfg& c : wide_cfgs()) {
    Rng rng(seed++);
    Mamba3ScanArgs a = make_args(c, rng);
    Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
    ops::Mamba3ScanGrads r = ops::mamba3_scan_bwd_ref(a, g);
    const std::string tag = str("R=", c.R, " G=", c.G, " H=", c.H, " N=", c.N, " norm=", c.norm);
    for (int64_t cs : {1, 5, 8, 23, 64}) {
      ops::Mamba3ScanGrads f = ops::mamba3_scan_bwd(a, g, cs);
      expect_grads_close(f, r, tag + str(" chunk=", cs));
    }
  }
}

TEST(Mamba3Scan, ChunkedBackwardDeterministic) {
  // Two runs bit-identical (same thread count), MIMO R = 2 with groups and the norm, a ragged
  // last chunk; and the chunk_size argument is checked.
  Cfg c = wide_cfgs()[3];
  Rng rng(1300);
  Mamba3ScanArgs a = make_args(c, rng);
  Tensor g = test::randn({c.B, c.L, c.H, c.P}, rng);
  ops::Mamba3ScanGrads x = ops::mamba3_scan_bwd(a, g, 8), y = ops::mamba3_scan_bwd(a, g, 8);
  expect_grads_identical(x, y, "two runs");
  test::expect_error([&] { ops::mamba3_scan_bwd(a, g, 0); }, {"mamba3_scan_bwd", "chunk_size"});
}

TEST(Mamba3Scan, BadArgumentsNameTheTensor) {
  Cfg c;
  Rng rng(1);
  Mamba3ScanArgs ok = make_args(c, rng);
  auto bad = [&](auto edit, std::initializer_list<const char*> frag) {
    Mamba3ScanArgs a = ok;
    edit(a);
    test::expect_error([&] { ops::mamba3_scan_ref(a); }, frag);
  };
  bad([](Mamba3ScanArgs& a) { a.V = Tensor({2, 5, 2, 4}); }, {"Z", "(2,5,2,4)"});
  bad([](Mamba3ScanArgs& a) { a.DT = Tensor({2, 5, 3}); }, {"DT"});
  bad([](Mamba3ScanArgs& a) { a.K_bias = Tensor({2, 1, 5}); }, {"K_bias"});
  bad([](Mamba3ScanArgs& a) { a.Angles = Tensor({2, 5, 3}); }, {"angles", "N=4"});
  bad(
      [](Mamba3ScanArgs& a) {
        a.Q = a.K = Tensor({2, 5, 2, 1, 4});
        a.Q_bias = a.K_bias = Tensor({2, 2, 4});
      },
      {"rank", "mimo"});
  bad([](Mamba3ScanArgs& a) { a.initial.ssm = Tensor({2, 2, 3, 4}); }, {"initial"});
  bad([](Mamba3ScanArgs& a) { a.Trap = Tensor(); }, {"Trap"});
}
