// mambacpp convert: rewrite a model folder (safetensors or pytorch_model.bin, mamba_ssm or
// transformers names, or a .gguf file) as model.safetensors + config.json in mamba_ssm's or
// transformers' layout, or as a GGUF file in llama.cpp's layout (--format gguf). --preset /
// --config write a model of random weights instead (the shapes of a released model: test files
// for other engines, e.g. llama.cpp's llama-bench in scripts/bench-llamacpp.py).
#include <cstdio>
#include <memory>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/os.h"
#include "mamba/gguf.h"
#include "mamba/lm.h"

namespace mamba::cli {

Command add_convert(CLI::App& app) {
  struct Opts {
    std::string model, config, preset, out, format = "mamba_ssm", gguf_type = "f32", tokenizer;
    uint64_t seed = 0;
  };
  auto o = std::make_shared<Opts>();
  auto* sub = app.add_subcommand(
      "convert", "Rewrite a model folder as safetensors in mamba_ssm's or transformers' layout");
  auto* src = sub->add_option_group("input", "what to write (one of)");
  src->add_option("--model", o->model, "input model folder (or .gguf file)");
  src->add_option("--config", o->config, "config.json file: a model of random weights");
  src->add_option(
      "--preset", o->preset,
      std::string("a model of random weights with the exact shapes of: ") + kPresetNames);
  src->require_option(1);
  sub->add_option("--seed", o->seed, "--config / --preset: seed of the random initialisation")
      ->capture_default_str();
  sub->add_option("--out", o->out,
                  "output folder (created; files written atomically); for gguf the .gguf file")
      ->required();
  sub->add_option("--format", o->format,
                  "mamba_ssm (MambaLMHeadModel), hf (transformers *-hf) or gguf (llama.cpp's "
                  "layout, docs/GGUF.md)")
      ->check(CLI::IsMember({"mamba_ssm", "hf", "gguf"}))
      ->capture_default_str();
  sub->add_option("--gguf-type", o->gguf_type,
                  "gguf: storage of the 2-D weight matrices (norms, conv, A, D, biases stay f32)")
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0", "q4_0"}))
      ->capture_default_str();
  sub->add_option("--tokenizer", o->tokenizer,
                  "gguf: tokenizer.json to embed (default: the model folder's, if it has one)");
  return {sub, [o] {
            MambaLM lm = !o->model.empty()
                             ? MambaLM::load(o->model)
                             : MambaLM(!o->config.empty()
                                           ? ModelConfig::load(o->config)
                                           : ModelConfig::parse(preset_json(o->preset), o->preset),
                                       o->seed);
            if (o->format == "gguf") {
              std::string tok = o->tokenizer;
              if (tok.empty() && !o->model.empty() && os::exists(o->model + "/tokenizer.json"))
                tok = o->model + "/tokenizer.json";
              lm.save_gguf(o->out, parse_ggml_type(o->gguf_type), tok);
              std::printf("wrote %s (GGUF, %s weights, %s, %lld parameters)\n", o->out.c_str(),
                          o->gguf_type.c_str(), tok.empty() ? "no tokenizer" : tok.c_str(),
                          (long long)lm.num_parameters());
              return 0;
            }
            lm.save(o->out, o->format == "hf");
            std::printf("wrote %s (%s layout, %lld parameters)\n", o->out.c_str(),
                        o->format.c_str(), (long long)lm.num_parameters());
            return 0;
          }};
}

}  // namespace mamba::cli
