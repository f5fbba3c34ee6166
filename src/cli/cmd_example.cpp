// mambacpp example <name>: small examples that learn on generated data, each with its baseline
// trained in the same run. `vision`: oriented bars in noise, a VSSBlock backbone (VMamba's 2-D
// scan) vs a Mamba-1 over the row-major flattened image (include/mamba/vision.h).
#include <chrono>
#include <cstdio>

#include "cli/commands.h"
#include "mamba/parallel.h"
#include "mamba/vision.h"

namespace mamba::cli {

Command add_example(CLI::App& app) {
  auto* sub = app.add_subcommand("example", "Examples that learn on generated data (see --help)");
  sub->require_subcommand(1);
  auto o = std::make_shared<vision::ExampleConfig>();
  auto threads = std::make_shared<int>(0);
  auto* vis = sub->add_subcommand(
      "vision",
      "Image classification of generated oriented bars in noise: a small VSSBlock backbone "
      "(VMamba's SS2D) vs a Mamba-1 over the row-major flattened image, same batches, same "
      "held-out images");
  vis->add_option("--image", o->image, "image side S (S x S pixels)")->capture_default_str();
  vis->add_option("--bar_len", o->bar_len, "bar length in pixels")->capture_default_str();
  vis->add_option("--noise", o->noise, "Gaussian noise std per pixel (bar pixels +1)")
      ->capture_default_str();
  vis->add_option("--dim", o->dim, "channels C of both backbones")->capture_default_str();
  vis->add_option("--vss_depth", o->vss_depth, "VSSBlocks")->capture_default_str();
  vis->add_option("--mamba_depth", o->mamba_depth, "Mamba-1 layers of the baseline")
      ->capture_default_str();
  vis->add_option("--steps", o->steps, "training steps of each model")->capture_default_str();
  vis->add_option("--batch", o->batch, "images per step")->capture_default_str();
  vis->add_option("--eval_images", o->eval_images, "held-out images for the accuracy")
      ->capture_default_str();
  vis->add_option("--lr", o->lr, "AdamW peak learning rate (warm-up, cosine to lr/10)")
      ->capture_default_str();
  vis->add_option("--seed", o->seed, "seed of the weights and the data")->capture_default_str();
  vis->add_option("--threads", *threads, "threads (0 = all cores)")->capture_default_str();
  return {sub, [o, threads] {
            if (*threads > 0) set_num_threads(*threads);
            const auto res = vision::run_example(*o, [](const std::string& line) {
              std::printf("%s\n", line.c_str());
              std::fflush(stdout);
            });
            std::printf("\nheld-out accuracy (%lld images, chance %.0f%%):\n",
                        (long long)o->eval_images, 100.0 / vision::kClasses);
            for (const auto& r : res)
              std::printf("  %-26s %6.2f%%   params %lld   final train loss %.4f   train %.1f s\n",
                          r.name.c_str(), 100.0 * r.accuracy, (long long)r.params,
                          r.final_train_loss, r.train_seconds);
            return 0;
          }};
}

}  // namespace mamba::cli
