"""Shared helpers of the Python tests: golden files (tests/data/golden/, produced by the official
mamba_ssm, see tests/data/golden/SOURCE.md) and the tolerances of tests/tolerances.h."""

import json
import os

import numpy as np
import pytest

import mambacpp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("MAMBA_TEST_DATA", os.path.join(ROOT, "tests", "data"))
GOLDEN = os.path.join(DATA, "golden")
SHARED = os.environ.get("MAMBA_SHARED_DIR", os.path.join(ROOT, "..", "shared"))

# tests/tolerances.h: (atol, rtol); |a - e| <= atol + rtol * |e| elementwise.
GOLDEN_F32 = (1e-5, 1e-4)  # kGoldenF32: outputs vs the official fp32 reference
GOLDEN_GRAD_F32 = (5e-5, 2e-4)  # kGoldenGradF32: gradients vs golden
STEP_VS_FULL = (1e-5, 1e-4)  # kStepVsFull: decode vs full forward
GOLDEN_LOGITS = (1e-4, 1e-4)  # kGoldenLogits: LM logits vs golden

MAMBA1_CASES = ["mamba1_d16_n64", "mamba1_d32_n16", "mamba1_d24_conv3_rank3", "mamba1_d12_bias_e3"]
MAMBA2_CASES = ["mamba2_d64_g1", "mamba2_d64_g2"]


def golden(name):
    """(tensors, metadata, config dict) of tests/data/golden/<name>.safetensors."""
    t, meta = mambacpp.load_safetensors(os.path.join(GOLDEN, name + ".safetensors"))
    cfg = json.loads(meta["config"]) if "config" in meta else None
    return t, meta, cfg


def assert_close(actual, expected, tol, what):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    atol, rtol = tol
    err = np.abs(a - e)
    bad = err > atol + rtol * np.abs(e)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} of {a.size} elements out of tolerance (atol {atol}, rtol {rtol}); "
        f"max abs err {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"
    )


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    n = mambacpp.num_threads()
    yield
    mambacpp.set_num_threads(n)

MAMBA3_CASES = [
    "mamba3_siso_d32_n16",
    "mamba3_siso_d48_n32_rope1_norm",
    "mamba3_siso_d32_g2",
    "mamba3_mimo_d32_r2",
    "mamba3_mimo_d32_r4_rope1_norm",
]
SS2D_CASES = ["ss2d_v0_d16_n8", "ss2d_v05_d32_n4", "ss2d_v05noz_d24_n4"]
VSSBLOCK_CASES = ["vssblock_v05noz_d24_n1"]
BIMAMBA_CASES = ["vim_bimamba_v2_d16_div", "vim_bimamba_v2_d24_n8_nodiv_ls"]
MHA_CASES = [
    "mha_d32_h2_hd24_rot16_noncausal",
    "mha_d48_h6_kv1_conv3_mlp",
    "mha_d64_h4_kv2_rot8i_conv4",
    "mha_d64_h4_rot16",
]
GATED_MLP_CASES = ["gated_mlp_d40_i72_bias_m16_o24", "gated_mlp_d64_i96"]


def scaled(tol, expected):
    """tests/test_mamba3.cpp's scaled(): the absolute part times max(1, max|expected|) (golden
    README, case 5)."""
    return (tol[0] * max(1.0, float(np.abs(np.asarray(expected)).max())), tol[1])
