#!/usr/bin/env bash
# Set-up, build, then the main job on its built-in default. Arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh main -j"$(nproc)" >/dev/null
if [ -x build/main/colt5 ]; then
  exec build/main/colt5 train "$@"
fi
exec build/main/colt5-demo "$@"
