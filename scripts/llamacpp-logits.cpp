// llama.cpp's greedy ids and logits for given prompt ids: the --logits-tool of
// scripts/check-llamacpp.py (tests/data/llamacpp/README.md). Not part of the build: it is compiled
// by hand against a llama.cpp build made outside this repository, e.g.
//
//   g++ -O2 -std=c++17 scripts/llamacpp-logits.cpp -I LLAMA/include -I LLAMA/ggml/include
//       -L LLAMA/build/bin -lllama -Wl,-rpath,LLAMA/build/bin -o /tmp/llamacpp-logits
//
// Usage: llamacpp-logits MODEL.gguf ID,ID,... N_NEW THREADS OUT.f32
// Decodes the prompt ids as one batch (the logits of every position), then feeds back its argmax
// N_NEW - 1 times, one token per llama_decode call (the cached recurrent state). Prints
// "n_vocab V" and "gen ID ..." (the N_NEW greedy ids) and writes (L + N_NEW - 1) rows of V
// float32 logits to OUT.f32: row i < L is position i of the prompt, row L - 1 + k the logits after
// feeding the k-th generated id.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "llama.h"

namespace {

[[noreturn]] void die(const std::string& msg) {
  std::fprintf(stderr, "llamacpp-logits: %s\n", msg.c_str());
  std::exit(1);
}

std::vector<llama_token> parse_ids(const std::string& s) {
  std::vector<llama_token> ids;
  size_t pos = 0;
  while (pos < s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    const std::string tok = s.substr(pos, end - pos);
    char* rest = nullptr;
    const long v = std::strtol(tok.c_str(), &rest, 10);
    if (tok.empty() || *rest != '\0' || v < 0) die("bad id '" + tok + "' in the id list");
    ids.push_back(static_cast<llama_token>(v));
    pos = end + 1;
  }
  if (ids.empty()) die("the id list is empty");
  return ids;
}

void quiet_log(ggml_log_level level, const char* text, void*) {
  if (level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s MODEL.gguf ID,ID,... N_NEW THREADS OUT.f32\n", argv[0]);
    return 2;
  }
  const std::vector<llama_token> prompt = parse_ids(argv[2]);
  const int n_new = std::atoi(argv[3]);
  const int threads = std::atoi(argv[4]);
  if (n_new < 1 || threads < 1) die("N_NEW and THREADS must be >= 1");

  llama_log_set(quiet_log, nullptr);
  llama_backend_init();
  llama_model* model = llama_model_load_from_file(argv[1], llama_model_default_params());
  if (!model) die(std::string("cannot load ") + argv[1]);
  const llama_vocab* vocab = llama_model_get_vocab(model);
  const int V = llama_vocab_n_tokens(vocab);
  const int L = static_cast<int>(prompt.size());
  for (llama_token t : prompt)
    if (t >= V) die("id " + std::to_string(t) + " is outside the vocabulary");

  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = static_cast<uint32_t>(L + n_new + 8);
  cp.n_batch = cp.n_ubatch = static_cast<uint32_t>(L);
  cp.n_threads = cp.n_threads_batch = threads;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) die("cannot create a context");

  std::FILE* out = std::fopen(argv[5], "wb");
  if (!out) die(std::string("cannot write ") + argv[5]);
  std::vector<llama_token> gen;
  auto emit = [&](int i) {  // writes the logits of output i, appends their argmax
    const float* lg = llama_get_logits_ith(ctx, i);
    if (!lg) die("no logits for output " + std::to_string(i));
    if (std::fwrite(lg, sizeof(float), V, out) != static_cast<size_t>(V)) die("write failed");
    int best = 0;
    for (int v = 1; v < V; ++v)
      if (lg[v] > lg[best]) best = v;
    return best;
  };

  llama_batch b = llama_batch_init(L, 0, 1);
  for (int i = 0; i < L; ++i) {
    b.token[i] = prompt[i];
    b.pos[i] = i;
    b.n_seq_id[i] = 1;
    b.seq_id[i][0] = 0;
    b.logits[i] = 1;
  }
  b.n_tokens = L;
  if (llama_decode(ctx, b) != 0) die("llama_decode of the prompt failed");
  int next = 0;
  for (int i = 0; i < L; ++i) next = emit(i);
  gen.push_back(next);
  for (int k = 1; k < n_new; ++k) {
    b.token[0] = next;
    b.pos[0] = L + k - 1;
    b.n_seq_id[0] = 1;
    b.seq_id[0][0] = 0;
    b.logits[0] = 1;
    b.n_tokens = 1;
    if (llama_decode(ctx, b) != 0) die("llama_decode of a generated token failed");
    next = emit(0);
    gen.push_back(next);
  }
  if (std::fclose(out) != 0) die("closing the output failed");

  std::printf("n_vocab %d\ngen", V);
  for (llama_token t : gen) std::printf(" %d", t);
  std::printf("\n");
  llama_batch_free(b);
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
