// Prefill that continues from a decode state (chunked prefill): each mixer's `prefill(hidden,
// State&)`, Block::prefill and MambaLM::prefill(ids, B, L, state, chunk).
//  - every mixer kind (Mamba1, its non-selective ablation, Mamba2 with d_mlp > 0, Mamba3 SISO and
//    MIMO, MHA with conv + rotary + GQA, MHA without conv): the sequence cut into ragged pieces
//    (1, 3, 7, rest) and prefilled piece by piece from new_state equals the one-shot forward
//    (outputs and every state tensor) and the step-by-step decode;
//  - MHA rows with different cached lengths continue each at its own position;
//  - the golden LMs (lm_mamba1, lm_mamba2, lm_hybrid, lm_mamba3, lm_mamba3_mimo): ragged pieces,
//    chunk sizes that do not divide L, B = 2, == forward_last's logits and state and == steps;
//  - errors: a state of another batch size, model or mixer kind, a negative chunk, a non-causal
//    MHA continued from a non-empty cache.
// Tolerance: tol::kStepVsFull (1e-5 abs + 1e-4 rel), the one for "full-sequence forward vs
// step-by-step decode, both fp32": a continued prefill computes the same recurrences and GEMMs
// and differs from the one-shot forward only in where chunk boundaries fall (the SSD / Mamba-3
// chunked forms and the GEMM row blocking sum in another order), i.e. fp32 reassociation, the
// same rounding argument as for the step path.
#include <algorithm>
#include <numeric>
#include <variant>

#include "mamba/lm.h"
#include "mamba/nn/block.h"
#include "mamba/rng.h"
#include "test_util.h"

using namespace mamba;

namespace {

// Rows [t0, t0 + n) of (B, L, d) as (B, n, d).
Tensor time_slice(const Tensor& x, int64_t t0, int64_t n) {
  const int64_t B = x.dim(0), L = x.dim(1), d = x.dim(2);
  return x.reshape({B, L * d}).cols(t0 * d, n * d).contiguous().reshape({B, n, d});
}

// The tensors of a layer state, by name; an MHA state's cache rows cut to their lengths (the
// capacities of two equal states may differ).
std::vector<std::pair<std::string, Tensor>> state_tensors(const BlockState& s) {
  std::vector<std::pair<std::string, Tensor>> out;
  std::visit(
      [&](const auto& st) {
        using S = std::decay_t<decltype(st)>;
        if constexpr (std::is_same_v<S, Mamba1State> || std::is_same_v<S, Mamba2State>) {
          out = {{"conv_state", st.conv_state}, {"ssm_state", st.ssm_state}};
        } else if constexpr (std::is_same_v<S, Mamba3State>) {
          out = {{"angle", st.angle}, {"ssm", st.ssm}, {"k", st.k}, {"v", st.v}};
        } else {
          for (size_t b = 0; b < st.len.size(); ++b) {
            const int64_t n = st.len[b];
            out.emplace_back(str("k_cache[", b, "] (len ", n, ")"),
                             st.k_cache.select(static_cast<int64_t>(b)).narrow(0, n).contiguous());
            out.emplace_back(str("v_cache[", b, "]"),
                             st.v_cache.select(static_cast<int64_t>(b)).narrow(0, n).contiguous());
          }
          if (st.conv_state.defined()) out.emplace_back("conv_state", st.conv_state);
        }
      },
      s);
  return out;
}

::testing::AssertionResult same_state(const BlockState& got, const BlockState& want,
                                      const std::string& what) {
  if (got.index() != want.index()) return ::testing::AssertionFailure() << what << ": kind";
  if (const auto* g = std::get_if<MHAState>(&got)) {
    if (g->len != std::get<MHAState>(want).len)
      return ::testing::AssertionFailure() << what << ": MHA lengths differ";
  }
  auto a = state_tensors(got), e = state_tensors(want);
  if (a.size() != e.size()) return ::testing::AssertionFailure() << what << ": tensor count";
  for (size_t i = 0; i < a.size(); ++i) {
    auto r = test::all_close(a[i].second, e[i].second, tol::kStepVsFull, what + " " + a[i].first);
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

// Cuts L into the pieces 1, 3, 7, then the rest (fewer when L is short).
std::vector<int64_t> ragged_pieces(int64_t L) {
  std::vector<int64_t> p;
  for (int64_t n : {1, 3, 7}) {
    const int64_t used = std::accumulate(p.begin(), p.end(), int64_t{0});
    if (used + n >= L) break;
    p.push_back(n);
  }
  p.push_back(L - std::accumulate(p.begin(), p.end(), int64_t{0}));
  return p;
}

// One mixer: pieces through prefill == one-shot forward (outputs and state) == steps.
template <class M>
void check_mixer(const M& m, int64_t B, int64_t L, uint64_t seed, const std::string& what) {
  const int64_t dm = m.config().d_model;
  Rng rng(seed);
  Tensor x = test::randn({B, L, dm}, rng);
  typename M::State full_state;
  Tensor full = m.forward(x, nullptr, &full_state);  // (B, L, d_model)

  typename M::State st = m.new_state(B);
  int64_t t0 = 0;
  for (int64_t n : ragged_pieces(L)) {
    Tensor y = m.prefill(time_slice(x, t0, n), st);
    ASSERT_TRUE(test::all_close(y, time_slice(full, t0, n), tol::kStepVsFull,
                                str(what, " piece at ", t0, " (", n, " tokens)")));
    t0 += n;
  }
  EXPECT_TRUE(same_state(BlockState(st), BlockState(full_state), what + " state"));

  typename M::State ss = m.new_state(B);
  for (int64_t t = 0; t < L; ++t) {
    Tensor y = m.step(time_slice(x, t, 1).reshape({B, dm}), ss);
    ASSERT_TRUE(test::all_close(y, time_slice(full, t, 1).reshape({B, dm}), tol::kStepVsFull,
                                str(what, " step ", t)));
  }
  EXPECT_TRUE(same_state(BlockState(ss), BlockState(st), what + " state after steps"));
}

}  // namespace

TEST(PrefillMixer, Mamba1PiecesEqualForwardAndSteps) {
  Mamba1Config c;
  c.d_model = 24, c.d_state = 8, c.d_conv = 4;
  check_mixer(Mamba1(c, 1), 2, 13, 10, "Mamba1");
  c.d_conv = 3, c.bias = true;
  check_mixer(Mamba1(c, 2), 1, 2, 11, "Mamba1 L=2 < d_conv");  // pieces 1, 1: inside the window
  c.selective = false;
  check_mixer(Mamba1(c, 3), 2, 9, 12, "Mamba1 non-selective");
}

TEST(PrefillMixer, Mamba2PiecesEqualForwardAndSteps) {
  Mamba2Config c;
  c.d_model = 32, c.d_state = 8, c.headdim = 8, c.ngroups = 2, c.chunk_size = 4;
  check_mixer(Mamba2(c, 1), 2, 13, 20, "Mamba2");
  c.d_ssm = 32, c.D_has_hdim = true, c.rmsnorm = false;  // d_mlp = 32 > 0, z gates the scan
  check_mixer(Mamba2(c, 2), 2, 17, 21, "Mamba2 d_mlp");
}

TEST(PrefillMixer, Mamba3PiecesEqualForwardAndSteps) {
  Mamba3Config c;
  c.d_model = 32, c.d_state = 16, c.headdim = 16, c.ngroups = 1, c.chunk_size = 4;
  check_mixer(Mamba3(c, 1), 2, 13, 30, "Mamba3 SISO");
  c.is_mimo = true, c.mimo_rank = 2, c.is_outproj_norm = true;
  check_mixer(Mamba3(c, 2), 2, 11, 31, "Mamba3 MIMO");
}

TEST(PrefillMixer, MHAPiecesEqualForwardAndSteps) {
  MHAConfig c;
  c.d_model = 32, c.num_heads = 4, c.num_heads_kv = 2, c.head_dim = 8, c.causal = true;
  c.rotary_emb_dim = 4, c.d_conv = 3, c.mlp_dim = 16;
  check_mixer(MHA(c, 1), 2, 13, 40, "MHA conv rotary GQA");
  c.d_conv = 0, c.rotary_emb_interleaved = true, c.mlp_dim = 0;
  check_mixer(MHA(c, 2), 2, 70, 41, "MHA no conv, L 70 > the first cache capacity");
}

TEST(PrefillMixer, MHARowsContinueAtTheirOwnLengths) {
  // Row 0 has seen 3 tokens, row 1 has seen 6 (prefilled alone, copied into a batch state as
  // generate and serve do); both then prefill 5 more in one call.
  MHAConfig c;
  c.d_model = 32, c.num_heads = 4, c.num_heads_kv = 1, c.head_dim = 8, c.causal = true;
  c.rotary_emb_dim = 8, c.d_conv = 4;
  MHA m(c, 5);
  Rng rng(6);
  const int64_t pre[2] = {3, 6}, n = 5;
  Tensor xs[2] = {test::randn({1, pre[0] + n, 32}, rng), test::randn({1, pre[1] + n, 32}, rng)};
  MHAState batch = m.new_state(2);
  for (int64_t b = 0; b < 2; ++b) {
    MHAState one = m.new_state(1);
    m.prefill(time_slice(xs[b], 0, pre[b]), one);
    batch.copy_row(b, one, 0);
  }
  Tensor chunk = Tensor::empty({2, n, 32});
  for (int64_t b = 0; b < 2; ++b) chunk.select(b).copy_from(time_slice(xs[b], pre[b], n).select(0));
  Tensor y = m.prefill(chunk, batch);
  EXPECT_EQ(batch.len, (std::vector<int64_t>{pre[0] + n, pre[1] + n}));
  for (int64_t b = 0; b < 2; ++b) {
    Tensor full = m.forward(xs[b]);
    EXPECT_TRUE(test::all_close(y.select(b), time_slice(full, pre[b], n).select(0),
                                tol::kStepVsFull, str("row ", b)));
  }
}

TEST(PrefillMixer, Errors) {
  Mamba1Config c1;
  c1.d_model = 16;
  Mamba1 m1(c1, 1);
  Rng rng(7);
  Tensor x = test::randn({2, 3, 16}, rng);
  Mamba1State s1 = m1.new_state(1);
  test::expect_error([&] { m1.prefill(x, s1); },
                     {"conv_state", "expected shape (2,32,4)", "got (1,32,4)"});
  MHAConfig c;
  c.d_model = 16, c.num_heads = 2, c.causal = false;
  MHA mha(c, 1);
  MHAState s = mha.new_state(2);
  mha.prefill(x, s);  // from an empty cache: the one-shot forward
  test::expect_error([&] { mha.prefill(x, s); }, {"non-causal", "prefill it in one piece"});
  MHAState s3 = mha.new_state(3);
  test::expect_error([&] { mha.prefill(x, s3); }, {"MHA state", "batch 2"});
}

// ---- the LM -------------------------------------------------------------------------------------

namespace {

// Columns [t0, t0 + n) of the (B, L) ids.
std::vector<int32_t> id_slice(const std::vector<int32_t>& ids, int64_t B, int64_t L, int64_t t0,
                              int64_t n) {
  std::vector<int32_t> out;
  for (int64_t b = 0; b < B; ++b)
    out.insert(out.end(), ids.begin() + b * L + t0, ids.begin() + b * L + t0 + n);
  return out;
}

::testing::AssertionResult same_lm_state(const LMState& got, const LMState& want,
                                         const std::string& what) {
  if (got.layers.size() != want.layers.size() || got.batch != want.batch)
    return ::testing::AssertionFailure() << what << ": layers / batch differ";
  for (size_t i = 0; i < got.layers.size(); ++i) {
    auto r = same_state(got.layers[i], want.layers[i], str(what, " layer ", i));
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

}  // namespace

class PrefillLM : public ::testing::TestWithParam<const char*> {};

TEST_P(PrefillLM, PiecesAndChunksEqualOneShotAndSteps) {
  const std::string name = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(name + "_ckpt"));
  const int64_t B = 2, L = 19, V = lm.vocab();
  Rng rng(8);
  std::vector<int32_t> ids(B * L);
  for (auto& v : ids)
    v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(lm.config().vocab_size)));
  LMState ref;
  Tensor want = lm.forward_last(ids, B, L, &ref);  // (B, V_pad)

  // One piece from a fresh state.
  LMState s0 = lm.new_state(B);
  EXPECT_TRUE(test::all_close(lm.prefill(ids, B, L, s0), want, tol::kStepVsFull, "one piece"));
  EXPECT_TRUE(same_lm_state(s0, ref, "one piece"));

  // Ragged pieces 1, 3, 7, 8, each continuing the state.
  LMState sp = lm.new_state(B);
  Tensor got;
  int64_t t0 = 0;
  for (int64_t n : ragged_pieces(L)) {
    got = lm.prefill(id_slice(ids, B, L, t0, n), B, n, sp);
    t0 += n;
  }
  EXPECT_TRUE(test::all_close(got, want, tol::kStepVsFull, "ragged pieces"));
  EXPECT_TRUE(same_lm_state(sp, ref, "ragged pieces"));

  // Chunk sizes that do not divide L (and 1, and > L), inside one call.
  for (int64_t chunk : {1, 4, 5, 18, 64}) {
    LMState sc = lm.new_state(B);
    EXPECT_TRUE(test::all_close(lm.prefill(ids, B, L, sc, chunk), want, tol::kStepVsFull,
                                str("chunk ", chunk)));
    EXPECT_TRUE(same_lm_state(sc, ref, str("chunk ", chunk)));
    // between_chunks (the serving engine's compute turn) runs after every chunk but the last and
    // changes nothing in the result.
    LMState sb = lm.new_state(B);
    int64_t calls = 0;
    Tensor with_cb = lm.prefill(ids, B, L, sb, chunk, [&] { ++calls; });
    EXPECT_EQ(calls, (L + chunk - 1) / chunk - 1) << "chunk " << chunk;
    LMState sn = lm.new_state(B);
    EXPECT_TRUE(test::all_close(with_cb, lm.prefill(ids, B, L, sn, chunk), tol::Tol{0, 0},
                                str("between_chunks, chunk ", chunk)));
  }

  // A prefix through prefill (chunked), the rest through prefill again: a partial cache hit.
  LMState sh = lm.new_state(B);
  lm.prefill(id_slice(ids, B, L, 0, 8), B, 8, sh, 3);
  EXPECT_TRUE(test::all_close(lm.prefill(id_slice(ids, B, L, 8, L - 8), B, L - 8, sh, 4), want,
                              tol::kStepVsFull, "prefix then rest"));

  // Step by step.
  LMState ss = lm.new_state(B);
  Tensor ls;
  for (int64_t t = 0; t < L; ++t) ls = lm.step(id_slice(ids, B, L, t, 1), ss);
  EXPECT_TRUE(test::all_close(ls, want, tol::kStepVsFull, "steps"));
  EXPECT_TRUE(same_lm_state(ss, ref, "steps"));
  ASSERT_EQ(want.shape(), (Shape{B, V}));

  // Decoding after a chunked prefill equals decoding after the one-shot one.
  for (int t = 0; t < 3; ++t) {
    std::vector<int32_t> tok = {static_cast<int32_t>(t + 1), static_cast<int32_t>(t + 7)};
    EXPECT_TRUE(
        test::all_close(lm.step(tok, sp), lm.step(tok, ref), tol::kStepVsFull, str("decode ", t)));
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, PrefillLM,
                         ::testing::Values("lm_mamba1", "lm_mamba2", "lm_hybrid", "lm_mamba3",
                                           "lm_mamba3_mimo"));

TEST(PrefillLMErrors, WrongBatchModelKindOrChunk) {
  MambaLM m1 = MambaLM::load(test::golden_path("lm_mamba1_ckpt"));
  MambaLM m2 = MambaLM::load(test::golden_path("lm_mamba2_ckpt"));
  MambaLM two(ModelConfig::parse(
      R"({"d_model": 32, "n_layer": 2, "vocab_size": 50, "ssm_cfg": {"layer": "Mamba2",
          "d_state": 8, "headdim": 16}})"));
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6};
  LMState s1 = m1.new_state(1);
  test::expect_error([&] { m1.prefill(ids, 2, 3, s1); }, {"state is for batch 1", "B = 2"});
  test::expect_error([&] { m1.prefill(ids, 2, 4, s1); }, {"expected 2x4 = 8 ids, got 6"});
  test::expect_error([&] { m1.prefill(ids, 1, 6, s1, -1); }, {"chunk must be >= 0"});
  LMState s2 = m2.new_state(1);  // a Mamba2 model's state for a Mamba1 model
  test::expect_error([&] { m1.prefill(ids, 1, 6, s2); }, {"layer 0 is a Mamba1 layer"});
  test::expect_error([&] { two.prefill(ids, 1, 6, s2); }, {"state has 3 layers, the model 2"});
  // Refused before anything is computed: the state is unchanged.
  LMState before = m1.new_state(1);
  EXPECT_TRUE(same_lm_state(s1, before, "after the refused calls"));
}
