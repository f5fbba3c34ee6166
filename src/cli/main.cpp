// mambacpp: one executable, one subcommand per file (see commands.h).
#include <csignal>
#include <cstdio>
#include <exception>
#include <vector>

#include "cli/commands.h"
#include "core/os.h"
#include "mamba/error.h"

int main(int argc, char** argv) {
#if defined(SIGXFSZ)
  // Over a file-size limit (ulimit -f), write() fails with EFBIG and the command reports which file
  // could not be written, instead of the process dying of SIGXFSZ mid-save.
  std::signal(SIGXFSZ, SIG_IGN);
#endif
  CLI::App app{
      "mambacpp: Mamba selective state-space models (Mamba-1, Mamba-2, Mamba-3) on the CPU"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "mamba.cpp 0.1.0");
  std::vector<mamba::cli::Command> cmds{
      mamba::cli::add_demo(app),     mamba::cli::add_info(app),
      mamba::cli::add_shapes(app),   mamba::cli::add_generate(app),
      mamba::cli::add_score(app),    mamba::cli::add_perplexity(app),
      mamba::cli::add_bench(app),    mamba::cli::add_convert(app),
      mamba::cli::add_tokenize(app), mamba::cli::add_detokenize(app),
      mamba::cli::add_train(app),    mamba::cli::add_eval_task(app),
      mamba::cli::add_example(app),  mamba::cli::add_st_forecast(app),
      mamba::cli::add_serve(app),
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // every command allocates and frees large buffers repeatedly (os.h)
  mamba::os::keep_freed_memory();
  try {
    for (auto& c : cmds)
      if (c.sub->parsed()) return c.run();
  } catch (const mamba::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
