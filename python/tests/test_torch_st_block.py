"""mambacpp.torch.STBlock (the spatio-temporal block; no official code, so no golden file): the
torch module against the numpy-level C++ layer (same parameters: same outputs and gradients),
directional finite differences of every parameter and the input, the streaming step against
the forward, and errors."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mambacpp  # noqa: E402
from mambacpp.torch import STBlock  # noqa: E402
from conftest import STEP_VS_FULL, assert_close  # noqa: E402

TEMPORAL = {
    "Mamba1": {"layer": "Mamba1", "d_state": 4},
    "Mamba2": {"layer": "Mamba2", "d_state": 8, "headdim": 4, "chunk_size": 4},
    "Mamba3": {"layer": "Mamba3", "d_state": 8, "headdim": 4, "chunk_size": 4},
    "MHA": {"layer": "MHA", "num_heads": 2, "causal": True, "rotary_emb_dim": 2},
}
B, T, N, C = 2, 5, 3, 8


def make(kind, seed=0):
    torch.manual_seed(seed)
    return STBlock(N, C, num_heads=2, temporal=TEMPORAL[kind])


@pytest.mark.parametrize("kind", list(TEMPORAL))
def test_torch_module_equals_the_numpy_layer(kind):
    m = make(kind)
    names = [n for n, _ in m.named_parameters()]
    layer = mambacpp.STBlock(N, C, num_heads=2, temporal=TEMPORAL[kind])
    assert layer.param_names == names == list(m.state_dict().keys())
    assert names[:3] == ["node_emb", "spatial.q_proj.weight", "spatial.k_proj.weight"]
    assert any(n.startswith("temporal.") for n in names)
    for n, p in m.named_parameters():
        layer.params[n][...] = p.detach().numpy()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, N, C)).astype(np.float32)
    g = rng.standard_normal((B, T, N, C)).astype(np.float32)
    y_np, saved = layer.forward(x, save=True)
    dx_np = layer.backward(saved, g)
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    (y * torch.from_numpy(g)).sum().backward()
    assert np.array_equal(y.detach().numpy(), y_np)
    assert np.array_equal(xt.grad.numpy(), dx_np)
    for n, p in m.named_parameters():
        assert np.array_equal(p.grad.numpy(), layer.grads[n]), n


@pytest.mark.parametrize("kind", list(TEMPORAL))
def test_directional_finite_differences_of_every_parameter_and_the_input(kind):
    """Central differences (eps 2e-3, fp32 forward, float64 loss) along a random direction of
    each tensor, against autograd; tolerance kLayerDirFD of tests/tolerances.h (2e-3 + 2e-3 rel)."""
    m = make(kind, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, N, C, generator=gen)
    g = torch.randn(B, T, N, C, generator=gen)
    xg = x.clone().requires_grad_()
    (m(xg) * g).sum().backward()
    eps = 2e-3
    targets = [("x", x, xg.grad)] + [(n, p, p.grad) for n, p in m.named_parameters()]
    for name, tensor, grad in targets:
        d = torch.randn(tensor.shape, generator=gen)
        analytic = float((grad.double() * d.double()).sum())
        orig = tensor.detach().clone()

        def loss(sign):
            with torch.no_grad():
                tensor.copy_(orig + sign * eps * d)
                out = float((m(x).double() * g.double()).sum())
                tensor.copy_(orig)
            return out

        numeric = (loss(1) - loss(-1)) / (2 * eps)
        assert abs(numeric - analytic) <= 2e-3 + 2e-3 * abs(numeric), (kind, name, numeric, analytic)


@pytest.mark.parametrize("kind", list(TEMPORAL))
def test_streaming_step_equals_the_forward(kind):
    m = make(kind, seed=5)
    x = torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = m(x)
        state = m.allocate_inference_cache(B)
        ys = torch.stack([m.step(x[:, t], state) for t in range(T)], 1)
        assert_close(ys, y, STEP_VS_FULL, kind + " step vs forward")
        # prefill the first P steps with forward(state=...), then stream the rest
        P = 2
        state = m.allocate_inference_cache(B)
        yp = m(x[:, :P], state=state)
        rest = [m.step(x[:, t], state) for t in range(P, T)]
        assert_close(torch.cat([yp, torch.stack(rest, 1)], 1), y, STEP_VS_FULL, kind + " prefill + step")
    # T = 1 and N = 1 (ragged shapes)
    m1 = STBlock(1, C, num_heads=2, temporal=TEMPORAL[kind])
    x1 = torch.randn(1, 1, 1, C)
    with torch.no_grad():
        assert_close(m1.step(x1[:, 0], m1.allocate_inference_cache(1)), m1(x1)[:, 0], STEP_VS_FULL, "T=N=1")


def test_errors():
    m = make("Mamba1")
    with pytest.raises(ValueError, match=r"\(batch, time, num_nodes, d_model\)"):
        m(torch.randn(B, T, C))
    with pytest.raises(ValueError, match="3"):  # the node count
        m(torch.randn(B, T, N + 1, C))
    with pytest.raises(TypeError, match="float32"):
        m(torch.randn(B, T, N, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="allocate_inference_cache"):
        m.step(torch.randn(B, N, C), None)
    with pytest.raises(ValueError, match="temporal.layer"):
        STBlock(N, C, temporal={"layer": "LSTM"})
    with pytest.raises(ValueError, match="causal"):
        STBlock(N, C, num_heads=2, temporal={"layer": "MHA", "num_heads": 2})
    with pytest.raises(ValueError, match="num_heads"):
        STBlock(N, C, num_heads=3)
    with pytest.raises(ValueError, match="temporal.nope"):
        STBlock(N, C, temporal={"layer": "Mamba1", "nope": 1})
