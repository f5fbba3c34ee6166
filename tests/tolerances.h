// Every tolerance the tests use, in one place, with the reason for it.
// A comparison passes when |a - e| <= atol + rtol * |e| for every element.
#pragma once

namespace mamba::tol {

struct Tol {
  double atol, rtol;
};

// Our fp32 kernels vs the official mamba_ssm reference (fp32 PyTorch, golden files).
// Both sides round in fp32 but sum in different orders; a scan of L steps accumulates
// O(L * 6e-8) relative error in the state. 1e-4 relative (the figure) plus an
// absolute floor of 1e-5 for elements that cancel to near zero.
constexpr Tol kGoldenF32{1e-5, 1e-4};
// Gradients vs golden: backward sums over L and over batch*L for parameters, so the same
// rounding argument gives a few times more; atol scales with those sums.
constexpr Tol kGoldenGradF32{5e-5, 2e-4};
// Fast fp32 kernel vs the naive reference (double accumulation) on random data.
constexpr Tol kFastVsRef{1e-5, 1e-4};
// Full-sequence forward vs step-by-step decode, both fp32.
constexpr Tol kStepVsFull{1e-5, 1e-4};
// Central finite differences in double (eps 1e-3 on fp32-representable inputs, f in double):
// truncation error O(eps^2 * f''') ~ 1e-6 relative plus fp32 rounding of the inputs.
constexpr Tol kFiniteDiff{1e-4, 1e-3};

// SSD chunked (fp32 GEMMs, decay from fp32 differences of double cumsums) vs the sequential
// double reference, for gradients: each gradient is a sum over up to B*L*P*N fp32 products, so
// atol is this value times max(1, max |expected|) of the tensor; rtol as kFastVsRef's scaled
// by the longer sums (a few x 1e-4).
constexpr Tol kSsdChunkedVsRef{2e-5, 3e-4};

}  // namespace mamba::tol

namespace mamba::tol {
// LM logits vs golden: logits reach |10| and sum 3 layers plus a 64-wide head; mamba_ssm's own
// cached-vs-uncached difference is 2.4e-6..7e-6 (golden README), so 1e-4 abs + 1e-4 rel.
constexpr Tol kGoldenLogits{1e-4, 1e-4};
// Whole-LM finite differences in fp32 (eps 1e-2, loss over B*L*V terms): fp32 rounding of the
// loss (~1e-7 * sum|terms| ~ 1e-5) divided by 2 eps gives ~1e-3 absolute noise.
constexpr Tol kLMFiniteDiff{3e-3, 2e-2};
// Layer backward vs a directional central difference of the fp32 layer forward (eps 2e-3 along
// a random N(0,1) direction): truncation O(eps^2) ~ 1e-5 relative, fp32 rounding of the loss
// (~1e-6 * |loss| / eps) gives the absolute part.
constexpr Tol kLayerDirFD{2e-3, 2e-3};

}  // namespace mamba::tol

namespace mamba::tol {
// Selective scan: fast fp32 backward vs the double reference. Gradients of B/C (var, group)
// and of A, D, delta_bias are sums over up to L*D fp32 products of O(1) terms, so the
// absolute floor is larger than for the forward (1e-4 for sums of ~1e2..1e3 terms of O(1)).
constexpr Tol kFastVsRefGrad{1e-4, 1e-4};
}  // namespace mamba::tol

namespace mamba::tol {
// Mamba-1 layer backward vs element-wise central differences of the fp32 layer forward
// (eps 3e-3, tiny config, loss sum(y*g) over 40 terms of O(0.3) summed in double): the fp32
// rounding of the outputs (~6e-8 * |y| each, ~3e-7 over the sum) divided by 2 eps is ~5e-5
// absolute; truncation O(eps^2 * f''') ~ 1e-5 relative. 5e-4 abs + 5e-3 rel leaves a 10x margin
// and still catches any wrong term (those are O(1e-2) or more).
constexpr Tol kLayerFiniteDiffF32{5e-4, 5e-3};
}  // namespace mamba::tol

namespace mamba::tol {
// Cross-entropy dlogits vs a central difference of the loss (computed in double from fp32
// logits, eps 1e-3 on O(1) logits): truncation O(eps^2 * f''') ~ 1e-7, plus the fp32 rounding
// of dlogits (~6e-8 relative); 2e-6 abs + 1e-4 rel is far below any wrong term (~1e-2).
constexpr Tol kCrossEntropyFD{2e-6, 1e-4};
// AdamW's fp32 update vs the same formula in double: a few fp32 roundings per element.
constexpr Tol kAdamWVsDouble{1e-7, 1e-5};
// Gradient accumulation (2 micro-batches of 4) vs one batch of 8: the same sums in another
// order (GEMM blocking over M differs), so fp32 reassociation only: ~1e-6 relative.
constexpr Tol kAccumVsBatch{1e-6, 1e-4};
}  // namespace mamba::tol

namespace mamba::tol {
// 16-bit weights (test_half_weights.cpp). A bf16 / f16 model against the fp32 model holding the
// SAME rounded weights: only the order of the fp32 sums differs (the 16-bit streaming kernel or
// convert + GEMM vs the BLAS), through 2 layers and a head of 40..80-term dots, logits O(1):
// a few fp32 ulps, as kStepVsFull.
constexpr Tol kHalfVsRoundedF32{1e-5, 1e-4};
// A bf16 model against the ORIGINAL fp32 model: each weight moves by up to 2^-8 relative (8
// significant bits), so each dot product by up to 2^-8 * sum |x_k w_k| (errors aligned), and
// sums that cancel make that a large fraction of |logit|. Measured in the tiny test models
// (logits up to 2): max |err| 5.5e-3 (Mamba1), 8.2e-3 (Mamba2); 3e-2 abs + 1e-2 rel leaves a
// 3-4x margin and is still far below the effect of a wrong or transposed weight (O(1)).
constexpr Tol kBf16VsF32Logits{3e-2, 1e-2};
// The same for f16 (11 significant bits, 2^-11 relative per weight, 8x finer than bf16):
// measured 8.4e-4 (Mamba1), 1.0e-3 (Mamba2).
constexpr Tol kF16VsF32Logits{4e-3, 1.5e-3};
}  // namespace mamba::tol

namespace mamba::tol {
// Quantised weights (test_quant_weights.cpp). A q8_0 / q4_0 model against the fp32 model holding
// the SAME dequantised weights (every d * q is exact in fp32): only the order of the fp32 sums
// differs (the streaming kernel's per-block vectors, or dequantise + packed GEMM, vs the BLAS),
// as for 16-bit weights: a few fp32 ulps on O(1) logits.
constexpr Tol kQuantVsDequantF32{1e-5, 1e-4};
// Against the ORIGINAL fp32 model: the quantisation error itself. q8_0 moves each weight by up
// to half a step of amax / 127 of its block (~4x bf16's 2^-9 relative); measured in the tiny
// test models (d_model 64, logits up to 2.3): max |err| 0.021 (Mamba1), 0.037 (Mamba2), so
// 0.1 abs + 2e-2 rel leaves a ~2.5x margin. q4_0's step is amax / 8 (16x coarser): measured
// max |err| 0.38 (Mamba1), 0.61 (Mamba2) on logits up to 2.3 / 1.5, so 1.5 abs + 0.1 rel; this
// bound is loose by nature (it only catches a gross error) — the correctness of the q4_0 kernels
// is checked by kQuantVsDequantF32, and the quantisation's effect on a trained model by the
// perplexity in docs/PERFORMANCE.md.
constexpr Tol kQ8_0VsF32Logits{1e-1, 2e-2};
constexpr Tol kQ4_0VsF32Logits{1.5, 1e-1};
// The same q8_0 / q4_0 model with 8-bit activations (--activations q8: x rounded to q8_0 blocks,
// half a step of max|x| / 127 per value, the same relative size as q8_0 weights' own rounding)
// against fp32 activations. Measured in the tiny test models (test_act_q8.cpp, logits up to 2.3):
// max |err| 0.024 / 0.026 (Mamba1 q8_0 / q4_0), 0.030 / 0.031 (Mamba2), so kQ8_0VsF32Logits'
// 0.1 abs + 2e-2 rel, a ~3x margin. The kernel's own correctness is checked exactly (bits
// against the portable kernel, a derived bound against the double reference).
constexpr Tol kQ8ActVsF32Act{1e-1, 2e-2};
// bf16 activations (ActivationType::bf16, the prefill products of bf16 weights) against fp32
// activations on the same bf16-weight tiny LMs (test_act_bf16): x rounded to 8 significant bits
// (2^-9 relative) in every projection. Measured max |err| 0.0063 (Mamba1, max |logit| 2.8) and
// 0.010 (Mamba2, 1.6), so 3e-2 abs + 1e-2 rel, a ~3x margin. The kernel's own correctness is
// checked exactly (bits against the portable kernel, a derived bound against the reference).
constexpr Tol kBf16ActVsF32Act{3e-2, 1e-2};
}  // namespace mamba::tol

namespace mamba::tol {
// Our logits against llama.cpp's on the same GGUF file (test_llamacpp_fixtures.cpp: trained tiny
// models, logits up to ~17, the 16 steps of a greedy continuation; the same weights on both
// sides, so only the arithmetic differs). See the measured figures in docs/GGUF.md.
// F32: both fp32 with other sum orders, as kGoldenLogits.
constexpr Tol kLlamaCppF32{1e-4, 1e-4};
// F16 / BF16 files: llama.cpp rounds the activations to the weight's 16-bit type before every
// matrix product (2^-11 / 2^-8 relative each) where we keep them in fp32; that rounding runs
// through 2 layers into logits of O(10).
constexpr Tol kLlamaCppF16{1.5e-2, 1e-3};
constexpr Tol kLlamaCppBF16{1e-1, 5e-3};
// Block-quantised files (Q8_0, Q4_0, Q5_0, Q4_K, Q6_K tensors): the weights are the same
// dequantised values on both sides, but llama.cpp quantises the activations to 8 bits per block
// (Q8_0 / Q8_K: up to amax / 254 per value) for every quantised product. A change of ours to
// 8-bit activations (issue 19, decode) rounds them independently of llama.cpp's, so the bound
// leaves room for both roundings: about 3x the largest measured difference.
constexpr Tol kLlamaCppQuant{6e-1, 2e-2};
// Q8_0 / Q4_0 Mamba-2 files with our 8-bit activations (--activations q8): both sides quantise
// the activations by ggml's rule and take exact integer block dots; only the fp32 order of the
// scaled block sums differs (llama.cpp keeps per-lane partial sums and reduces them at the end),
// as for F32 files. Measured: 1.9e-6 on logits up to ~17.
constexpr Tol kLlamaCppQ8Act{1e-4, 1e-4};
}  // namespace mamba::tol
