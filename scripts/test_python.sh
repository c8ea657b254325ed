#!/usr/bin/env bash
# Installs the Python package from this tree into the Python that holds torch
# (pip install --no-build-isolation ., so the installed torch is used) and runs
# its tests (python/tests), among them the live parity tests against the
# reference package, which is installed from PyPI first.
#   scripts/test_python.sh [BUILD_DIR]   BUILD_DIR: the CMake build folder to
#   build in (default build/python); a folder already built by
#   scripts/build.sh main reuses its library and compiles only the extension.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
build_dir=${1:-build/python}
start=$(date +%s)
"$PYTHON" -m pip install -q --disable-pip-version-check "scikit-build-core>=0.10" pytest \
  colt5-attention==0.11.2 local-attention==1.10.0
"$PYTHON" -m pip install -q --disable-pip-version-check --no-build-isolation -Cbuild-dir="$build_dir" .
installed=$(date +%s)
echo "test_python: installed in $((installed - start)) s"
# From outside the tree, so that the installed package is what is imported.
(cd python/tests && "$PYTHON" -m pytest -q -p no:cacheprovider --rootdir=. .)
echo "test_python: tests in $(($(date +%s) - installed)) s"
