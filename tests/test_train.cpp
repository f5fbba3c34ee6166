// Training: cross-entropy (vs finite differences), AdamW (vs a hand-computed update), clipping,
// the LR schedule, the synthetic-task generators' invariants, loss going down on each task and
// on a text, gradient accumulation == one big batch, resume == uninterrupted (bitwise),
// atomic checkpoints, the curves and the CLI.
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <span>
#include <thread>

#include "core/os.h"
#include "mamba/nn/mamba1.h"
#include "mamba/parallel.h"
#include "mamba/train.h"
#include "mamba/train_dist.h"
#include "test_util.h"

using namespace mamba;
using namespace mamba::train;
namespace fs = std::filesystem;

namespace {

std::string temp_dir(const std::string& name) {
  fs::path p =
      fs::temp_directory_path() / ("mamba_test_train_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

ModelConfig tiny_model(int64_t vocab, const std::string& layer = "Mamba1", int64_t d_model = 32) {
  std::string ssm = layer == "Mamba2"
                        ? R"({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16})"
                        : R"({"layer": "Mamba1", "d_state": 8})";
  return ModelConfig::parse(str(R"({"d_model": )", d_model, R"(, "n_layer": 2, "vocab_size": )",
                                vocab, R"(, "ssm_cfg": )", ssm,
                                R"(, "pad_vocab_size_multiple": 8})"));
}

TrainConfig tiny_train(TaskKind kind) {
  TrainConfig c;
  c.task.kind = kind;
  c.task.vocab = kind == TaskKind::SelectiveCopy ? 6 : 4;
  c.task.seqlen = 16;
  c.task.n_copy = 2;
  c.model = tiny_model(8);
  c.batch = 16;
  c.steps = 60;
  c.warmup = 5;
  c.lr = 1e-2;
  c.seed = 3;
  return c;
}

double mean_loss(const std::vector<StepLog>& h, size_t from, size_t to) {
  double s = 0;
  for (size_t i = from; i < to; ++i) s += h[i].loss;
  return s / static_cast<double>(to - from);
}

}  // namespace

// ---- loss ---------------------------------------------------------------------------------------

TEST(CrossEntropy, LossIsTheMeanOverCountedPositionsAndGradMatchesFiniteDifferences) {
  Rng rng(1);
  Tensor logits = test::randn({2, 3, 7}, rng, 1.5);
  std::vector<int32_t> tg = {3, kIgnoreIndex, 0, 6, 2, kIgnoreIndex};
  Tensor dl;
  LossResult r = cross_entropy(logits, tg, &dl);
  EXPECT_EQ(r.counted, 4);
  // By hand in double.
  double want = 0;
  int64_t correct = 0;
  for (int64_t i = 0; i < 6; ++i) {
    if (tg[i] == kIgnoreIndex) continue;
    double mx = -1e30, s = 0;
    int64_t am = 0;
    for (int64_t j = 0; j < 7; ++j)
      if (logits[i * 7 + j] > mx) mx = logits[i * 7 + j], am = j;
    for (int64_t j = 0; j < 7; ++j) s += std::exp((double)logits[i * 7 + j] - mx);
    want += mx + std::log(s) - logits[i * 7 + tg[i]];
    correct += am == tg[i];
  }
  EXPECT_NEAR(r.loss, want / 4, 1e-12);
  EXPECT_EQ(r.correct, correct);
  // Ignored rows get zero gradient; the rest match a central difference of the loss.
  for (int64_t j = 0; j < 7; ++j) EXPECT_EQ(dl[1 * 7 + j], 0.f);
  for (int64_t i = 0; i < logits.numel(); ++i) {
    const float orig = logits[i], eps = 1e-3f;
    logits[i] = orig + eps;
    const float hi = logits[i];
    const double lp = cross_entropy(logits, tg).loss;
    logits[i] = orig - eps;
    const float lo = logits[i];
    const double lm = cross_entropy(logits, tg).loss;
    logits[i] = orig;
    const double fd = (lp - lm) / ((double)hi - lo);
    EXPECT_NEAR(dl[i], fd, tol::kCrossEntropyFD.atol + tol::kCrossEntropyFD.rtol * std::fabs(fd))
        << "logit " << i;
  }
  // An explicit denominator scales loss and gradient (the mean over an accumulated batch).
  Tensor dl2;
  LossResult r2 = cross_entropy(logits, tg, &dl2, 8.0);
  EXPECT_NEAR(r2.loss, want / 8, 1e-12);
  for (int64_t i = 0; i < dl.numel(); ++i) EXPECT_NEAR(dl2[i], dl[i] / 2, 1e-7);
}

TEST(CrossEntropy, RejectsBadTargets) {
  Tensor logits({1, 2, 4});
  EXPECT_THROW(cross_entropy(logits, {0, 4}), Error);
  EXPECT_THROW(cross_entropy(logits, {0, -1}), Error);
  EXPECT_THROW(cross_entropy(logits, {0}), Error);
  LossResult r = cross_entropy(logits, {kIgnoreIndex, kIgnoreIndex});
  EXPECT_EQ(r.counted, 0);
  EXPECT_EQ(r.loss, 0);
}

// ---- optimiser ----------------------------------------------------------------------------------

namespace {
// A free-standing parameter (Param's gradient is private: allocated on first use, or set here).
Param make_param(const std::string& name, Tensor value, Tensor grad, bool no_weight_decay) {
  Param p;
  p.name = name;
  p.value = Weight(std::move(value));
  p.set_grad(std::move(grad));
  p.no_weight_decay = no_weight_decay;
  return p;
}
}  // namespace

TEST(AdamW, MatchesAHandComputedUpdateWithDecoupledDecay) {
  Param w = make_param("mixer.in_proj.weight", Tensor::from({2, 2}, {0.5f, -1.f, 2.f, 0.25f}),
                       Tensor({2, 2}), false);
  Param d = make_param("mixer.D", Tensor::from({2}, {1.f, -0.5f}), Tensor({2}), true);
  std::vector<std::pair<std::string, Param*>> ps = {{w.name, &w}, {d.name, &d}};
  AdamWConfig cfg;
  cfg.beta1 = 0.9, cfg.beta2 = 0.95, cfg.eps = 1e-8, cfg.weight_decay = 0.1;
  AdamW opt(ps, cfg);
  EXPECT_TRUE(opt.decays(0));
  EXPECT_FALSE(opt.decays(1));
  std::vector<double> pw(w.value.f32().data(), w.value.f32().data() + 4),
      pd(d.value.f32().data(), d.value.f32().data() + 2);
  std::vector<double> mw(4, 0), vw(4, 0), md(2, 0), vd(2, 0);
  const double grads_w[2][4] = {{0.1, -0.2, 0.3, 0.0}, {-0.05, 0.4, 0.1, 1.0}};
  const double grads_d[2][2] = {{1.0, -2.0}, {0.5, 0.5}};
  const double lrs[2] = {1e-2, 5e-3};
  for (int t = 1; t <= 2; ++t) {
    for (int i = 0; i < 4; ++i) w.grad()[i] = (float)grads_w[t - 1][i];
    for (int i = 0; i < 2; ++i) d.grad()[i] = (float)grads_d[t - 1][i];
    opt.step(lrs[t - 1]);
    const double lr = lrs[t - 1], bc1 = 1 - std::pow(0.9, t), bc2 = 1 - std::pow(0.95, t);
    auto upd = [&](double& p, double& m, double& v, double g, bool decay) {
      if (decay) p *= 1 - lr * 0.1;
      m = 0.9 * m + 0.1 * g;
      v = 0.95 * v + 0.05 * g * g;
      p -= lr / bc1 * m / (std::sqrt(v) / std::sqrt(bc2) + 1e-8);
    };
    for (int i = 0; i < 4; ++i) upd(pw[i], mw[i], vw[i], (float)grads_w[t - 1][i], true);
    for (int i = 0; i < 2; ++i) upd(pd[i], md[i], vd[i], (float)grads_d[t - 1][i], false);
    for (int i = 0; i < 4; ++i)
      EXPECT_NEAR(w.value.f32()[i], pw[i],
                  tol::kAdamWVsDouble.atol + tol::kAdamWVsDouble.rtol * std::fabs(pw[i]));
    for (int i = 0; i < 2; ++i)
      EXPECT_NEAR(d.value.f32()[i], pd[i],
                  tol::kAdamWVsDouble.atol + tol::kAdamWVsDouble.rtol * std::fabs(pd[i]));
  }
  EXPECT_EQ(opt.steps(), 2);
  // A zero-gradient element with decay only shrinks: w[3] had g = 0 at step 1.
  EXPECT_EQ(opt.state_tensors().size(), 4u);
}

TEST(AdamW, WeightDecayGroupsFollowTheParamMarks) {
  MambaLM lm(tiny_model(8), 0);
  std::set<std::string> decayed;
  for (auto& [n, p] : lm.named_parameters())
    if (uses_weight_decay(n, *p))
      decayed.insert(n.substr(n.rfind("mixer.") == std::string::npos ? 0 : n.rfind("mixer.") + 6));
  EXPECT_TRUE(decayed.count("in_proj.weight"));
  EXPECT_TRUE(decayed.count("x_proj.weight"));
  EXPECT_TRUE(decayed.count("dt_proj.weight"));
  EXPECT_TRUE(decayed.count("out_proj.weight"));
  EXPECT_TRUE(decayed.count("conv1d.weight"));
  for (const char* n : {"A_log", "D", "dt_proj.bias", "conv1d.bias", "backbone.embedding.weight",
                        "backbone.norm_f.weight", "backbone.layers.0.norm.weight"})
    EXPECT_FALSE(decayed.count(n)) << n;
}

TEST(ClipGradNorm, ScalesToMaxNormOnlyAboveIt) {
  Param a = make_param("a", Tensor({3}), Tensor::from({3}, {3.f, 0.f, 4.f}), false);
  Param b = make_param("b", Tensor({1}), Tensor::from({1}, {12.f}), false);
  std::vector<std::pair<std::string, Param*>> ps = {{"a", &a}, {"b", &b}};
  EXPECT_NEAR(clip_grad_norm(ps, 100.0), 13.0, 1e-12);
  EXPECT_EQ(a.grad()[0], 3.f);  // below: untouched
  EXPECT_NEAR(clip_grad_norm(ps, 1.3), 13.0, 1e-12);
  EXPECT_NEAR(a.grad()[0], 0.3, 1e-6);
  EXPECT_NEAR(b.grad()[0], 1.2, 1e-6);
  EXPECT_NEAR(clip_grad_norm(ps, 0.0), 1.3, 1e-6);  // 0 = off: only measures
  EXPECT_NEAR(b.grad()[0], 1.2, 1e-6);
}

TEST(LRSchedule, LinearWarmupThenCosineToMin) {
  EXPECT_NEAR(lr_at(0, 10, 110, 1e-3, 1e-5), 1e-4, 1e-15);
  EXPECT_NEAR(lr_at(4, 10, 110, 1e-3, 1e-5), 5e-4, 1e-15);
  EXPECT_NEAR(lr_at(9, 10, 110, 1e-3, 1e-5), 1e-3, 1e-15);
  EXPECT_NEAR(lr_at(10, 10, 110, 1e-3, 1e-5), 1e-3, 1e-15);
  EXPECT_NEAR(lr_at(60, 10, 110, 1e-3, 1e-5), (1e-3 + 1e-5) / 2, 1e-15);
  EXPECT_NEAR(lr_at(35, 10, 110, 1e-3, 1e-5),
              1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + std::cos(M_PI * 0.25)), 1e-15);
  EXPECT_NEAR(lr_at(110, 10, 110, 1e-3, 1e-5), 1e-5, 1e-15);
  EXPECT_NEAR(lr_at(500, 10, 110, 1e-3, 1e-5), 1e-5, 1e-15);
  EXPECT_NEAR(lr_at(7, 0, 0, 2e-3, 0), 2e-3, 1e-15);  // no schedule span: constant
}

// ---- data ---------------------------------------------------------------------------------------

TEST(Data, SelectiveCopyInvariants) {
  const int64_t B = 16, L = 40, V = 10, M = 6;
  Rng rng(5);
  Batch b = selective_copy_batch(B, L, V, M, rng);
  ASSERT_EQ((int64_t)b.ids.size(), B * L);
  EXPECT_EQ(b.counted(), B * M);
  for (int64_t s = 0; s < B; ++s) {
    std::vector<int32_t> data;
    for (int64_t t = 0; t < L - M; ++t) {
      const int32_t x = b.ids[s * L + t];
      EXPECT_TRUE(x >= 0 && x <= V - 2);
      if (x != 0) data.push_back(x);
      EXPECT_EQ(b.targets[s * L + t], kIgnoreIndex);
    }
    ASSERT_EQ((int64_t)data.size(), M) << "sequence " << s;
    for (int64_t j = 0; j < M; ++j) {
      EXPECT_EQ(b.ids[s * L + L - M + j], V - 1);        // markers
      EXPECT_EQ(b.targets[s * L + L - M + j], data[j]);  // the data tokens, in order
    }
  }
  Rng r1(9), r2(9), r3(10);
  Batch x = selective_copy_batch(4, L, V, M, r1), y = selective_copy_batch(4, L, V, M, r2),
        z = selective_copy_batch(4, L, V, M, r3);
  EXPECT_EQ(x.ids, y.ids);
  EXPECT_EQ(x.targets, y.targets);
  EXPECT_NE(x.ids, z.ids);
  Rng r4(1);
  EXPECT_THROW(selective_copy_batch(1, 10, V, 6, r4), Error);  // L < 2M
}

TEST(Data, InductionInvariants) {
  const int64_t B = 32, L = 20, V = 6;
  Rng rng(2);
  Batch b = induction_batch(B, L, V, rng);
  EXPECT_EQ(b.counted(), B);
  for (int64_t s = 0; s < B; ++s) {
    const int32_t* ids = b.ids.data() + s * L;
    std::vector<int64_t> sp;
    for (int64_t t = 0; t < L; ++t) {
      EXPECT_TRUE(ids[t] >= 0 && ids[t] < V);
      if (ids[t] == V - 1) sp.push_back(t);
      if (t < L - 1) {
        EXPECT_EQ(b.targets[s * L + t], kIgnoreIndex);
      }
    }
    ASSERT_EQ(sp.size(), 2u) << "the special token appears at p and at the end";
    EXPECT_EQ(sp[1], L - 1);
    EXPECT_EQ(b.targets[s * L + L - 1], ids[sp[0] + 1]);  // the key that followed it
  }
  Rng r1(4), r2(4);
  EXPECT_EQ(induction_batch(3, L, V, r1).ids, induction_batch(3, L, V, r2).ids);
}

TEST(Data, InductionLossOnAllPositions) {
  const int64_t B = 8, L = 20, V = 6;
  Rng r1(9), r2(9);
  Batch last = induction_batch(B, L, V, r1), all = induction_batch(B, L, V, r2, true);
  EXPECT_EQ(all.ids, last.ids);  // the same sequences
  EXPECT_EQ(all.counted(), B * L);
  for (int64_t s = 0; s < B; ++s) {
    for (int64_t t = 0; t + 1 < L; ++t)
      EXPECT_EQ(all.targets[s * L + t], all.ids[s * L + t + 1]) << "next token at " << t;
    EXPECT_EQ(all.targets[s * L + L - 1], last.targets[s * L + L - 1]);  // the answer
  }
  // The option only exists for induction; the evaluation counts the answer only.
  TaskConfig sc;
  sc.kind = TaskKind::SelectiveCopy, sc.all_positions = true;
  EXPECT_THROW(sc.validate(), Error);
  TrainConfig c = tiny_train(TaskKind::Induction);
  c.task.all_positions = true;
  Trainer tr(c);
  EXPECT_EQ(evaluate(tr.model(), c.task, 2, 4, 7, nullptr).counted, 8);
}

TEST(Data, TextWindowsAreShiftedByOne) {
  std::vector<int32_t> toks;
  for (int i = 0; i < 100; ++i) toks.push_back(i % 50);
  TextData d = TextData::from_tokens(toks, 50);
  Rng rng(0);
  Batch b = d.sample(5, 12, rng);
  EXPECT_EQ(b.counted(), 60);
  for (int64_t s = 0; s < 5; ++s)
    for (int64_t t = 0; t < 12; ++t) EXPECT_EQ(b.targets[s * 12 + t], (b.ids[s * 12 + t] + 1) % 50);
  EXPECT_THROW(d.sample(1, 100, rng), Error);
  EXPECT_THROW(TextData::from_tokens({1, 60}, 50), Error);
}

// ---- training -----------------------------------------------------------------------------------

class LossGoesDown : public ::testing::TestWithParam<TaskKind> {};

// Training tests run on one thread: they are small, and CTest may run test programs side by side.
TEST_P(LossGoesDown, WithinAFewDozenSteps) {
  set_num_threads(1);
  TrainConfig c = tiny_train(GetParam());
  std::string dir;
  if (GetParam() == TaskKind::Text) {
    dir = temp_dir("text");
    std::ofstream(dir + "/t.txt")
        << std::string(40, ' ') + "the quick brown fox jumps over the lazy dog. " +
               "the quick brown fox jumps over the lazy dog. the lazy dog sleeps. ";
    c.task.text_path = dir + "/t.txt";
    c.model = tiny_model(256);
    c.task.seqlen = 24;
  }
  Trainer tr(c);
  for (int i = 0; i < 60; ++i) tr.train_step();
  const auto& h = tr.history();
  const double first = mean_loss(h, 0, 3), last = mean_loss(h, 55, 60);
  EXPECT_LT(last, 0.8 * first) << task_name(GetParam()) << ": first " << first << ", last " << last;
  // Selective copying: below the loss of guessing among the V-2 data tokens, i.e. it copies.
  if (GetParam() == TaskKind::SelectiveCopy) {
    EXPECT_LT(last, std::log(4.0) - 0.1);
  }
  for (const auto& l : h) EXPECT_TRUE(std::isfinite(l.loss));
  if (!dir.empty()) fs::remove_all(dir);
}
INSTANTIATE_TEST_SUITE_P(Tasks, LossGoesDown,
                         ::testing::Values(TaskKind::SelectiveCopy, TaskKind::Induction,
                                           TaskKind::Text),
                         [](const auto& info) {
                           std::string n = task_name(info.param);
                           for (auto& ch : n)
                             if (ch == '-') ch = '_';
                           return n;
                         });

TEST(Train, Mamba2LossGoesDown) {
  set_num_threads(1);
  TrainConfig c = tiny_train(TaskKind::SelectiveCopy);
  c.model = tiny_model(8, "Mamba2");
  Trainer tr(c);
  for (int i = 0; i < 60; ++i) tr.train_step();
  EXPECT_LT(mean_loss(tr.history(), 55, 60), 0.8 * mean_loss(tr.history(), 0, 3));
}

TEST(Train, AccumulationEqualsOneBigBatch) {
  set_num_threads(1);
  TrainConfig a = tiny_train(TaskKind::SelectiveCopy), b = a;
  a.batch = 4, a.accum = 2;
  b.batch = 8, b.accum = 1;
  Trainer ta(a), tb(b);
  for (int i = 0; i < 3; ++i) {
    StepLog la = ta.train_step(), lb = tb.train_step();
    EXPECT_NEAR(la.loss, lb.loss, 1e-6 * std::fabs(lb.loss)) << "step " << i;
    EXPECT_NEAR(la.grad_norm, lb.grad_norm, 1e-4 * lb.grad_norm) << "step " << i;
  }
  auto pa = ta.model().named_parameters(), pb = tb.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_TRUE(test::all_close(pa[i].second->value.f32(), pb[i].second->value.f32(),
                                tol::kAccumVsBatch, pa[i].first));
}

namespace {
// N in-process "ranks" (threads) with train_dist.h's contract: sums in rank order, the same bits
// everywhere. Lets the data-parallel path of the Trainer (shares, buckets, the per-layer hook) be
// tested without MPI; tests/mpi/ runs the MPI implementation itself.
class ThreadGroup {
 public:
  explicit ThreadGroup(int n) : n_(n), slots_(static_cast<size_t>(n)) {}
  // Every rank deposits `in`; each gets the rank-order sum.
  template <class T>
  void sum(int rank, std::span<T> v) {
    {
      std::unique_lock lk(m_);
      slots_[static_cast<size_t>(rank)].assign(v.begin(), v.end());
    }
    arrive();
    for (size_t k = 0; k < v.size(); ++k) {
      T s = static_cast<T>(slots_[0][k]);
      for (int r = 1; r < n_; ++r) s += static_cast<T>(slots_[static_cast<size_t>(r)][k]);
      v[k] = s;
    }
    arrive();  // nobody overwrites a slot before every rank has read them all
  }
  void arrive() {
    std::unique_lock lk(m_);
    const int64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0, ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }
  int size() const { return n_; }

 private:
  int n_;
  std::vector<std::vector<double>> slots_;  // floats and doubles both fit exactly
  std::mutex m_;
  std::condition_variable cv_;
  int count_ = 0;
  int64_t gen_ = 0;
};

class ThreadDist final : public Dist {
 public:
  ThreadDist(ThreadGroup& g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_.size(); }
  void start_sum(std::span<float> buf) override { pending_.push_back(buf); }
  void progress() override {}
  void wait_all() override {
    for (std::span<float> b : pending_) g_.sum(rank_, b);
    pending_.clear();
  }
  void sum_disjoint(std::span<double> v) override { g_.sum(rank_, v); }
  void barrier() override { g_.arrive(); }
  [[noreturn]] void abort(const std::string& m) override { throw Error(m); }

 private:
  ThreadGroup& g_;
  int rank_;
  std::vector<std::span<float>> pending_;
};
}  // namespace

// Two ranks with accum 2 (one micro-batch each) are bit for bit one process with accum 2: every
// step's loss, accuracy and gradient norm, and every parameter after the steps, on both ranks.
// Small buckets, so the per-layer hook starts several sums. Accum 4 over 2 ranks: within fp32
// rounding of one process (the gradient sum is (g0+g1)+(g2+g3) instead of ((g0+g1)+g2)+g3).
TEST(Train, TwoRanksEqualOneProcessWithTheSameAccumulation) {
  set_num_threads(1);
  for (int64_t accum : {2, 4}) {
    TrainConfig c = tiny_train(TaskKind::SelectiveCopy);
    c.batch = 2, c.accum = accum;
    Trainer one(c);
    for (int i = 0; i < 4; ++i) one.train_step();
    ThreadGroup group(2);
    std::vector<std::unique_ptr<Trainer>> ranks;
    std::vector<std::unique_ptr<ThreadDist>> dists;
    for (int r = 0; r < 2; ++r) {
      ranks.push_back(std::make_unique<Trainer>(c));
      dists.push_back(std::make_unique<ThreadDist>(group, r));
      ranks.back()->set_dist(dists.back().get(), 4096, true);
    }
    std::vector<std::thread> th;
    for (int r = 0; r < 2; ++r)
      th.emplace_back([&ranks, r] {
        for (int i = 0; i < 4; ++i) ranks[static_cast<size_t>(r)]->train_step();
      });
    for (auto& t : th) t.join();
    for (int r = 0; r < 2; ++r) {
      const Trainer& tr = *ranks[static_cast<size_t>(r)];
      ASSERT_EQ(tr.history().size(), one.history().size());
      for (size_t i = 0; i < one.history().size(); ++i) {
        const StepLog &a = tr.history()[i], &b = one.history()[i];
        if (accum == 2) {
          EXPECT_EQ(a.loss, b.loss) << "rank " << r << " step " << i;
          EXPECT_EQ(a.grad_norm, b.grad_norm) << "rank " << r << " step " << i;
        } else {
          EXPECT_NEAR(a.loss, b.loss, 1e-6 * b.loss) << "rank " << r << " step " << i;
        }
        EXPECT_EQ(a.accuracy, b.accuracy) << "rank " << r << " step " << i;
        EXPECT_EQ(a.tokens, b.tokens);
      }
      auto pa = ranks[static_cast<size_t>(r)]->model().named_parameters();
      auto pb = one.model().named_parameters();
      auto p0 = ranks[0]->model().named_parameters();
      for (size_t i = 0; i < pa.size(); ++i) {
        const Tensor &va = pa[i].second->value.f32(), &vb = pb[i].second->value.f32();
        // the ranks always agree with each other bit for bit
        EXPECT_EQ(std::memcmp(va.data(), p0[i].second->value.f32().data(), va.numel() * 4), 0);
        if (accum == 2)
          EXPECT_EQ(std::memcmp(va.data(), vb.data(), va.numel() * 4), 0) << pa[i].first;
        else
          EXPECT_TRUE(test::all_close(va, vb, tol::kAccumVsBatch, pa[i].first));
      }
    }
  }
}

namespace {
// Runs `c` for 8 steps without a break, and 4 + save + resume + 4; losses, gradient norms and
// every parameter must be the same bits (train.h's promise).
void expect_resume_equals_uninterrupted(const TrainConfig& c, const std::string& name) {
  const std::string dir = temp_dir(name);
  Trainer full(c);
  for (int i = 0; i < 8; ++i) full.train_step();
  Trainer first(c);
  for (int i = 0; i < 4; ++i) first.train_step();
  first.save(dir);
  for (const auto& e : fs::directory_iterator(dir)) {  // only the finished files, no temporaries
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "config.json" || n == "model.safetensors" || n == "optimizer.safetensors" ||
                n == "trainer_state.json")
        << "unexpected file " << n;
  }
  Trainer resumed = Trainer::resume(dir);
  ASSERT_EQ(resumed.step(), 4);
  for (int i = 0; i < 4; ++i) resumed.train_step();
  ASSERT_EQ(resumed.history().size(), full.history().size());
  for (size_t i = 0; i < full.history().size(); ++i) {
    EXPECT_EQ(resumed.history()[i].loss, full.history()[i].loss) << "step " << i + 1;
    EXPECT_EQ(resumed.history()[i].grad_norm, full.history()[i].grad_norm) << "step " << i + 1;
  }
  auto pa = full.model().named_parameters(), pb = resumed.model().named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    ASSERT_EQ(pa[i].first, pb[i].first);
    const Tensor &a = pa[i].second->value.f32(), &b = pb[i].second->value.f32();
    ASSERT_EQ(a.numel(), b.numel()) << pa[i].first;
    EXPECT_EQ(std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel()) * sizeof(float)), 0)
        << pa[i].first << " differs";
  }
  fs::remove_all(dir);
}
}  // namespace

TEST(Train, ResumeEqualsUninterruptedBitForBit) {
  // With a fixed thread count every kernel splits work the same way (parallel_for is static),
  // so the comparison is exact (EXPECT_EQ on floats), not within a tolerance.
  set_num_threads(2);
  TrainConfig c = tiny_train(TaskKind::Induction);
  c.accum = 2, c.steps = 8, c.batch = 4;
  expect_resume_equals_uninterrupted(c, "resume");
}

TEST(Train, Mamba2ResumeEqualsUninterruptedBitForBit) {
  // 3 threads, H = 8 heads, batch 1, L = 64 (4 chunks of 16): the SSD backward splits the heads
  // into 3 parts whose dB / dC partials all meet on the same rows (summed in part order, so the
  // comparison is exact, not within a tolerance).
  set_num_threads(3);
  TrainConfig c = tiny_train(TaskKind::Induction);
  c.model = tiny_model(8, "Mamba2", 64);
  c.accum = 2, c.steps = 8, c.batch = 1;
  c.task.seqlen = 64;
  expect_resume_equals_uninterrupted(c, "resume_mamba2");
  set_num_threads(2);
}

TEST(Train, TornCheckpointIsDetected) {
  set_num_threads(1);
  const std::string dir = temp_dir("torn");
  Trainer tr(tiny_train(TaskKind::Induction));
  tr.train_step();
  tr.save(dir);
  const std::string opt = dir + "/optimizer.safetensors";
  const auto saved_opt = os::read_file(opt);
  tr.train_step();
  tr.save(dir);
  os::write_file_atomic(opt, saved_opt.data(),
                        saved_opt.size());  // as if the save stopped half-way
  try {
    Trainer::resume(dir);
    ADD_FAILURE() << "resume accepted an optimizer file from another step";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("step"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Trainer::resume(dir + "/nope"), Error);
  fs::remove_all(dir);
}

TEST(Train, InitWeightsFromACheckpoint) {
  set_num_threads(1);
  const std::string dir = temp_dir("init");
  Trainer a(tiny_train(TaskKind::Induction));
  a.train_step();
  a.save(dir);
  TrainConfig c = tiny_train(TaskKind::Induction);
  c.task.seqlen = 32, c.seed = 99;  // a longer task, another seed: only the weights come over
  Trainer b(c);
  b.init_weights_from(dir);
  auto pa = a.model().named_parameters(), pb = b.model().named_parameters();
  for (size_t i = 0; i < pa.size(); ++i)
    EXPECT_EQ(test::max_abs_diff(pa[i].second->value.f32(), pb[i].second->value.f32()), 0.0)
        << pa[i].first;
  b.train_step();
  EXPECT_THROW(b.init_weights_from(dir), Error);  // only before the first step
  TrainConfig other = c;
  other.model = tiny_model(8, "Mamba1", 16);
  Trainer d(other);
  EXPECT_THROW(d.init_weights_from(dir), Error);  // a different config
  fs::remove_all(dir);
}

TEST(Train, EvaluateCountsAnswerPositionsOnly) {
  set_num_threads(1);
  MambaLM lm(tiny_model(8), 1);
  TaskConfig t;
  t.kind = TaskKind::SelectiveCopy, t.seqlen = 24, t.vocab = 8, t.n_copy = 4;
  EvalResult r = evaluate(lm, t, 2, 3, 7);
  EXPECT_EQ(r.counted, 2 * 3 * 4);  // n_copy answers per sequence
  EXPECT_EQ(r.seq_total, 6);
  EXPECT_GE(r.accuracy(), 0.0);
  EXPECT_LE(r.accuracy(), 1.0);
}

TEST(Train, NonSelectiveAblationTrains) {
  ModelConfig m = tiny_model(8);
  set_selective(m, false);
  EXPECT_FALSE(get_selective(m));
  set_num_threads(1);
  TrainConfig c = tiny_train(TaskKind::SelectiveCopy);
  c.selective = false;
  Trainer tr(c);
  for (int i = 0; i < 10; ++i) tr.train_step();
  for (const auto& l : tr.history()) EXPECT_TRUE(std::isfinite(l.loss));
  EXPECT_FALSE(get_selective(tr.model().config()));
  for (auto& [name, p] : tr.model().named_parameters())
    EXPECT_EQ(name.find("x_proj"), std::string::npos) << name;  // delta, B, C take no input
  // The switch survives a checkpoint (config.json) and the run resumes.
  const std::string dir = temp_dir("lti");
  tr.save(dir);
  Trainer back = Trainer::resume(dir);
  EXPECT_FALSE(back.config().selective);
  EXPECT_FALSE(get_selective(back.model().config()));
  back.train_step();
  fs::remove_all(dir);
}

TEST(Train, ConfigRoundTripsThroughJson) {
  TrainConfig c = tiny_train(TaskKind::SelectiveCopy);
  c.accum = 3, c.clip = 0.5, c.adamw.weight_decay = 0.02, c.seed = 12345678901234ull;
  c.A_init_scale = 0.25;
  TrainConfig d = TrainConfig::from_json(c.to_json(), c.model);
  EXPECT_EQ(d.to_json(), c.to_json());
  TrainConfig ih = tiny_train(TaskKind::Induction);
  ih.task.all_positions = true;
  EXPECT_TRUE(TrainConfig::from_json(ih.to_json(), ih.model).task.all_positions);
  EXPECT_EQ(d.seed, c.seed);
  EXPECT_EQ(d.A_init_scale, 0.25);
  EXPECT_THROW(TrainConfig::from_json("{", c.model), Error);
  TrainConfig bad = c;
  bad.task.vocab = 100;  // more tokens than the model's vocabulary
  EXPECT_THROW(bad.validate(), Error);
  bad = c;
  bad.A_init_scale = 0;
  EXPECT_THROW(bad.validate(), Error);
}

TEST(Train, AInitScaleMultipliesTheInitialA) {
  TrainConfig c = tiny_train(TaskKind::Induction);
  Trainer base(c);
  c.A_init_scale = 0.1;
  Trainer scaled(c);
  auto pa = base.model().named_parameters(), pb = scaled.model().named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  int n_alog = 0;
  for (size_t i = 0; i < pa.size(); ++i) {
    const Tensor &a = pa[i].second->value.f32(), &b = pb[i].second->value.f32();
    const bool is_alog = pa[i].first.find("A_log") != std::string::npos;
    n_alog += is_alog;
    for (int64_t k = 0; k < a.numel(); ++k) {
      if (is_alog)  // A = -exp(A_log) is 0.1x the default one
        ASSERT_NEAR(std::exp(b[k]) / std::exp(a[k]), 0.1, 1e-6) << pa[i].first;
      else  // everything else is initialised identically
        ASSERT_EQ(a[k], b[k]) << pa[i].first;
    }
  }
  EXPECT_EQ(n_alog, c.model.n_layer);
}

// layer_init: each layer is initialised exactly as a whole model with that layer's delta range
// and A scale would initialise it; nothing else changes.
TEST(Train, LayerInitGivesEachLayerItsOwnDeltaRangeAndAScale) {
  TrainConfig fast = tiny_train(TaskKind::Induction);  // mamba_ssm's dt 1e-3..1e-1, A x1
  ASSERT_EQ(fast.model.n_layer, 2);
  TrainConfig slow = fast;
  std::get<Mamba1Config>(slow.model.ssm_cfg).dt_min = 1e-4,
  std::get<Mamba1Config>(slow.model.ssm_cfg).dt_max = 1e-2, slow.A_init_scale = 0.1;
  TrainConfig split = fast;
  split.layer_init = {{1e-3, 1e-1, 1.0}, {1e-4, 1e-2, 0.1}};
  Trainer tf(fast), ts(slow), tsplit(split);
  auto pf = tf.model().named_parameters(), ps = ts.model().named_parameters(),
       px = tsplit.model().named_parameters();
  ASSERT_EQ(pf.size(), px.size());
  int differs_from_fast = 0, differs_from_slow = 0;
  for (size_t i = 0; i < px.size(); ++i) {
    const std::string& name = px[i].first;
    const bool layer1 = name.rfind("backbone.layers.1.", 0) == 0;
    const Tensor& want = (layer1 ? ps : pf)[i].second->value.f32();
    const Tensor &got = px[i].second->value.f32(),
                 &other = (layer1 ? pf : ps)[i].second->value.f32();
    ASSERT_EQ(want.numel(), got.numel()) << name;
    bool diff_other = false;
    for (int64_t k = 0; k < got.numel(); ++k) {
      ASSERT_EQ(got[k], want[k]) << name << " [" << k << "]";
      diff_other |= got[k] != other[k];
    }
    if (diff_other) (layer1 ? differs_from_fast : differs_from_slow)++;
  }
  // the two layers really got different inits: dt_proj.bias and A_log of each layer differ from
  // the other recipe's
  EXPECT_EQ(differs_from_fast, 2);
  EXPECT_EQ(differs_from_slow, 2);
  TrainConfig bad = split;
  bad.layer_init.pop_back();
  EXPECT_THROW(Trainer{bad}, Error);  // one entry per layer
  bad = split, bad.A_init_scale = 0.5;
  EXPECT_THROW(bad.validate(), Error);  // both a global and per-layer A scale
  bad = split, bad.layer_init[1].dt_min = 0.1, bad.layer_init[1].dt_max = 0.01;
  EXPECT_THROW(bad.validate(), Error);
  bad = split, bad.layer_init[0].A_init_scale = 0;
  EXPECT_THROW(bad.validate(), Error);
  TrainConfig back = TrainConfig::from_json(split.to_json(), split.model);
  ASSERT_EQ(back.layer_init.size(), 2u);
  EXPECT_EQ(back.layer_init[1].dt_min, 1e-4);
  EXPECT_EQ(back.layer_init[1].A_init_scale, 0.1);
  EXPECT_EQ(back.to_json(), split.to_json());
}

// ---- curves and CLI -----------------------------------------------------------------------------

TEST(Curves, CsvAndSvg) {
  std::vector<StepLog> h(3);
  for (int i = 0; i < 3; ++i) h[i].step = i + 1, h[i].loss = 2.0 / (i + 1);
  std::string csv = history_csv(h);
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 4);
  EXPECT_EQ(csv.rfind("step,loss,", 0), 0u);
  std::string svg = svg_line_plot({{"a<b", {1, 2, 3}, {2, 1, 0.5}}}, "t", "step", "loss", true);
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("a&lt;b"), std::string::npos);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
}

TEST(CLI, TrainThenEvalTask) {
  const std::string dir = temp_dir("cli");
  const std::string cli = MAMBA_CLI_PATH;
  std::string cmd =
      cli +
      " train --task induction --seqlen 16 --task-vocab 8 --d_model 16 --n_layer 1 --d_state 4 "
      "--batch 4 --steps 6 --save-every 3 --threads 2 --eval-batches 1 --eval-batch 4 --save " +
      dir + " > " + dir + "/log.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors",
                        "trainer_state.json", "loss.csv", "loss.svg"})
    EXPECT_TRUE(fs::exists(dir + "/" + f)) << f;
  cmd = cli + " eval-task --model " + dir + " --seqlen 64 --batches 1 --batch 2 --threads 2 > " +
        dir + "/eval.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(dir + "/eval.txt");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(all.find("seqlen 64: token accuracy"), std::string::npos) << all;
  cmd = cli + " train --task nope --save " + dir + " > /dev/null 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  fs::remove_all(dir);
}

// Per-layer --dt-min/--dt-max/--A-init-scale lists reach TrainConfig::layer_init (one value is
// repeated for every layer); a list of the wrong length is a clear error.
TEST(CLI, TrainPerLayerInitLists) {
  const std::string dir = temp_dir("layer_init");
  const std::string cli = MAMBA_CLI_PATH;
  std::string cmd =
      cli +
      " train --task induction --seqlen 16 --task-vocab 8 --d_model 16 --n_layer 2 --d_state 4 "
      "--batch 2 --steps 1 --threads 1 --eval-batches 0 --dt-min 1e-3,1e-4 --dt-max 1e-1,1e-2 "
      "--A-init-scale 0.1 --save " +
      dir + " > " + dir + "/log.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto text = [&](const char* file) {
    const std::vector<uint8_t> b = os::read_file(dir + "/" + file);
    return std::string(b.begin(), b.end());
  };
  const nlohmann::json j = nlohmann::json::parse(text("trainer_state.json"));
  const nlohmann::json& li = j.at("train").at("layer_init");
  ASSERT_EQ(li.size(), 2u) << j.dump();
  EXPECT_EQ(li[0].at("dt_max").get<double>(), 1e-1);
  EXPECT_EQ(li[1].at("dt_min").get<double>(), 1e-4);
  EXPECT_EQ(li[0].at("A_init_scale").get<double>(), 0.1);
  EXPECT_EQ(li[1].at("A_init_scale").get<double>(), 0.1);
  const std::string log = text("log.txt");
  EXPECT_NE(log.find("layer 1 delta 0.0001..0.01, A x0.1"), std::string::npos) << log;
  cmd = cli + " train --task induction --n_layer 2 --dt-min 1e-3,1e-4,1e-5 --steps 1 --save " +
        dir + " > " + dir + "/err.txt 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  const std::string err = text("err.txt");
  EXPECT_NE(
      err.find("--dt-min: give one value for every layer or one per layer (n_layer = 2), got 3"),
      std::string::npos)
      << err;
  fs::remove_all(dir);
}

TEST(CLI, DemoQuickRunsEndToEnd) {
  const std::string dir = temp_dir("demo");
  const std::string cmd = std::string(MAMBA_CLI_PATH) + " demo --quick --threads 1 --out " + dir +
                          " > " + dir + "/log.txt 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  std::ifstream in(dir + "/log.txt");
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(all.find("decoded"), std::string::npos) << all;
  EXPECT_NE(all.find("(mamba_ssm: 7968)"), std::string::npos) << all;
  EXPECT_TRUE(fs::exists(dir + "/loss.svg"));
  EXPECT_TRUE(fs::exists(dir + "/selective/model.safetensors"));
  fs::remove_all(dir);
}

// ---- the non-selective layer (Mamba1Config::selective = false) ----------------------------------

namespace {
// Builds the ablation layer where this build's Mamba1Config has the switch.
template <class C>
bool make_lti(C& c) {
  if constexpr (requires { c.selective = false; }) {
    c.selective = false;
    return true;
  } else {
    return false;
  }
}
}  // namespace

TEST(NonSelectiveLayer, ParamsStepAndGradients) {
  Mamba1Config c;
  c.d_model = 8, c.d_state = 4, c.d_conv = 3;
  if (!make_lti(c)) GTEST_SKIP() << "this build's Mamba1Config has no selective switch";
  Mamba1 m(c, 3);
  EXPECT_FALSE(m.params().has("x_proj.weight"));
  EXPECT_FALSE(m.params().has("dt_proj.weight"));
  ASSERT_TRUE(m.params().has("B_ssm"));
  ASSERT_TRUE(m.params().has("C_ssm"));
  Rng rng(4);
  Tensor x = test::randn({2, 7, 8}, rng), g = test::randn({2, 7, 8}, rng);
  // Full forward == step by step.
  Tensor y = m.forward(x);
  Mamba1State st = m.new_state(2);
  for (int64_t t = 0; t < 7; ++t) {
    Tensor xt({2, 8});
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t j = 0; j < 8; ++j) xt[b * 8 + j] = x[(b * 7 + t) * 8 + j];
    Tensor yt = m.step(xt, st);
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t j = 0; j < 8; ++j) EXPECT_NEAR(yt[b * 8 + j], y[(b * 7 + t) * 8 + j], 1e-5);
  }
  // Backward vs central differences for the ablation's own parameters and the input.
  m.params().zero_grad();
  Mamba1Saved s;
  m.forward(x, &s);
  Tensor dx = m.backward(s, g);
  auto loss = [&] {
    Tensor yy = m.forward(x);
    double acc = 0;
    for (int64_t i = 0; i < yy.numel(); ++i) acc += (double)yy[i] * g[i];
    return acc;
  };
  auto fd = [&](float& v) {
    const float orig = v, eps = 3e-3f;
    v = orig + eps;
    const float hi = v;
    const double lp = loss();
    v = orig - eps;
    const float lo = v;
    const double lm = loss();
    v = orig;
    return (lp - lm) / ((double)hi - lo);
  };
  const auto t = tol::kLayerFiniteDiffF32;
  for (const char* name : {"B_ssm", "C_ssm", "dt_proj.bias", "A_log", "in_proj.weight"}) {
    Param& p = m.params().get(name);
    for (int64_t i : {int64_t{0}, p.value.numel() / 2, p.value.numel() - 1}) {
      const double want = fd(p.value.f32()[i]);
      EXPECT_NEAR(p.grad()[i], want, t.atol + t.rtol * std::fabs(want)) << name << "[" << i << "]";
    }
  }
  for (int64_t i : {int64_t{0}, int64_t{50}, x.numel() - 1}) {
    const double want = fd(x[i]);
    EXPECT_NEAR(dx[i], want, t.atol + t.rtol * std::fabs(want)) << "x[" << i << "]";
  }
}
