#!/usr/bin/env bash
# Copies the header-only dependencies (nlohmann-json, CLI11, Gloo's headers) and
# the GoogleTest sources installed on this machine into third_party/vendor
# (git-ignored), so a machine without a package registry (a GPU box) can
# configure and build:
#   third_party/vendor/include/{nlohmann,CLI,gloo}, third_party/vendor/googletest.
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
echo "vendor.sh: $(du -sh "$dest" | cut -f1) in $dest"
