"""The seed README's Python examples (python/examples/, unchanged but for
`from colt5 import ...`): as written on a GPU, at reduced sizes and without
.cuda() on the CPU. Each must give the shapes the README states."""

from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CUDA = torch.cuda.is_available()

# name: (replacements for the CPU, {variable: shape on the CPU}, {variable: shape as written})
CASES = {
    "transformer_block": (
        [("32768", "2048"), ("1024", "256"), ("512", "128")],
        {"ff_out": (2, 2048, 128), "attn_out": (2, 2048, 128), "block_out": (2, 2048, 128)},
        {"ff_out": (2, 32768, 512), "attn_out": (2, 32768, 512), "block_out": (2, 32768, 512)},
    ),
    "cross_attention": (
        [("1_048_576", "4096"), ("1024", "256"), ("512", "128"), ("131072", "1024")],
        {"cross_attn_out": (1, 256, 128)},
        {"cross_attn_out": (1, 1024, 512)},
    ),
    "autoregressive_attention": (
        [("1024", "256"), ("8192", "1024"), ("512", "128")],
        {"attn_out": (2, 1024, 128)},
        {"attn_out": (2, 8192, 512)},
    ),
    "image_attention": (
        [("256, 256", "32, 32"), ("light_window_size = 32", "light_window_size = 8"), ("1024", "64")],
        {"out": (1, 32, 32, 32)},
        {"out": (1, 32, 256, 256)},
    ),
    "vit": (
        [("image_size = 256", "image_size = 64"), ("randn(1, 3, 256, 256)", "randn(1, 3, 64, 64)"),
         ("patch_size = 32", "patch_size = 8"), ("dim = 1024", "dim = 64"), ("depth = 6", "depth = 2")],
        {"logits": (1, 1000)},
        {"logits": (1, 1000)},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_seed_example(name):
    path = EXAMPLES / f"{name}.py"
    assert path.is_file(), f"example {path} is missing"
    code = path.read_text()
    assert "colt5_attention" not in code
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
        exec(compile(code, str(path), "exec"), namespace)
    for var, shape in shapes.items():
        assert tuple(namespace[var].shape) == shape, f"{name}: {var} has shape {tuple(namespace[var].shape)}"
        assert torch.isfinite(namespace[var]).all()
