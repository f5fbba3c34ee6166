// Scaled dot-product attention with grouped key/value heads (GQA / MQA), causal or not, and the
// rotary position embedding (flash_attn's RotaryEmbedding), forward, backward and the decode step
// over a KV cache, with naive references beside the fast kernels.
//
// Layout, channel-last as the rest of the library (the order mamba_ssm's MHA gets out of in_proj):
//   q: (B, L, H, P)   k, v: (B, Lk, KV, P)   out: (B, L, H, P)   lse: (B, H, L)
// H = heads, KV = key/value heads (H % KV == 0), P = head dim. Query head h reads key/value head
// h / (H / KV) (mamba_ssm repeats each kv head H/KV times, repeat_interleave order).
//   out[b, i, h] = sum_j softmax_j(scale * q[b, i, h] . k[b, j, g]) v[b, j, g]
// Causal: query i sees keys j <= i + (Lk - L) (the mask aligned to the bottom-right corner, as
// flash_attn and the decode step; for Lk == L it is the usual lower triangle).
//
// The fast forward never holds an L x L score matrix: each (batch, head) walks blocks of 32
// queries over blocks of 64 keys with an online softmax (running max and sum per query row,
// FlashAttention's recurrence), keeping per row only the log-sum-exp `lse` for the backward. The
// backward recomputes the scores block by block from q, k and lse (FlashAttention-2's backward).
// Threads split (batch, head) pairs; dk / dv of a shared kv head are summed over its query heads
// in head order after the parallel region, so results do not depend on timing.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

struct AttnOpts {
  bool causal = true;
  float scale = 0;  // 0: 1 / sqrt(P)
};

// lse != nullptr receives the per-row log-sum-exp of the scaled scores, (B, H, L).
Tensor attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnOpts& o,
                     Tensor* lse = nullptr);

struct AttnGrads {
  Tensor dq, dk, dv;  // shapes of q, k, v
};
// Gradients of sum(out * dout), fresh tensors. out and lse are attention_fwd's.
AttnGrads attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, const AttnOpts& o);

// One decode step per row over a KV cache: q (B, H, P); k_cache, v_cache (B, cap, KV, P);
// lens[b] (1 <= lens[b] <= cap): the number of cached positions row b attends to (the new token's
// key and value already written at lens[b] - 1). Returns (B, H, P). Equals attention_fwd of a
// one-token query over those lens[b] keys (any causal flag: the last query sees every key).
Tensor attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        std::span<const int64_t> lens, const AttnOpts& o);

// ---- rotary embedding ---------------------------------------------------------------------------
// flash_attn's RotaryEmbedding (scale_base None): inv_freq_i = 1 / base^(2i / R) in fp32, the angle
// of position p is fp32(p * inv_freq_i), cos / sin of it in fp32. The first R (= rot_dim, even,
// <= P) dims of every head of x rotate; pairs (j, j + R/2) (non-interleaved) or (2j, 2j + 1)
// (interleaved) become (a cos - b sin, a sin + b cos). inverse = true rotates by the negative
// angle: the backward (the rotation is orthogonal, its transpose is its inverse).
struct RotaryOpts {
  int64_t rot_dim = 0;
  double base = 10000.0;
  bool interleaved = false;
};
// x: (B, L, nH, P), contiguous, rotated in place; row b, step t is at position pos0[b] + t (pos0
// has B entries, or one entry shared by every row).
void rotary_inplace(Tensor& x, std::span<const int64_t> pos0, const RotaryOpts& r,
                    bool inverse = false);

// ---- references (plain loops, double accumulation) ----------------------------------------------
// Shapes as above, values row-major in double; dims {B, L, Lk, H, KV, P}.
struct AttnDims {
  int64_t B, L, Lk, H, KV, P;
};
std::vector<double> attention_ref_f64(const std::vector<double>& q, const std::vector<double>& k,
                                      const std::vector<double>& v, const AttnDims& d,
                                      const AttnOpts& o);
Tensor attention_ref(const Tensor& q, const Tensor& k, const Tensor& v, const AttnOpts& o);
// Materialises the (L, Lk) probabilities per (b, h): the readable spec of the backward.
AttnGrads attention_bwd_ref(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                            const AttnOpts& o);
// x (B, L, nH, P) in double, rotated; pos0 as rotary_inplace. The angle is computed as the fast
// path does (fp32), the rotation in double.
std::vector<double> rotary_ref_f64(const std::vector<double>& x, const Shape& shape,
                                   std::span<const int64_t> pos0, const RotaryOpts& r,
                                   bool inverse = false);

}  // namespace mamba::ops
