// Training data: the Mamba paper's synthetic tasks (section 4.1), generated from an Rng, and a
// text file sampled as random windows.
#include <algorithm>
#include <string>

#include "core/os.h"
#include "mamba/tokenizer.h"
#include "mamba/train.h"

namespace mamba::train {

int64_t Batch::counted() const {
  int64_t n = 0;
  for (int32_t t : targets) n += t != kIgnoreIndex;
  return n;
}

TaskKind parse_task(const std::string& name) {
  if (name == "selective-copy" || name == "selective_copy" || name == "selective-copying")
    return TaskKind::SelectiveCopy;
  if (name == "induction" || name == "induction-heads" || name == "induction_heads")
    return TaskKind::Induction;
  if (name == "text") return TaskKind::Text;
  throw Error(str("task: expected selective-copy, induction or text, got '", name, "'"));
}

std::string task_name(TaskKind k) {
  switch (k) {
    case TaskKind::SelectiveCopy:
      return "selective-copy";
    case TaskKind::Induction:
      return "induction";
    case TaskKind::Text:
      return "text";
  }
  return "?";
}

void TaskConfig::validate() const {
  MAMBA_CHECK(seqlen >= 1, "task: seqlen must be >= 1, got ", seqlen);
  MAMBA_CHECK(
      !all_positions || kind == TaskKind::Induction,
      "task: the loss on all positions (--loss-all-positions) applies to the induction task only");
  switch (kind) {
    case TaskKind::SelectiveCopy:
      MAMBA_CHECK(vocab >= 3,
                  "selective-copy: vocab must be >= 3 (noise, marker and a data token), got ",
                  vocab);
      MAMBA_CHECK(n_copy >= 1, "selective-copy: n_copy must be >= 1, got ", n_copy);
      MAMBA_CHECK(seqlen >= 2 * n_copy, "selective-copy: seqlen (", seqlen,
                  ") must be >= 2 * n_copy (", 2 * n_copy,
                  "): n_copy data positions plus n_copy markers");
      break;
    case TaskKind::Induction:
      MAMBA_CHECK(vocab >= 2, "induction: vocab must be >= 2 (a token and the special token), got ",
                  vocab);
      MAMBA_CHECK(seqlen >= 3, "induction: seqlen must be >= 3 (special, key, ..., special), got ",
                  seqlen);
      break;
    case TaskKind::Text:
      MAMBA_CHECK(!text_path.empty(), "text task: --text FILE is required");
      break;
  }
}

Batch selective_copy_batch(int64_t B, int64_t L, int64_t V, int64_t M, Rng& rng) {
  MAMBA_CHECK(V >= 3 && M >= 1 && L >= 2 * M && B >= 1,
              "selective_copy_batch: need B >= 1, V >= 3, M >= 1 and L >= 2M, got B ", B, ", V ", V,
              ", M ", M, ", L ", L);
  Batch bt;
  bt.B = B, bt.L = L;
  bt.ids.assign(B * L, 0);
  bt.targets.assign(B * L, kIgnoreIndex);
  const int64_t region = L - M;  // noise + data
  std::vector<int64_t> pos(region);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* ids = bt.ids.data() + b * L;
    int32_t* tg = bt.targets.data() + b * L;
    // M distinct positions: a partial Fisher-Yates shuffle, then sorted (data keep their order).
    for (int64_t i = 0; i < region; ++i) pos[i] = i;
    for (int64_t i = 0; i < M; ++i)
      std::swap(pos[i], pos[i + static_cast<int64_t>(rng.below(region - i))]);
    std::sort(pos.begin(), pos.begin() + M);
    for (int64_t j = 0; j < M; ++j) {
      const int32_t tok = static_cast<int32_t>(1 + rng.below(V - 2));
      ids[pos[j]] = tok;
      ids[region + j] = static_cast<int32_t>(V - 1);
      tg[region + j] = tok;
    }
  }
  return bt;
}

Batch induction_batch(int64_t B, int64_t L, int64_t V, Rng& rng, bool all_positions) {
  MAMBA_CHECK(V >= 2 && L >= 3 && B >= 1, "induction_batch: need B >= 1, V >= 2 and L >= 3, got B ",
              B, ", V ", V, ", L ", L);
  Batch bt;
  bt.B = B, bt.L = L;
  bt.ids.resize(B * L);
  bt.targets.assign(B * L, kIgnoreIndex);
  const int32_t special = static_cast<int32_t>(V - 1);
  for (int64_t b = 0; b < B; ++b) {
    int32_t* ids = bt.ids.data() + b * L;
    for (int64_t t = 0; t < L; ++t) ids[t] = static_cast<int32_t>(rng.below(V - 1));
    const int64_t p = static_cast<int64_t>(rng.below(L - 2));  // [0, L-3]
    ids[p] = special;
    const int32_t key = ids[p + 1] == special ? 0 : ids[p + 1];  // ids[p+1] < V-1 always
    ids[L - 1] = special;
    if (all_positions)
      for (int64_t t = 0; t + 1 < L; ++t) bt.targets[b * L + t] = ids[t + 1];
    bt.targets[b * L + L - 1] = key;
  }
  return bt;
}

TextData TextData::from_tokens(std::vector<int32_t> tokens, int64_t vocab) {
  MAMBA_CHECK(vocab >= 1, "text data: vocab must be >= 1, got ", vocab);
  for (size_t i = 0; i < tokens.size(); ++i)
    MAMBA_CHECK(tokens[i] >= 0 && tokens[i] < vocab, "text data: token ", tokens[i], " at ", i,
                " is outside [0, ", vocab, ")");
  TextData d;
  d.tokens_ = std::move(tokens);
  d.vocab_ = vocab;
  return d;
}

TextData TextData::load(const std::string& text_path, const std::string& tokenizer_path) {
  std::vector<uint8_t> bytes = os::read_file(text_path, 1ull << 32);
  if (tokenizer_path.empty()) {
    std::vector<int32_t> t(bytes.begin(), bytes.end());
    return from_tokens(std::move(t), 256);
  }
  Tokenizer tok = Tokenizer::from_file(tokenizer_path);
  std::string text(bytes.begin(), bytes.end());
  return from_tokens(tok.encode(text), static_cast<int64_t>(tok.vocab_size()));
}

Batch TextData::sample(int64_t B, int64_t L, Rng& rng) const {
  const int64_t n = static_cast<int64_t>(tokens_.size());
  MAMBA_CHECK(n >= L + 1, "text data: ", n,
              " tokens are too few for windows of seqlen + 1 = ", L + 1);
  Batch bt;
  bt.B = B, bt.L = L;
  bt.ids.resize(B * L);
  bt.targets.resize(B * L);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t s = static_cast<int64_t>(rng.below(static_cast<uint64_t>(n - L)));
    for (int64_t t = 0; t < L; ++t) {
      bt.ids[b * L + t] = tokens_[s + t];
      bt.targets[b * L + t] = tokens_[s + t + 1];
    }
  }
  return bt;
}

Batch make_batch(const TaskConfig& task, int64_t B, Rng& rng, const TextData* text) {
  switch (task.kind) {
    case TaskKind::SelectiveCopy:
      return selective_copy_batch(B, task.seqlen, task.vocab, task.n_copy, rng);
    case TaskKind::Induction:
      return induction_batch(B, task.seqlen, task.vocab, rng, task.all_positions);
    case TaskKind::Text:
      MAMBA_CHECK(text != nullptr, "make_batch: the text task needs loaded text data");
      return text->sample(B, task.seqlen, rng);
  }
  throw Error("make_batch: unknown task");
}

}  // namespace mamba::train
