// Each `mambacpp <command>` lives in its own file and registers itself here.
// The CLI holds no math: it parses flags (CLI11, declared once) and calls the library.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>

namespace mamba::cli {

// Adds the subcommand to `app`; the returned callback runs it (after parsing) and returns
// the process exit code.
using Runner = std::function<int()>;
struct Command {
  CLI::App* sub;
  Runner run;
};

Command add_info(CLI::App& app);
Command add_shapes(CLI::App& app);
Command add_demo(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_score(CLI::App& app);
Command add_perplexity(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_convert(CLI::App& app);
Command add_tokenize(CLI::App& app);
Command add_detokenize(CLI::App& app);
Command add_train(CLI::App& app);
Command add_eval_task(CLI::App& app);
Command add_example(CLI::App& app);  // cmd_example.cpp: `example vision`
Command add_st_forecast(CLI::App& app);
Command add_serve(CLI::App& app);  // cmd_serve.cpp: the HTTP server (src/serve/)

}  // namespace mamba::cli
