// Vim's bidirectional Mamba ("bimamba v2": hustvl/Vim, mamba-1p1p1 mamba_ssm.modules.mamba_simple
// .Mamba(bimamba_type="v2")), the block of Vision Mamba:
//   xz = in_proj(hidden) -> x | z                                   (shared by both directions)
//   forward direction:  causal conv1d + SiLU -> x_proj -> dt_proj -> selective_scan(..., z)
//   backward direction: the same with its own conv1d_b / x_proj_b / dt_proj_b / A_b_log / D_b
//                       on the time-reversed sequence (its conv is anti-causal, its scan runs
//                       from the end; z is reversed with it)
//   y = out_proj((y_f + y_b) / (2 if if_divide_out else 1)) [* gamma when init_layer_scale]
// Both directions read x and z in place: the reversed one through the ops' reverse flag (a
// negative time stride), never through flipped copies.
// Bidirectional means non-causal: there is no decode step and no decode state. Vim's own module
// runs the backward direction only in its CUDA fast path; its slow path (use_fast_path=False, or
// any inference_params) silently drops it (docs/ARCHITECTURE.md, "Vim"). This layer is always
// bidirectional. Channel-last: activations are (B, L, ·).
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

// Vim's constructor arguments (mamba-1p1p1's Mamba), less the fast-path / device switches.
struct BiMambaConfig {
  int64_t d_model = 0;
  int64_t d_state = 16;
  int64_t d_conv = 4;
  double expand = 2;
  int64_t dt_rank = -1;  // -1 = "auto" = ceil(d_model / 16)
  double dt_min = 0.001, dt_max = 0.1;
  std::string dt_init = "random";  // "random" | "constant"
  double dt_scale = 1.0, dt_init_floor = 1e-4;
  bool conv_bias = true, bias = false;
  std::string bimamba_type = "v2";  // only "v2" (separate backward parameters) is a BiMamba
  // (y_f + y_b) / 2 before out_proj. Vim's class default is false; every released Vim model sets
  // it (Vim spells the argument if_devide_out).
  bool if_divide_out = false;
  // When set, a learned per-channel scale gamma (d_model), initialised to this value, multiplies
  // the output.
  std::optional<double> init_layer_scale;

  void validate() const;    // throws mamba::Error naming the field
  int64_t d_inner() const;  // D = int(expand * d_model)
  int64_t rank() const;     // R = dt_rank, resolved when "auto"
};

// Activations of one direction (each (B, L, ·) in the original time order).
struct BiMambaDirSaved {
  Tensor xc;      // (B, L, D) silu(conv(x)): the scan input u
  Tensor x_dbl;   // (B, L, R + 2N) x_proj output [dt_low | B | C]
  Tensor delta;   // (B, L, D) dt_proj.weight applied to dt_low (bias not yet added)
  Tensor Bm, Cm;  // (B, L, N)
};

struct BiMambaSaved {
  Tensor hidden;             // (B, L, d_model) the layer input
  Tensor x, z;               // (B, L, D) the in_proj halves
  BiMambaDirSaved fwd, bwd;  // forward and backward (reversed) directions
  Tensor y;                  // (B, L, D) (y_f + y_b) [/ 2]: the out_proj input
  Tensor o;                  // (B, L, d_model) out_proj output before gamma (only with gamma)
};

class BiMamba {
 public:
  using Config = BiMambaConfig;
  using Saved = BiMambaSaved;
  static constexpr const char* kName = "BiMamba";

  explicit BiMamba(const Config& cfg, uint64_t seed = 0);
  BiMamba(const BiMamba&) = delete;
  BiMamba& operator=(const BiMamba&) = delete;
  BiMamba(BiMamba&&) noexcept = default;
  BiMamba& operator=(BiMamba&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). saved != nullptr keeps what backward needs (fp32
  // weights only).
  Tensor forward(const Tensor& hidden, Saved* saved = nullptr) const;
  // dy: (B, L, d_model) -> dx (B, L, d_model); parameter gradients accumulate (+=) into params().
  Tensor backward(const Saved& saved, const Tensor& dy);

 private:
  // One direction's parameters (the backward set has the "_b" names).
  struct Dir {
    Param *conv_w = nullptr, *conv_b = nullptr, *xproj_w = nullptr, *dt_w = nullptr,
          *dt_b = nullptr, *A_log = nullptr, *Dp = nullptr;
    bool reverse = false;
  };
  // x, z: (B, L, D) -> the direction's gated scan output (B, L, D).
  Tensor dir_forward(const Dir& dir, const Tensor& x, const Tensor& z, BiMambaDirSaved& s) const;
  // dy: (B, L, D) gradient of the direction's output; returns its dx (B, L, D) and adds its dz
  // into dz (B, L, D).
  Tensor dir_backward(Dir& dir, const Tensor& x, const Tensor& z, const BiMambaDirSaved& s,
                      const Tensor& dy, Tensor& dz);
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }

  Config cfg_;
  int64_t d_inner_, d_state_, d_conv_, dt_rank_;  // D, N, K, R
  ParamList params_;
  Param *gamma_ = nullptr, *in_w_ = nullptr, *in_b_ = nullptr, *out_w_ = nullptr, *out_b_ = nullptr;
  Dir fwd_, bwd_;
};

}  // namespace mamba
