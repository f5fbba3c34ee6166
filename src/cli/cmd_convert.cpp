// mambacpp convert: rewrite a model folder (safetensors or pytorch_model.bin, mamba_ssm or
// transformers names) as model.safetensors + config.json in mamba_ssm's or transformers' layout.
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "mamba/lm.h"

namespace mamba::cli {

Command add_convert(CLI::App& app) {
  struct Opts {
    std::string model, out, format = "mamba_ssm";
  };
  auto o = std::make_shared<Opts>();
  auto* sub = app.add_subcommand(
      "convert", "Rewrite a model folder as safetensors in mamba_ssm's or transformers' layout");
  sub->add_option("--model", o->model, "input model folder")->required();
  sub->add_option("--out", o->out, "output folder (created; files written atomically)")->required();
  sub->add_option("--format", o->format, "mamba_ssm (MambaLMHeadModel) or hf (transformers *-hf)")
      ->check(CLI::IsMember({"mamba_ssm", "hf"}))
      ->capture_default_str();
  return {sub, [o] {
            MambaLM lm = MambaLM::load(o->model);
            lm.save(o->out, o->format == "hf");
            std::printf("wrote %s (%s layout, %lld parameters)\n", o->out.c_str(),
                        o->format.c_str(), (long long)lm.num_parameters());
            return 0;
          }};
}

}  // namespace mamba::cli
