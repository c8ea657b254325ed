"""Training steps of a small model (two routed transformer blocks, mean
squared error, AdamW) through the Python API equal the same steps run
entirely in C++ (colt5._C.cpp_train_steps builds its own modules from the
same configs and state)."""

import json

import torch
from torch import nn

import colt5
from colt5 import _C

CONFIGS = [
    dict(dim=16, num_heavy_attn_tokens_q=5, num_heavy_attn_tokens_kv=7, num_heavy_ff_tokens=6, light_dim_head=8,
         light_heads=2, light_window_size=8, heavy_dim_head=8, heavy_heads=2, router_kwargs=dict(eps=0.5)),
    dict(dim=16, num_heavy_attn_tokens_q=4, num_heavy_attn_tokens_kv=8, num_heavy_ff_tokens=5, light_dim_head=8,
         light_heads=2, light_window_size=8, heavy_dim_head=4, heavy_heads=4, num_routed_kv=2,
         multiply_keys_by_score=True, router_kwargs=dict(eps=1.0, cosine_sim_routing=True)),
]


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([colt5.ConditionalRoutedTransformerBlock(**c) for c in CONFIGS])

    def forward(self, x, mask):
        for block in self.blocks:
            x = block(x, mask=mask)
        return x


def test_training_steps_equal_cpp():
    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(1, 24, 16, dtype=torch.float64)
    mask = torch.ones(1, 24, dtype=torch.bool)
    mask[0, -3:] = False
    target = torch.randn_like(x)
    initial = [(k, v.clone()) for k, v in model.state_dict().items()]
    lr, wd, steps = 1e-2, 0.1, 3

    cpp_losses, cpp_state = _C.cpp_train_steps([json.dumps(c) for c in CONFIGS], initial, x, mask, target, lr, wd,
                                               steps)

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x, mask), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    assert len(cpp_losses) == steps
    for ours, theirs in zip(losses, cpp_losses):
        assert abs(ours - theirs) <= 1e-12 * abs(theirs), (losses, cpp_losses)
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert sorted(k for k, _ in cpp_state) == sorted(state.keys())
    moved = 0
    for k, v in cpp_state:
        err = (state[k] - v).abs().max().item()
        assert err <= 1e-12 * max(1.0, v.abs().max().item()), f"{k}: {err:.3e}"
        moved += not torch.equal(v, dict(initial)[k])
    assert moved > 0.9 * len(cpp_state)
