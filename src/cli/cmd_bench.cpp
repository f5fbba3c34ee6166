// mambacpp bench: prefill and decode tokens/s (median and spread over reps) and peak memory,
// for a model folder or for random weights of a config (no download needed to measure).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/os.h"
#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/trace.h"
#include "ops/gemm_nt.h"

namespace mamba::cli {

// Random-weight configs with the exact shapes of the state-spaces checkpoints.
std::string preset_json(const std::string& name) {
  if (name == "mamba-130m")
    return R"({"d_model":768,"n_layer":24,"vocab_size":50277,"ssm_cfg":{"layer":"Mamba1"},"pad_vocab_size_multiple":8})";
  if (name == "mamba2-130m")
    return R"({"d_model":768,"n_layer":24,"vocab_size":50277,"ssm_cfg":{"layer":"Mamba2"},"pad_vocab_size_multiple":16})";
  // mamba2attn-2.7b (state-spaces): 64 layers, Mamba-2 with MHA at 6 layers (30 heads of 128,
  // rotary 64, qkv conv 4, no biases); and mamba2-2.7b, the same without attention.
  if (name == "mamba2attn-2.7b")
    return R"({"d_model":2560,"n_layer":64,"vocab_size":50277,"ssm_cfg":{"layer":"Mamba2"},"attn_layer_idx":[9,18,27,36,45,56],"attn_cfg":{"causal":true,"d_conv":4,"head_dim":128,"num_heads":30,"out_proj_bias":false,"qkv_proj_bias":false,"rotary_emb_dim":64},"pad_vocab_size_multiple":16})";
  if (name == "mamba2-2.7b")
    return R"({"d_model":2560,"n_layer":64,"vocab_size":50277,"ssm_cfg":{"layer":"Mamba2"},"pad_vocab_size_multiple":16})";
  // Mamba-3 at the 130m width and depth with mamba_ssm's Mamba3 defaults (d_state 128, headdim 64,
  // SISO); there is no released checkpoint, so only the shapes are a choice.
  if (name == "mamba3-130m")
    return R"({"d_model":768,"n_layer":24,"vocab_size":50277,"ssm_cfg":{"layer":"Mamba3"},"pad_vocab_size_multiple":16})";
  // The other released sizes (state-spaces/mamba-* and mamba2-* config.json: d_model, n_layer;
  // everything else is mamba_ssm's default, as in those configs).
  struct Size {
    const char* name;
    int d_model, n_layer;
    bool m2;
  };
  static const Size sizes[] = {{"mamba-370m", 1024, 48, false}, {"mamba-790m", 1536, 48, false},
                               {"mamba-1.4b", 2048, 48, false}, {"mamba-2.8b", 2560, 64, false},
                               {"mamba2-370m", 1024, 48, true}, {"mamba2-780m", 1536, 48, true},
                               {"mamba2-1.3b", 2048, 48, true}};
  for (const Size& z : sizes)
    if (name == z.name)
      return str(R"({"d_model":)", z.d_model, R"(,"n_layer":)", z.n_layer,
                 R"(,"vocab_size":50277,"ssm_cfg":{"layer":")", z.m2 ? "Mamba2" : "Mamba1",
                 R"("},"pad_vocab_size_multiple":)", z.m2 ? 16 : 8, "}");
  if (name == "tiny")
    return R"({"d_model":64,"n_layer":2,"vocab_size":256,"ssm_cfg":{"layer":"Mamba1"}})";
  throw Error(str("unknown --preset '", name,
                  "' (mamba-130m, mamba-370m, mamba-790m, mamba-1.4b, mamba-2.8b, mamba2-130m, "
                  "mamba2-370m, mamba2-780m, mamba2-1.3b, mamba2-2.7b, mamba2attn-2.7b, "
                  "mamba3-130m, tiny)"));
}

namespace {

struct Stats {
  double median, min, max;
};
Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}
double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// --profile: one phase's op times summed over the measured repetitions (trace.h).
struct PhaseProfile {
  double wall = 0;  // the phase's measured seconds, all repetitions
  std::vector<trace::ProfileEntry> ops;
  void add(std::vector<trace::ProfileEntry> rows, double phase_seconds) {
    wall += phase_seconds;
    for (auto& r : rows) {
      auto it = std::find_if(ops.begin(), ops.end(),
                             [&](const trace::ProfileEntry& e) { return e.op == r.op; });
      if (it == ops.end()) {
        ops.push_back(std::move(r));
      } else {
        it->seconds += r.seconds, it->calls += r.calls;
      }
    }
  }
  double traced() const {
    double t = 0;
    for (const auto& e : ops) t += e.seconds;
    return t;
  }
  // Markdown table: per `unit` (a prefill, a token), time in ms or us, share of the phase's wall
  // time, calls; the rest of the wall time as "(not in a traced op)".
  void print(const char* title, double units, const char* unit, double scale,
             const char* time_unit) const {
    std::printf("\nprofile, %s (wall time charged to the traced op that ended it; %s):\n", title,
                unit);
    std::printf("| op | %s per %s | share | calls per %s |\n|---|---|---|---|\n", time_unit, unit,
                unit);
    for (const auto& e : ops)
      std::printf("| %s | %.3f | %.1f%% | %.2f |\n", e.op.c_str(), e.seconds / units * scale,
                  100.0 * e.seconds / wall, static_cast<double>(e.calls) / units);
    const double rest = wall - traced();
    std::printf("| (not in a traced op) | %.3f | %.1f%% | |\n", rest / units * scale,
                100.0 * rest / wall);
  }
  std::string json() const {
    std::string j = str("{\"wall_s\":", wall, ",\"ops\":[");
    for (size_t i = 0; i < ops.size(); ++i)
      j += str(i ? "," : "", "{\"op\":\"", ops[i].op, "\",\"s\":", ops[i].seconds,
               ",\"calls\":", ops[i].calls, "}");
    return j + "]}";
  }
};
}  // namespace

Command add_bench(CLI::App& app) {
  struct Opts {
    std::string model, config, preset, dtype = "f32", activations = "f32";
    int64_t prompt = 512, gen = 128, batch = 1, prefill_chunk = MambaLM::kDefaultPrefillChunk;
    int threads = 0, reps = 3;
    bool json = false, profile = false;
  };
  auto o = std::make_shared<Opts>();
  auto* sub = app.add_subcommand("bench", "Prefill and decode tokens/s and peak memory of a model");
  auto* src = sub->add_option_group("model", "what to measure (one of)");
  src->add_option("--model", o->model,
                  "model folder (config.json + weights) or a llama.cpp .gguf file");
  src->add_option("--config", o->config, "config.json file (random weights)");
  src->add_option("--preset", o->preset,
                  std::string("random weights with the exact shapes of: ") + kPresetNames);
  src->require_option(1);
  sub->add_option("--prompt", o->prompt, "prompt tokens for the prefill")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--prefill-chunk", o->prefill_chunk,
                  "prefill the prompt this many tokens at a time (MambaLM::prefill: activation "
                  "memory bounded by the chunk; 0 = the whole prompt in one piece)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  sub->add_option("--gen", o->gen, "tokens to decode")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--batch", o->batch, "sequences decoded together (tokens/s count all of them)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  sub->add_option("--reps", o->reps, "repetitions (median and spread are reported)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  sub->add_flag("--json", o->json, "one JSON object instead of the table");
  sub->add_flag("--profile", o->profile,
                "also time every op of the measured repetitions (the layers' traced ops: wall "
                "time from the end of the previous op, per op name over all layers) and print "
                "each op's share of the prefill and of a decode step (JSON: \"profile\")");
  add_dtype_option(sub, o->dtype);
  add_activations_option(sub, o->activations);
  return {
      sub, [o] {
        set_num_threads(o->threads);
        apply_activations(o->activations, o->dtype);
        const WeightDType wdt = parse_weight_dtype(o->dtype);
        std::unique_ptr<MambaLM> lm;
        std::string what;
        if (!o->model.empty()) {
          lm = std::make_unique<MambaLM>(
              MambaLM::load(o->model, wdt));  // converted tensor by tensor
          what = o->model;
        } else {
          ModelConfig cfg = !o->config.empty()
                                ? ModelConfig::load(o->config)
                                : ModelConfig::parse(preset_json(o->preset), o->preset);
          lm = std::make_unique<MambaLM>(cfg, 0, wdt);  // converted layer by layer
          what =
              o->config.empty() ? o->preset + " (random weights)" : o->config + " (random weights)";
        }
        if (wdt != WeightDType::f32) os::release_freed_memory();  // the fp32 copies' pages
        const double rss_loaded = os::current_rss_bytes() / 1048576.0;
        const int64_t V = lm->config().vocab_size, B = o->batch;
        Rng rng(0);
        std::vector<int32_t> ids(static_cast<size_t>(B * o->prompt));
        for (auto& v : ids) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
        std::vector<double> pre, dec;
        PhaseProfile prof_pre, prof_dec;
        for (int r = 0; r < o->reps + 1; ++r) {  // the first repetition is a warm-up
          const bool prof = o->profile && r > 0;
          trace::set_profile(prof);
          LMState st = lm->new_state(B);
          auto t0 = std::chrono::steady_clock::now();
          if (prof) trace::profile_mark();
          // prefill (chunked): logits of the last position only
          lm->prefill(ids, B, o->prompt, st, o->prefill_chunk);
          double tp = seconds(t0);
          if (prof) prof_pre.add(trace::profile_take(), tp);
          std::vector<int32_t> tok(static_cast<size_t>(B));
          for (auto& v : tok) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
          t0 = std::chrono::steady_clock::now();
          for (int64_t i = 0; i < o->gen; ++i) {
            if (prof) trace::profile_mark();  // the previous token's argmax is not an op
            Tensor logits = lm->step(tok, st);
            for (int64_t b = 0; b < B; ++b) {  // greedy feedback, as a real decode loop
              const float* l = logits.data() + b * lm->vocab();
              tok[b] = static_cast<int32_t>(std::max_element(l, l + V) - l);
            }
          }
          double td = seconds(t0);
          if (prof) prof_dec.add(trace::profile_take(), td);
          trace::set_profile(false);
          if (r > 0) pre.push_back(B * o->prompt / tp), dec.push_back(B * o->gen / td);
          if (!o->json)
            std::fprintf(stderr, "rep %d/%d: prefill %.1f tok/s, decode %.1f tok/s%s\n", r, o->reps,
                         B * o->prompt / tp, B * o->gen / td, r == 0 ? " (warm-up)" : "");
        }
        Stats p = stats(pre), d = stats(dec);
        const TokenCost cost = lm->token_cost();
        double rss = os::peak_rss_bytes() / 1048576.0,
               rss_end = os::current_rss_bytes() / 1048576.0;
        int64_t wbytes = 0;  // every parameter's storage (a tied head counted once)
        for (auto& [name, prm] : lm->named_parameters()) wbytes += prm->value.bytes();
        const double wmib = static_cast<double>(wbytes) / 1048576.0;
        if (o->json) {
          std::printf(
              "{\"model\":\"%s\",\"params\":%lld,\"dtype\":\"%s\",\"activations\":\"%s\","
              "\"prefill_gemm\":\"%s\","
              "\"threads\":%d,\"batch\":%lld,\"prompt\":%lld,\"prefill_chunk\":%lld,\"gen\":%lld,"
              "\"reps\":%d,\"prefill_tok_s\":{\"median\":%.1f,\"min\":%.1f,\"max\":%.1f},"
              "\"decode_tok_s\":{\"median\":%.1f,\"min\":%.1f,\"max\":%.1f},\"peak_rss_mib\":%.1f,"
              "\"rss_after_load_mib\":%.1f,\"rss_end_mib\":%.1f,\"weight_mib\":%.1f,"
              "\"decode_weight_bytes\":%lld,\"state_bytes\":%lld,\"prefill_flops_per_token\":%lld,"
              "\"decode_flops_per_token\":%lld%s}\n",
              what.c_str(), (long long)lm->num_parameters(), weight_dtype_name(wdt),
              activation_type_name(activation_type()),
              ops::gemm_nt_packed_active() ? "packed" : "blas", num_threads(), (long long)B,
              (long long)o->prompt, (long long)o->prefill_chunk, (long long)o->gen, o->reps,
              p.median, p.min, p.max, d.median, d.min, d.max, rss, rss_loaded, rss_end, wmib,
              (long long)cost.decode_weight_bytes, (long long)cost.state_bytes,
              (long long)cost.prefill_flops, (long long)cost.decode_flops,
              o->profile ? str(",\"profile\":{\"prefill\":", prof_pre.json(),
                               ",\"decode\":", prof_dec.json(), "}")
                               .c_str()
                         : "");
        } else {
          std::printf(
              "model: %s, %lld parameters, %s weights, %s activations, %d threads, batch %lld, "
              "prefill chunk %s\n",
              what.c_str(), (long long)lm->num_parameters(), weight_dtype_name(wdt),
              activation_type_name(activation_type()), num_threads(), (long long)B,
              o->prefill_chunk > 0 ? std::to_string(o->prefill_chunk).c_str() : "off (one piece)");
          std::printf("| test | tokens/s (median) | min | max |\n|---|---|---|---|\n");
          std::printf("| prefill %lld | %.1f | %.1f | %.1f |\n", (long long)o->prompt, p.median,
                      p.min, p.max);
          // With --batch B both rates count the tokens of all B sequences (aggregate).
          std::printf("| decode %lld%s | %.1f | %.1f | %.1f |\n", (long long)o->gen,
                      B > 1 ? str(" x ", B, " sequences").c_str() : "", d.median, d.min, d.max);
          std::printf("peak RSS: %.1f MiB (after load: %.1f MiB, at the end: %.1f MiB)\n", rss,
                      rss_loaded, rss_end);
          std::printf(
              "weights: %.1f MiB; per token: a decode step reads %.1f MB of weights and %.1f KB "
              "of state (read and written); projections %.1f MFLOP in prefill, %.1f with the "
              "head in decode\n",
              wmib, cost.decode_weight_bytes / 1e6, cost.state_bytes / 1e3,
              cost.prefill_flops / 1e6, cost.decode_flops / 1e6);
          if (o->profile) {
            prof_pre.print(
                str("prefill of ", B, " x ", o->prompt, " tokens, ", o->reps, " repetitions")
                    .c_str(),
                o->reps, "prefill", 1e3, "ms");
            prof_dec.print(str("decode, ", o->reps, " x ", o->gen, " steps of ", B,
                               B > 1 ? " sequences" : " sequence")
                               .c_str(),
                           static_cast<double>(o->reps) * static_cast<double>(o->gen), "step", 1e6,
                           "us");
          }
        }
        return 0;
      }};
}

}  // namespace mamba::cli
