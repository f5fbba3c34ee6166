"""examples/spatiotemporal.py runs end to end (a short run: the full one is in README.md)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
from conftest import ROOT  # noqa: E402


def test_spatiotemporal_example_runs():
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "spatiotemporal.py"), "--steps", "15", "--nodes", "4"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout
    for stage in ("spatial attention over nodes H_S (B, P, N, d)", "temporal Mamba H_T (B, P, N, d)",
                  "temporal CausalTemporalAttention", "gate z and fused H", "forecast (B, Hf, N)"):
        assert stage in out, out
    assert "(32, 48, 4, 32)" in out  # H_S: batch 32, P 48, N 4, d 32
    assert "persistence (last value repeated)" in out and "Mamba vs persistence" in out
