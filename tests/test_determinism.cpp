// Determinism: every reduction over threads adds its partials in a fixed order, so a result
// depends on the thread count only, never on timing (docs/ARCHITECTURE.md). Here the Mamba-1 and
// Mamba-2 layer backward and two training steps of a tiny LM run 3 times at 1, 2, 3, 4 and 6
// threads, and every output, dx, parameter gradient, loss and parameter must repeat bit for bit
// (memcmp) at each thread count. The shapes make the parallel splits real: at 6 threads the
// selective scan backward runs 6 channel parts, and the SSD backward 6 parts of (batch, head)
// pairs whose dB / dC partials meet on the same group rows (3 or more partials per element, so
// an arrival-order sum would differ between runs).
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "mamba/config.h"
#include "mamba/lm.h"
#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/parallel.h"
#include "mamba/train.h"
#include "test_util.h"

using namespace mamba;

namespace {

using Named = std::vector<std::pair<std::string, Tensor>>;

// ---- the few calls into the layer / LM API (the layers are being refactored: keep them here) ---

// y, dx and every parameter gradient of one forward + backward of a layer.
template <class Layer>
Named layer_run(const typename Layer::Config& c, const Tensor& x, const Tensor& dy) {
  Layer m(c, /*seed=*/5);
  typename Layer::Saved sv;
  Named r;
  r.emplace_back("y", m.forward(x, &sv));
  r.emplace_back("dx", m.backward(sv, dy));
  for (auto& g : m.params().named_grads("grad.")) r.push_back(std::move(g));
  return r;
}

Named mamba1_layer_run(const Tensor& x, const Tensor& dy) {
  Mamba1Config c;
  c.d_model = x.dim(2), c.d_state = 16;
  return layer_run<Mamba1>(c, x, dy);
}

// Mamba-2 with headdim 16: H = 2 d_model / 16 heads; several chunks.
Named mamba2_layer_run(const Tensor& x, const Tensor& dy) {
  Mamba2Config c;
  c.d_model = x.dim(2), c.d_state = 16, c.headdim = 16, c.chunk_size = 32;
  return layer_run<Mamba2>(c, x, dy);
}

train::TrainConfig tiny_lm(const std::string& layer) {
  const std::string ssm =
      layer == "Mamba2" ? R"({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})"
                        : R"({"layer": "Mamba1", "d_state": 16})";
  train::TrainConfig c;
  c.model = ModelConfig::parse(str(R"({"d_model": 64, "n_layer": 1, "vocab_size": 8, "ssm_cfg": )",
                                   ssm, R"(, "pad_vocab_size_multiple": 8})"));
  c.task.kind = train::TaskKind::Induction;
  c.task.vocab = 4;
  c.task.seqlen = 48;
  c.batch = 2, c.steps = 2, c.warmup = 1, c.lr = 1e-2, c.seed = 3;
  return c;
}

// The 8 bytes of a double as 2 floats (compared bit for bit like the tensors).
Tensor bits_of(double v) {
  Tensor t({2});
  std::memcpy(t.data(), &v, sizeof v);
  return t;
}

// Loss and gradient norm of each of 2 training steps, then every parameter.
Named lm_run(const std::string& layer) {
  train::Trainer tr(tiny_lm(layer));
  Named r;
  for (int i = 0; i < 2; ++i) {
    const train::StepLog s = tr.train_step();
    r.emplace_back(str("step", i, ".loss"), bits_of(s.loss));
    r.emplace_back(str("step", i, ".grad_norm"), bits_of(s.grad_norm));
  }
  for (auto& [name, p] : tr.model().named_parameters())
    r.emplace_back(name, p->value.to_f32().clone());
  return r;
}

// ------------------------------------------------------------------------------------------------

std::string fmt9(float v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.9g", static_cast<double>(v));
  return b;
}

// Empty when a and b are the same bits; otherwise names the first tensor and element that differ.
std::string first_difference(const Named& a, const Named& b) {
  if (a.size() != b.size()) return str("result count ", a.size(), " vs ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const Tensor &x = a[i].second, &y = b[i].second;
    if (a[i].first != b[i].first || x.shape() != y.shape())
      return str("result ", i, ": ", a[i].first, x.shape_str(), " vs ", b[i].first, y.shape_str());
    if (std::memcmp(x.data(), y.data(), static_cast<size_t>(x.numel()) * sizeof(float)) != 0)
      for (int64_t j = 0; j < x.numel(); ++j)
        if (std::memcmp(x.data() + j, y.data() + j, sizeof(float)) != 0)
          return str(a[i].first, "[", j, "]: ", fmt9(x[j]), " vs ", fmt9(y[j]));
  }
  return "";
}

bool any_nonzero(const Tensor& t) {
  for (int64_t i = 0; i < t.numel(); ++i)
    if (t[i] != 0.f) return true;
  return false;
}

// Runs fn 3 times at each thread count; every repeat must equal the first bit for bit.
template <class F>
void expect_repeatable(const char* what, F&& fn) {
  const int saved_threads = num_threads();
  for (int threads : {1, 2, 3, 4, 6}) {
    set_num_threads(threads);
    const Named first = fn();
    for (const auto& [name, t] : first)  // the comparison is not over zeros
      EXPECT_TRUE(any_nonzero(t)) << what << ": " << name << " is all zero";
    for (int rep = 1; rep < 3; ++rep) {
      const std::string diff = first_difference(first, fn());
      EXPECT_EQ(diff, "") << what << " at " << threads << " threads, repeat " << rep
                          << " differs from the first run";
    }
  }
  set_num_threads(saved_threads);
}

}  // namespace

TEST(Determinism, Mamba1LayerBackwardRepeatsBitForBit) {
  Rng rng(1);
  const Tensor x = test::randn({2, 256, 64}, rng), dy = test::randn({2, 256, 64}, rng);
  expect_repeatable("mamba1 layer", [&] { return mamba1_layer_run(x, dy); });
}

TEST(Determinism, Mamba2LayerBackwardRepeatsBitForBit) {
  Rng rng(2);
  // H = 12 heads, 4 chunks; B = 1: at 6 threads every part adds dB / dC into the same rows
  const Tensor x = test::randn({1, 128, 96}, rng), dy = test::randn({1, 128, 96}, rng);
  expect_repeatable("mamba2 layer", [&] { return mamba2_layer_run(x, dy); });
}

TEST(Determinism, Mamba2LayerBackwardTwoBatches) {
  Rng rng(3);
  const Tensor x = test::randn({2, 96, 96}, rng), dy = test::randn({2, 96, 96}, rng);
  expect_repeatable("mamba2 layer B=2", [&] { return mamba2_layer_run(x, dy); });
}

TEST(Determinism, Mamba1LMTrainingRepeatsBitForBit) {
  expect_repeatable("mamba1 LM", [] { return lm_run("Mamba1"); });
}

TEST(Determinism, Mamba2LMTrainingRepeatsBitForBit) {
  expect_repeatable("mamba2 LM", [] { return lm_run("Mamba2"); });
}

// Decode steps (MambaLM::step in its thread team, mamba/parallel.h with_team): 4 tokens of batch 1
// or 2, fp32 or q4_0 weights, Mamba-1 and Mamba-2, at d_model 384 so that the step's
// splits are real at 2+ threads (in_proj rows, the conv rows at B = 2, A = -exp(A_log), the state
// update's 768 channels or 12 heads); logits and the final states must repeat bit for bit.
namespace {
Named decode_run(const std::string& layer, WeightDType dt, int64_t B) {
  const std::string ssm = layer == "Mamba2" ? R"({"layer": "Mamba2", "d_state": 64, "headdim": 64})"
                                            : R"({"layer": "Mamba1", "d_state": 16})";
  MambaLM lm(ModelConfig::parse(
                 str(R"({"d_model": 384, "n_layer": 1, "vocab_size": 64, "ssm_cfg": )", ssm, "}")),
             7, dt);
  LMState st = lm.new_state(B);
  Named r;
  for (int t = 0; t < 4; ++t) {
    std::vector<int32_t> ids;
    for (int64_t b = 0; b < B; ++b) ids.push_back(static_cast<int32_t>((5 * t + 3 * b + 1) % 64));
    r.emplace_back(str("logits", t), lm.step(ids, st));
  }
  std::visit(
      [&](const auto& s) {
        if constexpr (requires { s.conv_state; }) r.emplace_back("conv_state", s.conv_state);
        if constexpr (requires { s.ssm_state; }) r.emplace_back("ssm_state", s.ssm_state);
      },
      st.layers[0]);
  return r;
}
}  // namespace

TEST(Determinism, DecodeStepsRepeatBitForBit) {
  const struct {
    const char* layer;
    WeightDType dt;
    int64_t B;
  } cases[] = {{"Mamba1", WeightDType::f32, 1},
               {"Mamba1", WeightDType::q4_0, 2},
               {"Mamba2", WeightDType::f32, 2},
               {"Mamba2", WeightDType::q4_0, 1}};
  for (const auto& c : cases)
    expect_repeatable(str(c.layer, " ", weight_dtype_name(c.dt), " B=", c.B).c_str(),
                      [&] { return decode_run(c.layer, c.dt, c.B); });
}
