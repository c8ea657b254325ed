#!/usr/bin/env bash
# Builds the safetensors parser fuzzer (libFuzzer, ASan, UBSan; no torch) and
# runs it over a seed corpus of small valid files plus tests/golden.
#   scripts/fuzz.sh                 one million inputs
#   scripts/fuzz.sh -max_total_time=600 -jobs=2   (arguments go to libFuzzer)
# FUZZ_TARGET=config fuzzes the `colt5` program's config.json reader and checks
# instead (fuzz/config_fuzz.cpp; needs LibTorch's headers, from python3's torch).
# FUZZ_TARGET=cli, text or checkpoint fuzz the command line, the text loader
# and checkpoint directories (fuzz/*_fuzz.cpp): they link the library and the
# program, built by `scripts/build.sh fuzz` (clang, ASan, UBSan) in build/fuzz.
# Environment: CXX (default clang++), FUZZ_DIR (default build-fuzz/),
# NLOHMANN_JSON_INCLUDE (directory holding nlohmann/json.hpp).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${FUZZ_DIR:-$root/build-fuzz}
cxx=${CXX:-clang++}
mkdir -p "$out/seeds" "$out/corpus"

includes=(-I"$root/src")
json_dir=${NLOHMANN_JSON_INCLUDE:-}
if [[ -z "$json_dir" ]]; then
  for d in "$root/third_party/vendor/nlohmann_json/include" "$root/third_party/vendor/include" /usr/local/include /usr/include; do
    if [[ -f "$d/nlohmann/json.hpp" ]]; then json_dir=$d; break; fi
  done
fi
[[ -n "$json_dir" && -f "$json_dir/nlohmann/json.hpp" ]] || { echo "nlohmann/json.hpp not found; set NLOHMANN_JSON_INCLUDE" >&2; exit 1; }
# -I/usr/include would reorder the system headers; it is searched anyway.
[[ "$json_dir" != /usr/include ]] && includes+=(-isystem "$json_dir")

target=${FUZZ_TARGET:-safetensors}
if [[ "$target" == cli || "$target" == text || "$target" == checkpoint ]]; then
  bash "$root/scripts/build.sh" fuzz colt5_fuzz_$target colt5-cli
  bin=$root/build/fuzz/fuzz/colt5_fuzz_$target
  seeds=$out/$target-seeds
  rm -rf "$seeds"
  mkdir -p "$seeds" "$out/$target-corpus"
  case "$target" in
    cli)
      # One argument per line: every subcommand with typical flags.
      printf 'train\n--steps\n10\n--dim\n64\n--seq-len\n128\n' >"$seeds/train"
      printf 'train\n--nproc\n2\n--batch\n4\n--split\n0.8,0.1\n--data\nx.txt\n' >"$seeds/train-text"
      printf 'train\n--resume\nrun\n--steps\n20\n--device\ncuda\n' >"$seeds/resume"
      printf 'train\n--light-only\n--world-size\n2\n--rank\n1\n--master-port\n29500\n' >"$seeds/dist"
      printf 'eval\n--ckpt\nrun\n--split\ntest\n' >"$seeds/eval"
      printf 'sample\n--ckpt\nrun\n--prompt\nHello\n--temperature\n0.5\n--top-k\n5\n' >"$seeds/sample"
      printf 'bench\n--batch\n2\n--seq-len\n256\n--dense\n--threads\n1\n' >"$seeds/bench"
      printf -- '--threads\n1\ntrain\n--help\n' >"$seeds/help" ;;
    text)
      # Four setting bytes, then text.
      printf '\x20\x01\x80\x80The quick brown fox jumps over the lazy dog. %.0s' {1..20} >"$seeds/english"
      printf '\x07\x03\x80\x40ab' >"$seeds/tiny" ;;
    checkpoint)
      # Real checkpoints of tiny models (routed and light-only), each its four
      # files joined by the separator line. The position table is cut to the
      # sequence length (32 rows, not the default 512) so that an input is
      # about 80 kB: smaller inputs run several times faster under ASan.
      for arch in routed light-only; do
        run=$out/checkpoint-run-$arch
        rm -rf "$run"
        flags=()
        [[ $arch == light-only ]] && flags=(--light-only)
        ASAN_OPTIONS=detect_leaks=0 "$root/build/fuzz/app/colt5" train --out "$run" --steps 2 --save-every 2 \
          --eval-every 2 --dim 16 --depth 1 --light-heads 2 --light-dim-head 8 --heavy-heads 2 --heavy-dim-head 8 \
          --window 8 --heavy-q 4 --heavy-kv 8 --heavy-ff-tokens 4 --seq-len 32 --batch 2 --task-keys 4 \
          --task-values 4 --task-filler 8 --task-pairs 1 --task-eval-size 4 --threads 1 --progress never \
          "${flags[@]+"${flags[@]}"}" >/dev/null
        ckpt=$(ls -d "$run"/ckpt-* | tail -1)
        python3 - "$ckpt" "$seeds/tiny-$arch" <<'PY'
import json, struct, sys
ckpt, out, rows = sys.argv[1], sys.argv[2], 32

def cut(raw):
    """The safetensors file with every position-table tensor cut to `rows` rows."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__", None)
    new_header, buf = {}, b""
    for name, t in header.items():
        lo, hi = t["data_offsets"]
        blob = data[lo:hi]
        shape = t["shape"]
        if name.endswith("pos_emb.weight") and shape and shape[0] > rows:
            blob = blob[:len(blob) // shape[0] * rows]
            shape = [rows] + shape[1:]
        new_header[name] = {"dtype": t["dtype"], "shape": shape, "data_offsets": [len(buf), len(buf) + len(blob)]}
        buf += blob
    if meta is not None:
        new_header = {"__metadata__": meta, **new_header}
    h = json.dumps(new_header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + buf

config = json.load(open(f"{ckpt}/config.json"))
config["model"]["max_seq_len"] = rows
parts = [json.dumps(config, indent=2).encode(), open(f"{ckpt}/state.json", "rb").read(),
         cut(open(f"{ckpt}/model.safetensors", "rb").read()), cut(open(f"{ckpt}/optimizer.safetensors", "rb").read())]
open(out, "wb").write(b"\n@@colt5@@\n".join(parts))
PY
      done
      ;;
  esac
  args=("$@")
  [[ " ${args[*]+"${args[*]}"} " == *" -runs="* || " ${args[*]+"${args[*]}"} " == *" -max_total_time="* ]] \
    || args=(-runs=1000000 "${args[@]+"${args[@]}"}")
  # LibTorch keeps some allocations for the process's life (no leak reports);
  # a smaller quarantine keeps the resident set bounded over a million inputs.
  export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:quarantine_size_mb=32} TMPDIR=${TMPDIR:-/dev/shm}
  cd "$out"
  # -close_fd_mask=3: the program's messages (help, errors) are not the fuzzer's output.
  max_len=65536
  [[ "$target" == checkpoint ]] && max_len=131072  # the seeds' four files are about 80 kB
  # fuzz/regressions/<target>: inputs that once failed, run again as seeds.
  extra=()
  [[ -d "$root/fuzz/regressions/$target" ]] && extra=("$root/fuzz/regressions/$target")
  exec "$bin" -max_len=$max_len -close_fd_mask=3 "${args[@]}" "$target-corpus" "$seeds" "${extra[@]+"${extra[@]}"}"
fi

if [[ "$target" == config ]]; then
  torch_dir=$("${PYTHON:-python3}" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)
  echo "building $out/config_fuzz"
  "$cxx" -std=c++17 -O1 -g -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    "${includes[@]}" -I"$root/app" -I"$root/include" \
    -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include" \
    "$root/fuzz/config_fuzz.cpp" "$root/app/program/config.cpp" -o "$out/config_fuzz"
  mkdir -p "$out/config-seeds" "$out/config-corpus"
  cp "$root/fuzz/config_seed.json" "$out/config-seeds/"
  args=("$@")
  [[ " ${args[*]+"${args[*]}"} " == *" -runs="* || " ${args[*]+"${args[*]}"} " == *" -max_total_time="* ]] \
    || args=(-runs=1000000 "${args[@]+"${args[@]}"}")
  cd "$out"
  exec ./config_fuzz -max_len=4096 "${args[@]}" config-corpus config-seeds
fi

echo "building $out/safetensors_fuzz"
"$cxx" -std=c++17 -O1 -g -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  "${includes[@]}" \
  "$root/fuzz/safetensors_fuzz.cpp" "$root/src/io/safetensors_format.cpp" \
  -o "$out/safetensors_fuzz"

# Seeds: small valid files covering every dtype, empty and 0-d tensors, metadata.
python3 - "$out/seeds" "$root/tests/golden" <<'PY'
import json, struct, sys, os
out = sys.argv[1]
def write(name, tensors, metadata=None):
    header, buf = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for tname, dtype, shape, data in tensors:
        header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [len(buf), len(buf) + len(data)]}
        buf += data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + buf)
write("empty.safetensors", [])
write("meta.safetensors", [], {"format": "pt", "note": "x"})
write("dtypes.safetensors", [
    ("f64", "F64", [2], struct.pack("<2d", 1.0, -2.5)),
    ("f32", "F32", [2, 1], struct.pack("<2f", 0.5, 3.0)),
    ("f16", "F16", [1], b"\x00\x3c"),
    ("bf16", "BF16", [1], b"\x80\x3f"),
    ("i64", "I64", [], struct.pack("<q", -7)),
    ("i32", "I32", [3], struct.pack("<3i", 1, 2, 3)),
    ("i8", "I8", [2], b"\xff\x01"),
    ("u8", "U8", [2, 2], b"\x01\x02\x03\x04"),
    ("bool", "BOOL", [3], b"\x01\x00\x01"),
    ("none", "F32", [0, 5], b""),
], {"k": "v"})
# The golden files' headers (names, dtypes, metadata) with one element per
# tensor, so that seeds stay small; the full files are copied as well.
import glob
sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
for path in sorted(glob.glob(os.path.join(sys.argv[2], "*.safetensors"))):
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    write("small_" + os.path.basename(path),
          [(k, v["dtype"], [1] * min(len(v["shape"]), 1), b"\0" * sizes[v["dtype"]]) for k, v in header.items()], meta)
PY
cp "$root"/tests/golden/*.safetensors "$out/seeds/" 2>/dev/null || true

args=("$@")
have_runs=0
have_len=0
for a in "${args[@]+"${args[@]}"}"; do
  case "$a" in -runs=*|-max_total_time=*) have_runs=1 ;; -max_len=*) have_len=1 ;; esac
done
[[ $have_runs == 1 ]] || args=(-runs=1000000 "${args[@]+"${args[@]}"}")
# Headers are a few kB; longer inputs (the full golden seeds) only slow mutation down.
[[ $have_len == 1 ]] || args=(-max_len=8192 "${args[@]}")

cd "$out"
exec ./safetensors_fuzz "${args[@]}" corpus seeds
