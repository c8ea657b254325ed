#!/usr/bin/env python3
"""The reference Python package (colt5-attention 0.11.2) on the configurations
of bench_modules_cuda, so the two can be run back to back on the same GPU with
the same LibTorch (the torch this Python imports): block 2 x 32768 x 512 and the
autoregressive module 2 x 8192 x 512, float32 (TF32 off and on), its Triton
router and its plain one, bf16 autocast; cross attention 1 x 1024 over 1,048,576
memories. Median of CUDA events; peak = allocated GiB during the timed runs.
A configuration the reference cannot run prints what it raised.

The package comes from `pip install colt5-attention==0.11.2`, or, on a machine
without a package registry, from third_party/vendor/reference (scripts/vendor.sh
unpacks the pure-Python wheels there).

  python3 bench/bench_modules_reference.py [--device cuda|cpu] [--small] [--runs N]
"""
import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
VENDORED = os.path.join(HERE, "..", "third_party", "vendor", "reference")
try:
    import colt5_attention
except ImportError:
    sys.path.insert(0, VENDORED)
    try:
        import colt5_attention
    except ImportError as e:
        raise SystemExit(f"bench_modules_reference: colt5-attention is not installed and not in {VENDORED} ({e})")


def measure(device, runs, f):
    """Median ms of f and peak allocated GiB while it ran."""
    f()
    f()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(runs):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30
    times = []
    for _ in range(runs):
        s = time.perf_counter()
        f()
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times), float("nan")


def row(work, pass_, result):
    if isinstance(result, str):
        print(f"{work:<52} {pass_:<8} fails: {result}", flush=True)
    else:
        ms, peak = result
        print(f"{work:<52} {pass_:<8} {ms:9.2f} {peak:8.2f}", flush=True)


def describe(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:120] if msg else ''}"


def attempt(device, runs, f):
    try:
        result = measure(device, runs, f)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # the reference's own failure is the result
        result = describe(e)
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception as e:  # a device-side assert surfaces at the next call
            return describe(e) + " (the CUDA context is lost: later rows cannot run)"
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="tiny shapes (a quick check that the script runs)")
    p.add_argument("--runs", type=int, default=10)
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    try:
        from importlib.metadata import version
        ref_version = version("colt5-attention")
    except Exception:  # unpacked without its metadata on the path
        ref_version = "unknown version"
    print(f"device: {name}; torch {torch.__version__}; colt5-attention {ref_version}"
          f"; median of {a.runs}; peak = allocated GiB during the timed runs\n")
    print(f"{'work (reference)':<52} {'pass':<8} {'ms':>9} {'peak GiB':>8}")
    n_block, n_ar, n_mem, k = (32768, 8192, 1048576, 1024) if not a.small else (512, 512, 4096, 64)

    def unset_grads(module, x):
        # As after an optimizer's zero_grad() (set_to_none, the default): each
        # timed step writes its gradients instead of adding to the last one's.
        for p in module.parameters():
            p.grad = None
        x.grad = None

    # ---------------------------------------------------------------- block
    for triton in ([True, False] if cuda else [False]):
        torch.manual_seed(1)
        block = colt5_attention.ConditionalRoutedTransformerBlock(
            512, num_heavy_attn_tokens_q=k, num_heavy_attn_tokens_kv=k, num_heavy_ff_tokens=k, light_dim_head=64,
            light_heads=8, light_window_size=128, heavy_dim_head=64, heavy_heads=8, use_triton=triton).to(device)
        x = torch.randn(2, n_block, 512, device=device, requires_grad=True)
        mask = torch.ones(2, n_block, dtype=torch.bool, device=device)
        # The upstream gradient: fixed, random, contiguous (as bench_modules_cuda's).
        g = torch.randn(2, n_block, 512, device=device)
        router = "Triton router" if triton else "plain router"
        for tf32 in ([False, True] if cuda else [False]):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            work = f"block 2x{n_block}x512, fp32, TF32 {'on' if tf32 else 'off'}, {router}"

            def fwd():
                with torch.no_grad():
                    block(x, mask=mask)

            row(work, "fwd", attempt(device, a.runs, fwd))
            def step():
                unset_grads(block, x)
                block(x, mask=mask).backward(g)

            row(work, "fwd+bwd", attempt(device, a.runs, step))
        torch.backends.cuda.matmul.allow_tf32 = False
        if cuda:
            def amp_step():
                unset_grads(block, x)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = block(x, mask=mask)
                out.backward(g.to(out.dtype))

            row(f"block 2x{n_block}x512, bf16 autocast, {router}", "fwd+bwd", attempt(device, a.runs, amp_step))
        del block, x, mask, g

    # ------------------------------------------------------- autoregressive
    torch.manual_seed(2)
    ar = colt5_attention.ConditionalRoutedAutoregressiveAttention(
        512, num_heavy_tokens_q=32, num_heavy_tokens_kv=k, num_routed_kv=2, light_dim_head=64, light_heads=8,
        light_window_size=128, heavy_window_size=128, heavy_dim_head=64, heavy_heads=8, use_triton=cuda).to(device)
    x = torch.randn(2, n_ar, 512, device=device, requires_grad=True)
    g = torch.randn(2, n_ar, 512, device=device)
    def ar_step():
        unset_grads(ar, x)
        ar(x).backward(g)

    for tf32 in ([False, True] if cuda else [False]):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        row(f"autoregressive 2x{n_ar}x512, fp32, TF32 {'on' if tf32 else 'off'}", "fwd+bwd",
            attempt(device, a.runs, ar_step))
    torch.backends.cuda.matmul.allow_tf32 = False
    del ar, x, g

    # ---------------------------------------------------------------- cross
    torch.manual_seed(3)
    cross = colt5_attention.ConditionalRoutedCrossAttention(
        512, num_tokens_q=512 if not a.small else 32, num_tokens_kv=1024 if not a.small else 64, dim_head=64, heads=8,
        kv_routing_tokens=2, use_triton=cuda, route_block_size=131072 if not a.small else 1024).to(device)
    tokens = torch.randn(1, 1024 if not a.small else 64, 512, device=device)
    memories = torch.randn(1, n_mem, 512, device=device)

    def cross_fwd():
        with torch.no_grad():
            cross(tokens, context=memories)

    row(f"cross 1x{tokens.shape[1]} over {n_mem}, fp32", "fwd", attempt(device, a.runs, cross_fwd))


if __name__ == "__main__":
    main()
