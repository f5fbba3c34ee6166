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
