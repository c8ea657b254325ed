#!/usr/bin/env bash
# Set-up, build and every CPU test: the main build (PyTorch's LibTorch, with the
# CUDA kernels compiled and linked when it has CUDA) and Debian's LibTorch 1.13.
# CUDA tests need a GPU: scripts/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)
for variant in ${COLT5_TEST_VARIANTS:-main deb113}; do
  echo "== build $variant"
  bash scripts/build.sh "$variant" -j"$jobs"
  echo "== test $variant"
  (cd "build/$variant" && ctest -L cpu --output-on-failure -j"$jobs" --timeout 1200)
done
echo "== all tests passed"
