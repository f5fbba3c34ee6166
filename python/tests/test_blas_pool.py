"""The layer's GEMMs when the process loaded another OpenBLAS than the one mambacpp links.

Debian's numpy and torch link the pthreads OpenBLAS; mambacpp links the OpenMP one; both have the
soname libopenblas.so.0, so whichever the process loads first serves all. After `import numpy` or
`import torch` first (the usual case), the GEMMs (the backward's dX and dW) run on the pthreads library, which src/core/gemm.cpp runs one
thread per block of C inside mambacpp's own pool. Each order runs in its own interpreter (the
import order is fixed per process); the results must agree with each other to fp32 rounding.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_close

CHILD = r"""
import json, sys
if sys.argv[1] == "torch-first":
    import torch
    torch.set_num_threads(2)
    (torch.ones(256, 256) @ torch.ones(256, 256)).sum()  # torch's pool awake, as in a model
if sys.argv[1] == "mambacpp-first":
    import mambacpp  # before numpy, which also brings the pthreads OpenBLAS
import numpy as np
import mambacpp
maps = [l.split()[-1] for l in open("/proc/self/maps") if "libopenblas" in l]
variant = ("pthread" if any("openblas-pthread" in m for m in maps) else
           "openmp" if any("openblas-openmp" in m for m in maps) else "other")
mambacpp.set_num_threads(2)
m = mambacpp.Mamba1(d_model=64, seed=3)
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 160, 64)).astype(np.float32)
g = rng.standard_normal((2, 160, 64)).astype(np.float32)
y, saved = m.forward(x, save=True)
dx = m.backward(saved, g)
out = {"y": y, "dx": dx}
out.update({"grad." + k: v for k, v in m.grads.items()})
np.savez(sys.argv[2], **out)
print(json.dumps({"variant": variant}))
"""


def run_child(order, path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", CHILD, order, path], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"{order}: exit {r.returncode}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])["variant"]


def test_gradients_do_not_depend_on_which_openblas_was_loaded(tmp_path):
    pytest.importorskip("torch")
    a, b = str(tmp_path / "mambacpp_first.npz"), str(tmp_path / "torch_first.npz")
    va = run_child("mambacpp-first", a)
    vb = run_child("torch-first", b)
    if vb != "pthread":
        pytest.skip(f"torch did not bring the pthreads OpenBLAS here (loaded: {vb}); "
                    "the path under test is not reachable")
    assert va != "pthread", "mambacpp imported first should load the OpenBLAS it links"
    ra, rb = np.load(a), np.load(b)
    assert sorted(ra.files) == sorted(rb.files)
    assert len(ra.files) >= 10  # y, dx and every parameter's gradient
    # Same arithmetic, other blocking of the GEMMs: fp32 rounding only. Gradients are sums over
    # 320 tokens, so their scale sets the tolerance (the golden gradient tolerance).
    for k in ra.files:
        scale = max(1.0, float(np.abs(ra[k]).max()))
        assert_close(rb[k] / scale, ra[k] / scale, (5e-5, 2e-4), k)
