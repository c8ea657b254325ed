"""The routed modules as torch.nn.Module objects: parameters are the C++
module's tensors, so state_dict, conversions, optimizers, hooks, autocast and
pickling act on what the C++ forward uses; bad input raises Python exceptions
with the library's message."""

import copy
import io
import json
import pickle

import pytest
import torch
from torch import nn

import colt5
from colt5 import _C


def small_block(**kw):
    args = dict(dim=16, num_heavy_attn_tokens_q=6, num_heavy_attn_tokens_kv=6, num_heavy_ff_tokens=6,
                light_dim_head=8, light_heads=2, light_window_size=8, heavy_dim_head=8, heavy_heads=2)
    args.update(kw)
    return colt5.ConditionalRoutedTransformerBlock(**args)


def small_ar(**kw):
    args = dict(dim=16, num_heavy_tokens_q=3, num_heavy_tokens_kv=6, light_dim_head=8, light_heads=2,
                light_window_size=8, heavy_dim_head=8, heavy_heads=2, rotary_emb=True)
    args.update(kw)
    return colt5.ConditionalRoutedAutoregressiveAttention(**args)


def inputs(b=2, n=24, dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, dim, generator=g).to(dtype)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[1, -5:] = False
    return x, mask


# ---------------------------------------------------------------- one set of tensors


def test_parameters_are_the_cpp_tensors():
    block = small_block()
    keys = list(block.state_dict().keys())
    assert "conditional_attn.heavy_attn.to_kv.weight" in keys
    assert "conditional_ff.light_ff.1.bias" in keys
    assert "conditional_attn.q_router.routing_token" in keys
    params = list(block.parameters())
    assert params and all(isinstance(p, nn.Parameter) and p.requires_grad for p in params)
    # Writing into a Python parameter changes what the C++ forward computes.
    x, mask = inputs()
    before = block(x, mask=mask).detach()
    with torch.no_grad():
        dict(block.named_parameters())["conditional_ff.heavy_ff.3.bias"].add_(1.0)
    after = block(x, mask=mask).detach()
    assert not torch.allclose(before, after)


def test_gradients_land_in_parameters():
    block = small_block()
    x, mask = inputs()
    x.requires_grad_()
    block(x, mask=mask).square().sum().backward()
    grads = {k: p.grad for k, p in block.named_parameters()}
    missing = [k for k, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    block.zero_grad()
    assert all(p.grad is None for p in block.parameters())


def test_gradient_matches_finite_difference_through_python_parameter():
    torch.manual_seed(0)
    ff = colt5.ConditionalRoutedFeedForward(8, num_heavy_tokens=3, router_kwargs=dict(eps=1.0)).double()
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    p = ff.heavy_ff[1].weight
    ff(x).sum().backward()
    analytic = p.grad[0, 0].item()
    h = 1e-6
    with torch.no_grad():
        p[0, 0] += h
        up = ff(x).sum().item()
        p[0, 0] -= 2 * h
        down = ff(x).sum().item()
        p[0, 0] += h
    assert abs((up - down) / (2 * h) - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_state_dict_round_trip_between_instances():
    a, b = small_block(), small_block()
    x, mask = inputs()
    assert not torch.allclose(a(x, mask=mask), b(x, mask=mask))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x, mask=mask), b(x, mask=mask), rtol=0, atol=0)
    # assign=True puts new tensors in place; the C++ module must see their values.
    c = small_block()
    state = {k: v.clone() for k, v in a.state_dict().items()}
    c.load_state_dict(state, assign=True)
    torch.testing.assert_close(a(x, mask=mask), c(x, mask=mask), rtol=0, atol=0)
    assert all(isinstance(p, nn.Parameter) for p in c.parameters())


def test_load_state_dict_reports_missing_and_unexpected_keys():
    block = small_block()
    state = block.state_dict()
    state.pop("conditional_ff.light_ff.1.bias")
    state["bogus.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="conditional_ff.light_ff.1.bias"):
        block.load_state_dict(state)


def test_dtype_round_trips_keep_the_parameter_objects():
    ar = small_ar()
    ids = [id(p) for p in ar.parameters()]
    x, _ = inputs()
    out32 = ar(x)
    ar.to(torch.float64)
    assert [id(p) for p in ar.parameters()] == ids
    assert all(t.dtype == torch.float64 for t in ar.state_dict().values())
    out64 = ar(x.double())  # the C++ forward runs on the converted tensors (buffers included)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out32, rtol=1e-4, atol=1e-4)
    ar.half()
    assert all(t.dtype == torch.float16 for t in ar.state_dict().values())
    out16 = ar(x.half())
    assert out16.dtype == torch.float16 and torch.isfinite(out16).all()
    ar.float()
    assert [id(p) for p in ar.parameters()] == ids
    torch.testing.assert_close(ar(x), out32, rtol=2e-2, atol=2e-2)  # values went through float16


def test_buffers_follow_conversions():
    ar = small_ar()
    buf_name = "rotary_emb.inv_freq"
    assert buf_name in dict(ar.named_buffers())
    ar.double()
    assert dict(ar.named_buffers())[buf_name].dtype == torch.float64
    # The C++ module's own buffer was converted too (the forward mixes it with float64 queries).
    cpp_buffers = dict(ar.rotary_emb._cpp.local_buffers())
    assert cpp_buffers["inv_freq"].dtype == torch.float64
    assert cpp_buffers["inv_freq"] is ar.rotary_emb.inv_freq


def test_optimizer_steps_reach_the_cpp_module():
    torch.manual_seed(0)
    block = small_block()
    x, mask = inputs()
    target = torch.randn_like(x)
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    loss0 = nn.functional.mse_loss(block(x, mask=mask), target)
    loss0.backward()
    grads = {k: p.grad.clone() for k, p in block.named_parameters()}
    opt.step()
    for k, p in block.named_parameters():
        torch.testing.assert_close(p.detach(), before[k] - 0.1 * grads[k])
    loss1 = nn.functional.mse_loss(block(x, mask=mask), target)
    assert loss1.item() < loss0.item()


def test_hooks():
    block = small_block()
    x, mask = inputs()
    seen = {}
    block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(pre=True), with_kwargs=True)
    block.register_forward_hook(lambda m, args, out: seen.update(out=out.shape))
    p = dict(block.named_parameters())["conditional_attn.heavy_attn.to_out.weight"]
    p.register_hook(lambda g: seen.update(grad=g.shape))
    block(x, mask=mask).sum().backward()
    assert seen == {"pre": True, "out": x.shape, "grad": p.shape}


def test_train_eval_reach_the_cpp_module():
    block = small_block()
    block.eval()
    assert not block._cpp.is_training() and not block.conditional_attn._cpp.is_training()
    block.train()
    assert block._cpp.is_training()


def test_autocast_bfloat16():
    block = small_block()
    x, mask = inputs()
    ref = block(x, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x, mask=mask)
    assert out.dtype in (torch.bfloat16, torch.float32)
    err = (out.float() - ref).abs().max() / ref.abs().max()
    assert err < 5e-2


def test_torch_save_pickle_and_deepcopy():
    block = small_block()
    x, mask = inputs()
    want = block(x, mask=mask)
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    buf.seek(0)
    other = small_block()
    other.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other(x, mask=mask), want, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(block, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x, mask=mask), want, rtol=0, atol=0)
    clone = copy.deepcopy(block)
    torch.testing.assert_close(clone(x, mask=mask), want, rtol=0, atol=0)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    torch.testing.assert_close(block(x, mask=mask), want, rtol=0, atol=0)  # the copy is independent
    assert pickle.loads(pickle.dumps(block)).config == block.config


def test_nested_in_a_python_model():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(11, 16)
            self.blocks = nn.ModuleList([small_block(), small_block()])
            self.head = nn.Linear(16, 11)

        def forward(self, ids):
            x = self.embed(ids)
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    model = Model()
    assert "blocks.1.conditional_attn.kv_router.routing_token" in model.state_dict()
    ids = torch.randint(0, 11, (2, 20))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert model.blocks[1].conditional_attn.kv_router.routing_token.grad is not None


# ---------------------------------------------------------------- functions and operators


def test_coor_descent_operator_and_gradcheck():
    assert hasattr(torch.ops.colt5, "coor_descent") and hasattr(torch.ops.colt5, "topk")
    torch.manual_seed(0)
    s = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 12) > 0.2
    mask[:, 0] = True
    out = colt5.coor_descent(s, n_iters=10, k=4, eps=0.5, eps_init=2.0, eps_decay=0.8, mask=mask)
    direct = torch.ops.colt5.coor_descent(s, 4.0, n_iters=10, eps=0.5, eps_init=2.0, eps_decay=0.8, mask=mask)
    torch.testing.assert_close(out, direct, rtol=0, atol=0)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out.sum(-1), torch.full((3,), 4.0, dtype=torch.float64), rtol=0.05, atol=0.2)
    assert torch.autograd.gradcheck(lambda t: colt5.coor_descent(t, n_iters=10, k=4, eps=0.5, mask=mask), (s,))
    k = torch.tensor([2.0, 3.0, 5.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, kk: colt5.coor_descent(t, n_iters=5, k=kk, eps=0.5), (s, k))


def test_topk_straight_through():
    torch.manual_seed(0)
    x = torch.randn(2, 16, requires_grad=True)
    r = colt5.topk(x, 4)
    torch.testing.assert_close(r.values, x.topk(4).values)
    assert torch.equal(r.indices, x.topk(4).indices)
    r.values.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    nd = colt5.topk(x, 4, non_differentiable=True)
    assert nd.coor_descent_values is None and torch.equal(nd.indices, r.indices)


def test_router_returns():
    router = colt5.CoordinateDescentRouter(16, num_routing_tokens=2)
    x, mask = inputs()
    r = router(x, num_tokens=5, mask=mask)
    assert isinstance(r, colt5.RouterReturn)
    assert r.indices.shape == (2, 2, 5) and r.routed_tokens.shape == (2, 2, 5, 16)
    assert r.routed_mask.shape == (2, 2, 5)
    short = router(x[:, :4], num_tokens=5)
    assert short.indices is None and short.routed_mask is None


def test_safetensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.tensor([True, False])}
    path = tmp_path / "x.safetensors"
    colt5.save_safetensors(path, t, {"note": "hi"})
    back, meta = colt5.load_safetensors(path)
    assert meta == {"note": "hi"} and torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(RuntimeError, match="x.safetensors"):
        colt5.load_safetensors(path)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make, exc, message",
    [
        (lambda: colt5.ConditionalRoutedFeedForward(16, num_heavy_tokens=0), RuntimeError, "num_heavy_tokens"),
        (lambda: colt5.ConditionalRoutedFeedForward("16", num_heavy_tokens=4), RuntimeError, "'dim' must be an integer"),
        (lambda: colt5.ConditionalRoutedFeedForward(16, num_heavy_tokens=4, router_kwargs={"bogus": 1}),
         RuntimeError, "bogus"),
        (lambda: colt5.ConditionalRoutedFeedForward(16, num_heavy_tokens=4, router_kwargs={"eps": object()}),
         TypeError, "eps"),
        (lambda: colt5.ConditionalRoutedAttention(16, num_heavy_tokens_q=4, num_heavy_tokens_kv=4, heavy_heads=3,
                                                  num_routed_kv=2), RuntimeError, "heavy_heads"),
        (lambda: colt5.ConditionalRoutedFeedForward(16), TypeError, "num_heavy_tokens"),
        (lambda: colt5.ConditionalRoutedViT(image_size=30, patch_size=4, num_classes=2, dim=16, depth=1,
                                            attn_num_heavy_tokens_q=2, attn_num_heavy_tokens_kv=2,
                                            attn_heavy_dim_head=8, attn_heavy_heads=2, attn_light_dim_head=8,
                                            attn_light_heads=2, attn_light_window_size=2, ff_num_heavy_tokens=2,
                                            ff_heavy_mult=2, ff_light_mult=1), RuntimeError, "divisible"),
    ],
)
def test_bad_configuration(make, exc, message):
    with pytest.raises(exc, match=message) as info:
        make()
    assert "Exception raised from" not in str(info.value)


def test_bad_inputs():
    block = small_block()
    x, mask = inputs()
    with pytest.raises(RuntimeError, match="ConditionalRouted") as info:
        block(x[0])  # (n, dim): missing batch dimension
    assert "Exception raised from" not in str(info.value)
    with pytest.raises(RuntimeError, match="mask"):
        block(x, mask=mask.float())
    with pytest.raises(RuntimeError, match="mask"):
        block(x, mask=mask[:, :5])
    with pytest.raises(TypeError, match="'x' must be a tensor"):
        block([1, 2, 3])
    with pytest.raises(TypeError, match="num_heavy_ff_tokens"):
        block(x, num_heavy_ff_tokens=2.5)
    with pytest.raises(RuntimeError, match="k"):
        colt5.coor_descent(torch.randn(2, 5), n_iters=3, k=-1.0)
    with pytest.raises(RuntimeError, match="n_iters"):
        colt5.coor_descent(torch.randn(2, 5), n_iters=0, k=2.0)
    with pytest.raises(RuntimeError, match="finite|NaN|nan"):
        colt5.coor_descent(torch.tensor([[0.0, float("nan")]]), n_iters=3, k=1.0)
    with pytest.raises(TypeError):
        colt5.coor_descent(torch.randn(2, 5), n_iters=3, k="2")
    with pytest.raises(RuntimeError, match="unknown module kind"):
        _C.build("Nope", "{}")
    with pytest.raises(ValueError, match="shape"):
        block.conditional_attn.null_q_token = torch.zeros(3)
    with pytest.raises(AttributeError):
        del block.conditional_attn.null_q_token


def test_config_is_json_of_reference_keywords():
    block = small_block(router_kwargs={"eps": 0.1, "eps_init": None})
    assert json.loads(json.dumps(block.config))["router_kwargs"] == {"eps": 0.1, "eps_init": None}
    assert "num_heavy_ff_tokens=6" in repr(block)


def test_swapped_parameters_are_refused():
    block = small_block()
    x, mask = inputs()
    params = {k: torch.zeros_like(v) for k, v in block.named_parameters()}
    with pytest.raises(RuntimeError, match="replaced by a tensor the C\\+\\+ module does not use"):
        torch.func.functional_call(block, params, (x,), {"mask": mask})
    block(x, mask=mask)  # functional_call restored the parameters
    with pytest.raises(RuntimeError, match="DataParallel"):
        block._replicate_for_data_parallel()


def test_configuration_attributes():
    ff = colt5.ConditionalRoutedFeedForward(16, num_heavy_tokens=4)
    assert ff.num_heavy_tokens == 4 and ff.heavy_ff_mult == 4
    assert isinstance(ff.router, nn.Module)
    with pytest.raises(AttributeError):
        ff.no_such_thing
