// mambacpp shapes: print every op of one layer's forward (and one decode step) with its
// input and output shapes, then the parameter count.
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/mha.h"
#include "mamba/trace.h"

namespace mamba::cli {

namespace {
struct ShapesOpts {
  std::string layer = "mamba1";
  int64_t d_model = 16, d_state = -1, d_conv = 4, batch = 2, seqlen = 32;
  double expand = 2;
  int64_t headdim = 64, ngroups = 1, chunk_size = 256, dt_rank = -1;
  bool step = true;
  int64_t num_heads = 4, num_heads_kv = 0, head_dim = 0, rotary_emb_dim = 0, mlp_dim = 0;
  bool noncausal = false;
};

template <class Layer>
int trace_layer(Layer& layer, const ShapesOpts& o) {
  std::printf("%s: %lld parameters\n", o.layer.c_str(), (long long)layer.params().count());
  for (const auto& p : layer.params().all())
    std::printf("  %-18s %s\n", p.name.c_str(), p.value.shape_str().c_str());
  Tensor x({o.batch, o.seqlen, o.d_model});
  trace::set_stream(&std::cout);
  trace::set_enabled(true);
  std::printf("forward, hidden %s:\n", x.shape_str().c_str());
  {
    trace::Scope scope("  ");
    layer.forward(x);
  }
  if (o.step) {
    auto state = layer.new_state(o.batch);
    Tensor xt({o.batch, o.d_model});
    std::printf("step (one token of decode):\n");
    trace::Scope scope("  ");
    layer.step(xt, state);
  }
  trace::set_enabled(false);
  return 0;
}
}  // namespace

Command add_shapes(CLI::App& app) {
  auto o = std::make_shared<ShapesOpts>();
  auto* sub = app.add_subcommand(
      "shapes", "Trace one layer: every op of its forward and of one decode step, with shapes");
  sub->add_option("--layer", o->layer, "mamba1, mamba2 or mha (attention)")
      ->check(CLI::IsMember({"mamba1", "mamba2", "mha"}))
      ->capture_default_str();
  sub->add_option("--d_model", o->d_model, "model width")->capture_default_str();
  sub->add_option("--d_state", o->d_state, "N (default: 16 for mamba1, 128 for mamba2)");
  sub->add_option("--d_conv", o->d_conv, "K, the conv width")->capture_default_str();
  sub->add_option("--expand", o->expand, "d_inner = expand * d_model")->capture_default_str();
  sub->add_option("--dt_rank", o->dt_rank, "mamba1: R (default auto = ceil(d_model/16))");
  sub->add_option("--headdim", o->headdim, "mamba2: P")->capture_default_str();
  sub->add_option("--ngroups", o->ngroups, "mamba2: G")->capture_default_str();
  sub->add_option("--chunk_size", o->chunk_size, "mamba2: SSD chunk")->capture_default_str();
  sub->add_option("--num_heads", o->num_heads, "mha: H")->capture_default_str();
  sub->add_option("--num_heads_kv", o->num_heads_kv, "mha: KV heads (default H)");
  sub->add_option("--head_dim", o->head_dim, "mha: P (default d_model / H)");
  sub->add_option("--rotary_emb_dim", o->rotary_emb_dim, "mha: rotary dims per head")
      ->capture_default_str();
  sub->add_option("--mlp_dim", o->mlp_dim, "mha: fused MLP width (rounded up to 256)")
      ->capture_default_str();
  sub->add_flag("--noncausal", o->noncausal, "mha: non-causal attention");
  sub->add_option("--batch", o->batch, "B")->capture_default_str();
  sub->add_option("--seqlen", o->seqlen, "L")->capture_default_str();
  sub->add_flag("!--no-step", o->step, "do not trace a decode step");
  return {sub, [o] {
            if (o->layer == "mamba1") {
              Mamba1Config c;
              c.d_model = o->d_model, c.d_conv = o->d_conv, c.expand = o->expand,
              c.dt_rank = o->dt_rank;
              c.d_state = o->d_state > 0 ? o->d_state : 16;
              Mamba1 layer(c, 0);
              return trace_layer(layer, *o);
            }
            if (o->layer == "mha") {  // d_conv here is MHA's qkv conv (0 = none)
              MHAConfig c;
              c.d_model = o->d_model, c.num_heads = o->num_heads, c.num_heads_kv = o->num_heads_kv;
              c.head_dim = o->head_dim, c.rotary_emb_dim = o->rotary_emb_dim;
              c.mlp_dim = o->mlp_dim, c.d_conv = o->d_conv, c.causal = !o->noncausal;
              MHA layer(c, 0);
              return trace_layer(layer, *o);
            }
            Mamba2Config c;
            c.d_model = o->d_model, c.d_conv = o->d_conv, c.expand = o->expand;
            c.headdim = o->headdim, c.ngroups = o->ngroups, c.chunk_size = o->chunk_size;
            c.d_state = o->d_state > 0 ? o->d_state : 128;
            Mamba2 layer(c, 0);
            return trace_layer(layer, *o);
          }};
}

}  // namespace mamba::cli
