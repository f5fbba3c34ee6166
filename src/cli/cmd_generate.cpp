// mambacpp generate: prompt(s) -> prefill -> step decoding with constant-size state.
// Streams text as tokens arrive; prints prefill and decode tokens/s at the end.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/os.h"
#include "mamba/generate.h"
#include "mamba/parallel.h"
#include "mamba/tokenizer.h"
#include "model/npy.h"

namespace mamba::cli {

namespace {
struct GenOpts {
  std::string model, tokenizer, ids_file, out_ids, dtype = "f32", activations = "f32";
  std::vector<std::string> prompts;
  int64_t max_new_tokens = 64;
  float temperature = 1.0f, top_p = 1.0f, min_p = 0.0f, repetition_penalty = 1.0f;
  int64_t top_k = 0;
  bool greedy = false, no_eos = false, quiet = false;
  uint64_t seed = 0;
  int threads = 0;
  int64_t prefill_chunk = MambaLM::kDefaultPrefillChunk;
};
}  // namespace

Command add_generate(CLI::App& app) {
  auto o = std::make_shared<GenOpts>();
  auto* sub = app.add_subcommand("generate", "Generate text (or token ids) from a model folder");
  sub->add_option("--model", o->model,
                  "model folder: config.json + model.safetensors or pytorch_model.bin; or a "
                  "llama.cpp .gguf file (docs/GGUF.md)")
      ->required();
  sub->add_option("--prompt", o->prompts,
                  "prompt text; repeat for several prompts, decoded as one batch");
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.json (default: the model folder's)");
  sub->add_option("--ids", o->ids_file, "int token ids (B, L) in a .npy file, instead of --prompt");
  sub->add_option("--out-ids", o->out_ids,
                  "write the generated ids (B, max_new_tokens) as int64 .npy");
  sub->add_option("-n,--max-new-tokens", o->max_new_tokens, "tokens to generate per sequence")
      ->capture_default_str();
  sub->add_flag("--greedy", o->greedy, "argmax decoding (same as --top-k 1)");
  sub->add_option("--temperature", o->temperature, "softmax temperature (> 0)")
      ->capture_default_str();
  sub->add_option("--top-k", o->top_k, "keep the k most likely tokens (0 = off)")
      ->capture_default_str();
  sub->add_option("--top-p", o->top_p, "nucleus sampling mass (1 = off)")->capture_default_str();
  sub->add_option("--min-p", o->min_p, "drop tokens below min_p * p_max (0 = off)")
      ->capture_default_str();
  sub->add_option("--repetition-penalty", o->repetition_penalty, "CTRL-style penalty (1 = off)")
      ->capture_default_str();
  sub->add_option("--seed", o->seed, "sampling seed")->capture_default_str();
  sub->add_flag("--no-eos", o->no_eos, "do not stop at the end-of-text token");
  sub->add_flag("-q,--quiet", o->quiet, "no streaming; print only the final texts and timings");
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  sub->add_option("--prefill-chunk", o->prefill_chunk,
                  "prefill prompts this many tokens at a time (bounds the activation memory by "
                  "the chunk; 0 = the whole prompt in one piece)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  add_dtype_option(sub, o->dtype);
  add_activations_option(sub, o->activations);
  return {sub, [o] {
            set_num_threads(o->threads);
            apply_activations(o->activations, o->dtype);
            MAMBA_CHECK(o->prompts.empty() != o->ids_file.empty(),
                        "give either --prompt or --ids (one of them)");
            MambaLM lm = load_model(o->model, o->dtype);
            std::unique_ptr<Tokenizer> tok;
            std::string tok_path =
                o->tokenizer.empty() ? o->model + "/tokenizer.json" : o->tokenizer;
            if (o->tokenizer.empty() && std::filesystem::is_regular_file(o->model)) {
              // a GGUF file: the vocabulary in its metadata (needed for --prompt; with --ids
              // a file without one still generates ids)
              tok_path = o->model + " (tokenizer.ggml.*)";
              try {
                tok = std::make_unique<Tokenizer>(Tokenizer::from_gguf(o->model));
              } catch (const Error&) {
                if (!o->prompts.empty()) throw;
              }
            } else if (os::exists(tok_path)) {
              tok = std::make_unique<Tokenizer>(Tokenizer::from_file(tok_path));
            }
            std::vector<std::vector<int32_t>> prompts;
            if (!o->prompts.empty()) {
              MAMBA_CHECK(tok, "no tokenizer: '", tok_path,
                          "' does not exist (use --tokenizer or --ids)");
              for (auto& p : o->prompts) prompts.push_back(tok->encode(p));
            } else {
              prompts = read_npy_ids(o->ids_file);
            }
            GenerateOptions g;
            g.max_new_tokens = o->max_new_tokens;
            g.prefill_chunk = o->prefill_chunk;
            g.sampling.greedy = o->greedy;
            g.sampling.temperature = o->temperature;
            g.sampling.top_k = o->top_k;
            g.sampling.top_p = o->top_p;
            g.sampling.min_p = o->min_p;
            g.sampling.repetition_penalty = o->repetition_penalty;
            g.seed = o->seed;
            g.vocab_limit = lm.config().vocab_size;
            if (tok && !o->no_eos && tok->eos_id()) g.eos_id = *tok->eos_id();
            if (lm.config().eos_token_id >= 0 && !o->no_eos)
              g.eos_id = static_cast<int32_t>(lm.config().eos_token_id);
            const bool stream = !o->quiet && prompts.size() == 1;
            std::unique_ptr<TokenStreamDecoder> dec;
            if (tok) dec = std::make_unique<TokenStreamDecoder>(*tok);
            if (stream) {
              if (tok) std::printf("%s", tok->decode(prompts[0]).c_str());
              std::fflush(stdout);
              g.on_token = [&](int64_t, int32_t id) {
                if (dec)
                  std::printf("%s", dec->push(id).c_str());
                else
                  std::printf(" %d", id);
                std::fflush(stdout);
              };
            }
            GenerateResult r = generate(lm, prompts, g);
            if (stream) {
              if (dec) std::printf("%s", dec->flush().c_str());
              std::printf("\n");
            } else {
              for (size_t b = 0; b < prompts.size(); ++b) {
                if (tok) {
                  std::printf("[%zu] %s%s\n", b, tok->decode(prompts[b]).c_str(),
                              tok->decode(r.tokens[b]).c_str());
                } else {
                  std::printf("[%zu]", b);
                  for (int32_t t : r.tokens[b]) std::printf(" %d", t);
                  std::printf("\n");
                }
              }
            }
            if (!o->out_ids.empty()) write_npy_ids(o->out_ids, r.tokens);
            std::fprintf(stderr,
                         "prefill: %lld tokens in %.3f s (%.1f tokens/s); decode: %lld tokens in "
                         "%.3f s (%.1f tokens/s); peak RSS %.1f MiB\n",
                         (long long)r.prefill_tokens, r.prefill_seconds,
                         r.prefill_tokens / std::max(r.prefill_seconds, 1e-9),
                         (long long)r.decode_tokens, r.decode_seconds,
                         r.decode_tokens / std::max(r.decode_seconds, 1e-9),
                         os::peak_rss_bytes() / 1048576.0);
            return 0;
          }};
}

}  // namespace mamba::cli
