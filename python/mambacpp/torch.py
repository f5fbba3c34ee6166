"""mambacpp.torch: PyTorch drop-ins for mamba_ssm's ``Mamba``, ``Mamba2`` and ``MambaLMHeadModel``.

Write ``from mambacpp.torch import Mamba`` where you wrote ``from mamba_ssm import Mamba``. The
modules take mamba_ssm's constructor arguments with its defaults, hold ordinary
``nn.Parameter``s under exactly mamba_ssm's ``state_dict()`` keys and shapes, and run the C++
kernels of mamba.cpp on the CPU: forward, backward (a ``torch.autograd.Function`` whose backward
is the C++ backward: gradients for the input and every parameter) and single-token decode
(``allocate_inference_cache`` / ``step`` / ``inference_params``).

How the parameters reach C++: the torch module owns them (plain ``nn.Parameter``s: optimisers,
``load_state_dict``, ``.data`` assignment, ``deepcopy``, ``torch.save`` all work as usual). Each
call hands their memory, with the input's, to the C++ layer as numpy views: no copies, and no
libtorch in the extension (it depends on Python and numpy only), so any torch version works.

Inputs must be float32 tensors on the CPU (anything else raises ``TypeError`` / ``ValueError``
naming the argument: no silent conversion); non-contiguous inputs are made contiguous (a copy).
Arguments that only choose a CUDA code path in mamba_ssm (``use_fast_path``, ``use_mem_eff_path``,
``sequence_parallel``, ``fused_add_norm``) are accepted and change nothing: the math is the same.
"""

import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _core

__all__ = [
    "Mamba",
    "Mamba2",
    "MambaConfig",
    "MambaLMHeadModel",
    "InferenceParams",
    "GatedMLP",
    "RMSNorm",
]


# ---- helpers ---------------------------------------------------------------------------------


def _check_device_dtype(owner, device, dtype):
    if device is not None and torch.device(device).type != "cpu":
        raise ValueError(f"{owner}: device={device!r}: mambacpp runs on the CPU (device='cpu' or None)")
    if dtype is not None and dtype != torch.float32:
        raise TypeError(f"{owner}: dtype={dtype}: mambacpp computes in float32 (dtype=torch.float32 or None)")


def _check_tensor(t, what, owner):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{owner}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{owner}: {what} is on {t.device}: mambacpp runs on the CPU (use .cpu())")
    if t.dtype != torch.float32:
        raise TypeError(
            f"{owner}: {what} has dtype {t.dtype}: mambacpp computes in float32 (convert with .float())"
        )


def _np(t):
    """A float32 CPU tensor as a numpy array over the same memory (a copy only if not contiguous)."""
    return t.detach().contiguous().numpy()


class _MixerFn(torch.autograd.Function):
    """y = layer(x) with the layer's parameters given as tensors; backward is the C++ backward."""

    @staticmethod
    def forward(ctx, core, state_sink, x, *params):
        xa = _np(x)
        pa = [_np(p) for p in params]
        train = any(ctx.needs_input_grad[2:])
        out = core.forward(xa, save=train, return_state=state_sink is not None, params=pa)
        if not isinstance(out, tuple):
            out = (out,)
        y = out[0]
        if train:
            ctx.core = core
            ctx.saved = out[1]
            ctx.save_for_backward(x, *params)  # torch's version checks: no in-place edits meanwhile
        if state_sink is not None:
            state_sink.append(out[-1])
        return torch.from_numpy(y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        params = ctx.saved_tensors[1:]
        grads = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
        dx = ctx.core.backward(
            ctx.saved,
            _np(dy.to(torch.float32)),
            params=[_np(p) for p in params],
            grads=[g.numpy() for g in grads],
        )
        need = ctx.needs_input_grad
        return (
            None,
            None,
            torch.from_numpy(dx) if need[2] else None,
            *[g if need[3 + i] else None for i, g in enumerate(grads)],
        )


class _ParamHolder(nn.Module):
    """A submodule that only holds parameters (e.g. Mamba2's gated RMSNorm weight)."""


class _MixerBase(nn.Module):
    """Shared by Mamba and Mamba2: parameters built from the C++ layer's list, forward, decode."""

    _core_cls = None
    _name = "Mixer"

    def _build(self, core, no_weight_decay=()):
        self._core = core
        names = core.param_names
        shapes = dict(zip(names, core.param_shapes))
        init = core.params
        self._param_refs = []  # (module, attribute) per name, in param_names order
        for name in names:
            shape = shapes[name]
            if "." in name:
                sub, attr = name.split(".", 1)
                if not hasattr(self, sub):
                    w = shapes.get(sub + ".weight")
                    has_bias = (sub + ".bias") in shapes
                    if w is not None and len(w) == 2:
                        mod = torch.nn.utils.skip_init(nn.Linear, w[1], w[0], bias=has_bias)
                    elif w is not None and len(w) == 3 and w[1] == 1:
                        mod = torch.nn.utils.skip_init(
                            nn.Conv1d, w[0], w[0], w[2], groups=w[0], padding=w[2] - 1, bias=has_bias
                        )
                    else:
                        mod = _ParamHolder()
                    setattr(self, sub, mod)
                mod = getattr(self, sub)
                if not isinstance(getattr(mod, attr, None), nn.Parameter):
                    mod.register_parameter(attr, nn.Parameter(torch.empty(shape)))
            else:
                mod, attr = self, name
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            p = getattr(mod, attr)
            assert tuple(p.shape) == tuple(shape), name
            with torch.no_grad():
                p.copy_(torch.from_numpy(init[name]))
            if name in no_weight_decay:
                p._no_weight_decay = True
            self._param_refs.append((mod, attr))

    def _params(self):
        ps = [getattr(m, a) for m, a in self._param_refs]
        for (m, a), p in zip(self._param_refs, ps):
            if p.device.type != "cpu" or p.dtype != torch.float32:
                _check_tensor(p, f"parameter {a}", self._name)
        return ps

    def _run(self, x, state_sink=None):
        return _MixerFn.apply(self._core, state_sink, x, *self._params())

    def _forward_seq(self, x, inference_params):
        _check_tensor(x, "hidden_states", self._name)
        if x.dim() != 3:
            raise ValueError(f"{self._name}: hidden_states must be (batch, seqlen, d_model), got {tuple(x.shape)}")
        if inference_params is None:
            return self._run(x)
        conv_state, ssm_state = self._get_states_from_cache(inference_params, x.shape[0])
        if inference_params.seqlen_offset > 0:
            out, _, _ = self.step(x, conv_state, ssm_state)
            return out
        sink = []
        y = self._run(x, sink)
        st = sink[0]
        with torch.no_grad():
            for dst, src in zip((conv_state, ssm_state), st.arrays()):
                dst.copy_(torch.from_numpy(src))
        return y

    def step(self, hidden_states, conv_state, ssm_state):
        """One token: hidden_states (B, 1, d_model) -> (out (B, 1, d_model), conv_state, ssm_state),
        the states updated in place (as mamba_ssm's step). Not differentiable."""
        _check_tensor(hidden_states, "hidden_states", self._name)
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(
                f"{self._name}.step: hidden_states must be (batch, 1, d_model), got {tuple(hidden_states.shape)}"
            )
        states = (conv_state, ssm_state)
        arrays = []
        for name, s in zip(("conv_state", "ssm_state"), states):
            _check_tensor(s, name, self._name)
            arrays.append(s.detach().numpy() if s.is_contiguous() else s.detach().contiguous().numpy())
        x = _np(hidden_states[:, 0])
        y = self._core.step(x, arrays, params=[_np(p) for p in self._params()])
        with torch.no_grad():
            for s, a in zip(states, arrays):  # non-contiguous states were stepped in a copy
                if not s.is_contiguous():
                    s.copy_(torch.from_numpy(a))
        return torch.from_numpy(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """Zeroed (conv_state, ssm_state) for batch_size sequences (any length: the size is fixed)."""
        _check_device_dtype(self._name, None, dtype)
        shapes = self._core.state_shapes(batch_size)
        return tuple(torch.zeros(tuple(s), dtype=torch.float32) for s in shapes)

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError(f"{self._name}: inference_params needs the layer built with layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state

    def __getstate__(self):  # pickling / deepcopy: the C++ layer is rebuilt from the config
        d = self.__dict__.copy()
        d["_core"] = (type(self._core), self._core.config)
        return d

    def __setstate__(self, d):
        cls, cfg = d["_core"]
        cfg = dict(cfg)
        d["_core"] = cls(cfg.pop("d_model"), **cfg)
        super().__setstate__(d)


def _seed():
    """A seed for the C++ initialisation drawn from torch's RNG (torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class Mamba(_MixerBase):
    """mamba_ssm.modules.mamba_simple.Mamba on mamba.cpp's CPU kernels (see the module docstring).

    forward(hidden_states (B, L, d_model), inference_params=None) -> (B, L, d_model).
    """

    _name = "Mamba"

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        use_fast_path=True,  # a CUDA kernel choice in mamba_ssm: accepted, same math
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_device_dtype("Mamba", device, dtype)
        core = _core.Mamba1(
            d_model,
            seed=_seed(),
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init=dt_init,
            dt_scale=dt_scale,
            dt_init_floor=dt_init_floor,
            conv_bias=conv_bias,
            bias=bias,
        )
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self._build(core, no_weight_decay=("A_log", "D"))
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden_states, inference_params=None):
        return self._forward_seq(hidden_states, inference_params)


class Mamba2(_MixerBase):
    """mamba_ssm.modules.mamba2.Mamba2 on mamba.cpp's CPU kernels (see the module docstring).

    forward(u (B, L, d_model) or (B*L, d_model) with seqlen=L, inference_params=None).
    """

    _name = "Mamba2"

    def __init__(
        self,
        d_model,
        d_state=128,
        d_conv=4,
        conv_init=None,
        expand=2,
        headdim=64,
        d_ssm=None,
        ngroups=1,
        A_init_range=(1, 16),
        D_has_hdim=False,
        rmsnorm=True,
        norm_before_gate=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        dt_limit=(0.0, float("inf")),
        bias=False,
        conv_bias=True,
        chunk_size=256,
        use_mem_eff_path=True,  # a CUDA kernel choice: accepted, same math
        layer_idx=None,
        process_group=None,
        sequence_parallel=True,  # tensor parallelism only: accepted, no effect without process_group
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_device_dtype("Mamba2", device, dtype)
        if process_group is not None:
            raise ValueError("Mamba2: process_group (tensor parallelism across GPUs) is not supported")
        core = _core.Mamba2(
            d_model,
            seed=_seed(),
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            headdim=headdim,
            d_ssm=d_ssm,
            ngroups=ngroups,
            A_init_range=list(A_init_range),
            D_has_hdim=D_has_hdim,
            rmsnorm=rmsnorm,
            norm_before_gate=norm_before_gate,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init_floor=dt_init_floor,
            dt_limit=list(dt_limit),
            bias=bias,
            conv_bias=conv_bias,
            chunk_size=chunk_size,
        )
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = dt_limit
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self._build(core, no_weight_decay=("A_log", "D", "dt_bias"))
        if conv_init is not None:
            with torch.no_grad():
                nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        if seq_idx is not None or cu_seqlens is not None:
            raise ValueError("Mamba2: seq_idx / cu_seqlens (packed variable-length sequences) are not supported")
        if seqlen is None:
            return self._forward_seq(u, inference_params)
        _check_tensor(u, "u", self._name)
        if u.dim() != 2 or u.shape[0] % seqlen:
            raise ValueError(f"Mamba2: with seqlen={seqlen}, u must be (batch*seqlen, d_model), got {tuple(u.shape)}")
        y = self._forward_seq(u.reshape(u.shape[0] // seqlen, seqlen, u.shape[1]), inference_params)
        return y.reshape(u.shape[0], -1)


# ---- the language model ----------------------------------------------------------------------


class RMSNorm(nn.Module):
    """mamba_ssm's RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        _check_device_dtype("RMSNorm", device, dtype)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x):
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class GatedMLP(nn.Module):
    """mamba_ssm.modules.mlp.GatedMLP: fc1 -> value * silu(gate) -> fc2 (pure torch)."""

    def __init__(
        self, in_features, hidden_features=None, out_features=None, activation=F.silu, bias=False,
        multiple_of=128, device=None, dtype=None,
    ):
        super().__init__()
        _check_device_dtype("GatedMLP", device, dtype)
        out_features = out_features if out_features is not None else in_features
        hidden_features = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden_features = (hidden_features + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.activation = activation
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x):
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * self.activation(gate))


@dataclass
class MambaConfig:
    """mamba_ssm.models.config_mamba.MambaConfig (the same fields and defaults)."""

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True  # a CUDA kernel choice: accepted, same math
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True


@dataclass
class InferenceParams:
    """mamba_ssm.utils.generation.InferenceParams: the decode cache handed to forward."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[torch.Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


class Block(nn.Module):
    """mamba_ssm.modules.block.Block (the add -> norm -> mixer [-> add -> norm2 -> mlp] order)."""

    def __init__(self, dim, mixer, norm, mlp=None, residual_in_fp32=True):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.norm = norm
        self.mixer = mixer
        if mlp is not None:
            self.norm2 = nn.LayerNorm(dim) if isinstance(norm, nn.LayerNorm) else RMSNorm(dim, eps=norm.eps)
            self.mlp = mlp
        else:
            self.mlp = None

    def forward(self, hidden_states, residual=None, inference_params=None):
        residual = (hidden_states + residual) if residual is not None else hidden_states
        hidden_states = self.norm(residual.to(dtype=self.norm.weight.dtype))
        if self.residual_in_fp32:
            residual = residual.to(torch.float32)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params)
        if self.mlp is not None:
            residual = hidden_states + residual
            hidden_states = self.norm2(residual.to(dtype=self.norm2.weight.dtype))
            if self.residual_in_fp32:
                residual = residual.to(torch.float32)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)


class MixerModel(nn.Module):
    """mamba_ssm.models.mixer_seq_simple.MixerModel: embedding, n_layer Blocks, norm_f."""

    def __init__(self, config, vocab_size):
        super().__init__()
        ssm_cfg = dict(config.ssm_cfg or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        mixers = {"Mamba1": Mamba, "Mamba2": Mamba2}
        if layer not in mixers:
            raise ValueError(f"MambaLMHeadModel: ssm_cfg.layer={layer!r}: mambacpp.torch has Mamba1 and Mamba2")
        if config.attn_layer_idx:
            raise ValueError("MambaLMHeadModel: attention layers (attn_layer_idx) are not supported by mambacpp.torch yet")
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(vocab_size, config.d_model)
        d = config.d_model

        def norm():
            return RMSNorm(d, eps=1e-5) if config.rms_norm else nn.LayerNorm(d, eps=1e-5)

        self.layers = nn.ModuleList(
            Block(
                d,
                mixers[layer](d, layer_idx=i, **ssm_cfg),
                norm(),
                GatedMLP(d, hidden_features=config.d_intermediate, out_features=d)
                if config.d_intermediate > 0
                else None,
                residual_in_fp32=config.residual_in_fp32,
            )
            for i in range(config.n_layer)
        )
        self.norm_f = norm()

    def forward(self, input_ids, inference_params=None):
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params)
        residual = (hidden_states + residual) if residual is not None else hidden_states
        return self.norm_f(residual.to(dtype=self.norm_f.weight.dtype))


CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


@dataclass
class GenerateOutput:
    """What generate(..., return_dict_in_generate=True) returns (mamba_ssm's fields)."""

    sequences: torch.Tensor
    scores: tuple = ()


def _init_lm_weights(model, n_layer, n_residuals_per_layer):
    """mamba_ssm's _init_weights (initializer_range 0.02, rescale_prenorm_residual)."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
    for name, p in model.named_parameters():
        if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            with torch.no_grad():
                p /= math.sqrt(n_residuals_per_layer * n_layer)


class MambaLMHeadModel(nn.Module):
    """mamba_ssm.models.mixer_seq_simple.MambaLMHeadModel on mamba.cpp's CPU kernels.

    forward(input_ids (B, L), inference_params=None, num_last_tokens=0) -> CausalLMOutput(logits),
    generate(input_ids, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, ...),
    from_pretrained(folder) (a local folder: config.json + model.safetensors or
    pytorch_model.bin), save_pretrained(folder).
    """

    def __init__(self, config, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        _check_device_dtype("MambaLMHeadModel", device, dtype)
        if isinstance(config, dict):
            config = MambaConfig(**config)
        self.config = config
        vocab_size = config.vocab_size
        m = config.pad_vocab_size_multiple
        if vocab_size % m:
            vocab_size += m - vocab_size % m
        self.backbone = MixerModel(config, vocab_size)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False)
        _init_lm_weights(self, config.n_layer, 1 if config.d_intermediate == 0 else 2)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {
            i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
            for i, layer in enumerate(self.backbone.layers)
        }

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, **mixer_kwargs):
        if mixer_kwargs:
            raise ValueError(f"MambaLMHeadModel.forward: unsupported arguments {sorted(mixer_kwargs)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("MambaLMHeadModel: input_ids must be an integer tensor (batch, seqlen)")
        hidden_states = self.backbone(input_ids, inference_params=inference_params)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        return CausalLMOutput(logits=self.lm_head(hidden_states))

    @torch.no_grad()
    def generate(
        self, input_ids, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
        return_dict_in_generate=False, output_scores=False, repetition_penalty=1.0,
        eos_token_id=None, vocab_size=None, **kwargs,
    ):
        """mamba_ssm's generate/decode: prefill, then one cached step per token until max_length
        (prompt included) or every sequence produced eos_token_id. top_k=1 is greedy; otherwise
        sampling with temperature, top_k, top_p, min_p (torch's RNG: torch.manual_seed). Returns
        the sequences (B, max_length), or GenerateOutput(sequences, scores) with
        return_dict_in_generate. CUDA-only options (cg, enable_timing, streamer) are accepted."""
        unknown = set(kwargs) - {"cg", "enable_timing", "streamer", "teacher_outputs"}
        if unknown:
            raise ValueError(f"generate: unsupported arguments {sorted(unknown)}")
        if kwargs.get("teacher_outputs") is not None:
            raise ValueError("generate: teacher_outputs is not supported")
        batch_size, seqlen = input_ids.shape
        inference_params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
        scores, sequences = [], [input_ids]
        sequences_cat = input_ids

        def should_stop(current_token):
            if inference_params.seqlen_offset == 0:
                return False
            if eos_token_id is not None and (current_token == eos_token_id).all():
                return True
            return inference_params.seqlen_offset >= max_length - 1

        while not should_stop(sequences[-1]):
            logits = self(sequences[-1], inference_params=inference_params, num_last_tokens=1).logits.squeeze(1)
            if vocab_size is not None:
                logits = logits[..., :vocab_size]
            scores.append(logits)
            inference_params.seqlen_offset += sequences[-1].shape[1]
            if repetition_penalty != 1.0:
                logits = _repetition_penalty(logits.clone(), sequences_cat, repetition_penalty)
            token = _sample(logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature).unsqueeze(1)
            sequences_cat = torch.cat([sequences_cat, token], dim=1)
            sequences.append(token)
        out = torch.cat(sequences, dim=1)
        if return_dict_in_generate:
            return GenerateOutput(sequences=out, scores=tuple(scores) if output_scores else ())
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs):
        """A local model folder (config.json + model.safetensors or pytorch_model.bin, mamba_ssm's
        names). Nothing is downloaded: fetch the hub folder first."""
        _check_device_dtype("MambaLMHeadModel.from_pretrained", device, dtype)
        if kwargs:
            raise ValueError(f"from_pretrained: unsupported arguments {sorted(kwargs)}")
        folder = str(pretrained_model_name)
        if not os.path.isdir(folder):
            raise ValueError(f"from_pretrained: {folder!r} is not a local folder (mambacpp downloads nothing)")
        with open(os.path.join(folder, "config.json")) as f:
            raw = json.load(f)
        known = set(MambaConfig.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"from_pretrained: config.json has keys mambacpp.torch does not know: {sorted(unknown)}")
        model = cls(MambaConfig(**raw))
        st = os.path.join(folder, "model.safetensors")
        if os.path.exists(st):
            arrays, _ = _core.load_safetensors(st)
            sd = {k: torch.from_numpy(v) for k, v in arrays.items()}
        else:
            sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu")
        if model.config.tie_embeddings and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["backbone.embedding.weight"]
        model.load_state_dict(sd)
        return model

    def save_pretrained(self, save_directory):
        """config.json and pytorch_model.bin, as mamba_ssm writes them."""
        os.makedirs(save_directory, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(save_directory, "pytorch_model.bin"))
        with open(os.path.join(save_directory, "config.json"), "w") as f:
            json.dump(self.config.__dict__, f, indent=4)


def _repetition_penalty(logits, prev_tokens, penalty):
    score = torch.gather(logits, 1, prev_tokens)
    score = torch.where(score < 0, score * penalty, score / penalty)
    logits.scatter_(1, prev_tokens, score)
    return logits


def _sample(logits, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0):
    """mamba_ssm's sample(): top_k=1 is argmax; else temperature, top-k, top-p, min-p filtering
    and a draw from torch's RNG."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"generate: temperature={temperature} must be > 0")
    logits = logits.float() / temperature
    if top_k > 0:
        k = min(top_k, logits.size(-1))
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        logits = logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(-1)
