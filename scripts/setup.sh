#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test colt5; does
# nothing when everything is present.
#   Debian: compilers and build tools, Debian's LibTorch 1.13 (CPU) with the
#           OpenBLAS it needs for fast matrix products, GoogleTest, CLI11,
#           nlohmann-json, clang (the fuzzer), Gloo's headers (data-parallel
#           training; PyTorch's LibTorch has Gloo built in but ships no headers).
#   PyPI:   torch 2.11 (its LibTorch, with CUDA, is the main build).
set -euo pipefail

DEB_PACKAGES=(cmake ninja-build g++ git libtorch-dev libopenblas0-pthread googletest libgtest-dev
  nlohmann-json3-dev libcli11-dev clang libclang-rt-14-dev libgloo-dev)
TORCH_VERSION=${COLT5_TORCH_VERSION:-2.11.0}
PYTHON=${PYTHON:-python3}

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" \
    >/dev/null 2>&1; then
  echo "setup: installing torch==$TORCH_VERSION from PyPI (large download)"
  "$PYTHON" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
fi
