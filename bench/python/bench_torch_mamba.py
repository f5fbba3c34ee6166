#!/usr/bin/env python3
"""Forward + backward of one Mamba layer from PyTorch: mambacpp.torch.Mamba against the pure-PyTorch
Mamba paths a CPU user falls back to, in the same process, with the same threads and weights.

  torch-seq:   the layer in torch with a straightforward sequential selective scan (a Python loop
               over L, as mamba_ssm's selective_scan_ref does it)
  torch-pscan: the layer in torch with a log-depth parallel scan over L (the odd/even recursive form
               of Blelloch's scan: O(L) work, depth log L, with a custom autograd backward that is
               the reverse scan, as mamba.py's PScan does it)
  mambacpp:    mambacpp.torch.Mamba (the C++ forward and backward through a torch.autograd.Function)
  core:        the same C++ layer through the numpy API directly (no torch): the Python layer's
               overhead is mambacpp / core - 1 (best of each, and the median over the
               interleaved pairs of runs: python_overhead_median_pair)

One JSON line per configuration. The torch baselines are slow (seconds to minutes per step at
L 2048) and the parallel scan holds several (B, L, D, N) tensors: the sequential one runs at
L' = min(L, --seq-max-len), the parallel one at the longest L' = L / 2^k whose (B, L', D, N) has at
most --pscan-max-elems elements, and their times are scaled by L / L' (recorded as
"<name>_measured_len"). The parallel scan's work is linear in L; the sequential loop's backward
is not (each step's dA[:, t] gets a gradient the size of the whole tensor), so its scaled figure
understates it (docs/PERFORMANCE.md). Measured at full size, never extrapolated: every mambacpp
and core figure. Not a test: run it by hand (docs/PERFORMANCE.md has the figures).

  PYTHONPATH=build/python python3 bench/python/bench_torch_mamba.py --threads 2
"""

import argparse
import json
import math
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import mambacpp
from mambacpp.torch import Mamba


def best_of(fn, reps):
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- the pure-torch layer ------------------------------------------------------------------


def scan_seq(dA, dBx, C):
    """h_t = dA_t * h_{t-1} + dBx_t; y_t = <h_t, C_t>. dA, dBx: (B, L, D, N); C: (B, L, N)."""
    h = torch.zeros_like(dBx[:, 0])
    ys = []
    for t in range(dA.shape[1]):
        h = dA[:, t] * h + dBx[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, 1)


def _pscan(a, b):
    """All h_t = a_t h_{t-1} + b_t along dim 1 (h_{-1} = 0), log depth, O(L) work."""
    L = a.shape[1]
    if L == 1:
        return b
    if L % 2:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], 1)
    a0, a1, b0, b1 = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    h_odd = _pscan(a1 * a0, a1 * b0 + b1)  # h at positions 1, 3, 5, ...
    h_even = torch.cat([b0[:, :1], a0[:, 1:] * h_odd[:, :-1] + b0[:, 1:]], 1)
    return torch.stack([h_even, h_odd], 2).flatten(1, 2)[:, :L]


class PScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        h = _pscan(a, b)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        # g_t = dh_t + a_{t+1} g_{t+1}: the same scan, reversed in time, with a shifted by one
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        g = _pscan(a_next.flip(1), dh.flip(1)).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return g * h_prev, g


def scan_pscan(dA, dBx, C):
    h = PScan.apply(dA, dBx)
    return torch.einsum("bldn,bln->bld", h, C)


def torch_mamba(m, x, scan):
    """mamba_ssm's Mamba forward (slow path) in plain torch, with the given scan, m's weights."""
    B, L, _ = x.shape
    xz = F.linear(x, m.in_proj.weight, m.in_proj.bias)
    xi, z = xz.chunk(2, dim=-1)
    xc = F.conv1d(xi.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)
    xc = F.silu(xc[..., :L]).transpose(1, 2)  # (B, L, D)
    dbl = F.linear(xc, m.x_proj.weight)
    dt, Bm, Cm = torch.split(dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, m.dt_proj.weight, m.dt_proj.bias))  # (B, L, D)
    A = -torch.exp(m.A_log)  # (D, N)
    dA = torch.exp(delta.unsqueeze(-1) * A)
    dBx = (delta * xc).unsqueeze(-1) * Bm.unsqueeze(2)
    y = scan(dA, dBx, Cm) + xc * m.D
    y = y * F.silu(z)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


# ---- the benchmark ---------------------------------------------------------------------------


def run(args):
    if args.keep_freed_memory:
        mambacpp.keep_freed_memory()
    torch.set_num_threads(args.threads)
    mambacpp.set_num_threads(args.threads)
    for d_model, L, batch in [(d, l, b) for d in args.d_model for l in args.seqlen for b in args.batch]:
        torch.manual_seed(0)
        m = Mamba(d_model)
        x = torch.randn(batch, L, d_model)
        g = torch.randn(batch, L, d_model)

        def ours():
            xr = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            m(xr).backward(g)

        core = m._core
        for k, v in core.params.items():  # the module's weights, into the numpy-level layer
            v[...] = m.state_dict()[k].numpy()
        xa, ga = x.numpy(), g.numpy()

        def direct():
            _, saved = core.forward(xa, save=True)
            core.backward(saved, ga)

        ours()
        direct()
        ts_ours, ts_core = [], []
        for _ in range(args.reps):  # interleaved pairs, so that both see the same machine load
            ts_ours.append(best_of(ours, 1))
            ts_core.append(best_of(direct, 1))
        t_ours, t_core = min(ts_ours), min(ts_core)
        # The overhead from pairs run back to back: the median of the per-pair ratios is robust to
        # a slow pair (a load spike hits both halves of a pair alike, or only one pair).
        pair_overhead = statistics.median(a / b for a, b in zip(ts_ours, ts_core)) - 1
        rec = dict(bench="torch_mamba_fwd_bwd", d_model=d_model, d_inner=m.d_inner, d_state=m.d_state,
                   seqlen=L, batch=batch, threads=args.threads, torch=torch.__version__,
                   mambacpp_s=round(t_ours, 5), core_s=round(t_core, 5),
                   python_overhead=round(t_ours / t_core - 1, 4),
                   python_overhead_median_pair=round(pair_overhead, 4), reps=args.reps,
                   keep_freed_memory=args.keep_freed_memory)
        if args.check:  # the torch paths compute the same layer (checked at a small length)
            with torch.no_grad():
                xs = x[:, :64]
                ref = m(xs)
                for scan in (scan_seq, scan_pscan):
                    err = (torch_mamba(m, xs, scan) - ref).abs().max().item()
                    assert err < 1e-3 * (1 + ref.abs().max().item()), (scan.__name__, err)
        for name, scan, on in (("torch_pscan", scan_pscan, not args.no_pscan), ("torch_seq", scan_seq, not args.no_seq)):
            if not on:
                continue
            if name == "torch_seq":
                Lb = min(L, args.seq_max_len)
            else:
                Lb = L
                while Lb > 1 and batch * Lb * m.d_inner * m.d_state > args.pscan_max_elems:
                    Lb //= 2
            xb, gb = x[:, :Lb].contiguous(), g[:, :Lb].contiguous()

            def base():
                xr = xb.clone().requires_grad_()
                m.zero_grad(set_to_none=True)
                torch_mamba(m, xr, scan).backward(gb)

            t = best_of(base, args.baseline_reps) * (L / Lb)
            rec[name + "_s"] = round(t, 4)
            rec["speedup_vs_" + name] = round(t / t_ours, 1)
            rec[name + "_measured_len"] = Lb
        rec["loadavg_1min"] = round(os.getloadavg()[0], 2)
        print(json.dumps(rec), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, nargs="+", default=[256, 768])
    p.add_argument("--seqlen", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="repetitions of the mambacpp timings (best taken)")
    p.add_argument("--baseline-reps", type=int, default=1)
    p.add_argument("--seq-max-len", type=int, default=256,
                   help="run the sequential torch scan at most this long, scaled linearly to L")
    p.add_argument("--pscan-max-elems", type=int, default=2**26,
                   help="largest (B, L, D, N) of the parallel torch scan (shorter L, scaled linearly)")
    p.add_argument("--no-seq", action="store_true", help="skip the sequential torch baseline")
    p.add_argument("--no-pscan", action="store_true", help="skip the parallel-scan torch baseline")
    p.add_argument("--check", action="store_true", help="check the torch paths against mambacpp first")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="call mambacpp.keep_freed_memory() first (the process's malloc keeps freed "
                        "memory: fewer page faults for mambacpp and torch alike)")
    run(p.parse_args())


if __name__ == "__main__":
    main()
