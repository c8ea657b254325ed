"""The routed modules, with the class names, signatures, keyword names and
defaults of the reference package colt5-attention; the computation is the
colt5 C++ library's."""

from collections import namedtuple

from . import _C
from ._module import CppModule, count, tensor, tensor_or_none

__all__ = [
    "CoordinateDescentRouter",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedAttention",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedTransformerBlock",
    "RouterReturn",
]

RouterReturn = namedtuple("RouterReturn", ["indices", "scores", "routed_tokens", "routed_mask"])


class CoordinateDescentRouter(CppModule):
    """Scores tokens against routing tokens and picks num_tokens of them by a
    coordinate-descent soft top-k (then a hard top-k).

    forward returns RouterReturn(indices, scores, routed_tokens, routed_mask):
    indices (b, k) or (b, r, k), None when nothing is routed (n <= num_tokens);
    scores the selected normalized scores; routed_tokens (b, k, d) or
    (b, r, k, d); routed_mask, None without a mask.
    """

    _kind = "CoordinateDescentRouter"

    def __init__(self, dim, straight_through=True, n_iters=20, fetch_k_ratio=9 / 8, eps=0.03, eps_decay=0.7,
                 eps_init=4., num_routing_tokens=1, learned_routing_tokens=False, use_triton=False,
                 cosine_sim_routing=False, cosine_sim_scale=8, route_block_size=None, triton_checkpoint_segments=None):
        super().__init__(dim=dim, straight_through=straight_through, n_iters=n_iters, fetch_k_ratio=fetch_k_ratio,
                         eps=eps, eps_decay=eps_decay, eps_init=eps_init, num_routing_tokens=num_routing_tokens,
                         learned_routing_tokens=learned_routing_tokens, use_triton=use_triton,
                         cosine_sim_routing=cosine_sim_routing, cosine_sim_scale=cosine_sim_scale,
                         route_block_size=route_block_size, triton_checkpoint_segments=triton_checkpoint_segments)

    def forward(self, x, *, num_tokens, mask=None, random_route=False, routing_tokens=None,
                keep_one_route_dim=False):
        k = self._kind
        self._check_tensors()
        n = count(k, "num_tokens", num_tokens)
        if n is None:
            raise TypeError(f"{k}: num_tokens is required")
        out = _C.router_forward(self._cpp, tensor(k, "x", x), n, tensor_or_none(k, "mask", mask), bool(random_route),
                                tensor_or_none(k, "routing_tokens", routing_tokens), bool(keep_one_route_dim))
        return RouterReturn(*out)

    def route_back(self, src, routed_tokens, indices):
        """src with routed_tokens (b, k, d) written at indices (b, k) of each row.
        Out of place (the reference writes into src): use the returned tensor."""
        k = self._kind
        return _C.router_route_back(self._cpp, tensor(k, "src", src), tensor(k, "routed_tokens", routed_tokens),
                                    tensor(k, "indices", indices))


class ConditionalRoutedFeedForward(CppModule):
    """Light feedforward on every token plus a heavy feedforward on num_heavy_tokens routed ones."""

    _kind = "ConditionalRoutedFeedForward"

    def __init__(self, dim, *, num_heavy_tokens, light_ff_mult=0.5, heavy_ff_mult=4, router_straight_through=True,
                 router_kwargs: dict = {}, use_triton=False):
        super().__init__(dim=dim, num_heavy_tokens=num_heavy_tokens, light_ff_mult=light_ff_mult,
                         heavy_ff_mult=heavy_ff_mult, router_straight_through=router_straight_through,
                         router_kwargs=dict(router_kwargs), use_triton=use_triton)

    def forward(self, x, mask=None, num_heavy_tokens=None):
        k = self._kind
        self._check_tensors()
        return _C.ff_forward(self._cpp, tensor(k, "x", x), tensor_or_none(k, "mask", mask),
                             count(k, "num_heavy_tokens", num_heavy_tokens))


class ConditionalRoutedAttention(CppModule):
    """Light local attention on every token plus heavy attention between routed queries and key/values."""

    _kind = "ConditionalRoutedAttention"

    def __init__(self, dim, *, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv=1, has_light_attn=True,
                 light_dim_head=64, light_heads=8, light_window_size=128, heavy_dim_head=64, heavy_heads=8,
                 router_straight_through=True, router_kwargs: dict = {}, multiply_keys_by_score=False,
                 multiply_queries_by_score=False, use_triton=False, use_null_q_tokens=True, use_flash_attn=False,
                 rotary_emb=False):
        super().__init__(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                         num_routed_kv=num_routed_kv, has_light_attn=has_light_attn, light_dim_head=light_dim_head,
                         light_heads=light_heads, light_window_size=light_window_size, heavy_dim_head=heavy_dim_head,
                         heavy_heads=heavy_heads, router_straight_through=router_straight_through,
                         router_kwargs=dict(router_kwargs), multiply_keys_by_score=multiply_keys_by_score,
                         multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                         use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn, rotary_emb=rotary_emb)

    def forward(self, x, *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None):
        k = self._kind
        self._check_tensors()
        return _C.attn_forward(self._cpp, tensor(k, "x", x), tensor_or_none(k, "mask", mask),
                               count(k, "num_heavy_tokens_q", num_heavy_tokens_q),
                               count(k, "num_heavy_tokens_kv", num_heavy_tokens_kv))


class ConditionalRoutedImageAttention(CppModule):
    """Routed attention over an image feature map: light attention inside
    light_window_size x light_window_size windows, heavy attention between
    queries and key/values routed from the whole map."""

    _kind = "ConditionalRoutedImageAttention"

    def __init__(self, dim, *, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv=1, light_dim_head=64,
                 light_heads=8, light_window_size=128, heavy_dim_head=64, heavy_heads=8, router_straight_through=True,
                 router_kwargs: dict = {}, multiply_keys_by_score=False, multiply_queries_by_score=False,
                 use_triton=False, use_null_q_tokens=True, use_flash_attn=False, channel_first=False):
        super().__init__(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                         num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                         light_window_size=light_window_size, heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads,
                         router_straight_through=router_straight_through, router_kwargs=dict(router_kwargs),
                         multiply_keys_by_score=multiply_keys_by_score,
                         multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                         use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                         channel_first=channel_first)

    def forward(self, x, *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, mask=None):
        k = self._kind
        self._check_tensors()
        return _C.image_forward(self._cpp, tensor(k, "x", x), tensor_or_none(k, "mask", mask),
                                count(k, "num_heavy_tokens_q", num_heavy_tokens_q),
                                count(k, "num_heavy_tokens_kv", num_heavy_tokens_kv))


class ConditionalRoutedAutoregressiveAttention(CppModule):
    """Causal routed attention: causal local attention, and per heavy window
    routed queries attending to key/values routed from earlier windows."""

    _kind = "ConditionalRoutedAutoregressiveAttention"

    def __init__(self, dim, *, num_heavy_tokens_q, num_heavy_tokens_kv, num_routed_kv=1, light_dim_head=64,
                 light_heads=8, light_window_size=128, heavy_window_size=None, heavy_dim_head=64, heavy_heads=8,
                 router_straight_through=True, router_kwargs: dict = {}, multiply_keys_by_score=False,
                 multiply_queries_by_score=False, use_triton=False, use_null_q_tokens=True, use_flash_attn=False,
                 rotary_emb=False):
        super().__init__(dim=dim, num_heavy_tokens_q=num_heavy_tokens_q, num_heavy_tokens_kv=num_heavy_tokens_kv,
                         num_routed_kv=num_routed_kv, light_dim_head=light_dim_head, light_heads=light_heads,
                         light_window_size=light_window_size, heavy_window_size=heavy_window_size,
                         heavy_dim_head=heavy_dim_head, heavy_heads=heavy_heads,
                         router_straight_through=router_straight_through, router_kwargs=dict(router_kwargs),
                         multiply_keys_by_score=multiply_keys_by_score,
                         multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                         use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn, rotary_emb=rotary_emb)

    def forward(self, x, *, num_heavy_tokens_q=None, num_heavy_tokens_kv=None, random_route=False):
        k = self._kind
        self._check_tensors()
        return _C.ar_forward(self._cpp, tensor(k, "x", x), count(k, "num_heavy_tokens_q", num_heavy_tokens_q),
                             count(k, "num_heavy_tokens_kv", num_heavy_tokens_kv), bool(random_route))


class ConditionalRoutedCrossAttention(CppModule):
    """Routed cross attention: num_tokens_q routed queries attend to num_tokens_kv routed context tokens."""

    _kind = "ConditionalRoutedCrossAttention"

    def __init__(self, dim, *, num_tokens_q, num_tokens_kv, num_sets_kv=1, dim_head=64, heads=8,
                 router_straight_through=True, router_kwargs: dict = {}, kv_routing_tokens=1,
                 multiply_keys_by_score=False, use_triton=False, use_null_q_tokens=True, use_flash_attn=False,
                 route_block_size=None):
        super().__init__(dim=dim, num_tokens_q=num_tokens_q, num_tokens_kv=num_tokens_kv, num_sets_kv=num_sets_kv,
                         dim_head=dim_head, heads=heads, router_straight_through=router_straight_through,
                         router_kwargs=dict(router_kwargs), kv_routing_tokens=kv_routing_tokens,
                         multiply_keys_by_score=multiply_keys_by_score, use_triton=use_triton,
                         use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn,
                         route_block_size=route_block_size)

    def forward(self, x, context, *, num_tokens_q=None, num_tokens_kv=None, mask=None, context_mask=None):
        k = self._kind
        self._check_tensors()
        return _C.cross_forward(self._cpp, tensor(k, "x", x), tensor(k, "context", context),
                                tensor_or_none(k, "mask", mask), tensor_or_none(k, "context_mask", context_mask),
                                count(k, "num_tokens_q", num_tokens_q), count(k, "num_tokens_kv", num_tokens_kv))


class ConditionalRoutedTransformerBlock(CppModule):
    """x = conditional_attn(x) + x; x = conditional_ff(x) + x."""

    _kind = "ConditionalRoutedTransformerBlock"

    def __init__(self, dim, *, num_heavy_attn_tokens_q, num_heavy_attn_tokens_kv, num_routed_kv=1,
                 num_heavy_ff_tokens, light_dim_head=64, light_heads=8, light_window_size=128, heavy_dim_head=64,
                 heavy_heads=8, light_ff_mult=0.5, heavy_ff_mult=4, router_straight_through=True,
                 router_kwargs: dict = {}, multiply_keys_by_score=False, multiply_queries_by_score=False,
                 use_triton=False, use_null_q_tokens=True, use_flash_attn=False):
        super().__init__(dim=dim, num_heavy_attn_tokens_q=num_heavy_attn_tokens_q,
                         num_heavy_attn_tokens_kv=num_heavy_attn_tokens_kv, num_routed_kv=num_routed_kv,
                         num_heavy_ff_tokens=num_heavy_ff_tokens, light_dim_head=light_dim_head,
                         light_heads=light_heads, light_window_size=light_window_size, heavy_dim_head=heavy_dim_head,
                         heavy_heads=heavy_heads, light_ff_mult=light_ff_mult, heavy_ff_mult=heavy_ff_mult,
                         router_straight_through=router_straight_through, router_kwargs=dict(router_kwargs),
                         multiply_keys_by_score=multiply_keys_by_score,
                         multiply_queries_by_score=multiply_queries_by_score, use_triton=use_triton,
                         use_null_q_tokens=use_null_q_tokens, use_flash_attn=use_flash_attn)

    def forward(self, x, mask=None, num_heavy_attn_tokens_q=None, num_heavy_attn_tokens_kv=None,
                num_heavy_ff_tokens=None):
        k = self._kind
        self._check_tensors()
        return _C.block_forward(self._cpp, tensor(k, "x", x), tensor_or_none(k, "mask", mask),
                                count(k, "num_heavy_attn_tokens_q", num_heavy_attn_tokens_q),
                                count(k, "num_heavy_attn_tokens_kv", num_heavy_attn_tokens_kv),
                                count(k, "num_heavy_ff_tokens", num_heavy_ff_tokens))
