// Selective scan (Mamba-1): golden data from mamba_ssm's selective_scan_ref (forward, last
// state, every gradient), fast kernel vs naive reference on awkward shapes and every B/C
// kind, finite differences of the backward in double, full sequence vs repeated
// selective_state_update, bad-input errors and NaN propagation. The fast-vs-reference tests
// (SelectiveScanPerTarget/...) run once per compiled SIMD target (hwy_gtest.h).
#include <hwy/tests/hwy_gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <vector>

#include "mamba/parallel.h"
#include "ops/selective_scan.h"
#include "test_util.h"

using namespace mamba;
using namespace mamba::ops;

namespace {

// ---- golden ------------------------------------------------------------------------------

// The reference's (B, X, L) -> our (B, L, X); (B, G, N, L) -> (B, L, G, N).
Tensor from_ref_layout(const Tensor& t) {
  if (t.ndim() == 3) return test::transpose12(t);
  if (t.ndim() == 4) {
    const int64_t B = t.dim(0), G = t.dim(1), N = t.dim(2), L = t.dim(3);
    return test::transpose12(t.reshape({B, G * N, L})).reshape({B, L, G, N});
  }
  return t;
}

struct GoldenCase {
  ScanArgs args;
  Tensor out, last_state, g;
  std::map<std::string, Tensor> grads;  // grad_<input>, in our layout
};

GoldenCase load_golden(int i) {
  char name[64];
  std::snprintf(name, sizeof name, "selective_scan_%02d.safetensors", i);
  SafetensorsFile f = SafetensorsFile::open(test::golden_path(name));
  GoldenCase c;
  auto get = [&](const char* k) { return f.has(k) ? from_ref_layout(f.tensor(k)) : Tensor(); };
  c.args.u = get("u");
  c.args.delta = get("delta");
  c.args.A = get("A");
  c.args.B = get("B");
  c.args.C = get("C");
  c.args.D = get("D");
  c.args.z = get("z");
  c.args.delta_bias = get("delta_bias");
  c.args.delta_softplus = f.meta("delta_softplus") == "True";
  EXPECT_EQ(c.args.D.defined(), f.meta("has_D") == "True");
  EXPECT_EQ(c.args.z.defined(), f.meta("has_z") == "True");
  EXPECT_EQ(c.args.delta_bias.defined(), f.meta("has_delta_bias") == "True");
  c.out = get("out");
  c.last_state = f.tensor("last_state");  // (B, D, N) in both layouts
  c.g = get("g");
  for (const std::string& n : f.names())
    if (n.rfind("grad_", 0) == 0) c.grads[n] = get(n.c_str());
  return c;
}

void expect_grads_match_golden(const ScanGrads& r, const GoldenCase& c, const std::string& tag) {
  const std::pair<const char*, const Tensor*> table[] = {
      {"grad_u", &r.du}, {"grad_delta", &r.ddelta},
      {"grad_A", &r.dA}, {"grad_B", &r.dB},
      {"grad_C", &r.dC}, {"grad_D", &r.dD},
      {"grad_z", &r.dz}, {"grad_delta_bias", &r.ddelta_bias}};
  for (auto& [name, t] : table) {
    auto it = c.grads.find(name);
    if (it == c.grads.end()) {
      EXPECT_FALSE(t->defined()) << tag << " " << name << " defined but input absent";
      continue;
    }
    EXPECT_TRUE(test::all_close(*t, it->second, tol::kGoldenGradF32, tag + " " + name));
  }
  EXPECT_FALSE(r.dinitial_state.defined()) << tag;
}

constexpr int kNumGolden = 24;

}  // namespace

TEST(SelectiveScanGolden, ReferenceMatchesMambaSsm) {
  for (int i = 0; i < kNumGolden; ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    GoldenCase c = load_golden(i);
    Tensor last;
    Tensor out = selective_scan_ref(c.args, &last);
    EXPECT_TRUE(test::all_close(out, c.out, tol::kGoldenF32, "ref out"));
    EXPECT_TRUE(test::all_close(last, c.last_state, tol::kGoldenF32, "ref last_state"));
    expect_grads_match_golden(selective_scan_bwd_ref(c.args, c.g), c, "ref");
  }
}

TEST(SelectiveScanGolden, FastMatchesMambaSsm) {
  for (int i = 0; i < kNumGolden; ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    GoldenCase c = load_golden(i);
    Tensor last;
    Tensor out = selective_scan_fwd(c.args, &last);
    EXPECT_TRUE(test::all_close(out, c.out, tol::kGoldenF32, "fast out"));
    EXPECT_TRUE(test::all_close(last, c.last_state, tol::kGoldenF32, "fast last_state"));
    Tensor out2 = selective_scan_fwd(c.args);  // without last_state
    EXPECT_TRUE(test::all_close(out2, c.out, tol::kGoldenF32, "fast out (no last_state)"));
    expect_grads_match_golden(selective_scan_bwd(c.args, c.g), c, "fast");
  }
}

// ---- random problems ---------------------------------------------------------------------

namespace {

struct Cfg {
  int64_t B = 1, L = 5, D = 16, N = 4;
  ScanBCKind bk = ScanBCKind::Var, ck = ScanBCKind::Var;
  int64_t bg = 1, cg = 1;  // groups for the group kind
  bool has_D = true, has_z = true, has_bias = true, softplus = true, has_init = false;
  double delta_lo = 0.0, delta_hi = 0.5;  // delta ~ U(lo, hi), as tests/ops/test_selective_scan.py
  bool reverse = false;                   // ScanArgs::reverse
};

std::string describe(const Cfg& c) {
  auto kind = [](ScanBCKind k, int64_t g) {
    return k == ScanBCKind::Const ? std::string("const")
           : k == ScanBCKind::Var ? std::string("var")
                                  : "group" + std::to_string(g);
  };
  return str("B=", c.B, " L=", c.L, " D=", c.D, " N=", c.N, " Bk=", kind(c.bk, c.bg),
             " Ck=", kind(c.ck, c.cg), " D?", c.has_D, " z?", c.has_z, " bias?", c.has_bias,
             " softplus?", c.softplus, " init?", c.has_init, " delta~U(", c.delta_lo, ",",
             c.delta_hi, ")", c.reverse ? " reverse" : "");
}

Tensor make_bc(ScanBCKind k, int64_t G, const Cfg& c, Rng& rng) {
  switch (k) {
    case ScanBCKind::Const:
      return test::randn({c.D, c.N}, rng);
    case ScanBCKind::Var:
      return test::randn({c.B, c.L, c.N}, rng);
    default:
      return test::randn({c.B, c.L, G, c.N}, rng);
  }
}

ScanArgs make_args(const Cfg& c, Rng& rng) {
  ScanArgs a;
  a.reverse = c.reverse;
  a.u = test::randn({c.B, c.L, c.D}, rng);
  a.delta = test::rand_uniform({c.B, c.L, c.D}, rng, c.delta_lo, c.delta_hi);
  a.A = test::rand_uniform({c.D, c.N}, rng, -1.5, -0.05);
  a.B = make_bc(c.bk, c.bg, c, rng);
  a.C = make_bc(c.ck, c.cg, c, rng);
  if (c.has_D) a.D = test::randn({c.D}, rng);
  if (c.has_z) a.z = test::randn({c.B, c.L, c.D}, rng);
  // Without softplus a negative bias would make dt < 0 and the state grow like exp(|dt A| L).
  if (c.has_bias) a.delta_bias = test::rand_uniform({c.D}, rng, c.softplus ? -0.5 : 0.0, 0.5);
  if (c.has_init) a.initial_state = test::randn({c.B, c.D, c.N}, rng);
  a.delta_softplus = c.softplus;
  return a;
}

void expect_same_grads(const ScanGrads& g, const ScanGrads& r, tol::Tol t, const std::string& tag) {
  const std::tuple<const char*, const Tensor*, const Tensor*> table[] = {
      {"du", &g.du, &r.du},
      {"ddelta", &g.ddelta, &r.ddelta},
      {"dA", &g.dA, &r.dA},
      {"dB", &g.dB, &r.dB},
      {"dC", &g.dC, &r.dC},
      {"dD", &g.dD, &r.dD},
      {"dz", &g.dz, &r.dz},
      {"ddelta_bias", &g.ddelta_bias, &r.ddelta_bias},
      {"dinitial_state", &g.dinitial_state, &r.dinitial_state}};
  for (auto& [name, a, e] : table) {
    ASSERT_EQ(a->defined(), e->defined()) << tag << " " << name;
    if (e->defined()) {
      EXPECT_TRUE(test::all_close(*a, *e, t, tag + " " + name));
    }
  }
}

// Fast forward and backward against the naive reference on one configuration.
void check_fast_vs_ref(const Cfg& c, uint64_t seed) {
  Rng rng(seed);
  ScanArgs a = make_args(c, rng);
  const std::string tag = describe(c);
  Tensor last_r, last_f;
  Tensor out_r = selective_scan_ref(a, &last_r);
  Tensor out_f = selective_scan_fwd(a, &last_f);
  EXPECT_TRUE(test::all_close(out_f, out_r, tol::kFastVsRef, tag + " out"));
  EXPECT_TRUE(test::all_close(last_f, last_r, tol::kFastVsRef, tag + " last_state"));
  Tensor dout = test::randn({c.B, c.L, c.D}, rng);
  expect_same_grads(selective_scan_bwd(a, dout), selective_scan_bwd_ref(a, dout),
                    tol::kFastVsRefGrad, tag);
}

}  // namespace

class SelectiveScanPerTarget : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(SelectiveScanPerTarget);

TEST_P(SelectiveScanPerTarget, AwkwardChannelCountsAllKinds) {
  // D around the vector widths (4, 8, 16 lanes); every B/C kind, groups that do and do not
  // align with the lanes (a block straddling two groups).
  uint64_t seed = 100;
  for (int64_t D : {1, 15, 16, 17, 31, 33}) {
    std::vector<std::tuple<ScanBCKind, int64_t>> kinds = {{ScanBCKind::Const, 1},
                                                          {ScanBCKind::Var, 1}};
    for (int64_t G : {2, 3, 5, 11, 17, 33})
      if (D % G == 0) kinds.push_back({ScanBCKind::Group, G});
    if (D == 1) kinds.push_back({ScanBCKind::Group, 1});
    for (auto [bk, bg] : kinds)
      for (auto [ck, cg] : kinds) {
        if (bk != ScanBCKind::Const && ck != ScanBCKind::Const && (bk != ck || bg != cg)) continue;
        Cfg c;
        c.D = D, c.B = 2, c.L = 9, c.N = (seed % 3 == 0) ? 1 : (seed % 3 == 1 ? 16 : 5);
        c.bk = bk, c.bg = bg, c.ck = ck, c.cg = cg;
        c.has_init = seed % 2 == 0;
        check_fast_vs_ref(c, seed++);
      }
  }
}

TEST_P(SelectiveScanPerTarget, OptionalInputsAndLengths) {
  // Every combination of D, z, delta_bias, softplus, initial state; lengths 1, below, at
  // and past the backward's checkpoint chunk (64), d_state 1/16/17.
  uint64_t seed = 500;
  for (int mask = 0; mask < 32; ++mask) {
    Cfg c;
    c.has_D = mask & 1, c.has_z = mask & 2, c.has_bias = mask & 4, c.softplus = mask & 8;
    c.has_init = mask & 16;
    const int64_t Ls[] = {1, 3, 64, 65, 130};
    const int64_t Ns[] = {1, 16, 17};
    c.L = Ls[mask % 5];
    c.N = Ns[mask % 3];
    c.D = (mask % 2) ? 17 : 33;
    c.B = 1 + mask % 2;
    c.bk = (mask % 3 == 0) ? ScanBCKind::Const : ScanBCKind::Var;
    c.ck = (mask % 4 == 0) ? ScanBCKind::Const : ScanBCKind::Var;
    // Negative dt (exp(dt A) > 1, the kernel's safe path) only where the state cannot blow up.
    if (!c.softplus && c.L <= 3) c.delta_lo = -0.5;
    check_fast_vs_ref(c, seed++);
  }
}

TEST_P(SelectiveScanPerTarget, SoftplusThresholdAndExpOverflow) {
  // As golden cases 12 and 23: delta + bias far past softplus's threshold 20 and past 88.
  for (bool sp : {true, false}) {
    Cfg c;
    c.B = 2, c.L = 7, c.D = 19, c.N = 16, c.softplus = sp, c.has_init = true;
    c.delta_lo = sp ? -100 : -2, c.delta_hi = sp ? 100 : 2;
    check_fast_vs_ref(c, sp ? 900 : 901);
  }
}

TEST(SelectiveScanFast, IndependentOfThreadCount) {
  Cfg c;
  // Big enough (L*N*D >= 2^16 per batch) for the kernels to use both threads.
  c.B = 2, c.L = 130, c.D = 70, c.N = 16, c.has_init = true;
  Rng rng(7);
  ScanArgs a = make_args(c, rng);
  Tensor dout = test::randn({c.B, c.L, c.D}, rng);
  const int saved = num_threads();
  set_num_threads(1);
  Tensor o1 = selective_scan_fwd(a);
  ScanGrads g1 = selective_scan_bwd(a, dout);
  set_num_threads(2);
  Tensor o2 = selective_scan_fwd(a);
  ScanGrads g2 = selective_scan_bwd(a, dout);
  ScanGrads g2b = selective_scan_bwd(a, dout);
  set_num_threads(saved);
  EXPECT_EQ(test::max_abs_diff(o1, o2), 0.0);  // blocks are independent: bitwise equal
  // dB/dC sum over channel blocks in thread parts: equal to rounding, and run to run exact.
  expect_same_grads(g2, g1, tol::kFastVsRefGrad, "threads 2 vs 1");
  EXPECT_EQ(test::max_abs_diff(g2.dB, g2b.dB), 0.0);
  EXPECT_EQ(test::max_abs_diff(g2.dC, g2b.dC), 0.0);
}

// ---- finite differences ----------------------------------------------------------------------

namespace {

// Checks every element of every input: (f(x+) - f(x-)) / (x+ - x-) with f = sum(out * g)
// evaluated by the double reference, against the reference and the fast backward.
void check_finite_differences(const Cfg& c, uint64_t seed) {
  Rng rng(seed);
  ScanArgs a = make_args(c, rng);
  Tensor g = test::randn({c.B, c.L, c.D}, rng);
  const std::string tag = describe(c);
  auto loss = [&]() {
    std::vector<double> out = selective_scan_ref_f64(a);
    double s = 0;
    for (size_t i = 0; i < out.size(); ++i) s += out[i] * g[static_cast<int64_t>(i)];
    return s;
  };
  ScanGrads gr = selective_scan_bwd_ref(a, g);
  ScanGrads gf = selective_scan_bwd(a, g);
  const std::tuple<const char*, Tensor*, const Tensor*, const Tensor*> inputs[] = {
      {"u", &a.u, &gr.du, &gf.du},
      {"delta", &a.delta, &gr.ddelta, &gf.ddelta},
      {"A", &a.A, &gr.dA, &gf.dA},
      {"B", &a.B, &gr.dB, &gf.dB},
      {"C", &a.C, &gr.dC, &gf.dC},
      {"D", &a.D, &gr.dD, &gf.dD},
      {"z", &a.z, &gr.dz, &gf.dz},
      {"delta_bias", &a.delta_bias, &gr.ddelta_bias, &gf.ddelta_bias},
      {"initial_state", &a.initial_state, &gr.dinitial_state, &gf.dinitial_state}};
  int checked = 0;
  for (auto& [name, x, dref, dfast] : inputs) {
    if (!x->defined()) continue;
    ASSERT_TRUE(dref->defined() && dfast->defined()) << tag << " " << name;
    Tensor fd(x->shape());
    for (int64_t i = 0; i < x->numel(); ++i) {
      const float v = (*x)[i];
      const float xp = v + 1e-3f, xm = v - 1e-3f;
      (*x)[i] = xp;
      const double fp = loss();
      (*x)[i] = xm;
      const double fm = loss();
      (*x)[i] = v;
      fd[i] = static_cast<float>((fp - fm) / (static_cast<double>(xp) - static_cast<double>(xm)));
      ++checked;
    }
    EXPECT_TRUE(
        test::all_close(*dref, fd, tol::kFiniteDiff, tag + " ref d" + name + " vs finite diff"));
    EXPECT_TRUE(
        test::all_close(*dfast, fd, tol::kFiniteDiff, tag + " fast d" + name + " vs finite diff"));
  }
  EXPECT_GT(checked, 50);
}

}  // namespace

TEST(SelectiveScanGrad, FiniteDifferencesEveryInputEveryKind) {
  struct K {
    ScanBCKind bk, ck;
    int64_t g;
  };
  const K kinds[] = {{ScanBCKind::Const, ScanBCKind::Const, 1},
                     {ScanBCKind::Var, ScanBCKind::Var, 1},
                     {ScanBCKind::Group, ScanBCKind::Group, 3},
                     {ScanBCKind::Const, ScanBCKind::Var, 1},
                     {ScanBCKind::Group, ScanBCKind::Const, 3}};
  uint64_t seed = 3000;
  for (const K& k : kinds)
    for (bool softplus : {true, false}) {
      Cfg c;
      c.B = 2, c.L = 4, c.D = 3, c.N = 2, c.has_init = true, c.softplus = softplus;
      c.bk = k.bk, c.ck = k.ck, c.bg = k.g, c.cg = k.g;
      check_finite_differences(c, seed++);
    }
  // One longer sequence across lanes and the backward's checkpoint chunk (64).
  Cfg c;
  c.B = 1, c.L = 67, c.D = 17, c.N = 1, c.has_init = true;
  check_finite_differences(c, seed++);
  // The reverse scan (Vim's backward direction): every kind once, and the long case.
  for (const K& k : kinds) {
    Cfg r;
    r.B = 2, r.L = 4, r.D = 3, r.N = 2, r.has_init = true, r.reverse = true;
    r.bk = k.bk, r.ck = k.ck, r.bg = k.g, r.cg = k.g;
    check_finite_differences(r, seed++);
  }
  c.reverse = true;
  check_finite_differences(c, seed++);
}

// ---- step vs full sequence ---------------------------------------------------------------------

namespace {

// (B, L, X...) -> (B, X...) at step t.
Tensor step_slice(const Tensor& t, int64_t s) {
  Shape sh = t.shape();
  const int64_t B = sh[0], L = sh[1];
  sh.erase(sh.begin() + 1);
  Tensor o(sh);
  const int64_t inner = t.numel() / (B * L);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < inner; ++i) o[b * inner + i] = t[(b * L + s) * inner + i];
  return o;
}

}  // namespace

TEST(SelectiveScanStep, RepeatedStateUpdateEqualsFullSequence) {
  uint64_t seed = 4000;
  for (int64_t L : {1, 5, 13, 70})
    for (int kind = 0; kind < 2; ++kind) {
      Cfg c;
      c.B = 2, c.L = L, c.D = 18, c.N = 16;
      c.bk = c.ck = kind ? ScanBCKind::Group : ScanBCKind::Var;
      c.bg = c.cg = kind ? 3 : 1;
      c.has_init = L != 5;
      c.has_z = L != 13, c.has_D = L != 13;
      Rng rng(seed++);
      ScanArgs a = make_args(c, rng);
      const std::string tag = describe(c);
      Tensor last;
      Tensor out = selective_scan_fwd(a, &last);
      Tensor state = a.initial_state.defined() ? a.initial_state.clone() : Tensor({c.B, c.D, c.N});
      for (int64_t t = 0; t < L; ++t) {
        Tensor y = selective_state_update(state, step_slice(a.u, t), step_slice(a.delta, t), a.A,
                                          step_slice(a.B, t), step_slice(a.C, t), a.D,
                                          a.z.defined() ? step_slice(a.z, t) : Tensor(),
                                          a.delta_bias, a.delta_softplus);
        ASSERT_TRUE(test::all_close(y, step_slice(out, t), tol::kStepVsFull,
                                    tag + " y at t=" + std::to_string(t)));
      }
      EXPECT_TRUE(test::all_close(state, last, tol::kStepVsFull, tag + " final state"));
    }
}

TEST(SelectiveScanStep, SplitSequenceWithInitialStateEqualsFull) {
  Cfg c;
  c.B = 2, c.L = 40, c.D = 33, c.N = 16, c.has_init = true;
  Rng rng(4100);
  ScanArgs a = make_args(c, rng);
  Tensor last;
  Tensor out = selective_scan_fwd(a, &last);
  const int64_t L1 = 17;
  auto part = [&](const Tensor& t, int64_t s0, int64_t n) {  // (B, L, ...) steps [s0, s0+n)
    Shape sh = t.shape();
    const int64_t inner = t.numel() / (sh[0] * sh[1]);
    sh[1] = n;
    Tensor o(sh);
    for (int64_t b = 0; b < sh[0]; ++b)
      for (int64_t i = 0; i < n * inner; ++i) o[b * n * inner + i] = t[(b * c.L + s0) * inner + i];
    return o;
  };
  ScanArgs a1 = a, a2 = a;
  for (auto [dst, s0, n] : {std::tuple{&a1, int64_t{0}, L1}, std::tuple{&a2, L1, c.L - L1}}) {
    dst->u = part(a.u, s0, n), dst->delta = part(a.delta, s0, n), dst->z = part(a.z, s0, n);
    dst->B = part(a.B, s0, n), dst->C = part(a.C, s0, n);
  }
  Tensor mid, last2;
  Tensor o1 = selective_scan_fwd(a1, &mid);
  a2.initial_state = mid;
  Tensor o2 = selective_scan_fwd(a2, &last2);
  EXPECT_TRUE(test::all_close(o1, part(out, 0, L1), tol::kStepVsFull, "first half"));
  EXPECT_TRUE(test::all_close(o2, part(out, L1, c.L - L1), tol::kStepVsFull, "second half"));
  EXPECT_TRUE(test::all_close(last2, last, tol::kStepVsFull, "last state"));
}

// ---- bad inputs
// ----------------------------------------------------------------------------------

namespace {

// Expects fn to throw mamba::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, std::vector<std::string> parts,
                  const std::string& what) {
  try {
    fn();
    ADD_FAILURE() << what << ": no exception";
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const auto& p : parts)
      EXPECT_NE(m.find(p), std::string::npos) << what << ": '" << p << "' not in: " << m;
  }
}

}  // namespace

TEST(SelectiveScanErrors, BadShapesNameTheTensor) {
  Cfg c;
  c.B = 2, c.L = 5, c.D = 6, c.N = 4, c.has_init = true;
  Rng rng(5000);
  const ScanArgs good = make_args(c, rng);
  ASSERT_NO_THROW(selective_scan_fwd(good));
  struct Case {
    const char* what;
    std::function<void(ScanArgs&)> mutate;
    std::vector<std::string> parts;
  };
  const std::vector<Case> cases = {
      {"delta shape",
       [](ScanArgs& a) {
         a.delta = Tensor({2, 5, 7});
       },
       {"delta", "(2,5,6)", "(2,5,7)"}},
      {"u rank",
       [](ScanArgs& a) {
         a.u = Tensor({5, 6});
       },
       {"u", "(5,6)"}},
      {"A shape",
       [](ScanArgs& a) {
         a.A = Tensor({7, 4});
       },
       {"A", "(6,4)", "(7,4)"}},
      {"A rank", [](ScanArgs& a) { a.A = Tensor({6}); }, {"A", "(6)"}},
      {"B var length",
       [](ScanArgs& a) {
         a.B = Tensor({2, 4, 4});
       },
       {"B", "(2,5,4)", "(2,4,4)"}},
      {"C const N",
       [](ScanArgs& a) {
         a.C = Tensor({6, 3});
       },
       {"C", "(6,4)", "(6,3)"}},
      {"B rank 5",
       [](ScanArgs& a) {
         a.B = Tensor({2, 5, 1, 1, 4});
       },
       {"B", "rank 5"}},
      {"C groups",
       [](ScanArgs& a) {
         a.C = Tensor({2, 5, 4, 4});
       },
       {"C", "G=4", "D=6"}},
      {"D skip", [](ScanArgs& a) { a.D = Tensor({5}); }, {"D", "(6)", "(5)"}},
      {"z",
       [](ScanArgs& a) {
         a.z = Tensor({2, 5, 5});
       },
       {"z", "(2,5,6)"}},
      {"delta_bias",
       [](ScanArgs& a) {
         a.delta_bias = Tensor({2, 6});
       },
       {"delta_bias", "(6)", "(2,6)"}},
      {"initial_state",
       [](ScanArgs& a) {
         a.initial_state = Tensor({2, 6, 5});
       },
       {"initial_state", "(2,6,4)", "(2,6,5)"}},
      {"missing B", [](ScanArgs& a) { a.B = Tensor(); }, {"B"}},
  };
  for (const Case& k : cases) {
    ScanArgs a = good;
    k.mutate(a);
    expect_error([&] { selective_scan_fwd(a); }, k.parts, std::string("fwd ") + k.what);
    expect_error([&] { selective_scan_ref(a); }, k.parts, std::string("ref ") + k.what);
    Tensor dout({2, 5, 6});
    expect_error([&] { selective_scan_bwd(a, dout); }, k.parts, std::string("bwd ") + k.what);
    expect_error([&] { selective_scan_bwd_ref(a, dout); }, k.parts,
                 std::string("bwd_ref ") + k.what);
  }
  expect_error(
      [&] {
        selective_scan_bwd(good, Tensor({2, 5, 5}));
      },
      {"dout", "(2,5,6)", "(2,5,5)"}, "bwd dout");
  expect_error(
      [&] {
        selective_scan_bwd_ref(good, Tensor({2, 5, 5}));
      },
      {"dout", "(2,5,6)"}, "bwd_ref dout");

  // selective_state_update
  Tensor st({2, 6, 4}), x({2, 6}), dt({2, 6}), Bv({2, 4}), Cv({2, 4});
  EXPECT_NO_THROW(
      selective_state_update(st, x, dt, good.A, Bv, Cv, good.D, x, good.delta_bias, true));
  Tensor bad_state({2, 6, 3});
  expect_error(
      [&] {
        selective_state_update(bad_state, x, dt, good.A, Bv, Cv, Tensor(), Tensor(), Tensor(),
                               true);
      },
      {"state", "(2,6,4)", "(2,6,3)"}, "step state");
  expect_error(
      [&] {
        selective_state_update(st, x, Tensor({2, 5}), good.A, Bv, Cv, Tensor(), Tensor(), Tensor(),
                               true);
      },
      {"dt", "(2,6)", "(2,5)"}, "step dt");
  expect_error(
      [&] {
        selective_state_update(st, x, dt, good.A, Tensor({2, 4, 4}), Cv, Tensor(), Tensor(),
                               Tensor(), true);
      },
      {"B", "G=4", "D=6"}, "step B groups");
  expect_error(
      [&] {
        selective_state_update(st, x, dt, good.A, Bv, Tensor({2, 1, 1, 4}), Tensor(), Tensor(),
                               Tensor(), true);
      },
      {"C", "(2,1,1,4)"}, "step C rank");
  expect_error(
      [&] {
        selective_state_update(st, x, dt, good.A, Bv, Cv, Tensor(), Tensor({2, 7}), Tensor(), true);
      },
      {"z", "(2,6)", "(2,7)"}, "step z");
}

// ---- NaN
// ------------------------------------------------------------------------------------------

// Decision: NaN propagates exactly as in the reference (no checks, no clamping to finite):
// a NaN in u/delta/z of channel d poisons that channel from that step on; a NaN in var B/C
// poisons every channel of that batch; a NaN in A[d, n] poisons channel d. The fast kernel
// produces the same NaN pattern as the reference, forward and backward.
TEST_P(SelectiveScanPerTarget, NaNPropagatesLikeTheReference) {
  Cfg c;
  c.B = 2, c.L = 6, c.D = 19, c.N = 5, c.has_init = true;
  struct Poison {
    const char* what;
    std::function<void(ScanArgs&)> set;
  };
  const float nan = std::nanf("");
  const std::vector<Poison> poisons = {
      {"u", [&](ScanArgs& a) { a.u[(0 * c.L + 2) * c.D + 1] = nan; }},
      {"delta", [&](ScanArgs& a) { a.delta[(1 * c.L + 3) * c.D + 17] = nan; }},
      {"A", [&](ScanArgs& a) { a.A[4 * c.N + 2] = nan; }},
      {"B", [&](ScanArgs& a) { a.B[(0 * c.L + 4) * c.N + 1] = nan; }},
      {"z", [&](ScanArgs& a) { a.z[(1 * c.L + 0) * c.D + 0] = nan; }},
      {"initial_state", [&](ScanArgs& a) { a.initial_state[(0 * c.D + 18) * c.N + 3] = nan; }},
  };
  for (const Poison& p : poisons) {
    Rng rng(6000);
    ScanArgs a = make_args(c, rng);
    p.set(a);
    Tensor last_r, last_f;
    Tensor out_r = selective_scan_ref(a, &last_r);
    Tensor out_f = selective_scan_fwd(a, &last_f);
    int64_t nans = 0;
    for (int64_t i = 0; i < out_r.numel(); ++i) nans += std::isnan(out_r[i]);
    EXPECT_GT(nans, 0) << p.what;
    EXPECT_LT(nans, out_r.numel()) << p.what;
    EXPECT_TRUE(
        test::all_close(out_f, out_r, tol::kFastVsRef, std::string("NaN in ") + p.what + " out"));
    EXPECT_TRUE(test::all_close(last_f, last_r, tol::kFastVsRef,
                                std::string("NaN in ") + p.what + " last"));
    Tensor dout = test::randn({c.B, c.L, c.D}, rng);
    expect_same_grads(selective_scan_bwd(a, dout), selective_scan_bwd_ref(a, dout),
                      tol::kFastVsRefGrad, std::string("NaN in ") + p.what);
  }
  // The channel pattern for u: channel 1 of batch 0 from step 2 on, nothing else.
  Rng rng(6000);
  ScanArgs a = make_args(c, rng);
  a.u[(0 * c.L + 2) * c.D + 1] = nan;
  Tensor out = selective_scan_fwd(a);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.L; ++t)
      for (int64_t d = 0; d < c.D; ++d)
        EXPECT_EQ(std::isnan(out[(b * c.L + t) * c.D + d]), b == 0 && d == 1 && t >= 2)
            << b << " " << t << " " << d;
}

TEST_P(SelectiveScanPerTarget, FastStepMatchesReferenceStep) {
  // The vectorised step (across N) against its scalar reference: N around the vector widths,
  // (B, N) and (B, G, N) B/C, optional D, z, dt_bias, softplus; several steps in a row.
  uint64_t seed = 4200;
  for (int64_t N : {1, 4, 15, 16, 17, 33})
    for (int variant = 0; variant < 3; ++variant) {
      Rng rng(seed++);
      const int64_t batch = 2, D = 12, G = variant == 2 ? 3 : 1;
      Tensor A = test::rand_uniform({D, N}, rng, -1.5, -0.05);
      Tensor s_ref = test::randn({batch, D, N}, rng), s_fast = s_ref.clone();
      Tensor Dv = variant != 1 ? test::randn({D}, rng) : Tensor();
      Tensor bias = variant != 0 ? test::rand_uniform({D}, rng, -0.5, 0.5) : Tensor();
      const bool softplus = variant != 1;
      for (int step = 0; step < 3; ++step) {
        Tensor x = test::randn({batch, D}, rng), dt = test::rand_uniform({batch, D}, rng, 0.0, 0.5);
        Tensor z = variant != 2 ? test::randn({batch, D}, rng) : Tensor();
        Tensor Bm = G > 1 ? test::randn({batch, G, N}, rng) : test::randn({batch, N}, rng);
        Tensor Cm = G > 1 ? test::randn({batch, G, N}, rng) : test::randn({batch, N}, rng);
        Tensor yr = selective_state_update_ref(s_ref, x, dt, A, Bm, Cm, Dv, z, bias, softplus);
        Tensor yf = selective_state_update(s_fast, x, dt, A, Bm, Cm, Dv, z, bias, softplus);
        const std::string tag = str("N=", N, " variant=", variant, " step=", step);
        EXPECT_TRUE(test::all_close(yf, yr, tol::kFastVsRef, tag + " y"));
        EXPECT_TRUE(test::all_close(s_fast, s_ref, tol::kFastVsRef, tag + " state"));
      }
    }
}

// ---- reverse scan ------------------------------------------------------------------------------

namespace {

// (B, L, ...) -> the same with time reversed; (D, N) const B/C and undefined tensors unchanged.
Tensor flip_time(const Tensor& t, int64_t L) {
  if (!t.defined() || t.ndim() < 3 || t.dim(1) != L) return t;
  Tensor o(t.shape());
  const int64_t B = t.dim(0), inner = t.numel() / (B * L);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      for (int64_t i = 0; i < inner; ++i)
        o[(b * L + s) * inner + i] = t[(b * L + (L - 1 - s)) * inner + i];
  return o;
}

}  // namespace

TEST_P(SelectiveScanPerTarget, ReverseEqualsFlippedScanAndMatchesReference) {
  // reverse = flip(scan(flip(inputs))) over time: the reference on flipped copies is the oracle
  // for the reference's reverse flag, which is the oracle for the fast kernels (forward, last
  // state and every gradient), over every B/C kind and lengths around the backward's chunk (64).
  uint64_t seed = 7000;
  struct K {
    ScanBCKind bk, ck;
    int64_t g;
  };
  const K kinds[] = {{ScanBCKind::Const, ScanBCKind::Const, 1},
                     {ScanBCKind::Var, ScanBCKind::Var, 1},
                     {ScanBCKind::Group, ScanBCKind::Group, 3},
                     {ScanBCKind::Var, ScanBCKind::Const, 1}};
  for (const K& k : kinds)
    for (int64_t L : {1, 5, 64, 65, 130}) {
      Cfg c;
      c.B = 2, c.L = L, c.D = 33, c.N = L % 2 ? 16 : 5, c.has_init = L % 2 == 1, c.reverse = true;
      c.bk = k.bk, c.ck = k.ck, c.bg = k.g, c.cg = k.g;
      Rng rng(seed);
      ScanArgs a = make_args(c, rng);
      ScanArgs f = a;  // flipped copies, forward direction
      f.reverse = false;
      f.u = flip_time(a.u, L), f.delta = flip_time(a.delta, L), f.z = flip_time(a.z, L);
      f.B = flip_time(a.B, L), f.C = flip_time(a.C, L);
      Tensor last_r, last_f;
      Tensor out_r = selective_scan_ref(a, &last_r);
      Tensor out_f = flip_time(selective_scan_ref(f, &last_f), L);
      const std::string tag = describe(c);
      EXPECT_TRUE(test::all_close(out_r, out_f, {1e-6, 1e-6}, tag + " ref reverse vs flipped"));
      EXPECT_TRUE(test::all_close(last_r, last_f, {1e-6, 1e-6}, tag + " last reverse vs flipped"));
      Tensor dout = test::randn({c.B, L, c.D}, rng);
      ScanGrads gr = selective_scan_bwd_ref(a, dout),
                gf = selective_scan_bwd_ref(f, flip_time(dout, L));
      EXPECT_TRUE(test::all_close(gr.du, flip_time(gf.du, L), {1e-6, 1e-5}, tag + " du flipped"));
      EXPECT_TRUE(test::all_close(gr.dB, flip_time(gf.dB, L), {1e-6, 1e-5}, tag + " dB flipped"));
      EXPECT_TRUE(test::all_close(gr.dA, gf.dA, {1e-6, 1e-5}, tag + " dA flipped"));
      check_fast_vs_ref(c, seed++);
    }
}
