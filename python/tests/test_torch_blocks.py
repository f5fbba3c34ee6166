"""mambacpp.torch's research blocks as drop-ins for the official modules: Mamba3 (mamba_ssm),
SS2D / VSSBlock (VMamba), BiMamba (Vim), MHA / GatedMLP (mamba_ssm). Golden outputs and every
gradient through autograd (the C++ backward), the official state_dict keys, decode == forward
(Mamba3 step / cached forward, MHA's KV cache), errors, and a small SS2D model that learns."""

import copy
import inspect
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mambacpp  # noqa: E402
from mambacpp.torch import MHA, BiMamba, GatedMLP, InferenceParams, Mamba3, SS2D, VSSBlock  # noqa: E402
from conftest import (  # noqa: E402
    BIMAMBA_CASES,
    GATED_MLP_CASES,
    GOLDEN_F32,
    GOLDEN_GRAD_F32,
    MAMBA3_CASES,
    MHA_CASES,
    SS2D_CASES,
    STEP_VS_FULL,
    VSSBLOCK_CASES,
    assert_close,
    golden,
    scaled,
)

CLASSES = {"mamba3": Mamba3, "ss2d": SS2D, "vssblock": VSSBlock, "vim": BiMamba, "mha": MHA, "gated": GatedMLP}


def module_from_golden(name):
    t, meta, cfg = golden(name)
    cls = CLASSES[name.split("_")[0]]
    extra = {"layer_idx": 0} if cls in (Mamba3, MHA) else {}
    m = cls(**cfg, **extra)
    sd = {k[len("params."):]: torch.from_numpy(v) for k, v in t.items() if k.startswith("params.")}
    m.load_state_dict(sd)  # strict: the keys and shapes must be the official ones
    return m, t, meta


@pytest.mark.parametrize(
    "name", MAMBA3_CASES + SS2D_CASES + VSSBLOCK_CASES + BIMAMBA_CASES + MHA_CASES + GATED_MLP_CASES
)
def test_golden_forward_and_every_gradient(name):
    m, t, meta = module_from_golden(name)
    assert list(m.state_dict().keys()) == meta["param_names"].split(",")  # the official order too
    assert sum(p.numel() for p in m.parameters()) == int(meta["param_count"])
    # Mamba-3's tolerances are scaled by max(1, max|expected|) as tests/test_mamba3.cpp does.
    sc = (lambda tol, e: scaled(tol, e)) if name.startswith("mamba3") else (lambda tol, e: tol)
    x = torch.from_numpy(t["x"]).clone().requires_grad_()
    y = m(x)
    assert y.shape == t["y"].shape and y.dtype == torch.float32
    assert_close(y.detach(), t["y"], sc(GOLDEN_F32, t["y"]), name + " y")
    (y * torch.from_numpy(t["g"])).sum().backward()
    assert_close(x.grad, t["grad_x"], sc(GOLDEN_GRAD_F32, t["grad_x"]), name + " grad_x")
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        e = t["grad." + n]
        assert_close(p.grad, e, sc(GOLDEN_GRAD_F32, e), name + " grad." + n)


def wrapped(a):
    """Phase differences into (-pi, pi] (step keeps Mamba-3's angles unwrapped, forward wraps)."""
    return np.remainder(np.asarray(a, dtype=np.float64) + np.pi, 2 * np.pi) - np.pi


def check_mamba3_states(states, t, prefix, name):
    angle, ssm, k, v = (s.numpy() for s in states)
    for got, key in ((ssm, "ssm_state"), (k, "k_state"), (v, "v_state")):
        e = t[prefix + key]
        assert_close(got, e, scaled(GOLDEN_F32, e), f"{name} {prefix}{key}")
    d = wrapped(angle - t[prefix + "angle_state"])
    assert_close(d, np.zeros_like(d), (1e-5, 0), f"{name} {prefix}angle_state (mod 2 pi)")


@pytest.mark.parametrize("name", MAMBA3_CASES)
def test_mamba3_step_prefill_and_cached_decode(name):
    m, t, meta = module_from_golden(name)
    x = torch.from_numpy(t["x"])
    B, L, _ = x.shape
    ytol = scaled(GOLDEN_F32, t["y"])
    with torch.no_grad():
        y_full = m(x)
        states = m.allocate_inference_cache(B, L)
        if "angle_state" in t:  # allocate_inference_cache's shapes are the official ones
            keys = ("angle_state", "ssm_state", "k_state", "v_state")
            assert [tuple(s.shape) for s in states] == [t[k].shape for k in keys]
        ys = []
        for i in range(L):  # the official step takes (batch, d_model)
            out = m.step(x[:, i], *states)
            assert len(out) == 5 and out[0].shape == (B, x.shape[2])
            ys.append(out[0])
        ys = torch.stack(ys, 1)
        assert_close(ys, y_full, ytol, name + " step == forward")
        if "y_step" not in t:  # mamba3_siso_d32_g2: the official step cannot run ngroups 2 of 4 heads
            return
        assert_close(ys, t["y_step"], ytol, name + " y_step")
        check_mamba3_states(states, t, "", name)
        # mamba_ssm's cached forward: prefill P tokens, then one token per call (the official model
        # fails here, upstream #1014 / #1022; ours equals the forward)
        P = int(meta["prefill_len"])
        ip = InferenceParams(max_seqlen=L, max_batch_size=B)
        outs = [m(x[:, :P], inference_params=ip)]
        check_mamba3_states(ip.key_value_memory_dict[0], t, "prefill_", name)
        ip.seqlen_offset = P
        for i in range(P, L):
            outs.append(m(x[:, i : i + 1], inference_params=ip))
            ip.seqlen_offset += 1
        ypd = torch.cat(outs, 1)
        assert_close(ypd, t["y_prefill_decode"], ytol, name + " prefill+decode")
        assert_close(ypd, y_full, ytol, name + " prefill+decode vs forward")


@pytest.mark.parametrize("name", [c for c in MHA_CASES if "noncausal" not in c])
def test_mha_kv_cache_decode_equals_forward(name):
    m, t, meta = module_from_golden(name)
    x = torch.from_numpy(t["x"])
    B, L, _ = x.shape
    with torch.no_grad():
        y_full = m(x)
        state = m.allocate_inference_cache(B, L)
        ys = torch.cat([m.step(x[:, i : i + 1], state)[0] for i in range(L)], 1)
        assert_close(ys, t["y_step"], GOLDEN_F32, name + " y_step")
        assert_close(ys, y_full, STEP_VS_FULL, name + " step vs forward")
        assert state.lengths == [L] * B
        kv = t["kv_cache"]  # (B, L, 2, KV, P): keys after rotary, values
        assert_close(state.k_cache[:, :L], kv[:, :, 0], GOLDEN_F32, name + " k_cache")
        assert_close(state.v_cache[:, :L], kv[:, :, 1], GOLDEN_F32, name + " v_cache")
        if m.d_conv > 0:
            assert_close(state.conv_state, t["conv_state"], GOLDEN_F32, name + " conv_state")
        # prefill then decode through inference_params, as mamba_ssm's generate does
        P = int(meta["prefill_len"])
        ip = InferenceParams(max_seqlen=L, max_batch_size=B)
        outs = [m(x[:, :P], inference_params=ip)]
        ip.seqlen_offset = P
        for i in range(P, L):
            outs.append(m(x[:, i : i + 1], inference_params=ip))
            ip.seqlen_offset += 1
        ypd = torch.cat(outs, 1)
        assert_close(ypd, t["y_prefill_decode"], GOLDEN_F32, name + " prefill+decode")
        assert_close(ypd, y_full, STEP_VS_FULL, name + " prefill+decode vs forward")
        if "y_step_official" in t:  # the shipped conv state drifts (PR #1027); ours does not
            assert np.abs(t["y_step_official"] - y_full.numpy()).max() > 1e-3


def test_gated_mlp_any_leading_shape_and_the_lm_uses_it():
    m, t, _ = module_from_golden("gated_mlp_d64_i96")
    x = torch.from_numpy(t["x"])
    with torch.no_grad():
        assert_close(m(x.reshape(-1, 64)).reshape(t["y"].shape), t["y"], GOLDEN_F32, "(B*L, in)")
        assert_close(m(x[0, 3]), t["y"][0, 3], GOLDEN_F32, "one row (in,)")
    assert isinstance(m.fc1, torch.nn.Linear) and isinstance(m.fc2, torch.nn.Linear)
    with pytest.raises(ValueError, match="silu"):
        GatedMLP(16, activation=torch.nn.functional.gelu)


def test_ss2d_channel_last_and_channel_first_agree():
    torch.manual_seed(0)
    a = SS2D(16, d_state=4, ssm_ratio=1.0, forward_type="v05_noz")
    b = SS2D(16, d_state=4, ssm_ratio=1.0, forward_type="v05_noz", channel_first=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 3, 16)  # (B, H, W, C): non-square, W odd
    with torch.no_grad():
        ya = a(x)
        yb = b(x.permute(0, 3, 1, 2))
    assert yb.shape == (2, 16, 5, 3)
    assert_close(yb.permute(0, 2, 3, 1), ya, (1e-6, 1e-5), "channel_first vs channel_last")
    for H, W in ((1, 4), (4, 1), (1, 1)):  # a row, a column, a pixel
        assert a(torch.randn(1, H, W, 16)).shape == (1, H, W, 16)


def test_vssblock_default_layout_and_norm_layer():
    blk = VSSBlock(hidden_dim=8, ssm_d_state=2, ssm_ratio=1.0, mlp_ratio=2.0, forward_type="v05_noz")
    assert "op.in_proj.weight" in blk.state_dict() and "mlp.fc2.bias" in blk.state_dict()
    x = torch.randn(2, 3, 4, 8, requires_grad=True)
    blk(x).sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in blk.parameters())
    with pytest.raises(ValueError, match="norm_layer"):
        VSSBlock(hidden_dim=8, norm_layer=torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="drop_path"):
        VSSBlock(hidden_dim=8, drop_path=0.1)


def test_linear2d_weights_stored_4d_load_as_vmamba_loads_them():
    # VMamba's Linear2d views a checkpoint's (out, in, 1, 1) conv-kernel weight as (out, in).
    name = VSSBLOCK_CASES[0]
    _, _, cfg = golden(name)
    ref, t, _ = module_from_golden(name)
    sd = {k[len("params."):]: torch.from_numpy(v).clone() for k, v in t.items() if k.startswith("params.")}
    l2d = ("op.in_proj.weight", "op.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    for k in l2d:
        sd[k] = sd[k][:, :, None, None]
    blk = VSSBlock(**cfg)
    blk.load_state_dict(sd)
    for k in l2d:
        assert blk.state_dict()[k].shape == ref.state_dict()[k].shape
    x = torch.from_numpy(t["x"])
    with torch.no_grad():
        assert torch.equal(blk(x), ref(x))
    sd["op.in_proj.weight"] = sd["op.in_proj.weight"].reshape(*sd["op.in_proj.weight"].shape[:2], 1, 1, 1)
    with pytest.raises(RuntimeError, match="in_proj"):  # any other shape: torch's size mismatch
        VSSBlock(**cfg).load_state_dict(sd)
    s = SS2D(16, d_state=4, ssm_ratio=1.0, forward_type="v05_noz", channel_first=True)
    sd2 = {k: (v[:, :, None, None] if k in ("in_proj.weight", "out_proj.weight") else v)
           for k, v in s.state_dict().items()}
    s2 = SS2D(16, d_state=4, ssm_ratio=1.0, forward_type="v05_noz", channel_first=True)
    s2.load_state_dict(sd2)
    assert all(torch.equal(a, b) for a, b in zip(s.state_dict().values(), s2.state_dict().values()))


def test_constructor_signatures_are_the_official_ones():
    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}

    d = defaults(Mamba3)
    assert {k: d[k] for k in ("d_state", "expand", "headdim", "ngroups", "rope_fraction", "A_floor", "is_mimo",
                              "mimo_rank", "chunk_size", "is_outproj_norm")} == dict(
        d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, A_floor=1e-4, is_mimo=False,
        mimo_rank=4, chunk_size=64, is_outproj_norm=False)
    d = defaults(SS2D)
    assert (d["d_model"], d["d_state"], d["ssm_ratio"], d["d_conv"], d["forward_type"], d["channel_first"],
            d["act_layer"]) == (96, 16, 2.0, 3, "v2", False, torch.nn.SiLU)
    d = defaults(VSSBlock)
    assert (d["ssm_d_state"], d["mlp_ratio"], d["forward_type"], d["norm_layer"], d["mlp_act_layer"]) == (
        16, 4.0, "v2", torch.nn.LayerNorm, torch.nn.GELU)
    d = defaults(BiMamba)
    assert (d["bimamba_type"], d["if_devide_out"], d["init_layer_scale"], d["d_conv"]) == ("v2", False, None, 4)
    d = defaults(MHA)
    assert (d["num_heads_kv"], d["mlp_dim"], d["causal"], d["d_conv"], d["rotary_emb_base"]) == (
        None, 0, False, 0, 10000.0)
    d = defaults(GatedMLP)
    assert (d["hidden_features"], d["bias"], d["multiple_of"]) == (None, False, 128)


def test_bad_inputs_are_clear_errors():
    m3 = Mamba3(16, d_state=8, headdim=8, chunk_size=4)
    with pytest.raises(TypeError, match="float32"):
        m3(torch.randn(1, 3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, d_model\)"):
        m3(torch.randn(3, 16))
    with pytest.raises(ValueError, match="16"):
        m3(torch.randn(1, 3, 15))
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(16, d_state=8, headdim=8, rope_fraction=0.3)
    with pytest.raises(ValueError, match="headdim"):
        Mamba3(16, d_state=8, headdim=7)
    with pytest.raises(TypeError, match="nope"):
        Mamba3(16, nope=1)
    with pytest.raises(ValueError, match="CPU"):
        SS2D(8, device="cuda")
    with pytest.raises(TypeError, match="float32"):
        BiMamba(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        SS2D(8, d_state=2, channel_first=True)(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match="forward_type"):
        SS2D(8, forward_type="v9")
    with pytest.raises(ValueError, match="bimamba_type"):
        BiMamba(8, bimamba_type="v1")
    with pytest.raises(ValueError, match="inference_params"):
        BiMamba(8)(torch.randn(1, 3, 8), inference_params=InferenceParams(3, 1))
    with pytest.raises(ValueError, match="num_heads"):
        MHA(10, 3)
    with pytest.raises(ValueError, match="causal"):
        MHA(8, 2).step(torch.randn(1, 8), None)
    with pytest.raises(ValueError, match="in_features"):
        GatedMLP(8)(torch.randn(2, 7))


def test_state_dict_round_trip_pickle_and_deepcopy():
    for name in ("vssblock_v05noz_d24_n1", "mamba3_mimo_d32_r2", "mha_d48_h6_kv1_conv3_mlp"):
        m, t, _ = module_from_golden(name)
        x = torch.from_numpy(t["x"])
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        m2 = torch.load(buf)
        m3 = copy.deepcopy(m)
        with torch.no_grad():
            assert torch.equal(m(x), m2(x)) and torch.equal(m(x), m3(x)), name


def test_numpy_level_classes():
    t, meta, cfg = golden("ss2d_v0_d16_n8")
    layer = mambacpp.SS2D(**cfg)
    assert layer.param_names == meta["param_names"].split(",")
    for n in layer.param_names:
        layer.params[n][...] = t["params." + n]
    y, saved = layer.forward(t["x"], save=True)
    assert_close(y, t["y"], GOLDEN_F32, "numpy SS2D y")
    dx = layer.backward(saved, t["g"])
    assert_close(dx, t["grad_x"], GOLDEN_GRAD_F32, "numpy SS2D grad_x")
    assert_close(layer.grads["A_logs"], t["grad.A_logs"], GOLDEN_GRAD_F32, "numpy SS2D grad.A_logs")
    with pytest.raises(ValueError, match="no decode state"):
        layer.forward(t["x"], return_state=True)
    m3 = mambacpp.Mamba3(16, d_state=8, headdim=8)
    assert m3.state_names == ["angle_state", "ssm_state", "k_state", "v_state"]
    with pytest.raises(ValueError, match="MHAState"):
        mambacpp.MHA(8, 2, causal=True).step(np.zeros((1, 8), np.float32), [np.zeros(1, np.float32)])
    with pytest.raises(ValueError, match="float32"):
        mambacpp.GatedMLP(8).forward(np.zeros((2, 8)))


def test_a_small_ss2d_model_learns():
    """A VMamba-style classifier (patch embedding, SS2D, pooling, head) learns to tell horizontal
    from vertical bars in noise: a task no per-pixel model can solve without mixing pixels."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, H, W = 64, 6, 6
    labels = rng.integers(0, 2, n)
    imgs = 0.3 * rng.standard_normal((n, H, W, 1)).astype(np.float32)
    for i, lab in enumerate(labels):
        k = rng.integers(0, H)
        if lab:
            imgs[i, k, :, 0] += 1.5
        else:
            imgs[i, :, k, 0] += 1.5
    x, yl = torch.from_numpy(imgs), torch.from_numpy(labels)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(1, 8)
            self.ss2d = SS2D(8, d_state=4, ssm_ratio=1.0, forward_type="v05_noz")
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            h = self.embed(x)
            h = h + self.ss2d(h)
            return self.head(h.mean((1, 2)))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    loss0 = torch.nn.functional.cross_entropy(net(x), yl).item()
    for _ in range(60):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), yl)
        loss.backward()
        opt.step()
    acc = (net(x).argmax(1) == yl).float().mean().item()
    assert loss.item() < 0.5 * loss0 and acc >= 0.9, (loss0, loss.item(), acc)
