"""The float64 golden cases of tests/golden (results of the reference package)
run through the Python API: module built from the case's config with the
reference's keyword names, parameters loaded with load_state_dict, called as
the reference was, outputs and gradients compared (1e-7 relative; router
indices exactly, as a set per row)."""

import json
from pathlib import Path

import pytest
import torch

import colt5

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"
TOL = 1e-7

CLASSES = {
    "CoordinateDescentRouter": colt5.CoordinateDescentRouter,
    "ConditionalRoutedFeedForward": colt5.ConditionalRoutedFeedForward,
    "ConditionalRoutedAttention": colt5.ConditionalRoutedAttention,
    "ConditionalRoutedTransformerBlock": colt5.ConditionalRoutedTransformerBlock,
    "ConditionalRoutedAutoregressiveAttention": colt5.ConditionalRoutedAutoregressiveAttention,
    "ConditionalRoutedCrossAttention": colt5.ConditionalRoutedCrossAttention,
    "ConditionalRoutedImageAttention": colt5.ConditionalRoutedImageAttention,
    "ConditionalRoutedViT": colt5.ConditionalRoutedViT,
}


def case_files():
    files = sorted(GOLDEN.glob("*.safetensors"))
    return files


def test_golden_cases_present():
    assert GOLDEN.is_dir(), f"golden cases folder {GOLDEN} is missing"
    assert len(case_files()) >= 18, f"expected at least 18 golden cases in {GOLDEN}, found {len(case_files())}"


def rel_err(ours, want):
    ours, want = ours.detach().double(), want.double()
    assert ours.shape == want.shape, f"shape {tuple(ours.shape)}, case {tuple(want.shape)}"
    scale = want.abs().max().item() if want.numel() else 0.0
    diff = (ours - want).abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def check(case, name, ours, want):
    assert ours is not None, f"{case}: no {name}"
    e = rel_err(ours, want)
    assert e <= TOL, f"{case}: {name} differs by {e:.3e} (relative)"


def tie_order(ours_indices, want_indices):
    """Per row, the positions in ours of the case's indices (identity where the sets differ)."""
    eq = want_indices.unsqueeze(-1) == ours_indices.unsqueeze(-2)
    same = (eq.sum(-1) == 1).all(-1, keepdim=True)
    identity = torch.arange(ours_indices.shape[-1]).expand_as(ours_indices)
    return torch.where(same, eq.long().argmax(-1), identity)


@pytest.mark.parametrize("path", case_files(), ids=lambda p: p.stem)
def test_golden_case(path):
    tensors, meta = colt5.load_safetensors(path)
    kind = meta["kind"]
    config = json.loads(meta["config"])
    call = json.loads(meta.get("call", "{}"))
    inputs = {k[len("input."):]: v for k, v in tensors.items() if k.startswith("input.")}
    leaves = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in inputs.items()}
    args = [leaves[a] for a in call.get("args", [])]
    kwargs = {kw: leaves[name] for kw, name in call.get("tensor_kwargs", {}).items()}
    kwargs.update(call.get("kwargs", {}))
    module = None

    if kind == "coor_descent":
        cfg = dict(config)
        if isinstance(cfg.get("k"), list):
            cfg["k"] = leaves["k"]
        s = leaves["s"]
        outputs = {"scores": colt5.coor_descent(s, mask=leaves.get("mask"), **cfg)}
    else:
        assert kind in CLASSES, f"{path.name}: unknown kind {kind}"
        cfg = dict(config)
        if kind == "CoordinateDescentRouter":
            kwargs.setdefault("num_tokens", cfg.pop("num_tokens"))
            kwargs.setdefault("keep_one_route_dim", cfg.pop("keep_one_route_dim", False))
        module = CLASSES[kind](**cfg).double()
        prefix = "router." if kind == "CoordinateDescentRouter" else ""
        state = {k[len("param.") + len(prefix):]: v for k, v in tensors.items() if k.startswith("param.")}
        module.load_state_dict(state, strict=True)
        result = module(*args, **kwargs)
        if kind == "CoordinateDescentRouter":
            indices, scores, routed, routed_mask = result
            if "aux.indices" in tensors:
                want = tensors["aux.indices"]
                assert indices is not None, f"{path.name}: nothing routed"
                assert torch.equal(indices.sort(-1).values, want.sort(-1).values), f"{path.name}: routed sets differ"
                perm = tie_order(indices, want)
                indices = indices.gather(-1, perm)
                scores = scores.gather(-1, perm)
                routed = routed.gather(-2, perm.unsqueeze(-1).expand_as(routed))
                if routed_mask is not None:
                    routed_mask = routed_mask.gather(-1, perm)
                assert torch.equal(indices, want)
            else:
                assert indices is None, f"{path.name}: routed although the case routes nothing"
            check(path.name, "aux.scores", scores, tensors["aux.scores"])
            if "aux.routed_mask" in tensors:
                assert routed_mask is not None and torch.equal(routed_mask, tensors["aux.routed_mask"].bool())
            outputs = {"out": routed * scores.unsqueeze(-1)}
        else:
            outputs = {"out": result}

    loss = 0
    for name, out in outputs.items():
        check(path.name, f"output.{name}", out, tensors[f"output.{name}"])
        loss = loss + (out * tensors[f"grad_output.{name}"]).sum()
    loss.backward()
    for name, leaf in leaves.items():
        key = f"grad.input.{name}"
        if key in tensors:
            grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            check(path.name, key, grad, tensors[key])
    if module is not None:
        params = dict(module.named_parameters())
        prefix = "router." if kind == "CoordinateDescentRouter" else ""
        n = 0
        for key, want in tensors.items():
            if not key.startswith("grad.param."):
                continue
            p = params[key[len("grad.param.") + len(prefix):]]
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            check(path.name, key, grad, want)
            n += 1
        assert n == len(params), f"{path.name}: {n} parameter gradients in the case, {len(params)} parameters"
