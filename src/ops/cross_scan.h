// VMamba's 2-D selective scan (SS2D's core): four scans over an H x W image, one per pixel order,
// each with its own parameters, and the merge that sums the four outputs at each pixel.
//
//   pixel orders (L = H W, t = step):  k = 0 row-major      p = t              (p = i W + j)
//                                      k = 1 column-major   t = j H + i
//                                      k = 2, 3: the reverse of 0, 1 (step t reads order 0/1's
//                                      L-1-t)
//   u        : (B, H, W, D)            the scan input (SiLU(conv2d(x))), channel-last
//   delta    : (B, H, W, K, D)         dt_projs_weight[k] applied to direction k's dt_r at pixel p
//   x_dbl    : (B, H, W, K, R + 2N)    x_proj_weight[k] u[p] = [dt_r | B | C] of direction k
//   A        : (K D, N)                -exp(A_logs); channel k D + d serves direction k
//   Ds, delta_bias : (K D)             optional
//   y        : (B, H, W, D)            y[p] = sum_k y_k[p]
//   direction k, channel d (c = k D + d), over its steps t with p = order_k(t):
//     dt = softplus(delta[p, k, d] + delta_bias[c]),  h = exp(dt A[c]) h + dt B_k[p] u[p, d],
//     y_k[p, d] = <h, C_k[p]> + Ds[c] u[p, d]
// This is mamba_ssm's selective_scan_ref over VMamba's cross_scan copies xs (B, K D, L) with B/C
// groups (B, K, N, L), followed by cross_merge: the same numbers, computed without the copies.
//
// Two implementations of the same op (CrossScanImpl), measured against each other in
// bench/bench_ss2d.cpp:
//   Strided: a scan kernel that reads u, delta, B, C at pixel order_k(t) in place (an index
//            table per direction) and adds y_k into y: no copy of the image at all.
//   Copy:    VMamba's way: the four orders materialised as (B, L, K D) copies (and B/C, delta
//            gathered), one ops::selective_scan_fwd / _bwd call over K D channels with K
//            groups, then the merge (and the scatter of the gradients).
#pragma once
#include <cstdint>
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

constexpr int64_t kCrossScanK = 4;

struct CrossScanArgs {
  Tensor u, delta, x_dbl, A;
  Tensor Ds, delta_bias;  // optional
  int64_t dt_rank = 0;    // R: B starts at column R of a direction's x_dbl row, C at R + N
  bool delta_softplus = true;
};
struct CrossScanGrads {
  Tensor du;                // (B, H, W, D)
  Tensor ddelta;            // (B, H, W, K, D)
  Tensor dx_dbl;            // (B, H, W, K, R + 2N): the B and C columns; the dt_r columns are zero
  Tensor dA;                // (K D, N)
  Tensor dDs, ddelta_bias;  // (K D), defined iff the inputs are
};
enum class CrossScanImpl { Strided, Copy };

struct CrossScanDims {
  int64_t batch = 0, H = 0, W = 0, D = 0, N = 0, R = 0;
  int64_t L() const { return H * W; }
  int64_t E() const { return R + 2 * N; }
};
// Validates every tensor (throws mamba::Error naming it, the expected and the actual shape).
CrossScanDims cross_scan_check(const CrossScanArgs& a, const char* what = "cross_scan");
// The pixel index of step t of direction k (0 <= k < 4).
int64_t cross_scan_pixel(int64_t k, int64_t t, int64_t H, int64_t W);

Tensor cross_scan_fwd(const CrossScanArgs& a, CrossScanImpl impl = CrossScanImpl::Strided);
// Gradients of sum(y * dy), fresh tensors.
CrossScanGrads cross_scan_bwd(const CrossScanArgs& a, const Tensor& dy,
                              CrossScanImpl impl = CrossScanImpl::Strided);

// Naive reference: plain loops over the explicit pixel orders, double accumulation (the spec).
Tensor cross_scan_ref(const CrossScanArgs& a);
std::vector<double> cross_scan_ref_f64(const CrossScanArgs& a);
// Backward reference: the four orders gathered, mamba_ssm's selective_scan backward reference
// (ops::selective_scan_bwd_ref, double) over them, the gradients scattered back.
CrossScanGrads cross_scan_bwd_ref(const CrossScanArgs& a, const Tensor& dy);

}  // namespace mamba::ops
