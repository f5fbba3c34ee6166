// The small ops of the spatio-temporal block (nn/st_block.h): GMAN's gated fusion with its
// backward and reference, the (B, X, Y, C) <-> (B, Y, X, C) reorder between the node-major and
// time-major layouts, and the node-embedding broadcast add / gradient reduction.
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

// z = sigmoid(pre), h = z * hs + (1 - z) * ht (all the same shape, contiguous).
struct FusionOut {
  Tensor h, z;
};
FusionOut gated_fusion_fwd(const Tensor& pre, const Tensor& hs, const Tensor& ht);
// Gradients of sum(h * dh): dpre = dh (hs - ht) z (1 - z), dhs = dh z, dht = dh (1 - z).
struct FusionGrads {
  Tensor dpre, dhs, dht;
};
FusionGrads gated_fusion_bwd(const Tensor& z, const Tensor& hs, const Tensor& ht, const Tensor& dh);
// h in double from double inputs (for finite differences).
std::vector<double> gated_fusion_ref_f64(const std::vector<double>& pre,
                                         const std::vector<double>& hs,
                                         const std::vector<double>& ht);

// x (B, X, Y, C) -> (B, Y, X, C), a new contiguous tensor.
Tensor swap_dims12(const Tensor& x);
// x (M, N, C) + e (N, C) broadcast over M, a new tensor.
Tensor add_broadcast(const Tensor& x, const Tensor& e);
// de (N, C) += sum over m of dx (M, N, C), m in order.
void broadcast_grad(const Tensor& de, const Tensor& dx);

}  // namespace mamba::ops
