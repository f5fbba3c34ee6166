// mambacpp shapes: print every op of one layer's forward with its input and output shapes.
#include <cstdio>

#include "cli/commands.h"
#include "mamba/trace.h"

namespace mamba::cli {

Command add_shapes(CLI::App& app) {
  auto* sub = app.add_subcommand("shapes", "Trace one layer's forward: every op with its input and output shapes");
  return {sub, [] {
            std::printf("shapes: not implemented yet\n");
            return 1;
          }};
}

}  // namespace mamba::cli
