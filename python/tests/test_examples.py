"""The seed README's Python examples, unchanged but for the import: read from
the README that the reference package (colt5-attention, installed for the
parity tests) carries in its metadata, `colt5_attention` replaced by `colt5`.
As written on a GPU; on the CPU at reduced sizes and without .cuda(). Each must
give the shapes the README states."""

import importlib.metadata
import re

import pytest
import torch

CUDA = torch.cuda.is_available()


def readme_examples():
    """The README's ```python blocks, keyed by what each one imports."""
    try:
        readme = importlib.metadata.metadata("colt5-attention").get_payload()
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the reference package colt5-attention is not installed (scripts/test_python.sh installs it)")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    out = {}
    for block in blocks:
        imported = re.search(r"from colt5_attention(?:\.\w+)? import \(?\s*(\w+)", block)
        assert imported, f"a README example imports nothing from colt5_attention:\n{block}"
        out[imported.group(1)] = block
    return out


# first imported name: (replacements for the CPU, {variable: shape on the CPU}, {variable: shape as written})
CASES = {
    "ConditionalRoutedFeedForward": (
        [("32768", "2048"), ("1024", "256"), ("512", "128")],
        {"ff_out": (2, 2048, 128), "attn_out": (2, 2048, 128), "block_out": (2, 2048, 128)},
        {"ff_out": (2, 32768, 512), "attn_out": (2, 32768, 512), "block_out": (2, 32768, 512)},
    ),
    "ConditionalRoutedCrossAttention": (
        [("1_048_576", "4096"), ("1024", "256"), ("512", "128"), ("131072", "1024")],
        {"cross_attn_out": (1, 256, 128)},
        {"cross_attn_out": (1, 1024, 512)},
    ),
    "ConditionalRoutedAutoregressiveAttention": (
        [("1024", "256"), ("8192", "1024"), ("512", "128")],
        {"attn_out": (2, 1024, 128)},
        {"attn_out": (2, 8192, 512)},
    ),
    "ConditionalRoutedImageAttention": (
        [("256, 256", "32, 32"), ("light_window_size = 32", "light_window_size = 8"), ("1024", "64")],
        {"out": (1, 32, 32, 32)},
        {"out": (1, 32, 256, 256)},
    ),
    "ConditionalRoutedViT": (
        [("image_size = 256", "image_size = 64"), ("randn(1, 3, 256, 256)", "randn(1, 3, 64, 64)"),
         ("patch_size = 32", "patch_size = 8"), ("dim = 1024", "dim = 64"), ("depth = 6", "depth = 2")],
        {"logits": (1, 1000)},
        {"logits": (1, 1000)},
    ),
    "topk": (
        [],
        {"values": (1024, 10), "indices": (1024, 10), "coor_descent_values": (1024, 10), "gates": (1024, 10)},
        {"values": (1024, 10), "indices": (1024, 10), "coor_descent_values": (1024, 10), "gates": (1024, 10)},
    ),
}


def test_every_readme_example_is_covered():
    assert set(readme_examples()) == set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_seed_example(name):
    code = readme_examples()[name]
    code = re.sub(r"\bcolt5_attention\b", "colt5", code)
    replacements, cpu_shapes, full_shapes = CASES[name]
    if CUDA:
        shapes = full_shapes
    else:
        code = code.replace(".cuda()", "")
        for old, new in replacements:
            assert old in code, f"{name}: '{old}' not found"
            code = code.replace(old, new)
        shapes = cpu_shapes
    torch.manual_seed(0)
    namespace = {"__name__": f"example_{name}"}
    with torch.no_grad() if not CUDA else torch.enable_grad():
        exec(compile(code, f"README example {name}", "exec"), namespace)
    for var, shape in shapes.items():
        assert tuple(namespace[var].shape) == shape, f"{name}: {var} has shape {tuple(namespace[var].shape)}"
        assert torch.isfinite(namespace[var]).all()
