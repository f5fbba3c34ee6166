// Small helpers shared by the CLI commands (no math here).
#pragma once
#include <CLI/CLI.hpp>
#include <string>
#include <vector>

#include "core/os.h"
#include "mamba/lm.h"
#include "model/npy.h"

namespace mamba::cli {

// The config JSON of a --preset (random weights with the exact shapes of a released model;
// defined in cmd_bench.cpp). Throws naming the known presets for an unknown name.
std::string preset_json(const std::string& name);
// The presets' names, for --help.
inline constexpr const char* kPresetNames =
    "mamba-130m, mamba-370m, mamba-790m, mamba-1.4b, mamba-2.8b, mamba2-130m, mamba2-370m, "
    "mamba2-780m, mamba2-1.3b, mamba2-2.7b, mamba2attn-2.7b, tiny; mamba3-130m (Mamba-3 "
    "defaults at that width and depth)";

// Token ids (B, L) from an int .npy file (int64 or int32; a 1-D array is one sequence).
inline std::vector<std::vector<int32_t>> read_npy_ids(const std::string& path) {
  NpyArray a = read_npy(path);
  std::vector<int64_t> v = npy_to_i64(a, path);
  MAMBA_CHECK(a.shape.size() == 1 || a.shape.size() == 2, path,
              ": token ids must be (L) or (B, L), got shape ", shape_str(a.shape));
  const int64_t B = a.shape.size() == 2 ? a.shape[0] : 1, L = a.shape.back();
  MAMBA_CHECK(B > 0 && L > 0, path, ": empty token ids ", shape_str(a.shape));
  std::vector<std::vector<int32_t>> out(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) {
      int64_t id = v[b * L + t];
      MAMBA_CHECK(id >= 0 && id <= INT32_MAX, path, ": token id ", id, " at (", b, ", ", t,
                  ") is out of range");
      out[b].push_back(static_cast<int32_t>(id));
    }
  return out;
}

// Writes equal-length id lists as an int64 (B, L) .npy; shorter rows (stopped at EOS) are
// padded with -1.
inline void write_npy_ids(const std::string& path, const std::vector<std::vector<int32_t>>& ids) {
  size_t L = 0;
  for (auto& r : ids) L = std::max(L, r.size());
  std::vector<int64_t> flat;
  for (auto& r : ids)
    for (size_t t = 0; t < L; ++t) flat.push_back(t < r.size() ? r[t] : -1);
  write_npy_i64(path, {static_cast<int64_t>(ids.size()), static_cast<int64_t>(L)}, flat);
}

// --dtype: the storage of the large weights for inference (commands that run a model).
inline CLI::Option* add_dtype_option(CLI::App* sub, std::string& dtype) {
  return sub
      ->add_option(
          "--dtype", dtype,
          "weight storage: f32, or bf16 / f16 (16-bit projections and embedding/lm_head, "
          "converted on load, fp32 accumulation; about half the memory traffic of decode), "
          "or q8_0 / q4_0 (ggml's 8-bit / 4-bit blocks of 32 with an f16 scale, 8.5 / 4.5 "
          "bits per weight, quantised on load; a GGUF tensor already in that format is "
          "kept as it is; matrices whose rows are not whole blocks, e.g. Mamba-1's "
          "dt_proj, stay f32; fp32 activations unless --activations q8 / bf16, fp32 accumulation). "
          "Inference only")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "f16", "q8_0", "q4_0"}));
}

// --activations: the activations of the products with q8_0 / q4_0 weights (opt-in q8).
inline CLI::Option* add_activations_option(CLI::App* sub, std::string& act) {
  return sub
      ->add_option("--activations", act,
                   "f32, or q8 (opt-in, only with --dtype q8_0 / q4_0): the activations of every "
                   "product with the quantised weights (prefill and decode) are quantised per "
                   "block of 32 values to q8_0 as llama.cpp does (d = max|x| / 127, q = round(x / "
                   "d)) and each block's dot product with the weights is computed exactly in "
                   "integers (AVX-512 VNNI; a slow scalar kernel with the same results elsewhere), "
                   "scaled and summed in fp32. Faster prefill and decode, logits move by about the "
                   "weights' own q8_0 rounding (docs/PERFORMANCE.md, stop 28). bf16 (opt-in, only "
                   "with --dtype bf16): in the prefill (more than 16 rows) the activations are "
                   "rounded to bf16 and multiplied with the bf16 weights by AVX-512 BF16's "
                   "vdpbf16ps in fp32 (a slow scalar kernel with the same results elsewhere); "
                   "decode keeps fp32 activations")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "q8", "bf16"}));
}

// Sets the process-wide activation type from --activations; q8 needs --dtype q8_0 or q4_0, bf16
// needs --dtype bf16.
inline void apply_activations(const std::string& act, const std::string& dtype) {
  const ActivationType a = parse_activation_type(act);
  MAMBA_CHECK(a != ActivationType::bf16 || parse_weight_dtype(dtype) == WeightDType::bf16,
              "--activations bf16 applies to bf16 weights only: give --dtype bf16 (got --dtype ",
              dtype, ")");
  MAMBA_CHECK(a != ActivationType::q8 || is_quantised(parse_weight_dtype(dtype)),
              "--activations q8 applies to block-quantised weights only: give --dtype q8_0 or "
              "q4_0 (got --dtype ",
              dtype, ")");
  set_activation_type(a);
}

// Loads a model folder with the given --dtype and releases the fp32 copies' memory.
inline MambaLM load_model(const std::string& dir, const std::string& dtype) {
  MambaLM lm = MambaLM::load(dir, parse_weight_dtype(dtype));
  if (lm.weight_dtype() != WeightDType::f32) os::release_freed_memory();  // the fp32 copies' pages
  return lm;
}

}  // namespace mamba::cli
