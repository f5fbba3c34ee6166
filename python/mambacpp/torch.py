"""mambacpp.torch: PyTorch drop-ins for mamba_ssm's ``Mamba``, ``Mamba2``, ``Mamba3``, ``MHA``,
``GatedMLP`` and ``MambaLMHeadModel``, VMamba's ``SS2D`` and ``VSSBlock``, Vim's bidirectional
Mamba (``BiMamba``), and the spatio-temporal block ``STBlock``.

Write ``from mambacpp.torch import Mamba`` where you wrote ``from mamba_ssm import Mamba``. The
modules take the official constructor arguments with their defaults, hold ordinary
``nn.Parameter``s under exactly the official ``state_dict()`` keys and shapes, and run the C++
kernels of mamba.cpp on the CPU: forward, backward (a ``torch.autograd.Function`` whose backward
is the C++ backward: gradients for the input and every parameter) and, for the causal mixers,
single-token decode (``allocate_inference_cache`` / ``step`` / ``inference_params``).

How the parameters reach C++: the torch module owns them (plain ``nn.Parameter``s: optimisers,
``load_state_dict``, ``.data`` assignment, ``deepcopy``, ``torch.save`` all work as usual). Each
call hands their memory, with the input's, to the C++ layer as numpy views: no copies, and no
libtorch in the extension (it depends on Python and numpy only), so any torch version works.

Inputs must be float32 tensors on the CPU (anything else raises ``TypeError`` / ``ValueError``
naming the argument: no silent conversion); non-contiguous inputs are made contiguous (a copy).
Arguments that only choose a CUDA code path in mamba_ssm (``use_fast_path``, ``use_mem_eff_path``,
``sequence_parallel``, ``fused_add_norm``) are accepted and change nothing: the math is the same.
"""

import functools
import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _core

__all__ = [
    "Mamba",
    "Mamba2",
    "Mamba3",
    "MHA",
    "GatedMLP",
    "SS2D",
    "VSSBlock",
    "BiMamba",
    "STBlock",
    "MambaConfig",
    "MambaLMHeadModel",
    "InferenceParams",
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


def _seed():
    """A seed for the C++ initialisation drawn from torch's RNG (torch.manual_seed reproduces it)."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class _LayerFn(torch.autograd.Function):
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
        # Zeroed buffers from the C++ library's tensor cache (reused memory: no page faults on
        # every call, as torch.zeros of a fresh block has).
        grads = [torch.from_numpy(_core._zeros(tuple(p.shape))) for p in params]
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


def _submodule_for(prefix, shapes):
    """The torch module that holds `prefix`.weight / .bias in the official code (by shape):
    nn.Linear for a 2-D weight, a depthwise nn.Conv1d / nn.Conv2d for (C, 1, K) / (C, 1, k, k);
    a plain holder otherwise (norms, MLP containers)."""
    w = shapes.get(prefix + ".weight")
    has_bias = (prefix + ".bias") in shapes
    if w is not None and len(w) == 2:
        return torch.nn.utils.skip_init(nn.Linear, w[1], w[0], bias=has_bias)
    if w is not None and len(w) == 3 and w[1] == 1:
        return torch.nn.utils.skip_init(nn.Conv1d, w[0], w[0], w[2], groups=w[0], padding=w[2] - 1, bias=has_bias)
    if w is not None and len(w) == 4 and w[1] == 1 and w[2] == w[3]:
        return torch.nn.utils.skip_init(
            nn.Conv2d, w[0], w[0], w[2], groups=w[0], padding=(w[2] - 1) // 2, bias=has_bias
        )
    return _ParamHolder()


class _CoreModule(nn.Module):
    """Shared by every mambacpp.torch layer: the argument checks, the C++ layer (a mambacpp._core
    class), parameters built from its list under the official state_dict keys, the autograd
    Function, decode states and pickling. A subclass gives the official constructor signature and
    calls _init_core; see docs/ARCHITECTURE.md, "Python"."""

    _name = "Layer"

    def _init_core(self, core_cls, *args, device=None, dtype=None, no_weight_decay=(), **kwargs):
        _check_device_dtype(self._name, device, dtype)
        core = core_cls(*args, seed=_seed(), **kwargs)
        self._core = core
        names = core.param_names
        shapes = dict(zip(names, core.param_shapes))
        init = core.params
        self._param_refs = []  # (module, attribute) per name, in param_names order
        for name in names:
            parts = name.split(".")
            mod = self
            for i, part in enumerate(parts[:-1]):
                if part not in mod._modules:
                    prefix = ".".join(parts[: i + 1])
                    sub = _submodule_for(prefix, shapes) if i == len(parts) - 2 else _ParamHolder()
                    setattr(mod, part, sub)
                mod = getattr(mod, part)
            attr = parts[-1]
            if not isinstance(getattr(mod, attr, None), nn.Parameter):
                mod.register_parameter(attr, nn.Parameter(torch.empty(shapes[name])))
            p = getattr(mod, attr)
            assert tuple(p.shape) == tuple(shapes[name]), name
            # The parameter's memory is the C++ layer's own (a writable numpy view that keeps the
            # layer alive): one copy of the weights, not two. Every call still passes the
            # parameters explicitly, so a parameter whose .data is later replaced (.to(), a
            # deepcopy) is used as it is.
            p.data = torch.from_numpy(init[name])
            if attr in no_weight_decay or name in no_weight_decay:
                p._no_weight_decay = True
            self._param_refs.append((mod, attr))

    def _params(self):
        ps = [getattr(m, a) for m, a in self._param_refs]
        for (m, a), p in zip(self._param_refs, ps):
            if p.device.type != "cpu" or p.dtype != torch.float32:
                _check_tensor(p, f"parameter {a}", self._name)
        return ps

    def _check_input(self, x, what, layout, ndim):
        """x must be a float32 CPU tensor with ndim dimensions (the sizes are checked by C++)."""
        _check_tensor(x, what, self._name)
        if x.dim() != ndim:
            raise ValueError(f"{self._name}: {what} must be {layout}, got shape {tuple(x.shape)}")

    def _run(self, x, state_sink=None):
        return _LayerFn.apply(self._core, state_sink, x, *self._params())

    def __getstate__(self):  # pickling / deepcopy: the C++ layer is rebuilt from the config
        d = self.__dict__.copy()
        d["_core"] = (type(self._core), self._core.config)
        return d

    def __setstate__(self, d):
        cls, cfg = d["_core"]
        d["_core"] = cls(**cfg)
        super().__setstate__(d)


class _DecodeMixer(_CoreModule):
    """A causal sequence mixer with mamba_ssm's decode API: forward(x, inference_params), step,
    allocate_inference_cache. Fixed-size states (Mamba, Mamba2, Mamba3) are tensors in
    inference_params.key_value_memory_dict[layer_idx], in the official order; MHA's growing KV cache
    is an opaque mambacpp.MHAState there."""

    _state_arrays = True  # False: the cache is an opaque _core State object (MHA)

    def _forward_seq(self, x, inference_params, what="hidden_states"):
        self._check_input(x, what, "(batch, seqlen, d_model)", 3)
        if inference_params is None:
            return self._run(x)
        states = self._get_states_from_cache(inference_params, x.shape[0])
        if inference_params.seqlen_offset > 0:
            if not self._state_arrays:
                return self._step_opaque(x, states)
            return torch.cat([self.step(x[:, i : i + 1], *states)[0] for i in range(x.shape[1])], 1)
        sink = []
        y = self._run(x, sink)
        if self._state_arrays:
            with torch.no_grad():
                for dst, src in zip(states, sink[0].arrays()):
                    dst.copy_(torch.from_numpy(src))
        else:
            inference_params.key_value_memory_dict[self.layer_idx] = sink[0]
        return y

    def _step_opaque(self, x, state):
        params = [_np(p) for p in self._params()]
        with torch.no_grad():
            ys = [torch.from_numpy(self._core.step(_np(x[:, i]), state, params=params)) for i in range(x.shape[1])]
        return torch.stack(ys, 1)

    def step(self, hidden_states, *states):
        """One token: hidden_states (B, 1, d_model) or (B, d_model) -> (out of the same shape, *states),
        the states updated in place (as the official step). Not differentiable."""
        _check_tensor(hidden_states, "hidden_states", self._name)
        squeeze = hidden_states.dim() == 3
        if not (hidden_states.dim() == 2 or (squeeze and hidden_states.shape[1] == 1)):
            raise ValueError(
                f"{self._name}.step: hidden_states must be (batch, 1, d_model) or (batch, d_model), "
                f"got {tuple(hidden_states.shape)}"
            )
        x = _np(hidden_states[:, 0] if squeeze else hidden_states)
        if not self._state_arrays:
            if len(states) != 1:
                raise ValueError(f"{self._name}.step: expected one state (allocate_inference_cache's), got {len(states)}")
            with torch.no_grad():
                y = torch.from_numpy(self._core.step(x, states[0], params=[_np(p) for p in self._params()]))
            return (y.unsqueeze(1) if squeeze else y), states[0]
        names = self._state_names()
        if len(states) != len(names):
            raise ValueError(f"{self._name}.step: expected the states {', '.join(names)}, got {len(states)} tensors")
        arrays = []
        for name, s in zip(names, states):
            _check_tensor(s, name, self._name)
            arrays.append(s.detach().numpy() if s.is_contiguous() else s.detach().contiguous().numpy())
        y = self._core.step(x, arrays, params=[_np(p) for p in self._params()])
        with torch.no_grad():
            for s, a in zip(states, arrays):  # non-contiguous states were stepped in a copy
                if not s.is_contiguous():
                    s.copy_(torch.from_numpy(a))
        y = torch.from_numpy(y)
        return ((y.unsqueeze(1) if squeeze else y), *states)

    def _state_names(self):
        return self._core.state_names

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """Zeroed decode states for batch_size sequences (any length: their size is fixed; MHA's KV
        cache grows as tokens arrive), in the official order."""
        _check_device_dtype(self._name, None, dtype)
        if not self._state_arrays:
            return self._core.new_state(batch_size)
        shapes = self._core.state_shapes(batch_size)
        return tuple(torch.zeros(tuple(s), dtype=torch.float32) for s in shapes)

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        if self.layer_idx is None:
            raise ValueError(f"{self._name}: inference_params needs the layer built with layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache or initialize_states:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        return cache[self.layer_idx]


def _set_mamba1_attributes(m, d_model, d_state, d_conv, expand, dt_rank, use_fast_path, layer_idx):
    """The attributes mamba_ssm's Mamba (and Vim's, which extends it) sets from its arguments."""
    m.d_model = d_model
    m.d_state = d_state
    m.d_conv = d_conv
    m.expand = expand
    m.d_inner = int(expand * d_model)
    m.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    m.use_fast_path = use_fast_path
    m.layer_idx = layer_idx


class Mamba(_DecodeMixer):
    """mamba_ssm.modules.mamba_simple.Mamba on mamba.cpp's CPU kernels (see the module docstring).

    forward(hidden_states (B, L, d_model), inference_params=None) -> (B, L, d_model);
    step(hidden_states (B, 1, d_model), conv_state, ssm_state).
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
        self._init_core(
            _core.Mamba1, d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
            dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
            conv_bias=conv_bias, bias=bias, device=device, dtype=dtype, no_weight_decay=("A_log", "D"),
        )
        _set_mamba1_attributes(self, d_model, d_state, d_conv, expand, dt_rank, use_fast_path, layer_idx)
        self.activation = "silu"
        self.dt_proj.bias._no_reinit = True

    def forward(self, hidden_states, inference_params=None):
        return self._forward_seq(hidden_states, inference_params)


class Mamba2(_DecodeMixer):
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
        if process_group is not None:
            raise ValueError("Mamba2: process_group (tensor parallelism across GPUs) is not supported")
        self._init_core(
            _core.Mamba2, d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
            d_ssm=d_ssm, ngroups=ngroups, A_init_range=list(A_init_range), D_has_hdim=D_has_hdim,
            rmsnorm=rmsnorm, norm_before_gate=norm_before_gate, dt_min=dt_min, dt_max=dt_max,
            dt_init_floor=dt_init_floor, dt_limit=list(dt_limit), bias=bias, conv_bias=conv_bias,
            chunk_size=chunk_size, device=device, dtype=dtype, no_weight_decay=("A_log", "D", "dt_bias"),
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
        if conv_init is not None:
            with torch.no_grad():
                nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        if seq_idx is not None or cu_seqlens is not None:
            raise ValueError("Mamba2: seq_idx / cu_seqlens (packed variable-length sequences) are not supported")
        if seqlen is None:
            return self._forward_seq(u, inference_params, "u")
        self._check_input(u, "u", f"(batch*seqlen, d_model) with seqlen={seqlen}", 2)
        if u.shape[0] % seqlen:
            raise ValueError(f"Mamba2: with seqlen={seqlen}, u must be (batch*seqlen, d_model), got {tuple(u.shape)}")
        y = self._forward_seq(u.reshape(u.shape[0] // seqlen, seqlen, u.shape[1]), inference_params, "u")
        return y.reshape(u.shape[0], -1)


class Mamba3(_DecodeMixer):
    """mamba_ssm.modules.mamba3.Mamba3 (SISO and MIMO) on mamba.cpp's CPU kernels.

    forward(u (B, L, d_model), inference_params=None) -> (B, L, d_model);
    step(u (B, d_model) or (B, 1, d_model), angle_state, ssm_state, k_state, v_state) ->
    (out, angle_state, ssm_state, k_state, v_state), the states updated in place. Unlike the
    official module, cached decode through forward(inference_params, seqlen_offset > 0) works, and
    step works for any ngroups dividing nheads.
    """

    _name = "Mamba3"

    def __init__(
        self,
        d_model,
        d_state=128,
        expand=2,
        headdim=64,
        ngroups=1,
        rope_fraction=0.5,
        dt_min=0.001,
        dt_max=0.1,
        dt_init_floor=1e-4,
        A_floor=1e-4,
        is_outproj_norm=False,
        is_mimo=False,
        mimo_rank=4,
        chunk_size=64,  # a kernel tiling choice: the math does not depend on it
        dropout=0.0,  # absorbed, as mamba_ssm does
        layer_idx=None,
        n_layer=None,  # absorbed, as mamba_ssm does
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:  # mamba_ssm swallows unknown keywords; a typo would then go unnoticed
            raise TypeError(f"Mamba3: unexpected arguments {sorted(kwargs)}")
        self._init_core(
            _core.Mamba3, d_model, d_state=d_state, expand=expand, headdim=headdim, ngroups=ngroups,
            rope_fraction=rope_fraction, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor,
            A_floor=A_floor, is_outproj_norm=is_outproj_norm, is_mimo=is_mimo, mimo_rank=mimo_rank,
            chunk_size=chunk_size, device=device, dtype=dtype, no_weight_decay=("dt_bias", "D"),
        )
        self.d_model = d_model
        self.d_state = d_state
        self.expand = expand
        self.headdim = headdim
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.A_floor = A_floor
        self.is_outproj_norm = is_outproj_norm
        self.is_mimo = is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        self.d_inner = int(expand * d_model)
        self.nheads = self.d_inner // headdim
        self.num_bc_heads = ngroups
        self.num_rope_angles = self._core.state_shapes(1)[0][2]

    def forward(self, u, seq_idx=None, cu_seqlens=None, inference_params=None):
        if seq_idx is not None or cu_seqlens is not None:
            raise ValueError("Mamba3: seq_idx / cu_seqlens (packed variable-length sequences) are not supported")
        return self._forward_seq(u, inference_params, "u")


class MHA(_DecodeMixer):
    """mamba_ssm.modules.mha.MHA on mamba.cpp's CPU kernels: GQA (num_heads_kv), head_dim, rotary
    (interleaved or not, rotary_emb_dim <= head_dim), the optional causal depthwise qkv conv
    (d_conv), mlp_dim fused into in_proj / out_proj.

    forward(x (B, L, embed_dim), inference_params=None). Decode (causal only) keeps an opaque
    mambacpp.MHAState in inference_params.key_value_memory_dict[layer_idx] (a KV cache that grows,
    and the conv window); allocate_inference_cache returns one, step(x, state) advances it. Unlike
    mamba_ssm, the conv window keeps the pre-conv qkv columns, so decode equals the forward
    (upstream PR #1027).
    """

    _name = "MHA"
    _state_arrays = False

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_heads_kv=None,
        head_dim=None,
        mlp_dim=0,
        qkv_proj_bias=True,
        out_proj_bias=True,
        softmax_scale=None,
        causal=False,
        layer_idx=None,
        d_conv=0,
        rotary_emb_dim=0,
        rotary_emb_base=10000.0,
        rotary_emb_interleaved=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self._init_core(
            _core.MHA, embed_dim, num_heads, num_heads_kv=num_heads_kv, head_dim=head_dim, mlp_dim=mlp_dim,
            qkv_proj_bias=qkv_proj_bias, out_proj_bias=out_proj_bias, softmax_scale=softmax_scale,
            causal=causal, d_conv=d_conv, rotary_emb_dim=rotary_emb_dim, rotary_emb_base=rotary_emb_base,
            rotary_emb_interleaved=rotary_emb_interleaved, device=device, dtype=dtype,
        )
        self.embed_dim = embed_dim
        self.layer_idx = layer_idx
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        self.mlp_dim = (mlp_dim + 255) // 256 * 256

    def forward(self, x, inference_params=None):
        if inference_params is not None and not self.causal:
            raise ValueError("MHA: decode (inference_params) needs causal=True")
        return self._forward_seq(x, inference_params, "x")

    def step(self, x, state):
        """One token for each row: x (B, 1, embed_dim) or (B, embed_dim), state from
        allocate_inference_cache or a prefill -> (out, state), the state advanced in place."""
        if not self.causal:
            raise ValueError("MHA.step: decode needs causal=True")
        return super().step(x, state)


class GatedMLP(_CoreModule):
    """mamba_ssm.modules.mlp.GatedMLP on mamba.cpp's kernels: fc1 -> value * silu(gate) -> fc2.
    forward(x (..., in_features)) -> (..., out_features)."""

    _name = "GatedMLP"

    def __init__(
        self, in_features, hidden_features=None, out_features=None, activation=F.silu, bias=False,
        multiple_of=128, device=None, dtype=None,
    ):
        super().__init__()
        if activation is not F.silu:
            raise ValueError(f"GatedMLP: activation={activation!r}: mambacpp implements F.silu (the default)")
        self._init_core(
            _core.GatedMLP, in_features, hidden_features=hidden_features, out_features=out_features,
            bias=bias, multiple_of=multiple_of, device=device, dtype=dtype,
        )
        self.activation = activation

    def forward(self, x):
        _check_tensor(x, "x", self._name)
        if x.dim() < 1:
            raise ValueError("GatedMLP: x must be (..., in_features)")
        return self._run(x)


def _act_name(act, owner, what):
    """VMamba passes activation classes (nn.SiLU, nn.GELU); mambacpp takes their names."""
    if isinstance(act, str):
        return act
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act.__name__
    raise ValueError(f"{owner}: {what}={act!r}: give an activation class such as nn.SiLU, or its name")


def _linear2d_hook(keys, state_dict, prefix, *args):
    for k in keys:
        t = state_dict.get(prefix + k)
        if t is not None and t.dim() == 4 and tuple(t.shape[2:]) == (1, 1):
            state_dict[prefix + k] = t.reshape(t.shape[0], t.shape[1])


def _accept_linear2d_4d(module, keys):
    """VMamba's Linear2d keeps nn.Linear's (out, in) weight but loads checkpoints that stored it as
    a 1x1 conv kernel (out, in, 1, 1) by viewing it 2-D; `keys` are the module's Linear2d weights.
    (A partial of a module-level function: the module stays picklable.)"""
    module._register_load_state_dict_pre_hook(functools.partial(_linear2d_hook, tuple(keys)))


class SS2D(_CoreModule):
    """VMamba's SS2D (classification/models/vmamba.py) on mamba.cpp's CPU kernels: the 2-D selective
    scan over four pixel orders with per-direction parameters, VMamba's constructor arguments and
    state_dict keys.

    forward(x): x is (B, H, W, d_model) (channel_last, the default) or (B, d_model, H, W) when
    channel_first=True, as VMamba's module takes it; the output has the input's layout. All
    forward_types run (v0, v2, v05_noz, ...: the same math); dropout must be 0. No decode.
    """

    _name = "SS2D"

    def __init__(
        self,
        d_model=96,
        d_state=16,
        ssm_ratio=2.0,
        dt_rank="auto",
        act_layer=nn.SiLU,
        d_conv=3,
        conv_bias=True,
        dropout=0.0,
        bias=False,
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        initialize="v0",
        forward_type="v2",
        channel_first=False,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"SS2D: unexpected arguments {sorted(kwargs)}")
        self._init_core(
            _core.SS2D, d_model, d_state=d_state, ssm_ratio=ssm_ratio, dt_rank=dt_rank,
            act_layer=_act_name(act_layer, "SS2D", "act_layer"), d_conv=d_conv, conv_bias=conv_bias,
            dropout=dropout, bias=bias, dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale,
            dt_init_floor=dt_init_floor, initialize=initialize, forward_type=forward_type,
            channel_first=channel_first, device=device, dtype=dtype, no_weight_decay=("A_logs", "Ds"),
        )
        self.d_model = d_model
        self.channel_first = channel_first
        self.forward_type = forward_type
        _accept_linear2d_4d(self, ("in_proj.weight", "out_proj.weight"))

    def forward(self, x, **kwargs):
        layout = "(B, C, H, W) (channel_first)" if self.channel_first else "(B, H, W, C)"
        self._check_input(x, "x", layout, 4)
        return self._run(x)


class VSSBlock(_CoreModule):
    """VMamba's VSSBlock on mamba.cpp's CPU kernels: x + SS2D(norm(x)), then x + Mlp(norm2(x)) (or
    post_norm), VMamba's constructor arguments and state_dict keys (norm.*, op.*, norm2.*, mlp.*).

    forward(x): (B, H, W, C), or (B, C, H, W) when channel_first=True (VMamba then uses LayerNorm2d
    as norm_layer: pass it, nn.LayerNorm, or the names "LayerNorm" / "LayerNorm2d": all normalise
    over the channels with eps 1e-5). drop_path and the dropouts must be 0.
    """

    _name = "VSSBlock"

    def __init__(
        self,
        hidden_dim=0,
        drop_path=0,
        norm_layer=nn.LayerNorm,
        channel_first=False,
        ssm_d_state=16,
        ssm_ratio=2.0,
        ssm_dt_rank="auto",
        ssm_act_layer=nn.SiLU,
        ssm_conv=3,
        ssm_conv_bias=True,
        ssm_drop_rate=0.0,
        ssm_init="v0",
        forward_type="v2",
        mlp_ratio=4.0,
        mlp_act_layer=nn.GELU,
        mlp_drop_rate=0.0,
        gmlp=False,
        use_checkpoint=False,
        post_norm=False,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        if kwargs:
            raise TypeError(f"VSSBlock: unexpected arguments {sorted(kwargs)}")
        norm = _act_name(norm_layer, "VSSBlock", "norm_layer")
        if norm not in ("LayerNorm", "LayerNorm2d"):
            raise ValueError(f"VSSBlock: norm_layer={norm_layer!r}: mambacpp implements LayerNorm / LayerNorm2d")
        self._init_core(
            _core.VSSBlock, hidden_dim, drop_path=drop_path, channel_first=channel_first,
            ssm_d_state=ssm_d_state, ssm_ratio=ssm_ratio, ssm_dt_rank=ssm_dt_rank,
            ssm_act_layer=_act_name(ssm_act_layer, "VSSBlock", "ssm_act_layer"), ssm_conv=ssm_conv,
            ssm_conv_bias=ssm_conv_bias, ssm_drop_rate=ssm_drop_rate, ssm_init=ssm_init,
            forward_type=forward_type, mlp_ratio=mlp_ratio,
            mlp_act_layer=_act_name(mlp_act_layer, "VSSBlock", "mlp_act_layer"), mlp_drop_rate=mlp_drop_rate,
            gmlp=gmlp, use_checkpoint=use_checkpoint, post_norm=post_norm, device=device, dtype=dtype,
            no_weight_decay=("A_logs", "Ds"),
        )
        self.hidden_dim = hidden_dim
        self.channel_first = channel_first
        _accept_linear2d_4d(
            self, ("op.in_proj.weight", "op.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"))

    def forward(self, input):
        layout = "(B, C, H, W) (channel_first)" if self.channel_first else "(B, H, W, C)"
        self._check_input(input, "input", layout, 4)
        return self._run(input)


class BiMamba(_CoreModule):
    """Vim's bidirectional Mamba (hustvl/Vim mamba-1p1p1 mamba_simple.Mamba with
    bimamba_type="v2") on mamba.cpp's CPU kernels: Vim's constructor arguments and state_dict keys
    (in_proj / out_proj / gamma shared, conv1d_b / x_proj_b / dt_proj_b / A_b_log / D_b for the
    reversed direction). Always bidirectional (Vim's slow path silently drops the reversed
    direction); not causal, so no decode: inference_params is refused.

    forward(hidden_states (B, L, d_model)) -> (B, L, d_model).
    """

    _name = "BiMamba"

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
        use_fast_path=True,  # a CUDA kernel choice: accepted, same math (always both directions)
        layer_idx=None,
        device=None,
        dtype=None,
        bimamba_type="v2",
        if_devide_out=False,  # Vim's spelling
        init_layer_scale=None,
        if_divide_out=None,  # the same switch, spelt correctly (an alias; give one of the two)
    ):
        super().__init__()
        if if_divide_out is not None:
            if if_devide_out:
                raise ValueError("BiMamba: give if_devide_out (Vim's spelling) or if_divide_out, not both")
            if_devide_out = if_divide_out
        self._init_core(
            _core.BiMamba, d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank,
            dt_min=dt_min, dt_max=dt_max, dt_init=dt_init, dt_scale=dt_scale, dt_init_floor=dt_init_floor,
            conv_bias=conv_bias, bias=bias, bimamba_type=bimamba_type, if_devide_out=if_devide_out,
            init_layer_scale=init_layer_scale, device=device, dtype=dtype,
            no_weight_decay=("A_log", "D", "A_b_log", "D_b"),
        )
        _set_mamba1_attributes(self, d_model, d_state, d_conv, expand, dt_rank, use_fast_path, layer_idx)
        self.bimamba_type = bimamba_type
        self.if_devide_out = if_devide_out
        self.init_layer_scale = init_layer_scale
        self.dt_proj.bias._no_reinit = True
        self.dt_proj_b.bias._no_reinit = True

    def forward(self, hidden_states, inference_params=None):
        if inference_params is not None:
            raise ValueError("BiMamba: bidirectional, so no decode (inference_params must be None)")
        self._check_input(hidden_states, "hidden_states", "(batch, seqlen, d_model)", 3)
        return self._run(hidden_states)


class STBlock(_CoreModule):
    """The spatio-temporal block (include/mamba/nn/st_block.h; no official code exists): spatial
    multi-head attention over the N nodes of each time step (node embedding added to queries and
    keys), a temporal mixer over the T steps of each node, GMAN's gated fusion, a linear layer and
    the residual.

    STBlock(num_nodes, d_model, num_heads=1, temporal=None): temporal is the temporal mixer's
    arguments with "layer" ("Mamba1" (default), "Mamba2", "Mamba3", or "MHA" with causal=True: the
    temporal-attention baseline). forward(x (B, T, N, C)) -> (B, T, N, C);
    allocate_inference_cache(B) and step(x_t (B, N, C), state) stream one time step of every node
    (O(1) state per node for the Mamba layers).
    """

    _name = "STBlock"

    def __init__(self, num_nodes, d_model, num_heads=1, temporal=None, device=None, dtype=None):
        super().__init__()
        temporal = {"layer": "Mamba1"} if temporal is None else dict(temporal)
        self._init_core(
            _core.STBlock, num_nodes, d_model, num_heads=num_heads, temporal=temporal, device=device, dtype=dtype,
            no_weight_decay=("temporal.A_log", "temporal.D", "temporal.dt_bias"),
        )
        self.num_nodes = num_nodes
        self.d_model = d_model
        self.num_heads = num_heads
        self.temporal_cfg = temporal

    def forward(self, x, state=None):
        """x (B, T, N, C) -> (B, T, N, C). state: an allocate_inference_cache(B) object, filled with
        the temporal state after the last step (for streaming on with step); not differentiable
        through the state."""
        self._check_input(x, "x", "(batch, time, num_nodes, d_model)", 4)
        if state is None:
            return self._run(x)
        if not isinstance(state, _STState):
            raise ValueError("STBlock: state must come from allocate_inference_cache")
        sink = []
        y = self._run(x, sink)
        state.core = sink[0]
        return y

    def allocate_inference_cache(self, batch_size, max_seqlen=None, dtype=None, **kwargs):
        """A zeroed streaming state for batch_size sequences of num_nodes nodes."""
        _check_device_dtype(self._name, None, dtype)
        return _STState(self._core.new_state(batch_size))

    def step(self, x, state):
        """One time step: x (B, N, C) -> (B, N, C), advancing state. Not differentiable."""
        self._check_input(x, "x", "(batch, num_nodes, d_model)", 3)
        if not isinstance(state, _STState):
            raise ValueError("STBlock.step: state must come from allocate_inference_cache")
        with torch.no_grad():
            return torch.from_numpy(self._core.step(_np(x), state.core, params=[_np(p) for p in self._params()]))


class _STState:
    """STBlock's streaming state (opaque; the temporal mixer's state of every node)."""

    def __init__(self, core):
        self.core = core


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
        mixers = {"Mamba1": Mamba, "Mamba2": Mamba2, "Mamba3": Mamba3}
        if layer not in mixers:
            raise ValueError(f"MambaLMHeadModel: ssm_cfg.layer={layer!r}: mambacpp.torch has {', '.join(mixers)}")
        attn_idx = set(config.attn_layer_idx or [])
        bad = sorted(i for i in attn_idx if not (isinstance(i, int) and 0 <= i < config.n_layer))
        if bad:
            raise ValueError(f"MambaLMHeadModel: attn_layer_idx {bad} out of range [0, n_layer={config.n_layer})")
        attn_cfg = dict(config.attn_cfg or {})
        self.residual_in_fp32 = config.residual_in_fp32
        self.embedding = nn.Embedding(vocab_size, config.d_model)
        d = config.d_model

        def norm():
            return RMSNorm(d, eps=1e-5) if config.rms_norm else nn.LayerNorm(d, eps=1e-5)

        def mixer(i):  # mamba_ssm's create_block: MHA(d, **attn_cfg) at attn_layer_idx
            if i in attn_idx:
                return MHA(d, layer_idx=i, **attn_cfg)
            return mixers[layer](d, layer_idx=i, **ssm_cfg)

        self.layers = nn.ModuleList(
            Block(
                d,
                mixer(i),
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
