"""Straight-through differentiable hard top-k whose gradient comes from coordinate descent."""

from collections import namedtuple

import torch

__all__ = ["topk", "TopkReturn"]

TopkReturn = namedtuple("TopkReturn", ["values", "indices", "coor_descent_values", "gates"])


def topk(x, k, coor_descent_k_ratio=9 / 8, n_iters=20, eps=1e-1, eps_init=None, eps_decay=1., mask=None,
         fused=False, non_differentiable=False):
    """Top-k of the last dimension: values equal x's top k (x times straight-through
    gates that are 1 in value), gradients through coordinate descent run with
    k * coor_descent_k_ratio (capped at the row length). Ties go to the lower
    position. `fused` is accepted: the fused kernels are always used."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk: k must be an int, got {type(k).__name__}")
    if non_differentiable:
        indices = torch.ops.colt5.topk_indices(x, k, None, mask)
        return TopkReturn(x.gather(-1, indices), indices, None, None)
    out = torch.ops.colt5.topk(x, k, float(coor_descent_k_ratio), int(n_iters), float(eps),
                               None if eps_init is None else float(eps_init), float(eps_decay), mask)
    return TopkReturn(*out)
