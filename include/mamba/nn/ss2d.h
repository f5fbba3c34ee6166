// VMamba's SS2D (MzeroMiko/VMamba classification/models/vmamba.py, class SS2D): the 2-D selective
// scan layer of VMamba's VSSBlock, with VMamba's constructor arguments and state_dict keys.
//   [x | z] = in_proj(x)                        (z absent for the "_noz" forward types)
//   u = SiLU(conv2d(x))                         depthwise k x k, padding (k-1)/2 (none if d_conv <=
//   1) per direction k (row-major, column-major and their reverses):
//     [dt_r | B | C] = x_proj_weight[k] u,  delta = dt_projs_weight[k] dt_r
//     y_k = selective_scan(u, delta + dt_projs_bias[k], A = -exp(A_logs[k]), B, C, Ds[k])
//   y = sum_k y_k at each pixel  ->  out_norm (LayerNorm over channels)  [-> GELU if "_oact"]
//   [-> * SiLU(z)]  ->  out_proj
// forward_type: "v0" (the original VMamba: channel-last, d_conv 3 with bias, always gated) or the
// v2 code path "v01".."v05", "v2", "v3" (the same math; they pick CUDA kernels and einsum vs conv1d
// upstream) with VMamba's postfixes "_noz" (no z gate, in_proj has D rows), "_nozact" (z not
// passed through SiLU), "_oact" (GELU after out_norm), "_no32" (no effect in fp32) and "_onnone"
// (no out_norm). channel_first: tensors are (B, C, H, W) and in_proj / out_proj are VMamba's
// Linear2d (1x1 convs with the same (out, in) weights); otherwise (B, H, W, C).
// Inside, images are channel-last (B, H, W, C): channel-first tensors are transposed once at the
// layer's boundary. The four scan orders are read in place by a strided kernel (ops/cross_scan.h);
// VMamba's copy-based cross scan is kept as an alternative for measurement (set_scan_impl).
// VMamba's official code cannot run this on a CPU (docs/VMAMBA.md): its cross-scan dispatch
// raises for CPU tensors and its default forward_type "v2" asserts.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

struct SS2DConfig {
  int64_t d_model = 96;
  int64_t d_state = 16;
  double ssm_ratio = 2.0;
  int64_t dt_rank = -1;            // -1 = "auto" = ceil(d_model / 16)
  std::string act_layer = "silu";  // VMamba's act_layer: nn.SiLU only
  int64_t d_conv = 3;              // < 2: no conv
  bool conv_bias = true;
  double dropout = 0.0;  // nn.Dropout: only 0 (inference and deterministic training)
  bool bias = false;     // in_proj / out_proj biases
  double dt_min = 0.001, dt_max = 0.1;
  std::string dt_init = "random";  // "random" | "constant"
  double dt_scale = 1.0, dt_init_floor = 1e-4;
  std::string initialize = "v0";    // "v0" | "v1" | "v2" (VMamba's dt/A/D init variants)
  std::string forward_type = "v2";  // see the top of this file
  bool channel_first = false;

  void validate() const;    // throws mamba::Error naming the field
  int64_t d_inner() const;  // D = int(ssm_ratio * d_model)
  int64_t rank() const;     // R
  // What forward_type selects (validate() first).
  bool is_v0() const;
  bool has_z() const;         // in_proj also produces the gate z
  bool z_act() const;         // z passes through SiLU
  bool out_act() const;       // GELU after out_norm ("_oact")
  bool has_out_norm() const;  // false for "_onnone"
  bool operator==(const SS2DConfig&) const = default;

  // VMamba's keyword arguments as a JSON object ({"d_model": 24, "forward_type": "v05_noz", ...});
  // unknown keys and wrong types are errors naming the key. (src/nn/ss2d_json.cpp)
  static SS2DConfig from_json(const std::string& text);
};

// Activations forward keeps for backward (channel-last, (B, H, W, .)).
struct SS2DSaved {
  Tensor hidden;  // (B, H, W, d_model) the layer input (channel-last)
  Tensor x;       // (B, H, W, D) conv input
  Tensor z;       // (B, H, W, D) gate before SiLU (has_z)
  Tensor zs;      // (B, H, W, D) the gate as applied
  Tensor xc;      // (B, H, W, D) conv output (before SiLU)
  Tensor u;       // (B, H, W, D) scan input SiLU(xc)
  Tensor x_dbl;   // (B, H, W, K, R + 2N)
  Tensor delta;   // (B, H, W, K, D)
  Tensor y;       // (B, H, W, D) merged scan output
  Tensor yn;      // (B, H, W, D) after out_norm
  Tensor yo;      // (B, H, W, D) after the output activation
  Tensor yg;      // (B, H, W, D) out_proj input
};

enum class SS2DScan { strided, copy };

class SafetensorsFile;

// Loads `pl` from f (tensor prefix + parameter name), as VMamba loads its modules: a Linear2d
// weight (in_proj / out_proj of a channel-first SS2D, mlp.fc1 / mlp.fc2 of a channel-first block:
// the 2-D (out, in) weight of a 1x1 conv) stored 4-D as (out, in, 1, 1), as conv checkpoints keep
// it, is read as (out, in), like VMamba's Linear2d._load_from_state_dict. Every other shape must
// match exactly.
void load_vmamba_params(ParamList& pl, const SafetensorsFile& f, const std::string& prefix);

class SS2D {
 public:
  using Config = SS2DConfig;
  using Saved = SS2DSaved;
  static constexpr const char* kName = "SS2D";
  static constexpr int64_t kDirections = 4;  // K

  explicit SS2D(const Config& cfg, uint64_t seed = 0);
  SS2D(const SS2D&) = delete;
  SS2D& operator=(const SS2D&) = delete;
  SS2D(SS2D&&) noexcept = default;
  SS2D& operator=(SS2D&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }
  // Every parameter from tensors named prefix + its VMamba key (load_vmamba_params).
  void load(const SafetensorsFile& f, const std::string& prefix = "");

  // x: (B, H, W, d_model), or (B, d_model, H, W) when channel_first -> the same layout.
  // saved != nullptr keeps what backward needs (fp32 weights only).
  Tensor forward(const Tensor& x, Saved* saved = nullptr) const;
  // dy: the output's layout -> dx (the input's layout); parameter gradients accumulate (+=).
  Tensor backward(const Saved& saved, const Tensor& dy);
  // The same on channel-last tensors whatever channel_first says (VSSBlock's inner path).
  Tensor forward_cl(const Tensor& x, Saved* saved = nullptr) const;
  Tensor backward_cl(const Saved& saved, const Tensor& dy);

  // The cross-scan implementation (default strided; copy = VMamba's materialised four orders).
  void set_scan_impl(SS2DScan s) { scan_ = s; }

 private:
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }

  Config cfg_;
  int64_t d_inner_, d_state_, dt_rank_;
  SS2DScan scan_ = SS2DScan::strided;
  ParamList params_;
  Param *xproj_w_ = nullptr, *A_logs_ = nullptr, *Ds_ = nullptr, *dt_w_ = nullptr, *dt_b_ = nullptr;
  Param *norm_w_ = nullptr, *norm_b_ = nullptr, *in_w_ = nullptr, *in_b_ = nullptr;
  Param *conv_w_ = nullptr, *conv_b_ = nullptr, *out_w_ = nullptr, *out_b_ = nullptr;
};

// (B, C, H, W) <-> (B, H, W, C)
Tensor nchw_to_nhwc(const Tensor& x);
Tensor nhwc_to_nchw(const Tensor& x);

}  // namespace mamba
