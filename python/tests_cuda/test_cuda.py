"""On a GPU (needs CUDA; run with `pytest python/tests_cuda` after installing
the package there): .cuda() moves the C++ module's tensors, the CUDA forward
and backward agree with the CPU, bf16 autocast runs, and the fused operators
run on CUDA tensors."""

import torch

import colt5

assert torch.cuda.is_available(), "these tests need a CUDA device"
assert colt5.with_cuda, "the installed colt5 was built without its CUDA kernels"


def block():
    torch.manual_seed(0)
    return colt5.ConditionalRoutedTransformerBlock(dim=64, num_heavy_attn_tokens_q=32, num_heavy_attn_tokens_kv=32,
                                                   num_heavy_ff_tokens=32, light_window_size=16, light_heads=2,
                                                   heavy_heads=2, light_dim_head=32, heavy_dim_head=32,
                                                   router_kwargs=dict(eps=1.0))


def test_cuda_matches_cpu_float64():
    cpu = block().double()
    gpu = block().double()
    gpu.load_state_dict(cpu.state_dict())
    ids = [id(p) for p in gpu.parameters()]
    gpu.cuda()
    assert [id(p) for p in gpu.parameters()] == ids
    assert all(p.is_cuda for p in gpu.parameters())
    x = torch.randn(2, 256, 64, dtype=torch.float64)
    mask = torch.ones(2, 256, dtype=torch.bool)
    mask[1, -17:] = False
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    out_c = cpu(xc, mask=mask)
    out_g = gpu(xg, mask=mask.cuda())
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(out_c)
    (out_c * g).sum().backward()
    (out_g * g.cuda()).sum().backward()
    torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=1e-8, atol=1e-9)
    grads_c = {k: p.grad for k, p in cpu.named_parameters()}
    for k, p in gpu.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads_c[k], rtol=1e-8, atol=1e-9, msg=k)


def test_bf16_autocast_and_half_on_cuda():
    m = block().cuda()
    x = torch.randn(2, 256, 64, device="cuda")
    ref = m(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all()
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < 5e-2
    m.half()
    out16 = m(x.half())
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()


def test_operators_on_cuda():
    s = torch.randn(4, 4096, device="cuda", requires_grad=True)
    scores = colt5.coor_descent(s, n_iters=20, k=288, eps=0.03, eps_init=4.0, eps_decay=0.7)
    ref = colt5.coor_descent(s.detach().cpu(), n_iters=20, k=288, eps=0.03, eps_init=4.0, eps_decay=0.7)
    torch.testing.assert_close(scores.detach().cpu(), ref, rtol=1e-4, atol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(s.grad).all()
    idx = torch.ops.colt5.topk_indices(scores.detach(), 256, s.detach(), None)
    assert torch.equal(idx.cpu(), torch.ops.colt5.topk_indices(scores.detach().cpu(), 256, s.detach().cpu(), None))
