#!/usr/bin/env bash
# Set-up, build and every CPU test: the main build (PyTorch's LibTorch, with the
# CUDA kernels compiled and linked when it has CUDA), Debian's LibTorch 1.13,
# and the suite again under AddressSanitizer + UndefinedBehaviorSanitizer
# (variant san), and the Python package (built in the main build's folder)
# with its tests. COLT5_TEST_VARIANTS picks variants (default "main deb113 san").
# CUDA tests need a GPU: scripts/gpu.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
jobs=$(nproc)
for variant in ${COLT5_TEST_VARIANTS:-main deb113 san}; do
  echo "== build $variant"
  bash scripts/build.sh "$variant" -j"$jobs"
  echo "== test $variant"
  if [ "$variant" = san ]; then
    # LibTorch keeps allocations alive until exit by design: leaks are not reported.
    export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  fi
  timeout=1200
  [ "$variant" = san ] && timeout=3600
  # ctest lists the suite's tests by running it; a first start on a cold
  # machine (LibTorch's libraries read from disk, under the sanitizers) can be
  # slow, so it is paid and reported here rather than inside ctest's listing.
  start=$(date +%s)
  timeout 900 "build/$variant/tests/colt5_tests" --gtest_list_tests >/dev/null \
    || { echo "test.sh: build/$variant/tests/colt5_tests could not list its tests" >&2; exit 1; }
  echo "listing the $variant suite's tests took $(( $(date +%s) - start )) s"
  (cd "build/$variant" && ctest -L cpu --output-on-failure -j"$jobs" --timeout "$timeout")
  if [ "$variant" = main ]; then
    echo "== install and build a find_package(colt5) consumer"
    rm -rf build/main-install build/consumer
    cmake --install build/main --prefix build/main-install >/dev/null
    prefix=$("${PYTHON:-python3}" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    cmake -S examples/consumer -B build/consumer -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$PWD/build/main-install;$prefix" >build/consumer.configure.log 2>&1 \
      || { cat build/consumer.configure.log; exit 1; }
    ninja -C build/consumer
    build/consumer/consumer
    echo "== the main job's command (scripts/run.sh), three steps"
    rm -rf build/run-smoke
    bash scripts/run.sh --steps 3 --eval-every 3 --task-eval-size 8 --progress never --out build/run-smoke
    test -f build/run-smoke/metrics.csv
    echo "== Python package: pip install --no-build-isolation ., then pytest"
    bash scripts/test_python.sh build/main
  fi
done
echo "== all tests passed"
