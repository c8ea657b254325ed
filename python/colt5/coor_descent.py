"""Differentiable soft top-k by coordinate descent with eps-scaling (fused kernels)."""

import torch

__all__ = ["coor_descent"]


def coor_descent(s, *, n_iters, k, eps=1e-1, eps_init=None, eps_decay=1., mask=None, checkpoint_segments=0):
    """Soft top-k of the last dimension of s: scores in [0, 1] summing to about k
    per row over the unmasked entries, 0 where mask is False.

    k: a number, or a tensor of one value per row (shape s.shape[:-1]; k gets
    gradients when it requires them). Arithmetic in float32 or wider for any
    input dtype; the result has s's dtype. checkpoint_segments > 0 trades
    backward recomputation for memory (results are identical).
    """
    if isinstance(k, torch.Tensor) and k.dim() > 0:
        return torch.ops.colt5.coor_descent.row_k(s, k, n_iters=n_iters, eps=eps, eps_init=eps_init,
                                                  eps_decay=eps_decay, mask=mask,
                                                  checkpoint_segments=checkpoint_segments)
    if isinstance(k, torch.Tensor):
        k = k.item()
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"coor_descent: k must be a number or a tensor, got {type(k).__name__}")
    return torch.ops.colt5.coor_descent.default(s, float(k), n_iters=n_iters, eps=eps, eps_init=eps_init,
                                                eps_decay=eps_decay, mask=mask,
                                                checkpoint_segments=checkpoint_segments)
