#!/usr/bin/env bash
# One command for a GPU machine with PyTorch, nvcc, CMake and ninja but no
# package registry (run scripts/vendor.sh beforehand where the header-only
# dependencies and GoogleTest are not installed, and bring third_party/vendor):
# configures a CUDA build outside the tree, builds with all cores, runs the CUDA
# tests (ctest -L cuda), the CPU tests when COLT5_GPU_CPU_TESTS=1, the CUDA
# benchmark (and its GPU time by scope and kernel, --kernels) and right after
# it the reference package's on the same GPU
# (bench/bench_modules_reference.py; scripts/vendor.sh vendors the package),
# then the operator counts of each module's training step (bench_ops), the
# program's --cuda-graph (a short training eager and from a graph, compared;
# the README's bench with the replayed step), and prints a short table. Logs go to $OUT when it is set.
#   COLT5_GPU_BUILD   build folder (default /tmp/colt5-build)
#   COLT5_GPU_CPU_TESTS=1  also build and run the CPU tests
#   COLT5_GPU_BENCH=0      skip the benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
build=${COLT5_GPU_BUILD:-/tmp/colt5-build}
logs=${OUT:-$build/logs}
mkdir -p "$build" "$logs"
PYTHON=${PYTHON:-python3}
# LibTorch adds -gencode flags for its own architecture list (compute_50 and up,
# which nvcc 13 rejects) unless told otherwise: build for Hopper only.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export CUDACXX=${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
t0=$(date +%s)
stamp() { echo "[$(($(date +%s) - t0)) s] $*"; }

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv 2>&1 | tee "$logs/gpu.txt"
prefix=$("$PYTHON" -c 'import torch;print(torch.utils.cmake_prefix_path)') || { echo "gpu.sh: no PyTorch"; exit 1; }
stamp "configure ($build)"
if ! cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" -DCOLT5_CUDA=ON \
    >"$logs/configure.log" 2>&1; then
  tail -40 "$logs/configure.log"; exit 1
fi
targets=(colt5_cuda_tests bench_coor_descent_cuda bench_modules_cuda bench_ops colt5-cli)
[ "${COLT5_GPU_CPU_TESTS:-0}" = 1 ] && targets+=(colt5_tests)
stamp "build ${targets[*]} with $(nproc) jobs"
if ! ninja -C "$build" -j"$(nproc)" "${targets[@]}" >"$logs/build.log" 2>&1; then
  grep -E "error|Error" -A3 "$logs/build.log" | head -60; exit 1
fi
stamp "ctest -L cuda"
ctest --test-dir "$build" -L cuda --output-on-failure >"$logs/ctest_cuda.log" 2>&1
cuda_rc=$?
cpu_rc=-
if [ "${COLT5_GPU_CPU_TESTS:-0}" = 1 ]; then
  stamp "ctest -L cpu"
  timeout 600 ctest --test-dir "$build" -L cpu -j"$(nproc)" --output-on-failure >"$logs/ctest_cpu.log" 2>&1
  cpu_rc=$?
fi
bench_rc=-
if [ "${COLT5_GPU_BENCH:-1}" = 1 ]; then
  stamp "bench_coor_descent_cuda"
  "$build/bench_coor_descent_cuda" >"$logs/bench.txt" 2>&1
  bench_rc=$?
  stamp "bench_modules_cuda"
  "$build/bench_modules_cuda" >"$logs/bench_modules.txt" 2>&1 || bench_rc=1
  # Each module's training step by colt5 scope and by kernel (Kineto).
  stamp "bench_modules_cuda --kernels"
  "$build/bench_modules_cuda" --kernels >"$logs/bench_kernels.txt" 2>&1 || bench_rc=1
  # The reference package on the same GPU and LibTorch, right after (when it
  # is installed or vendored: scripts/vendor.sh).
  stamp "bench_modules_reference.py"
  "$PYTHON" bench/bench_modules_reference.py >"$logs/bench_reference.txt" 2>&1 || echo "(the reference benchmark did not run: see $logs/bench_reference.txt)" >>"$logs/bench_reference.txt"
  # The operators each module's training step dispatches on the GPU (and its
  # eager time).
  stamp "bench_ops --device cuda"
  "$build/bench_ops" --device cuda --seq 8192 --dim 512 --dim-head 64 >"$logs/bench_ops.txt" 2>&1 || bench_rc=1
fi
# The program's --cuda-graph: the same short training eager and from a graph
# (same seed and batches: the losses agree up to the order of floating-point
# atomics), and the README's bench with the replayed step beside the eager one.
graph_rc=-
if [ "${COLT5_GPU_BENCH:-1}" = 1 ]; then
  stamp "colt5 train eager / --cuda-graph, colt5 bench --cuda-graph"
  graph_rc=0
  for mode in eager graph; do
    flag=""
    [ "$mode" = graph ] && flag=--cuda-graph
    rm -rf "$build/run-$mode"
    "$build/app/colt5" train --device cuda --out "$build/run-$mode" --steps 60 --log-every 10 --eval-every 30 \
      --progress never $flag >"$logs/train_$mode.txt" 2>&1 || graph_rc=1
  done
  "$PYTHON" - "$build/run-eager/metrics.csv" "$build/run-graph/metrics.csv" >"$logs/train_graph_vs_eager.txt" 2>&1 <<'PY' || graph_rc=1
import csv, sys
rows = [{int(r["step"]): r for r in csv.DictReader(open(p))} for p in sys.argv[1:]]
worst = 0.0
for step, a in sorted(rows[0].items()):
    b = rows[1][step]
    for key in ("train_loss", "valid_loss"):
        if a[key] and b[key]:
            x, y = float(a[key]), float(b[key])
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
            print(f"step {step} {key}: eager {x:.6f} graph {y:.6f}")
print(f"largest relative difference {worst:.2e}")
sys.exit(0 if worst < 1e-2 else 1)
PY
  "$build/app/colt5" bench --device cuda --batch 8 --seq-len 8192 --dim 512 --depth 2 --window 128 --heavy-q 32 \
    --heavy-kv 1024 --light-heads 8 --heavy-heads 8 --light-dim-head 64 --heavy-dim-head 64 --dense --cuda-graph \
    --iters 10 --warmup-iters 2 >"$logs/bench_program.txt" 2>&1 || graph_rc=1
fi
stamp "done"
{
  echo "== CUDA tests (rc $cuda_rc)"
  grep -E "tests passed|Failed|\*\*\*|Expected|Which is|rel_err|seed=|Value of|Actual" "$logs/ctest_cuda.log" | head -60
  [ "$cpu_rc" != - ] && { echo "== CPU tests (rc $cpu_rc)"; grep -E "tests passed|\(Failed\)|\*\*\*" "$logs/ctest_cpu.log" | head -20; }
  [ "$bench_rc" != - ] && { echo "== benchmark (rc $bench_rc)"; sed -n '/^device:/,$p' "$logs/bench.txt";
    echo; cat "$logs/bench_modules.txt"; echo; cat "$logs/bench_kernels.txt"; echo; cat "$logs/bench_ops.txt"; echo; cat "$logs/bench_reference.txt"; }
  [ "$graph_rc" != - ] && { echo "== colt5 --cuda-graph (rc $graph_rc)"; tail -3 "$logs/train_graph_vs_eager.txt";
    cat "$logs/bench_program.txt"; }
} | tee "$logs/summary.txt"
[ "$cuda_rc" = 0 ] && [ "$cpu_rc" != 1 ] && [ "$bench_rc" != 1 ] && [ "$graph_rc" != 1 ]
