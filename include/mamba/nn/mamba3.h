// The Mamba-3 mixer layer (mamba_ssm.modules.mamba3.Mamba3), SISO and MIMO:
//   in_proj -> z | x | B | C | dd_dt | dd_A | trap | angles
//   DT = softplus(dd_dt + dt_bias), A = min(-heavy_tail(dd_A), -A_floor), ADT = A * DT
//   (heavy_tail(x) = 1 + x for x >= 0, 1 / (1 - x) below: mamba_ssm @ e9594ce)
//   B, C -> RMSNorm over N (B_norm, C_norm) -> Mamba-3 scan (ops/mamba3_scan.h: trapezoidal
//   recurrence, rotary angles accumulated over time, B_bias / C_bias, D, z gate, MIMO rank R
//   with mimo_x / mimo_z / mimo_o, MIMO's head-wise norm fused before the gate)
//   [SISO with is_outproj_norm: gated RMSNorm(y, z) per head, norm before gate] -> out_proj
// Forward (optionally saving what backward needs and returning the decode state), backward
// (every parameter and the input), step (one token from the angle / ssm / k / v states).
// Channel-last: activations are (B, L, ·).
//
// The forward / prefill / step run the chunked fp32 scan (ops::mamba3_scan_fwd); the backward
// runs ops::mamba3_scan_bwd (fp32, chunked with GEMMs at chunk_size, (batch, head) pairs in
// parallel).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

namespace json_io {
class KeyReader;
}

// mamba_ssm's Mamba3 constructor arguments and defaults.
struct Mamba3Config {
  int64_t d_model = 0;
  int64_t d_state = 128;
  double expand = 2;
  int64_t headdim = 64;
  int64_t ngroups = 1;
  double rope_fraction = 0.5;  // 0.5 or 1.0
  double dt_min = 0.001, dt_max = 0.1, dt_init_floor = 1e-4;
  double A_floor = 1e-4;
  bool is_outproj_norm = false;
  bool is_mimo = false;
  int64_t mimo_rank = 4;    // used only when is_mimo
  int64_t chunk_size = 64;  // a kernel tiling choice; the math does not depend on it

  void validate() const;            // throws mamba::Error naming the field
  int64_t d_inner() const;          // int(expand * d_model)
  int64_t nheads() const;           // H = d_inner / headdim
  int64_t rank() const;             // R = mimo_rank if is_mimo, else 1
  int64_t num_rope_angles() const;  // S = (int(d_state * rope_fraction) rounded down to even) / 2
  int64_t d_in_proj() const;        // 2 D + 2 R G N + 3 H + S
  bool operator==(const Mamba3Config&) const = default;

  // config.json's ssm_cfg (mamba_ssm's keyword arguments of Mamba3), in src/nn/mamba3_json.cpp;
  // the same contract as Mamba1Config's.
  static Mamba3Config from_ssm_cfg(json_io::KeyReader& r, int64_t d_model);
  std::string to_ssm_cfg() const;
  static const std::vector<std::string>& ssm_cfg_keys();
  void check_ssm_cfg() const;
};

// Decode state, mamba_ssm's layouts.
struct Mamba3State {
  Tensor angle;  // (B, H, S) accumulated rotation phase
  Tensor ssm;    // (B, H, P, N)
  Tensor k;      // (B, R, H, N) the last token's rotated B (+ bias) per rank
  Tensor v;      // (B, H, P) the last token's x
  void copy_row(int64_t dst_b, const Mamba3State& src, int64_t src_b) {
    angle.select(dst_b).copy_from(src.angle.select(src_b));
    ssm.select(dst_b).copy_from(src.ssm.select(src_b));
    k.select(dst_b).copy_from(src.k.select(src_b));
    v.select(dst_b).copy_from(src.v.select(src_b));
  }
};

struct Mamba3Saved {
  Tensor hidden;   // (B, L, d_model) the layer input
  Tensor proj;     // (B, L, d_in_proj) in_proj output
  Tensor Bn, Cn;   // (B, L, R, G, N) after their RMSNorm
  Tensor DT, ADT;  // (B, L, H)
  Tensor y_scan;   // (B, L, D) scan output (the gated norm's input, SISO with is_outproj_norm)
  Tensor y;        // (B, L, D) out_proj input
};

class Mamba3 {
 public:
  using Config = Mamba3Config;
  using State = Mamba3State;
  using Saved = Mamba3Saved;
  static constexpr const char* kName = "Mamba3";

  explicit Mamba3(const Config& cfg, uint64_t seed = 0);
  Mamba3(const Mamba3&) = delete;
  Mamba3& operator=(const Mamba3&) = delete;
  Mamba3(Mamba3&&) noexcept = default;
  Mamba3& operator=(Mamba3&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). saved: what backward needs; state: receives the
  // decode state after the last token (prefill).
  Tensor forward(const Tensor& hidden, Saved* saved = nullptr, State* state = nullptr) const;
  // The forward continued from a decode state (chunked prefill), as Mamba1::prefill: hidden (B, L,
  // d_model) after the tokens `state` has seen; returns (B, L, d_model) and advances state.
  Tensor prefill(const Tensor& hidden, State& state) const;
  // dy: (B, L, d_model) -> dx; parameter gradients accumulate (+=).
  Tensor backward(const Saved& saved, const Tensor& dy);
  State new_state(int64_t batch) const;  // zeros
  // x: (B, d_model) -> (B, d_model); advances state by one token.
  Tensor step(const Tensor& x, State& state) const;

 private:
  // The shared path: hidden (B, L, d_model), optional initial state in / final state out.
  Tensor run(const Tensor& hidden, Saved* saved, const State* init, State* final_state) const;
  void check_state(const State& s, int64_t batch) const;
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }

  Config cfg_;
  int64_t D_, H_, P_, N_, G_, R_, S_,
      E_;  // d_inner, heads, headdim, d_state, groups, rank, angles, d_in_proj
  ParamList params_;
  Param *dt_bias_ = nullptr, *B_bias_ = nullptr, *C_bias_ = nullptr, *mimo_x_ = nullptr,
        *mimo_z_ = nullptr, *mimo_o_ = nullptr, *Dp_ = nullptr, *in_w_ = nullptr,
        *B_norm_ = nullptr, *C_norm_ = nullptr, *norm_ = nullptr, *out_w_ = nullptr;
};

}  // namespace mamba
