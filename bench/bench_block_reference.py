#!/usr/bin/env python3
"""The reference Python package's transformer block on the CPU, with the
configuration and timing of bench_block_cpu (2 x 4096 x 512, 256 heavy tokens,
float32, median of N runs of forward and of forward+backward of sum(out)), so
the two can be run back to back on the same machine with the same torch and
thread count.  Needs `pip install colt5-attention==0.11.2`.

  python3 bench/bench_block_reference.py [--runs N] [--threads T]
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    block = ConditionalRoutedTransformerBlock(dim=512, num_heavy_attn_tokens_q=256, num_heavy_attn_tokens_kv=256,
                                              num_heavy_ff_tokens=256)
    x = torch.randn(2, 4096, 512, requires_grad=True)
    mask = torch.ones(2, 4096, dtype=torch.bool)

    def fwd():
        with torch.no_grad():
            block(x, mask=mask)

    def fwd_bwd():
        out = block(x, mask=mask)
        out.backward(torch.ones_like(out))

    f = median_seconds(a.runs, fwd)
    fb = median_seconds(a.runs, fwd_bwd)
    print(f"reference colt5-attention block, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {a.runs}: fwd {f:.4f} s, fwd+bwd {fb:.4f} s")


if __name__ == "__main__":
    main()
