#!/usr/bin/env bash
# ctest python_venv_install: the README's one-command install (pip install --no-build-isolation .)
# into a fresh venv (python3 -m venv --system-site-packages: numpy and torch from Debian), reusing
# the extension of this CMake build (MAMBACPP_CMAKE_BUILD_DIR), then an import and a forward +
# backward through mambacpp.torch from outside the source tree.
# Usage: venv_install.sh PYTHON SOURCE_DIR BUILD_DIR
set -euo pipefail
py=$1 src=$2 build=$3
venv=$build/python-venv-test
rm -rf "$venv"
"$py" -m venv --system-site-packages --without-pip "$venv"
cd "$src"
# pip from the base interpreter, running in the venv (no network: --no-index).
MAMBACPP_CMAKE_BUILD_DIR=$build "$venv/bin/python" -m pip install -q --no-build-isolation --no-index \
  --no-deps --no-cache-dir .
cd /tmp
"$venv/bin/python" - <<'PY'
import os, sys
import mambacpp
assert mambacpp.__file__.startswith(sys.prefix), (mambacpp.__file__, sys.prefix)
print("mambacpp", mambacpp.__version__, "from", os.path.dirname(mambacpp.__file__))
try:
    import torch
except ImportError:
    torch = None
if torch is not None:
    from mambacpp.torch import Mamba
    m = Mamba(16)
    x = torch.randn(2, 8, 16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad.shape == x.shape and m.in_proj.weight.grad is not None
    print("mambacpp.torch forward + backward: ok (torch", torch.__version__ + ")")
PY
rm -rf "$venv"
