#!/usr/bin/env bash
# Set-up, build, then the main job on its built-in default. Arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh main -j"$(nproc)" colt5-cli >/dev/null
exec build/main/app/colt5 train "$@"
