#!/usr/bin/env bash
# Copies the header-only dependencies (nlohmann-json, CLI11, Gloo's headers) and
# the GoogleTest sources installed on this machine into third_party/vendor
# (git-ignored), so a machine without a package registry (a GPU box) can
# configure and build:
#   third_party/vendor/include/{nlohmann,CLI,gloo}, third_party/vendor/googletest.
# Where PyPI is reachable it also unpacks the reference Python package and its
# pure-Python dependencies (colt5-attention 0.11.2, local-attention 1.10.0,
# einops, packaging) into third_party/vendor/reference, for
# bench/bench_modules_reference.py on that box (skipped, with a note, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=third_party/vendor
for d in /usr/include/nlohmann /usr/include/CLI /usr/include/gloo /usr/src/googletest; do
  [ -d "$d" ] || { echo "vendor.sh: $d is missing (apt-get install nlohmann-json3-dev libcli11-dev libgloo-dev googletest)" >&2; exit 1; }
done
rm -rf "$dest"
mkdir -p "$dest/include"
cp -a /usr/include/nlohmann "$dest/include/"
cp -a /usr/include/CLI "$dest/include/"
cp -a /usr/include/gloo "$dest/include/"
cp -a /usr/src/googletest "$dest/googletest"
wheels=$(mktemp -d)
if "${PYTHON:-python3}" -m pip download -q --no-deps -d "$wheels" colt5-attention==0.11.2 local-attention==1.10.0 \
    einops==0.8.2 packaging >/dev/null 2>&1; then
  mkdir -p "$dest/reference"
  for w in "$wheels"/*.whl; do "${PYTHON:-python3}" -m zipfile -e "$w" "$dest/reference"; done
else
  echo "vendor.sh: PyPI not reachable; the reference package is left out (bench_modules_reference.py needs it)"
fi
rm -rf "$wheels"
echo "vendor.sh: $(du -sh "$dest" | cut -f1) in $dest"
