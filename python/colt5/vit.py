"""ConditionalRoutedViT (Simple ViT with routed image attention and routed
feedforward), with the reference's signature, on the colt5 C++ library."""

from . import _C
from ._module import CppModule, tensor

__all__ = ["ConditionalRoutedViT", "posemb_sincos_2d"]


def posemb_sincos_2d(patches, temperature=10000):
    """2-D sine-cosine position embedding (h, w, dim) of a (b, h, w, dim) patch grid."""
    return _C.posemb_sincos_2d(tensor("posemb_sincos_2d", "patches", patches), float(temperature))


class ConditionalRoutedViT(CppModule):
    """Patch embedding, depth x (routed image attention, routed feedforward), mean pool, LayerNorm, linear head.
    img (b, channels, image_h, image_w) -> logits (b, num_classes)."""

    _kind = "ConditionalRoutedViT"

    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, attn_num_heavy_tokens_q,
                 attn_num_heavy_tokens_kv, attn_heavy_dim_head, attn_heavy_heads, attn_light_dim_head,
                 attn_light_heads, attn_light_window_size, ff_num_heavy_tokens, ff_heavy_mult, ff_light_mult,
                 channels=3, router_straight_through=True, router_kwargs: dict = {}, router_use_triton=False,
                 flash_attn=True, attn_num_routed_kv=1, default_coor_descent_eps=1.):
        router_kwargs = dict(router_kwargs)
        # The routers' eps is router_kwargs['eps'] when given, else default_coor_descent_eps.
        if router_kwargs.get("eps") is not None:
            default_coor_descent_eps = router_kwargs["eps"]
        super().__init__(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim, depth=depth,
                         attn_num_heavy_tokens_q=attn_num_heavy_tokens_q,
                         attn_num_heavy_tokens_kv=attn_num_heavy_tokens_kv, attn_heavy_dim_head=attn_heavy_dim_head,
                         attn_heavy_heads=attn_heavy_heads, attn_light_dim_head=attn_light_dim_head,
                         attn_light_heads=attn_light_heads, attn_light_window_size=attn_light_window_size,
                         ff_num_heavy_tokens=ff_num_heavy_tokens, ff_heavy_mult=ff_heavy_mult,
                         ff_light_mult=ff_light_mult, channels=channels,
                         router_straight_through=router_straight_through, router_kwargs=router_kwargs,
                         router_use_triton=router_use_triton, flash_attn=flash_attn,
                         attn_num_routed_kv=attn_num_routed_kv, default_coor_descent_eps=default_coor_descent_eps)

    def forward(self, img):
        self._check_tensors()
        return _C.vit_forward(self._cpp, tensor(self._kind, "img", img))
