#!/usr/bin/env python3
"""A small spatio-temporal forecaster in plain PyTorch, with mambacpp.torch.Mamba as the temporal
branch (where such models usually put temporal attention).

Data: N sensors on a small graph (a ring plus a few chords), hourly readings with a daily and a
weekly cycle, each node's signal mixed with its neighbours' and noise. Task: from the last P hours
of every node, forecast the next Hf hours of every node.

Model, per window x (B, P, N):
  embed           value + hour-of-day / day-of-week features -> H0 (B, P, N, d)
  spatial branch  self-attention over the N nodes at each time step -> H_S (B, P, N, d)
  temporal branch mambacpp.torch.Mamba over each node's series      -> H_T (B, P, N, d)
                  (or, for comparison, causal self-attention over time)
  gated fusion    z = sigmoid(H_S W1 + H_T W2 + b),  H = z * H_S + (1 - z) * H_T
  head            H at the last step -> the next Hf values of each node (B, Hf, N)

Prints the tensor shapes of each stage once, then the validation MAE of the Mamba model, of the
same model with attention as its temporal branch, and of the persistence baseline (the last
observed value repeated). Run from the repository root after installing the package
(README.md, "Python"):

  python3 examples/spatiotemporal.py            # 300 steps per model: minutes on 2 cores
  python3 examples/spatiotemporal.py --steps 30 # a quick look
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from mambacpp.torch import Mamba


def make_series(n_nodes, hours, seed):
    """(hours, N) readings and (hours, 4) time features: daily and weekly cycles on a graph."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(hours, dtype=torch.float32)
    day, week = 2 * math.pi * t / 24, 2 * math.pi * t / (24 * 7)
    amp = 1 + torch.rand(n_nodes, generator=g)
    phase = 2 * math.pi * torch.rand(n_nodes, generator=g)
    wk = 0.5 * torch.rand(n_nodes, generator=g)
    base = amp * torch.sin(day[:, None] + phase) + wk * torch.sin(week[:, None]) + 0.3 * torch.sin(2 * day[:, None])
    adj = torch.zeros(n_nodes, n_nodes)
    for i in range(n_nodes):  # a ring plus chords
        adj[i, (i + 1) % n_nodes] = adj[(i + 1) % n_nodes, i] = 1
    for i in range(0, n_nodes, 3):
        j = (i + n_nodes // 2) % n_nodes
        adj[i, j] = adj[j, i] = 1
    mix = torch.eye(n_nodes) + 0.3 * adj / adj.sum(1, keepdim=True)
    series = base @ mix.T + 0.15 * torch.randn(hours, n_nodes, generator=g)
    feats = torch.stack([torch.sin(day), torch.cos(day), torch.sin(week), torch.cos(week)], 1)
    return series, feats


def windows(series, feats, past, horizon):
    """All windows: x (W, P, N), f (W, P, 4), y (W, Hf, N)."""
    idx = torch.arange(series.shape[0] - past - horizon + 1)
    x = torch.stack([series[i : i + past] for i in idx])
    f = torch.stack([feats[i : i + past] for i in idx])
    y = torch.stack([series[i + past : i + past + horizon] for i in idx])
    return x, f, y


class CausalTemporalAttention(nn.Module):
    """The comparison temporal branch: causal self-attention over time, with learned positions."""

    def __init__(self, d, past, heads=4):
        super().__init__()
        self.pos = nn.Parameter(0.02 * torch.randn(past, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, h):  # (B*N, P, d)
        P = h.shape[1]
        q = h + self.pos[:P]
        mask = torch.triu(torch.ones(P, P, dtype=torch.bool), 1)
        return self.attn(q, q, q, attn_mask=mask, need_weights=False)[0]


class Forecaster(nn.Module):
    def __init__(self, n_nodes, past, horizon, d=32, temporal="mamba"):
        super().__init__()
        self.embed = nn.Linear(1 + 4, d)
        self.node = nn.Parameter(0.1 * torch.randn(n_nodes, d))  # node identity
        self.spatial = nn.MultiheadAttention(d, 4, batch_first=True)
        self.temporal = Mamba(d, d_state=16, d_conv=4, expand=2) if temporal == "mamba" else CausalTemporalAttention(d, past)
        self.W1 = nn.Linear(d, d, bias=False)
        self.W2 = nn.Linear(d, d, bias=True)  # its bias is b
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, horizon)
        self.shown = False

    def show(self, name, t):
        if not self.shown:
            print(f"  {name:<44} {tuple(t.shape)}")

    def forward(self, x, f):  # x (B, P, N), f (B, P, 4)
        B, P, N = x.shape
        self.show("input x (B, P, N)", x)
        inp = torch.cat([x.unsqueeze(-1), f.unsqueeze(2).expand(B, P, N, 4)], -1)
        h0 = self.embed(inp) + self.node
        self.show("embedded H0 (B, P, N, d)", h0)
        s = h0.reshape(B * P, N, -1)
        hs = self.spatial(s, s, s, need_weights=False)[0].reshape(B, P, N, -1)
        self.show("spatial attention over nodes H_S (B, P, N, d)", hs)
        tin = h0.permute(0, 2, 1, 3).reshape(B * N, P, -1)
        self.show("temporal input (B*N, P, d)", tin)
        ht = self.temporal(tin).reshape(B, N, P, -1).permute(0, 2, 1, 3)
        self.show(f"temporal {type(self.temporal).__name__} H_T (B, P, N, d)", ht)
        z = torch.sigmoid(self.W1(hs) + self.W2(ht))
        h = self.norm(z * hs + (1 - z) * ht + h0)
        self.show("gate z and fused H (B, P, N, d)", h)
        out = self.head(h[:, -1]).transpose(1, 2)
        self.show("forecast (B, Hf, N)", out)
        self.shown = True
        return out


def train(model, data, steps, batch, lr, seed):
    (xt, ft, yt), (xv, fv, yv) = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 10)  # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    t0 = time.time()
    for step in range(steps):
        i = torch.randint(0, xt.shape[0], (batch,), generator=g)
        loss = F.l1_loss(model(xt[i], ft[i]), yt[i])
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"    step {step:4d}  train MAE {loss.item():.4f}")
    with torch.no_grad():
        mae = F.l1_loss(model(xv, fv), yv).item()
    return mae, time.time() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--past", type=int, default=48, help="P: hours of history per window")
    p.add_argument("--horizon", type=int, default=12, help="Hf: hours to forecast")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    series, feats = make_series(a.nodes, 24 * 7 * 10, a.seed)  # 10 weeks: 8 train, 2 validation
    split = 24 * 7 * 8
    mean, std = series[:split].mean(), series[:split].std()
    series = (series - mean) / std
    train_w = windows(series[:split], feats[:split], a.past, a.horizon)
    val_w = windows(series[split - a.past :], feats[split - a.past :], a.past, a.horizon)
    print(f"series {tuple(series.shape)} (hours, nodes); train windows {train_w[0].shape[0]}, "
          f"validation windows {val_w[0].shape[0]}; P={a.past}, Hf={a.horizon}")
    xv, _, yv = val_w
    persistence = F.l1_loss(xv[:, -1:].expand_as(yv), yv).item()
    results = {}
    for temporal in ("mamba", "attention"):
        torch.manual_seed(a.seed)
        model = Forecaster(a.nodes, a.past, a.horizon, temporal=temporal)
        print(f"\n== temporal branch: {temporal} ({sum(p.numel() for p in model.parameters())} parameters)")
        results[temporal] = train(model, (train_w, val_w), a.steps, a.batch, a.lr, a.seed)
    print("\n== validation MAE (normalised units; lower is better)")
    print(f"  persistence (last value repeated)      {persistence:.4f}")
    for k, name in (("mamba", "mambacpp.torch.Mamba temporal branch"), ("attention", "attention temporal branch")):
        mae, sec = results[k]
        print(f"  {name:<38} {mae:.4f}   ({sec:.1f} s training)")
    print(f"  Mamba vs persistence: {persistence / results['mamba'][0]:.2f}x lower MAE")


if __name__ == "__main__":
    main()
