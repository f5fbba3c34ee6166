// Attention prefill cost in a hybrid LM, as JSON lines: one MHA layer (mamba2attn-2.7b's attn_cfg:
// d_model 2560, 30 heads of 128, 30 kv heads, rotary 64, d_conv 4, no biases) against one Mamba-2
// layer of the same model (d_model 2560, its defaults: d_state 128, headdim 64, expand 2), both
// forward over (1, L, d_model), measured in the same run; plus the attention kernel alone
// (ops::attention_fwd, blocked online softmax) and, at the shorter lengths, the naive reference
// attention (double, one score row at a time) as the kernel's baseline.
#include <cmath>

#include "bench_util.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/mha.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/attention.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_attention: MHA layer vs Mamba-2 layer prefill (mamba2attn-2.7b shapes), JSON lines\n"
    "  --d_model 2560 --heads 30 --kv_heads 30 --head_dim 128 --rotary 64 --d_conv 4\n"
    "  --seqlens 512,4096 (comma list) --reps 3 --threads 0 (0 = all cores)\n"
    "  --ref_max 1024 (naive reference attention only for L <= this)\n";
}

int main(int argc, char** argv) {
  bench::Args a(argc, argv, kUsage);
  set_num_threads(static_cast<int>(a.get("threads", 0)));
  const int64_t dm = a.get("d_model", 2560);
  const int reps = static_cast<int>(a.get("reps", 3));
  const int64_t ref_max = a.get("ref_max", 1024);
  MHAConfig mc;
  mc.d_model = dm, mc.num_heads = a.get("heads", 30), mc.num_heads_kv = a.get("kv_heads", 30);
  mc.head_dim = a.get("head_dim", 128), mc.rotary_emb_dim = a.get("rotary", 64);
  mc.d_conv = a.get("d_conv", 4), mc.causal = true, mc.qkv_proj_bias = false;
  mc.out_proj_bias = false;
  Mamba2Config sc;
  sc.d_model = dm;
  MHA mha(mc, 1);
  Mamba2 m2(sc, 2);
  std::vector<int64_t> seqlens;
  {
    std::string s = a.get_str("seqlens", "512,4096");
    size_t p = 0;
    while (p < s.size()) {
      size_t q = s.find(',', p);
      if (q == std::string::npos) q = s.size();
      seqlens.push_back(std::stoll(s.substr(p, q - p)));
      p = q + 1;
    }
  }
  Rng rng(0);
  for (int64_t L : seqlens) {
    Tensor x({1, L, dm});
    rng.fill_normal(x, 0, 1);
    const double t_mha = bench::median_seconds(reps, [&] { mha.forward(x); });
    const double t_m2 = bench::median_seconds(reps, [&] { m2.forward(x); });
    const int64_t H = mc.num_heads, KV = mc.heads_kv(), P = mc.head();
    Tensor q({1, L, H, P}), k({1, L, KV, P}), v({1, L, KV, P});
    rng.fill_normal(q, 0, 1), rng.fill_normal(k, 0, 1), rng.fill_normal(v, 0, 1);
    const double t_attn = bench::median_seconds(reps, [&] {
      ops::attention_fwd(q, k, v, {true, 0});
    });
    // Causal attention FLOPs: QK^T and PV, each 2 * H * P * L(L+1)/2.
    const double flops = 2.0 * 2.0 * H * P * (L * (L + 1) / 2.0);
    double t_ref = -1;
    if (L <= ref_max)
      t_ref = bench::median_seconds(1, [&] { ops::attention_ref(q, k, v, {true, 0}); });
    std::printf(
        "{\"bench\":\"attention_prefill\",\"L\":%lld,\"d_model\":%lld,\"heads\":%lld,"
        "\"kv_heads\":%lld,\"head_dim\":%lld,\"threads\":%d,\"mha_layer_s\":%.4f,"
        "\"mamba2_layer_s\":%.4f,\"mha_over_mamba2\":%.3f,\"attention_kernel_s\":%.4f,"
        "\"attention_kernel_gflops\":%.2f,\"attention_share_of_mha_layer\":%.3f,"
        "\"naive_ref_s\":%.4f,\"kernel_speedup_vs_ref\":%.1f,\"mha_tok_s\":%.1f,"
        "\"mamba2_tok_s\":%.1f}\n",
        (long long)L, (long long)dm, (long long)H, (long long)KV, (long long)P, num_threads(),
        t_mha, t_m2, t_mha / t_m2, t_attn, flops / t_attn * 1e-9, t_attn / t_mha, t_ref,
        t_ref > 0 ? t_ref / t_attn : 0.0, L / t_mha, L / t_m2);
    std::fflush(stdout);
  }
  return 0;
}
