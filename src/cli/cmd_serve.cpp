// mambacpp serve: an OpenAI-compatible HTTP server (src/serve/, docs/SERVING.md) with continuous
// batching of recurrent states and a prefix-state cache. Built only when cpp-httplib is found
// (MAMBA_HAVE_SERVE); otherwise the command says how to get it.
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <memory>
#include <thread>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/os.h"
#include "mamba/parallel.h"
#include "mamba/tokenizer.h"
#if MAMBA_HAVE_SERVE
#include <pthread.h>

#include "serve/server.h"
#endif

namespace mamba::cli {

namespace {
struct ServeOpts {
  std::string model, config, tokenizer, host = "127.0.0.1", dtype = "f32", activations = "f32",
                                        api_key, name, chat_template;
  int port = 8080, threads = 0;
  int64_t max_batch = 16, max_queue = 64, prefix_cache_mib = 256, max_body_kib = 1024,
          max_tokens = 4096, max_prompt_tokens = 8192, tensor_cache_mib = 128;
  // serve::EngineOptions' defaults (engine.h is not included without cpp-httplib)
  struct {
    int64_t cache_block = 384, prefill_chunk = MambaLM::kDefaultPrefillChunk,
            prefill_batch_tokens = 512;
  } engine;
};
}  // namespace

Command add_serve(CLI::App& app) {
  auto o = std::make_shared<ServeOpts>();
  auto* sub = app.add_subcommand(
      "serve",
      "OpenAI-compatible HTTP server: POST /v1/completions and (with a chat template) "
      "/v1/chat/completions (JSON or streamed events), GET /v1/models, /health, /metrics; "
      "continuous batching and a prefix-state cache (docs/SERVING.md)");
  auto* src = sub->add_option_group("model", "what to serve (one of)");
  src->add_option("--model", o->model,
                  "model folder: config.json + model.safetensors or pytorch_model.bin "
                  "(+ tokenizer.json for text prompts)");
  src->add_option("--config", o->config,
                  "config.json file: random weights of that shape (for load tests; no "
                  "tokenizer unless --tokenizer)");
  src->require_option(1);
  sub->add_option("--tokenizer", o->tokenizer, "tokenizer.json (default: the model folder's)");
  sub->add_option("--chat-template", o->chat_template,
                  "Jinja chat template file for /v1/chat/completions, instead of the model "
                  "folder's (tokenizer_config.json chat_template or chat_template.jinja)");
  sub->add_option("--name", o->name, "the model id /v1/models lists (default: the folder's name)");
  sub->add_option("--host", o->host, "address to listen on")->capture_default_str();
  sub->add_option("--port", o->port, "port (0: any free port; the chosen one is printed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  add_dtype_option(sub, o->dtype);
  add_activations_option(sub, o->activations);
  sub->add_option("--threads", o->threads, "compute threads (0 = all cores)")
      ->capture_default_str();
  sub->add_option("--max-batch", o->max_batch, "sequences decoded together")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{4096}));
  sub->add_option("--max-queue", o->max_queue,
                  "sequences waiting for a batch slot; beyond it requests get 429")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 20));
  sub->add_option("--prefix-cache-mib", o->prefix_cache_mib,
                  "memory bound of the prefix-state cache in MiB (0 = off)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  sub->add_option("--prefix-cache-block", o->engine.cache_block,
                  "the prefix cache also keeps a prompt's state every this many tokens, so a "
                  "prompt sharing only its start continues from the last shared boundary")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  sub->add_option("--prefill-chunk", o->engine.prefill_chunk,
                  "prompt tokens per row per prefill chunk (MambaLM::prefill): bounds the "
                  "prefill's activation memory, and how long a decode step waits while a "
                  "prompt is prefilled (chunks and steps take turns)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  sub->add_option("--prefill-batch-tokens", o->engine.prefill_batch_tokens,
                  "queued prompts are prefilled together as the rows of one batch, at most this "
                  "many tokens per chunk over all rows")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  sub->add_option(
         "--tensor-cache-mib", o->tensor_cache_mib,
         "freed tensor memory kept for reuse, at most this many MiB (0 = none): the batch changes "
         "shape with every join and leave, so a large cache fills with blocks of "
         "sizes that rarely come back")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  sub->add_option("--api-key", o->api_key,
                  "require 'Authorization: Bearer KEY' on every endpoint but /health");
  sub->add_option("--max-body-kib", o->max_body_kib, "largest request body (KiB); beyond: 413")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
  sub->add_option("--max-tokens-limit", o->max_tokens, "largest max_tokens a request may ask for")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  sub->add_option("--max-prompt-tokens", o->max_prompt_tokens, "longest prompt in tokens")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 30));
  return {sub, [o]() -> int {
#if !MAMBA_HAVE_SERVE
            (void)o;
            throw Error(
                "this mambacpp was built without the HTTP server: install cpp-httplib (Debian: "
                "apt-get install libcpp-httplib-dev, or scripts/install-deps.sh) and configure "
                "the build again");
#else
            // SIGINT / SIGTERM are taken by one thread (sigwait): block them before any other
            // thread starts, so every thread inherits the mask.
            sigset_t sigs;
            sigemptyset(&sigs);
            sigaddset(&sigs, SIGINT);
            sigaddset(&sigs, SIGTERM);
            pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
            std::signal(SIGPIPE, SIG_IGN);  // a client gone mid-write is an error return
            set_num_threads(o->threads);
            apply_activations(o->activations, o->dtype);
            // Only ever lowered: sanitizer builds keep it off (a reused block would hide a use
            // after free).
            os::set_tensor_cache_limit(std::min(
                os::tensor_cache_limit(), static_cast<uint64_t>(o->tensor_cache_mib) << 20));
            MambaLM lm = o->config.empty()
                             ? load_model(o->model, o->dtype)
                             : MambaLM(ModelConfig::load(o->config), 0,
                                       parse_weight_dtype(o->dtype));
            std::unique_ptr<Tokenizer> tok;
            const std::string tok_path =
                !o->tokenizer.empty() ? o->tokenizer
                : o->model.empty()    ? std::string()
                                      : o->model + "/tokenizer.json";
            if (!tok_path.empty() && os::exists(tok_path))
              tok = std::make_unique<Tokenizer>(Tokenizer::from_file(tok_path));
            else if (!o->tokenizer.empty())
              throw Error("--tokenizer '" + o->tokenizer + "' does not exist");
            serve::ServerOptions so;
            so.host = o->host;
            so.port = o->port;
            so.model_dir = o->model;
            so.chat_template_file = o->chat_template;
            so.model_name = o->name;
            if (so.model_name.empty()) {
              std::string d = o->model.empty() ? "random" : o->model;
              while (d.size() > 1 && d.back() == '/') d.pop_back();
              so.model_name = d.substr(d.find_last_of('/') + 1);
            }
            so.api_key = o->api_key;
            so.max_body_bytes = o->max_body_kib * 1024;
            so.max_tokens_limit = o->max_tokens;
            so.max_prompt_tokens = o->max_prompt_tokens;
            so.vocab_limit = lm.config().vocab_size;
            if (tok && tok->eos_id()) so.eos_id = *tok->eos_id();
            if (lm.config().eos_token_id >= 0)
              so.eos_id = static_cast<int32_t>(lm.config().eos_token_id);
            so.engine.max_batch = o->max_batch;
            so.engine.max_queue = o->max_queue;
            so.engine.prefix_cache_bytes = o->prefix_cache_mib * 1024 * 1024;
            so.engine.cache_block = o->engine.cache_block;
            so.engine.prefill_chunk = o->engine.prefill_chunk;
            so.engine.prefill_batch_tokens = o->engine.prefill_batch_tokens;
            serve::Server server(lm, tok.get(), so);
            const int port = server.bind();
            std::printf("mambacpp serve: model '%s' (%s%s) listening on http://%s:%d\n",
                        so.model_name.c_str(), o->dtype.c_str(),
                        tok ? ", with tokenizer" : ", token ids only", o->host.c_str(), port);
            std::printf("mambacpp serve: %s\n", server.chat_status().c_str());
            std::fflush(stdout);
            std::atomic<bool> over{false};
            std::thread sig([&] {
              int s = 0;
              sigwait(&sigs, &s);
              if (!over) {
                std::fprintf(stderr, "mambacpp serve: signal %d, shutting down\n", s);
                server.stop();
              }
            });
            const bool ok = server.run();
            if (!over.exchange(true)) pthread_kill(sig.native_handle(), SIGTERM);
            sig.join();
            std::fprintf(stderr, "mambacpp serve: stopped\n");
            return ok ? 0 : 1;
#endif
          }};
}

}  // namespace mamba::cli
