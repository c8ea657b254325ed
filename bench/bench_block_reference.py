#!/usr/bin/env python3
"""The reference Python package's transformer block on the CPU, with the
configuration and timing of bench_block_cpu (2 x 4096 x 512, 256 heavy tokens,
float32, median of N runs of forward and of forward+backward of sum(out)), so
the two can be run back to back on the same machine with the same torch and
thread count (`bench_block_cpu --reference` runs it in alternation with its own
block).  Needs `pip install colt5-attention==0.11.2`.

  python3 bench/bench_block_reference.py [--runs N] [--threads T] [--batch B] [--seq N] [--dim D] [--heavy K]
"""
import argparse
import statistics
import time

import torch

try:
    from colt5_attention import ConditionalRoutedTransformerBlock
except ImportError as e:  # the comparison needs the package; say so plainly
    raise SystemExit(f"bench_block_reference: colt5-attention is not installed ({e})")


def median_seconds(runs, f):
    f()
    t = []
    for _ in range(runs):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return statistics.median(t)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heavy", type=int, default=256)
    a = p.parse_args()
    for name in ("runs", "threads", "batch", "seq", "dim", "heavy"):
        if getattr(a, name) <= 0:
            p.error(f"--{name} needs a positive number")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    block = ConditionalRoutedTransformerBlock(dim=a.dim, num_heavy_attn_tokens_q=a.heavy,
                                              num_heavy_attn_tokens_kv=a.heavy, num_heavy_ff_tokens=a.heavy)
    x = torch.randn(a.batch, a.seq, a.dim, requires_grad=True)
    mask = torch.ones(a.batch, a.seq, dtype=torch.bool)

    def fwd():
        with torch.no_grad():
            block(x, mask=mask)

    def fwd_bwd():
        out = block(x, mask=mask)
        out.backward(torch.ones_like(out))

    f = median_seconds(a.runs, fwd)
    fb = median_seconds(a.runs, fwd_bwd)
    print(f"reference colt5-attention block, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.batch} x {a.seq} x {a.dim}, {a.heavy} heavy tokens, median of {a.runs}: "
          f"fwd {f:.4f} s, fwd+bwd {fb:.4f} s")


if __name__ == "__main__":
    main()
