// mambacpp shapes: print every op of one layer's forward (and one decode step) with its
// input and output shapes, then the parameter count.
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "mamba/nn/bimamba.h"
#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/mamba3.h"
#include "mamba/nn/mha.h"
#include "mamba/nn/ss2d.h"
#include "mamba/trace.h"

namespace mamba::cli {

namespace {
struct ShapesOpts {
  std::string layer = "mamba1";
  int64_t d_model = 16, d_state = -1, d_conv = 4, batch = 2, seqlen = 32;
  double expand = 2;
  int64_t headdim = 64, ngroups = 1, chunk_size = 256, dt_rank = -1;
  bool step = true;
  int64_t height = 8, width = 8;    // ss2d
  std::string forward_type = "v2";  // ss2d
  bool channel_first = false;       // ss2d
  bool mimo = false;                // mamba3
  int64_t rank = 4;                 // mamba3
  int64_t num_heads = 4, num_heads_kv = 0, head_dim = 0, rotary_emb_dim = 0, mlp_dim = 0;
  bool noncausal = false;
};

// VMamba's SS2D: a 2-D layer (no decode step); x is (B, H, W, d_model) or (B, d_model, H, W).
int trace_ss2d(const ShapesOpts& o, int64_t d_conv) {
  SS2DConfig c;
  c.d_model = o.d_model, c.d_conv = d_conv, c.ssm_ratio = o.expand, c.dt_rank = o.dt_rank;
  c.d_state = o.d_state > 0 ? o.d_state : 16;
  c.forward_type = o.forward_type, c.channel_first = o.channel_first;
  SS2D layer(c, 0);
  std::printf("ss2d (forward_type %s, %s): %lld parameters\n", c.forward_type.c_str(),
              c.channel_first ? "channel-first" : "channel-last",
              (long long)layer.params().count());
  for (const auto& p : layer.params().all())
    std::printf("  %-18s %s\n", p.name.c_str(), p.value.shape_str().c_str());
  Tensor x = c.channel_first ? Tensor({o.batch, o.d_model, o.height, o.width})
                             : Tensor({o.batch, o.height, o.width, o.d_model});
  trace::set_stream(&std::cout);
  trace::set_enabled(true);
  std::printf(
      "forward, x %s (inside: channel-last (B, H, W, C); the four scan orders are read "
      "in place):\n",
      x.shape_str().c_str());
  {
    trace::Scope scope("  ");
    layer.forward(x);
  }
  trace::set_enabled(false);
  return 0;
}

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
  if constexpr (requires { typename Layer::State; }) {
    if (o.step) {
      auto state = layer.new_state(o.batch);
      Tensor xt({o.batch, o.d_model});
      std::printf("step (one token of decode):\n");
      trace::Scope scope("  ");
      layer.step(xt, state);
    }
  } else {
    std::printf("(no decode step: the layer is bidirectional)\n");
  }
  trace::set_enabled(false);
  return 0;
}
}  // namespace

Command add_shapes(CLI::App& app) {
  auto o = std::make_shared<ShapesOpts>();
  auto* sub = app.add_subcommand(
      "shapes", "Trace one layer: every op of its forward and of one decode step, with shapes");
  sub->add_option("--layer", o->layer,
                  "mamba1, mamba2, mamba3, bimamba (Vim's bidirectional Mamba, forward only), "
                  "mha (attention) or ss2d (VMamba's 2-D scan)")
      ->check(CLI::IsMember({"mamba1", "mamba2", "mamba3", "bimamba", "mha", "ss2d"}))
      ->capture_default_str();
  sub->add_option("--d_model", o->d_model, "model width")->capture_default_str();
  sub->add_option("--d_state", o->d_state,
                  "N (default: 16 for mamba1, bimamba and ss2d, 128 for mamba2 and mamba3)");
  auto* dconv = sub->add_option("--d_conv", o->d_conv, "K, the conv width (ss2d: 3 unless given)")
                    ->capture_default_str();
  sub->add_option("--expand", o->expand, "d_inner = expand * d_model (ss2d: ssm_ratio)")
      ->capture_default_str();
  sub->add_option("--dt_rank", o->dt_rank,
                  "mamba1, bimamba, ss2d: R (default auto = ceil(d_model/16))");
  sub->add_option("--headdim", o->headdim, "mamba2, mamba3: P")->capture_default_str();
  sub->add_option("--ngroups", o->ngroups, "mamba2, mamba3: G")->capture_default_str();
  sub->add_option("--chunk_size", o->chunk_size, "mamba2: SSD chunk")->capture_default_str();
  sub->add_flag("--mimo", o->mimo, "mamba3: MIMO heads");
  sub->add_option("--rank", o->rank, "mamba3 --mimo: mimo_rank R")->capture_default_str();
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
  sub->add_option("--height", o->height, "ss2d: image height H")->capture_default_str();
  sub->add_option("--width", o->width, "ss2d: image width W")->capture_default_str();
  sub->add_option("--forward_type", o->forward_type, "ss2d: VMamba's forward_type")
      ->capture_default_str();
  sub->add_flag("--channel_first", o->channel_first, "ss2d: (B, C, H, W) tensors");
  return {sub, [o, dconv] {
            if (o->layer == "ss2d") return trace_ss2d(*o, dconv->count() ? o->d_conv : 3);
            if (o->layer == "mamba1") {
              Mamba1Config c;
              c.d_model = o->d_model, c.d_conv = o->d_conv, c.expand = o->expand,
              c.dt_rank = o->dt_rank;
              c.d_state = o->d_state > 0 ? o->d_state : 16;
              Mamba1 layer(c, 0);
              return trace_layer(layer, *o);
            }
            if (o->layer == "mamba3") {
              Mamba3Config c;
              c.d_model = o->d_model, c.expand = o->expand, c.headdim = o->headdim;
              c.ngroups = o->ngroups, c.chunk_size = o->chunk_size;
              c.d_state = o->d_state > 0 ? o->d_state : 128;
              c.is_mimo = o->mimo, c.mimo_rank = o->rank;
              Mamba3 layer(c, 0);
              return trace_layer(layer, *o);
            }
            if (o->layer == "bimamba") {
              BiMambaConfig c;  // as every released Vim model: (y_f + y_b) / 2
              c.d_model = o->d_model, c.d_conv = o->d_conv, c.expand = o->expand,
              c.dt_rank = o->dt_rank, c.if_divide_out = true;
              c.d_state = o->d_state > 0 ? o->d_state : 16;
              BiMamba layer(c, 0);
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
