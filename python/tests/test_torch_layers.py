"""mambacpp.torch.Mamba / Mamba2 as drop-ins for mamba_ssm's modules: golden outputs and every
gradient through autograd, mamba_ssm's state_dict layout, decode (step, inference_params),
errors, and a small model that learns."""

import copy
import inspect
import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mambacpp  # noqa: E402
from mambacpp.torch import InferenceParams, Mamba, Mamba2  # noqa: E402
from conftest import (  # noqa: E402
    GOLDEN_F32,
    GOLDEN_GRAD_F32,
    MAMBA1_CASES,
    MAMBA2_CASES,
    STEP_VS_FULL,
    assert_close,
    golden,
)


def module_from_golden(name, **extra):
    t, meta, cfg = golden(name)
    cls = Mamba2 if name.startswith("mamba2") else Mamba
    m = cls(**cfg, layer_idx=0, **extra)
    sd = {k[len("params."):]: torch.from_numpy(v) for k, v in t.items() if k.startswith("params.")}
    m.load_state_dict(sd)  # strict: the keys and shapes must be mamba_ssm's
    return m, t, meta


@pytest.mark.parametrize("name", MAMBA1_CASES + MAMBA2_CASES)
def test_golden_forward_and_every_gradient(name):
    m, t, meta = module_from_golden(name)
    assert list(m.state_dict().keys()) == meta["param_names"].split(",")  # mamba_ssm's order too
    assert sum(p.numel() for p in m.parameters()) == int(meta["param_count"])
    x = torch.from_numpy(t["x"]).clone().requires_grad_()
    y = m(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert_close(y.detach(), t["y"], GOLDEN_F32, name + " y")
    (y * torch.from_numpy(t["g"])).sum().backward()
    assert_close(x.grad, t["grad_x"], GOLDEN_GRAD_F32, name + " grad_x")
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert_close(p.grad, t["grad." + n], GOLDEN_GRAD_F32, name + " grad." + n)


@pytest.mark.parametrize("name", MAMBA1_CASES + MAMBA2_CASES)
def test_decode_step_and_inference_params(name):
    m, t, meta = module_from_golden(name)
    x = torch.from_numpy(t["x"])
    B, L, _ = x.shape
    with torch.no_grad():
        conv_state, ssm_state = m.allocate_inference_cache(B, L)
        ys = []
        for i in range(L):
            y, conv_state, ssm_state = m.step(x[:, i : i + 1], conv_state, ssm_state)
            ys.append(y)
        assert_close(torch.cat(ys, 1), t["y_step"], GOLDEN_F32, name + " step")
        assert_close(conv_state, t["conv_state"], GOLDEN_F32, name + " conv_state")
        assert_close(ssm_state, t["ssm_state"], GOLDEN_F32, name + " ssm_state")
        # mamba_ssm's cached forward: prefill P tokens, then one token per call
        P = int(meta["prefill_len"])
        ip = InferenceParams(max_seqlen=L, max_batch_size=B)
        outs = [m(x[:, :P], inference_params=ip)]
        cs, ss = ip.key_value_memory_dict[0]
        assert_close(cs, t["prefill_conv_state"], GOLDEN_F32, name + " prefill conv_state")
        assert_close(ss, t["prefill_ssm_state"], GOLDEN_F32, name + " prefill ssm_state")
        ip.seqlen_offset = P
        for i in range(P, L):
            outs.append(m(x[:, i : i + 1], inference_params=ip))
            ip.seqlen_offset += 1
        assert_close(torch.cat(outs, 1), t["y_prefill_decode"], GOLDEN_F32, name + " prefill+decode")
        # step == forward
        assert_close(torch.cat(ys, 1), m(x), STEP_VS_FULL, name + " step vs forward")


def test_non_contiguous_step_state_is_updated():
    m, t, _ = module_from_golden("mamba2_d64_g1")
    x = torch.from_numpy(t["x"])
    B, L, _ = x.shape
    # mamba_ssm 2.x allocates Mamba2's conv_state as (B, K, C).transpose(1, 2): not contiguous
    conv_state = torch.zeros(B, m.d_conv, m.conv1d.weight.shape[0]).transpose(1, 2)
    ssm_state = torch.zeros(B, m.nheads, m.headdim, m.d_state)
    with torch.no_grad():
        ys = [m.step(x[:, i : i + 1], conv_state, ssm_state)[0] for i in range(L)]
    assert_close(torch.cat(ys, 1), t["y_step"], GOLDEN_F32, "step with a transposed conv_state")


def test_state_dict_round_trip_and_torch_save():
    m, t, _ = module_from_golden("mamba1_d24_conv3_rank3")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = Mamba(**golden("mamba1_d24_conv3_rank3")[2])
    m2.load_state_dict(torch.load(buf))
    x = torch.from_numpy(t["x"])
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    # the whole module pickles (torch.save(model)) and deep-copies
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf)
    m4 = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(m(x), m3(x)) and torch.equal(m(x), m4(x))
    m4.D.data.add_(1.0)  # a deep copy owns its parameters
    with torch.no_grad():
        assert not torch.equal(m(x), m4(x))


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_parameters_share_the_cpp_layers_memory(cls):
    # One copy of the weights: every parameter is the C++ layer's own array (same address), an
    # in-place update (an optimizer step, load_state_dict) is seen by both, and the layer keeps
    # working when the module is the only owner.
    m = cls(32) if cls is Mamba else cls(32, headdim=16)
    core = m._core.params
    for name, p in m.named_parameters():
        assert p.data_ptr() == core[name].__array_interface__["data"][0], name
    with torch.no_grad():
        m.out_proj.weight.mul_(2.0)
    np.testing.assert_array_equal(m.out_proj.weight.detach().numpy(), core["out_proj.weight"])
    x = torch.randn(1, 5, 32)
    y = m(x)
    del core
    assert torch.equal(m(x), y)


def test_mamba_ssm_constructor_signature():
    sig = inspect.signature(Mamba.__init__)
    want = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1, dt_init="random",
                dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False, use_fast_path=True,
                layer_idx=None, device=None, dtype=None)
    assert {k: sig.parameters[k].default for k in want} == want
    sig2 = inspect.signature(Mamba2.__init__)
    want2 = dict(d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None, ngroups=1,
                 A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None, sequence_parallel=True)
    assert {k: sig2.parameters[k].default for k in want2} == want2
    assert sig2.parameters["dt_limit"].default == (0.0, float("inf"))
    # initialisation follows torch's RNG; A_log, D and dt_bias are marked as mamba_ssm marks them
    torch.manual_seed(3)
    a = Mamba(16)
    torch.manual_seed(3)
    b = Mamba(16)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.A_log._no_weight_decay and a.D._no_weight_decay and a.dt_proj.bias._no_reinit
    assert torch.allclose(a.A_log[0], torch.log(torch.arange(1, 17, dtype=torch.float32)))  # S4D-real
    m2 = Mamba2(64, d_state=16, headdim=16, conv_init=0.01)
    assert m2.dt_bias._no_weight_decay and m2.conv1d.weight.abs().max() <= 0.01
    assert isinstance(a.in_proj, torch.nn.Linear) and isinstance(a.conv1d, torch.nn.Conv1d)


def test_bad_inputs_are_clear_errors():
    m = Mamba(16, d_state=4, layer_idx=0)
    x = torch.randn(2, 5, 16)
    with pytest.raises(TypeError, match="float32"):
        m(x.double())
    with pytest.raises(TypeError, match="float32"):
        m(x.to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"expected shape \(\*,\*,16\)"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match="batch, seqlen, d_model"):
        m(torch.randn(5, 16))
    with pytest.raises(TypeError):
        Mamba(16, not_an_argument=1)
    with pytest.raises(ValueError, match="CPU"):
        Mamba(16, device="cuda")
    with pytest.raises(TypeError, match="float32"):
        Mamba(16, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_state"):
        Mamba(16, d_state=0)
    with pytest.raises(ValueError, match="process_group"):
        Mamba2(64, process_group=object())
    with pytest.raises(ValueError, match="cu_seqlens"):
        Mamba2(64, d_state=16, headdim=16)(torch.randn(1, 4, 64), cu_seqlens=torch.tensor([0, 4]))
    m64 = copy.deepcopy(m).double()
    with pytest.raises(TypeError, match="float32"):
        m64(x)
    with pytest.raises(ValueError, match="layer_idx"):
        Mamba(16)(x, inference_params=InferenceParams(max_seqlen=5, max_batch_size=2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU"):
            m(x.cuda())


def test_non_contiguous_input_and_grad():
    m, t, _ = module_from_golden("mamba1_d16_n64")
    xt = torch.from_numpy(t["x"]).transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not xt.is_contiguous()
    y = m(xt)
    assert_close(y.detach(), t["y"], GOLDEN_F32, "non-contiguous x")
    g = torch.from_numpy(t["g"]).transpose(0, 1).contiguous().transpose(0, 1)
    y.backward(g)
    assert_close(xt.grad, t["grad_x"], GOLDEN_GRAD_F32, "non-contiguous grad_x")


def test_mamba2_flat_seqlen_argument():
    m, t, _ = module_from_golden("mamba2_d64_g2")
    x = torch.from_numpy(t["x"])
    B, L, D = x.shape
    with torch.no_grad():
        y = m(x.reshape(B * L, D), seqlen=L)
    assert_close(y.reshape(B, L, D), t["y"], GOLDEN_F32, "seqlen=")


def test_a_small_model_learns():
    """A PyTorch model with mambacpp.torch.Mamba inside learns a task that needs memory: output
    the input delayed by 3 steps. AdamW, gradient clipping and torch.save work unchanged."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(1, 16)
            self.mamba = Mamba(16, d_state=8, d_conv=4, expand=2)
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.out(self.mamba(self.inp(x)))

    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    delay = 3

    def batch():
        x = torch.randn(8, 32, 1)
        y = torch.zeros_like(x)
        y[:, delay:] = x[:, :-delay]
        return x, y

    x0, y0 = batch()
    with torch.no_grad():
        first = torch.nn.functional.mse_loss(net(x0), y0).item()
    for _ in range(150):
        x, y = batch()
        loss = torch.nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        last = torch.nn.functional.mse_loss(net(x0), y0).item()
    print("mse", first, "->", last)
    assert last < 0.2 * first, (first, last)
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    assert "mamba.in_proj.weight" in net.state_dict()


def test_gradcheck_float64_is_refused_but_fp32_directional_difference_matches():
    """A directional finite difference of the module's loss (fp32, eps 2e-3) against autograd,
    with the tolerance of tests/tolerances.h (kLayerDirFD: 2e-3 abs + 2e-3 rel)."""
    torch.manual_seed(1)
    m = Mamba2(32, d_state=8, headdim=8, chunk_size=4)
    x = torch.randn(2, 9, 32)
    g = torch.randn(2, 9, 32)
    params = list(m.parameters())
    dirs = [torch.randn_like(p) for p in params]
    dx = torch.randn_like(x)
    y = m(x.requires_grad_())
    (y * g).sum().backward()
    analytic = (x.grad * dx).sum().item() + sum((p.grad * d).sum().item() for p, d in zip(params, dirs))
    eps = 2e-3

    def loss(sign):
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(sign * eps * d)
            out = (m(x.detach() + sign * eps * dx).double() * g.double()).sum().item()
            for p, d in zip(params, dirs):
                p.sub_(sign * eps * d)
        return out

    numeric = (loss(1) - loss(-1)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 + 2e-3 * abs(numeric), (numeric, analytic)


def test_modules_from_several_python_threads():
    """Forward + backward from 4 Python threads at once (two on one shared module, two on their
    own modules) give the single-threaded results bit for bit."""
    import threading

    torch.manual_seed(2)
    shared = Mamba(24, d_state=8)
    own = [copy.deepcopy(shared) for _ in range(2)]
    x = torch.randn(2, 40, 24)

    def run(m):
        xr = x.clone().requires_grad_()
        y = m(xr)
        y.backward(torch.ones_like(y))
        return y.detach(), xr.grad

    ref_y, ref_dx = run(copy.deepcopy(shared))
    out, errors = {}, []

    def work(i, m):
        try:
            for _ in range(3):
                out[i] = run(m)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=work, args=(i, m)) for i, m in enumerate([shared, shared] + own)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors, errors
    for y, dx in out.values():
        assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)
