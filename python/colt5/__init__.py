"""colt5: CoLT5 conditionally routed attention and feedforward on the colt5 C++
core, with the module names, signatures and state_dict keys of the Python
package colt5-attention (`from colt5 import ...` instead of
`from colt5_attention import ...`)."""

import torch  # noqa: F401  (loads LibTorch before the extension)

from . import _C
from .coor_descent import coor_descent
from .topk import TopkReturn, topk
from .transformer_block import (
    ConditionalRoutedAttention,
    ConditionalRoutedAutoregressiveAttention,
    ConditionalRoutedCrossAttention,
    ConditionalRoutedFeedForward,
    ConditionalRoutedImageAttention,
    ConditionalRoutedTransformerBlock,
    CoordinateDescentRouter,
    RouterReturn,
)
from .vit import ConditionalRoutedViT


def load_safetensors(path):
    """Reads a safetensors file: (dict of tensors in file order, dict of metadata strings)."""
    return _C.load_safetensors(str(path))


def save_safetensors(path, tensors, metadata=None):
    """Writes a dict of tensors (and metadata strings) as a safetensors file, atomically."""
    _C.save_safetensors(str(path), list(tensors.items()), dict(metadata or {}))


with_cuda = _C.with_cuda

__all__ = [
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedTransformerBlock",
    "ConditionalRoutedViT",
    "CoordinateDescentRouter",
    "RouterReturn",
    "TopkReturn",
    "coor_descent",
    "topk",
    "load_safetensors",
    "save_safetensors",
]
