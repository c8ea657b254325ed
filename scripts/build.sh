#!/usr/bin/env bash
# Configures and builds one variant in build/<variant>:
#   main    LibTorch of the installed PyTorch (CUDA kernels compiled when it has CUDA)
#   cpu     the same LibTorch, CUDA kernels off (faster to build)
#   deb113  Debian's libtorch-dev 1.13 (CPU)
#   san     like cpu, with AddressSanitizer and UndefinedBehaviorSanitizer in colt5's own code
#   fuzz    clang, the library and the program with ASan + UBSan and libFuzzer's coverage, and the
#           fuzz targets of fuzz/ (no tests, benchmarks or CUDA); scripts/fuzz.sh runs them
# Extra arguments are passed to ninja (targets).
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:-main}
shift || true
PYTHON=${PYTHON:-python3}
case "$variant" in
  main | cpu)
    prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    cuda=AUTO
    [ "$variant" = cpu ] && cuda=OFF
    args=(-DCMAKE_PREFIX_PATH="$prefix" -DCOLT5_CUDA=$cuda) ;;
  deb113)
    args=(-DCMAKE_PREFIX_PATH=/usr/lib/x86_64-linux-gnu/cmake -DCOLT5_CUDA=OFF) ;;
  san)
    prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    # vptr checks are left out: LibTorch's classes come from libraries built without the sanitizers.
    san="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    # -O1 with line tables only: a third of -O2 -g's compile time on 2 cores, stack traces still name lines.
    args=(-DCMAKE_PREFIX_PATH="$prefix" -DCOLT5_CUDA=OFF -DCOLT5_BUILD_BENCH=OFF "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -g1"
      "-DCMAKE_CXX_FLAGS=$san" "-DCMAKE_EXE_LINKER_FLAGS=$san" "-DCMAKE_SHARED_LINKER_FLAGS=$san") ;;
  fuzz)
    prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
    san="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
    args=(-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_PREFIX_PATH="$prefix" -DCOLT5_CUDA=OFF
      -DCOLT5_BUILD_BENCH=OFF -DCOLT5_BUILD_TESTS=OFF -DCOLT5_BUILD_FUZZ=ON -DCOLT5_USE_PCH=OFF
      "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -gline-tables-only" "-DCMAKE_CXX_FLAGS=$san"
      "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined"
      "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined") ;;
  *) echo "build.sh: unknown variant '$variant' (main, cpu, deb113, san or fuzz)" >&2; exit 2 ;;
esac
mkdir -p build
# nvcc from the CUDA toolkit's usual place when it is not on PATH.
if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
dir=build/$variant
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${args[@]}" >"$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log"; exit 1; }
fi
ninja -C "$dir" "$@"
