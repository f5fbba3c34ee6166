// The HTTP front of `mambacpp serve`: OpenAI's /v1/completions and /v1/chat/completions (JSON or
// server-sent events; chat when the model folder has a chat template, rendered by
// src/serve/chat_template.h), /v1/models, /health and /metrics (Prometheus text) over the Engine
// (src/serve/engine.h).
// Built on cpp-httplib (Debian's libcpp-httplib-dev); this header does not include it.
// What the server guarantees is written in docs/SERVING.md.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "mamba/lm.h"
#include "mamba/tokenizer.h"
#include "serve/engine.h"

namespace mamba::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                 // 0: any free port (bind() returns it)
  std::string model_name;          // the id /v1/models lists and requests may name
  std::string model_dir;           // its chat template (tokenizer_config.json, chat_template.jinja)
  std::string chat_template_file;  // a Jinja file used instead of the folder's template
  std::string api_key;             // empty: no authentication
  int64_t max_body_bytes = 1 << 20;
  int64_t max_tokens_limit = 4096;   // largest max_tokens a request may ask for
  int64_t max_prompt_tokens = 8192;  // longest prompt (tokens)
  int32_t eos_id = -1;               // stop id (-1: none)
  int64_t vocab_limit = -1;          // the real vocabulary (ids >= are padding)
  int http_threads = 0;              // 0: max_batch + max_queue + 8
  EngineOptions engine;
};

class Server {
 public:
  // lm and tok (may be null: prompts and outputs are token ids only) must outlive the server.
  // Loads the chat template: a broken --chat-template file is a mamba::Error; a folder's
  // template that cannot be used leaves chat answering 501 with the reason (chat_status()).
  Server(const MambaLM& lm, const Tokenizer* tok, ServerOptions opt);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  // Binds the listening socket; returns the port (throws mamba::Error when it cannot bind).
  int bind();
  // Serves until stop(); returns true when it stopped cleanly.
  bool run();
  // Graceful stop, callable from any thread: new requests get 503, in-flight sequences end with a
  // final event (finish_reason "abort"), then the listener closes and run() returns.
  void stop();
  // One line on /v1/chat/completions: available (from which template) or why not.
  std::string chat_status() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mamba::serve
