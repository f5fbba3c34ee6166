// mambacpp score: float32 logits (B, L, V_pad) for int token ids (B, L), as .npy.
// mambacpp perplexity: per-token NLL and perplexity of a text file, in windows of --context
// tokens advanced by --stride (tokens already scored in an earlier window are not rescored).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/os.h"
#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "mamba/tokenizer.h"
#include "model/npy.h"

namespace mamba::cli {

Command add_score(CLI::App& app) {
  struct Opts {
    std::string model, ids, out, dtype = "f32", activations = "f32";
    int threads = 0;
  };
  auto o = std::make_shared<Opts>();
  auto* sub =
      app.add_subcommand("score", "Write the logits (B, L, V) of token ids (B, L) as float32 .npy");
  sub->add_option("--model", o->model, "model folder or .gguf file")->required();
  sub->add_option("--ids", o->ids, "int64/int32 token ids (B, L) or (L), .npy")
      ->required()
      ->check(CLI::ExistingFile);
  sub->add_option("--out", o->out, "output .npy, float32 (B, L, V_pad)")->required();
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  add_dtype_option(sub, o->dtype);
  add_activations_option(sub, o->activations);
  return {sub, [o] {
            set_num_threads(o->threads);
            apply_activations(o->activations, o->dtype);
            MambaLM lm = load_model(o->model, o->dtype);
            auto rows = read_npy_ids(o->ids);
            const int64_t B = static_cast<int64_t>(rows.size()),
                          L = static_cast<int64_t>(rows[0].size());
            std::vector<int32_t> flat;
            for (auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
            Tensor logits = lm.forward(flat, B, L);
            write_npy(o->out, logits);
            std::fprintf(stderr, "wrote %s %s\n", o->out.c_str(), logits.shape_str().c_str());
            return 0;
          }};
}

Command add_perplexity(CLI::App& app) {
  struct Opts {
    std::string model, text, tokenizer, dtype = "f32", activations = "f32";
    int64_t context = 1024, stride = 512;
    int threads = 0;
  };
  auto o = std::make_shared<Opts>();
  auto* sub = app.add_subcommand("perplexity", "Per-token NLL and perplexity of a text file");
  sub->add_option("--model", o->model, "model folder or .gguf file")->required();
  sub->add_option("--text", o->text, "UTF-8 text file")->required()->check(CLI::ExistingFile);
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.json (default: the model folder's)");
  sub->add_option("--context", o->context, "tokens per window")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--stride", o->stride, "window advance; only new tokens are scored")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  add_dtype_option(sub, o->dtype);
  add_activations_option(sub, o->activations);
  return {sub, [o] {
            set_num_threads(o->threads);
            apply_activations(o->activations, o->dtype);
            MAMBA_CHECK(o->stride <= o->context, "--stride (", o->stride,
                        ") must be <= --context (", o->context, ")");
            MambaLM lm = load_model(o->model, o->dtype);
            Tokenizer tok = o->tokenizer.empty() ? Tokenizer::from_model_dir(o->model)
                                                 : Tokenizer::from_file(o->tokenizer);
            std::ifstream f(o->text, std::ios::binary);
            std::stringstream ss;
            ss << f.rdbuf();
            std::vector<int32_t> ids = tok.encode(ss.str());
            const int64_t n = static_cast<int64_t>(ids.size()), V = lm.vocab();
            MAMBA_CHECK(n >= 2, o->text, ": needs at least 2 tokens, has ", n);
            double nll = 0;
            int64_t counted = 0, scored_until = 1;  // targets [1, scored_until) are done
            for (int64_t begin = 0; scored_until < n; begin += o->stride) {
              const int64_t end = std::min(n, begin + o->context);
              std::vector<int32_t> win(ids.begin() + begin, ids.begin() + end);
              Tensor logits = lm.forward(win, 1, end - begin);
              for (int64_t t = std::max(scored_until, begin + 1); t < end; ++t) {
                const float* l = logits.data() + (t - 1 - begin) * V;
                double mx = l[0], s = 0;
                for (int64_t v = 1; v < V; ++v) mx = std::max(mx, (double)l[v]);
                for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - mx);
                nll += (std::log(s) + mx) - l[ids[t]];
                ++counted;
              }
              scored_until = end;
              std::fprintf(stderr, "\rscored %lld / %lld tokens", (long long)scored_until,
                           (long long)n);
            }
            std::fprintf(stderr, "\n");
            std::printf("{\"tokens\": %lld, \"nll_per_token\": %.6f, \"perplexity\": %.4f}\n",
                        (long long)counted, nll / counted, std::exp(nll / counted));
            return 0;
          }};
}

}  // namespace mamba::cli
