// mambacpp demo: the README's main demo, a few minutes of CPU.
//   1. trains a small Mamba-1 on Selective Copying (the Mamba paper's section 4.1 task),
//   2. trains the non-selective ablation (delta, B, C independent of the input: LTI, S4-like)
//      with the same budget, and prints both accuracies side by side,
//   3. saves the selective model, loads it back and shows a copy being produced by step-mode
//      decoding (one token at a time with a constant-size state), checked against the
//      full-sequence forward,
//   4. a brief tour of the layers: parameter count vs mamba_ssm and backward vs finite
//      differences.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#if defined(__GLIBC__)
#endif

#include "cli/commands.h"
#include "core/os.h"
#include "mamba/lm.h"
#include "mamba/nn/mamba1.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/train.h"

namespace mamba::cli {

namespace {
namespace fs = std::filesystem;

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct DemoOpts {
  int threads = 0;
  int64_t steps = 0;  // 0 = the default budget
  std::string out = "demo-out";
  bool quick = false;
};

// Trains one model with a progress line; returns the final eval.
train::EvalResult train_one(const char* name, const train::TrainConfig& c, train::Trainer& tr) {
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  int64_t tokens = 0;
  while (tr.step() < c.steps) {
    train::StepLog l = tr.train_step();
    tokens += l.tokens;
    if (seconds_since(last) >= 5.0 || l.step == c.steps) {
      last = std::chrono::steady_clock::now();
      const double el = seconds_since(t0);
      std::printf("  %-14s step %5lld/%lld  loss %.4f  acc %5.1f%%  %7.0f tok/s  ETA %.0f s\n",
                  name, static_cast<long long>(l.step), static_cast<long long>(c.steps), l.loss,
                  100 * l.accuracy, tokens / el,
                  el / l.step * static_cast<double>(c.steps - l.step));
      std::fflush(stdout);
    }
  }
  return train::evaluate(tr.model(), c.task, 8, 32, c.seed + 1000003);
}

std::string show(int32_t t, int64_t V) {
  if (t == 0) return ".";
  if (t == V - 1) return ">";
  return std::string(1, static_cast<char>('a' + t - 1));
}
}  // namespace

Command add_demo(CLI::App& app) {
  auto o = std::make_shared<DemoOpts>();
  auto* sub = app.add_subcommand("demo",
                                 "Train a small Mamba on Selective Copying next to the "
                                 "non-selective ablation, save, reload, decode");
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  sub->add_option("--steps", o->steps, "training steps per model (0 = the default budget)")
      ->capture_default_str();
  sub->add_option("--out", o->out, "folder for the checkpoint and the loss curves")
      ->capture_default_str();
  sub->add_flag("--quick", o->quick, "a few steps only (a smoke test; the accuracies stay low)");
  return {
      sub, [o] {
        set_num_threads(o->threads);
        const auto t_all = std::chrono::steady_clock::now();
        train::TrainConfig c;
        c.task.kind = train::TaskKind::SelectiveCopy;
        c.task.seqlen = 64, c.task.vocab = 8, c.task.n_copy = 4;
        c.model =
            ModelConfig::parse(str(R"({"d_model": 64, "n_layer": 2, "vocab_size": )", c.task.vocab,
                                   R"(, "ssm_cfg": {"layer": "Mamba1", "d_state": 16}})"),
                               "demo");
        c.batch = 16, c.steps = o->steps > 0 ? o->steps : (o->quick ? 20 : 1000);
        c.warmup = std::min<int64_t>(20, c.steps / 10), c.lr = 5e-3, c.seed = 0;
        std::printf(
            "== Selective Copying (Mamba paper, section 4.1): %lld tokens scattered among %lld "
            "noise "
            "positions; after %lld markers the model must output them in order.\n",
            (long long)c.task.n_copy, (long long)(c.task.seqlen - 2 * c.task.n_copy),
            (long long)c.task.n_copy);
        std::printf(
            "   Mamba-1, 2 layers, d_model %lld, d_state 16; batch %lld, %lld steps, lr %g, %d "
            "threads\n\n",
            (long long)c.model.d_model, (long long)c.batch, (long long)c.steps, c.lr,
            num_threads());
        std::printf("== 1. The selective model (delta, B, C computed from the input)\n");
        train::Trainer sel(c);
        train::EvalResult rs = train_one("selective", c, sel);
        std::printf(
            "\n== 2. The non-selective ablation (LTI: delta, B, C learned constants, as S4)\n");
        train::TrainConfig cn = c;
        cn.selective = false;
        auto lti = std::make_unique<train::Trainer>(cn);
        train::EvalResult rn = train_one("non-selective", cn, *lti);
        std::printf("\n== 3. Token accuracy on %lld fresh sequences\n", (long long)rs.seq_total);
        std::printf("  selective      %6.2f%%   (whole sequences copied: %.1f%%)\n",
                    100 * rs.accuracy(), 100 * rs.seq_accuracy());
        std::printf("  non-selective  %6.2f%%   (whole sequences copied: %.1f%%)\n",
                    100 * rn.accuracy(), 100 * rn.seq_accuracy());
        std::printf("  (chance: %.1f%%)\n", 100.0 / static_cast<double>(c.task.vocab - 2));
        // Curves and checkpoint.
        fs::create_directories(o->out);
        std::vector<train::Series> ser;
        auto add = [&](const char* label, const train::Trainer& t) {
          train::Series s{label, {}, {}};
          for (const auto& l : t.history()) s.x.push_back((double)l.step), s.y.push_back(l.loss);
          ser.push_back(std::move(s));
        };
        add("selective", sel);
        add("non-selective", *lti);
        const std::string svg = train::svg_line_plot(ser, "Selective Copying: training loss",
                                                     "step", "cross-entropy loss", true);
        os::write_file_atomic((fs::path(o->out) / "loss.svg").string(), svg.data(), svg.size());
        const std::string ckpt = (fs::path(o->out) / "selective").string();
        sel.save(ckpt);
        std::printf(
            "\n== 4. Saved to %s; loaded back; one new sequence decoded token by token (step "
            "mode)\n",
            ckpt.c_str());
        MambaLM lm = MambaLM::load(ckpt);
        Rng rng(2026);
        train::Batch b = train::make_batch(c.task, 1, rng);
        const int64_t L = b.L, V = c.task.vocab, M = c.task.n_copy;
        LMState st = lm.new_state(1);
        std::string in, want, got;
        double worst = 0;
        Tensor full = lm.forward(b.ids, 1, L);
        for (int64_t t = 0; t < L; ++t) {
          Tensor lg = lm.step({b.ids[t]}, st);  // (1, V_pad)
          for (int64_t j = 0; j < lg.numel(); ++j)
            worst = std::max(worst, (double)std::fabs(lg[j] - full[t * lg.numel() + j]));
          in += show(b.ids[t], V);
          if (t >= L - M) {
            int32_t am = 0;
            for (int32_t j = 1; j < V; ++j)
              if (lg[j] > lg[am]) am = j;
            got += show(am, V);
            want += show(b.targets[t], V);
          }
        }
        std::printf("  input   %s\n", in.c_str());
        std::printf("  answer  %s\n  decoded %s   (%s)\n", want.c_str(), got.c_str(),
                    want == got ? "copied exactly" : "not exact");
        std::printf(
            "  step-mode logits vs full forward: max |diff| = %.2e (state: %lld floats per layer, "
            "any length)\n",
            worst,
            (long long)std::visit(
                [](const auto& s) -> int64_t {
                  if constexpr (requires { s.ssm_state; })  // Mamba-1 / Mamba-2
                    return s.conv_state.numel() + s.ssm_state.numel();
                  else if constexpr (requires { s.angle; })  // Mamba-3
                    return s.angle.numel() + s.ssm.numel() + s.k.numel() + s.v.numel();
                  else
                    return 0;  // the demo's model has no attention layer
                },
                st.layers.at(0)));
        std::printf(
            "\n== 5. The layers: parameter count vs mamba_ssm, backward vs finite differences\n");
        {
          Mamba1Config c1;
          c1.d_model = 16, c1.d_state = 64;
          Mamba1 m1(c1, 0);
          std::printf("  Mamba(d_model=16, d_state=64): %lld parameters (mamba_ssm: 7968)\n",
                      (long long)m1.params().count());
          Tensor x({2, 12, 16}), g({2, 12, 16});
          Rng r2(7);
          r2.fill_normal(x);
          r2.fill_normal(g);
          Mamba1Saved s;
          m1.forward(x, &s);
          m1.backward(s, g);
          auto loss = [&] {
            Tensor y = m1.forward(x);
            double acc = 0;
            for (int64_t i = 0; i < y.numel(); ++i) acc += (double)y[i] * g[i];
            return acc;
          };
          for (auto [name, idx] :
               {std::pair<const char*, int64_t>{"in_proj.weight", 17}, {"D", 3}}) {
            Param& p = m1.params().get(name);
            Tensor& w = p.value.f32();
            const float orig = w[idx];
            w[idx] = orig + 1e-2f;
            const float hi = w[idx];
            const double lp = loss();
            w[idx] = orig - 1e-2f;
            const float lo = w[idx];
            const double lm2 = loss();
            w[idx] = orig;
            std::printf("  d sum(y*g) / d %s[%lld]: backward %.6f, finite difference %.6f\n", name,
                        (long long)idx, p.grad()[idx], (lp - lm2) / ((double)hi - lo));
          }
        }
        std::printf("\nloss curves: %s/loss.svg; total %.0f s\n", o->out.c_str(),
                    seconds_since(t_all));
        return 0;
      }};
}

}  // namespace mamba::cli
