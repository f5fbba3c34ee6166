// The Mamba-2 mixer layer: mamba_ssm.modules.mamba2.Mamba2 (the use_mem_eff_path=False path).
//
//   hidden (B, L, d_model)
//     in_proj              -> zxbcdt (B, L, d_in_proj), split [z0, x0, z, xBC, dt]
//                             (d_mlp, d_mlp, d_ssm, d_ssm + 2GN, H), d_mlp = d_inner - d_ssm
//     conv1d + SiLU (xBC)  -> x (B, L, H, P), B, C (B, L, G, N)
//     ssd(x, dt, A = -exp(A_log), B, C, D, dt_bias, softplus, dt_limit) -> y (B, L, d_ssm)
//     norm(y, z)           -> gated RMSNorm (group_size d_ssm / G, norm_before_gate=false)
//                             (without rmsnorm, z gates the scan output: y * silu(z))
//     [silu(z0) * x0, y]   -> out_proj -> (B, L, d_model)
// Parameters (mamba_ssm's state_dict keys): dt_bias (H), A_log (H), D (H or d_ssm),
// in_proj.weight (d_in_proj, d_model) [+ in_proj.bias], conv1d.weight (d_ssm+2GN, 1, K),
// conv1d.bias, norm.weight (d_ssm), out_proj.weight (d_model, d_inner) [+ out_proj.bias].
// Three paths over the same parameters: forward (sequence), backward (from Mamba2Saved) and
// step (one token with Mamba2State), as for Mamba1 (include/mamba/nn/mamba1.h).
#pragma once
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "mamba/nn/param.h"
#include "mamba/ops/ssd.h"
#include "mamba/tensor.h"

namespace mamba {

namespace json_io {
class KeyReader;
}

struct Mamba2Config {
  int64_t d_model = 0;
  int64_t d_state = 128;  // N
  int64_t d_conv = 4;     // K
  double expand = 2;      // d_inner = int(expand * d_model)
  int64_t headdim = 64;   // P
  int64_t d_ssm = 0;      // 0 = None (mamba_ssm): the SSM covers all of d_inner
  int64_t ngroups = 1;    // G
  std::pair<double, double> A_init_range{1.0, 16.0};
  bool D_has_hdim = false;  // D is (d_ssm) instead of (H)
  bool rmsnorm = true;
  bool norm_before_gate = false;
  double dt_min = 0.001, dt_max = 0.1, dt_init_floor = 1e-4;  // initialisation only
  std::pair<double, double> dt_limit{0.0, std::numeric_limits<double>::infinity()};
  bool bias = false;  // in_proj / out_proj bias
  bool conv_bias = true;
  int64_t chunk_size = 256;  // as configured (mamba_ssm's GPU tile); the CPU SSD uses
                             // min(chunk_size, kCpuChunk), see ssd_chunk()

  // Throws mamba::Error naming the offending field.
  void validate() const;
  int64_t d_inner() const { return static_cast<int64_t>(expand * static_cast<double>(d_model)); }
  int64_t ssm_dim() const { return d_ssm > 0 ? d_ssm : d_inner(); }  // d_ssm resolved
  int64_t nheads() const { return ssm_dim() / headdim; }             // H
  int64_t d_mlp() const { return d_inner() - ssm_dim(); }
  int64_t conv_dim() const { return ssm_dim() + 2 * ngroups * d_state; }  // d_ssm + 2GN
  int64_t d_in_proj() const { return 2 * d_inner() + 2 * ngroups * d_state + nheads(); }
  bool operator==(const Mamba2Config&) const = default;

  // config.json's ssm_cfg (mamba_ssm's keyword arguments of Mamba2), in src/nn/mamba2_json.cpp;
  // see Mamba1Config for the four functions.
  static Mamba2Config from_ssm_cfg(json_io::KeyReader& r, int64_t d_model);
  std::string to_ssm_cfg() const;
  static const std::vector<std::string>& ssm_cfg_keys();
  void check_ssm_cfg() const;
  // The SSD's chunk (tile) on the CPU. The SSD gives the same result for any chunk size up to
  // rounding; chunk_size (256 in mamba_ssm's configs) is the GPU kernel's tile, while on the CPU
  // 64 is 1.6x faster at L = 512 (bench_ssd --sweep, docs/PERFORMANCE.md).
  static constexpr int64_t kCpuChunk = 64;
  int64_t ssd_chunk() const { return chunk_size < kCpuChunk ? chunk_size : kCpuChunk; }
};

// Decode state (mamba_ssm's inference cache for one layer).
struct Mamba2State {
  Tensor conv_state;  // (B, d_ssm + 2GN, K): the last K conv inputs, oldest first
  Tensor ssm_state;   // (B, H, P, N)
  // Row dst_b of this state = row src_b of src (generate stacks prefilled states into a batch).
  void copy_row(int64_t dst_b, const Mamba2State& src, int64_t src_b) {
    conv_state.select(dst_b).copy_from(src.conv_state.select(src_b));
    ssm_state.select(dst_b).copy_from(src.ssm_state.select(src_b));
  }
};

// What forward keeps for backward.
struct Mamba2Saved {
  Tensor hidden;     // (B, L, d_model) layer input
  Tensor xbc_raw;    // (B, L, d_ssm + 2GN) conv input
  Tensor z0, x0;     // (B, L, d_mlp) (only when d_mlp > 0)
  Tensor z;          // (B, L, d_ssm)
  ops::SsdArgs ssd;  // x (B, L, H, P), dt (B, L, H), B, C (B, L, G, N), A, D, z, dt_bias
  Tensor y;          // (B, L, d_ssm) scan output (norm input)
  Tensor y_out;      // (B, L, d_inner) out_proj input
};

// The layer contract: see Mamba1 (include/mamba/nn/mamba1.h).
class Mamba2 {
 public:
  using Config = Mamba2Config;
  using State = Mamba2State;
  using Saved = Mamba2Saved;
  static constexpr const char* kName = "Mamba2";

  explicit Mamba2(const Config& cfg, uint64_t seed = 0);
  Mamba2(const Mamba2&) = delete;
  Mamba2& operator=(const Mamba2&) = delete;
  Mamba2(Mamba2&&) noexcept = default;
  Mamba2& operator=(Mamba2&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). saved != nullptr keeps what backward needs (fp32
  // weights only); state != nullptr receives the decode state after the last token (prefill).
  Tensor forward(const Tensor& hidden, Saved* saved = nullptr, State* state = nullptr) const;
  // The forward continued from a decode state (chunked prefill), as Mamba1::prefill: hidden (B, L,
  // d_model) after the tokens `state` has seen; returns (B, L, d_model) and advances state.
  Tensor prefill(const Tensor& hidden, State& state) const;
  // dy: (B, L, d_model). Returns dhidden (B, L, d_model); accumulates parameter grads (+=).
  // Throws "… inference only; load in f32 to train" when the weights are not fp32.
  Tensor backward(const Saved& saved, const Tensor& dy);

  State new_state(int64_t batch) const;  // zeros
  // x: (B, d_model) one token -> (B, d_model); advances state.
  Tensor step(const Tensor& x, State& state) const;

 private:
  // step's in_proj and conv update at B = 1 in one pass (the same bits): zxbcdt (1, in_proj
  // rows), xbc (1, conv_dim) the conv's output; conv_state advanced.
  void in_proj_conv_one(const Tensor& xin, State& state, Tensor& zxbcdt, Tensor& xbc) const;
  Tensor A() const;  // -exp(A_log): (H)
  void check_input(const Tensor& hidden, const char* what) const;
  void check_state(const State& s, int64_t batch, const char* what) const;
  // The shared sequence path (see Mamba1::run): init optional, state may be init.
  Tensor run(const Tensor& hidden, Saved* saved, const State* init, State* state) const;
  Tensor mlp_gate_cat(const Tensor& yn, const Tensor& z0, const Tensor& x0) const;
  ops::SsdArgs ssd_args(const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C,
                        const Tensor& z) const;
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }

  Config cfg_;
  ParamList params_;
  // The parameters (nullptr when absent by config: biases, norm.weight without rmsnorm).
  Param *dt_bias_ = nullptr, *A_log_ = nullptr, *D_ = nullptr, *in_w_ = nullptr, *in_b_ = nullptr;
  Param *conv_w_ = nullptr, *conv_b_ = nullptr, *norm_w_ = nullptr, *out_w_ = nullptr,
        *out_b_ = nullptr;
};

}  // namespace mamba
