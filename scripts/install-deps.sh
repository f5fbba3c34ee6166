#!/usr/bin/env bash
# Installs the Debian packages mamba.cpp needs, only those that are missing.
# Needs root (or sudo). Safe to run again: it does nothing when all are present.
set -euo pipefail
PKGS=(g++ cmake make libopenblas-dev libopenblas0-openmp libhwy-dev nlohmann-json3-dev
      libcli11-dev libgtest-dev libutf8proc-dev
      # `mambacpp serve` (cpp-httplib) and its tests (curl; node + npm below)
      libcpp-httplib-dev curl
      # the reference renderer test_chat_template compares the chat templates with (Jinja2)
      python3-jinja2
      # the Python module (MAMBA_PYTHON): build, install with pip, and its tests
      python3-dev pybind11-dev python3-numpy python3-pip python3-setuptools python3-wheel
      python3-venv python3-pytest python3-torch
      # data-parallel `mambacpp train` over MPI (MAMBA_MPI) and its mpirun tests
      openmpi-bin libopenmpi-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# node + npm drive the official openai client in test_serve (any install of them will do)
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  missing+=(nodejs npm)
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
