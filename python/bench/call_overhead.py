"""Python call overhead: the README's CPU transformer block (2 x 4096 x 512,
256 heavy tokens for the feedforward and for the attention's queries and
keys/values) forward called through the Python module against the same C++
module's forward called from C++, in one process, in alternating rounds; plus
a tiny block where the per-call overhead is visible. Medians, no autograd."""

import argparse
import os
import platform
import statistics
import time

import torch

import colt5
from colt5 import _C


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def measure(label, block, x, mask, reps, rounds=3):
    """Rounds of `reps` back-to-back calls from Python and from C++, alternating
    (so that load from other processes hits both alike)."""
    py, cpp = [], []
    with torch.no_grad():
        block(x, mask=mask)
        for _ in range(rounds):
            for _ in range(reps):
                t0 = time.perf_counter()
                block(x, mask=mask)
                py.append(time.perf_counter() - t0)
            cpp.extend(_C.cpp_block_forward_seconds(block._cpp, x, mask, reps))
    p, c = statistics.median(py), statistics.median(cpp)
    print(f"| {label} | {c * 1e3:.3f} | {p * 1e3:.3f} | {(p - c) * 1e6:+.1f} | {p / c:.4f} | "
          f"{min(cpp) * 1e3:.3f} / {min(py) * 1e3:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny-reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs")
    print("| work | C++ call ms | Python call ms | difference µs | ratio | fastest C++ / Python ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    tiny = colt5.ConditionalRoutedTransformerBlock(dim=32, num_heavy_attn_tokens_q=8, num_heavy_attn_tokens_kv=8,
                                                   num_heavy_ff_tokens=8, light_window_size=16, light_heads=2,
                                                   heavy_heads=2, light_dim_head=16, heavy_dim_head=16).eval()
    x = torch.randn(1, 64, 32)
    measure("block 1 x 64 x 32, fwd", tiny, x, torch.ones(1, 64, dtype=torch.bool), args.tiny_reps)
    # An empty batch runs the same calls with no arithmetic: the difference is the Python layer alone.
    measure("same, empty batch (0 x 64 x 32), no mask", tiny, x[:0], None, args.tiny_reps)
    block = colt5.ConditionalRoutedTransformerBlock(dim=512, num_heavy_attn_tokens_q=256, num_heavy_attn_tokens_kv=256,
                                                    num_heavy_ff_tokens=256, light_window_size=128, light_heads=8,
                                                    heavy_heads=8).eval()
    x = torch.randn(2, 4096, 512)
    measure("block 2 x 4096 x 512 (README), fwd", block, x, torch.ones(2, 4096, dtype=torch.bool), args.reps)


if __name__ == "__main__":
    main()
