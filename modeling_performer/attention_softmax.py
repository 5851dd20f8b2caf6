"""Exact softmax attention (SDPA) and its boolean mask."""

from typing import Optional

import torch
import torch.nn.functional as F

from .attention_common import repeat_key_heads

# SDPA takes grouped key/value heads as they are (enable_gqa) from torch 2.5.
_SDPA_GROUPS = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)

# --------------------------------------------------------------------------------------------
# Exact softmax


def build_attention_mask(
    query_length: int,
    key_length: int,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    device=None,
) -> Optional[torch.Tensor]:
    """Boolean mask [B or 1, 1, T, S] (True = attend). With causal=True the T queries are the
    last T positions of the S keys (earlier keys come from a cache)."""
    mask = None
    if causal:
        offset = key_length - query_length
        rows = torch.arange(query_length, device=device).unsqueeze(1) + offset
        mask = (torch.arange(key_length, device=device).unsqueeze(0) <= rows)[None, None]
    if key_padding_mask is not None:
        pad = key_padding_mask.to(torch.bool)[:, None, None, :]
        mask = pad if mask is None else mask & pad
    return mask


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Exact attention through torch SDPA. q: [B, H, T, D], k/v: [B, H, S, D] -> [B, H, T, D].

    attn_mask: optional boolean [B or 1, 1 or H, T, S] (True = attend), combined with the others.
    Queries that can see no key at all return zeros (SDPA would return NaN).
    """
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must have shape [B, S] = {(k.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}")
    mask = build_attention_mask(q.shape[2], k.shape[2], key_padding_mask, causal, device=q.device)
    if attn_mask is not None:
        attn_mask = attn_mask.to(torch.bool)
        mask = attn_mask if mask is None else mask & attn_mask
    groups = {}
    if q.shape[1] != k.shape[1]:
        # Without gradients, SDPA reads the grouped heads in place (the same outputs, bit for bit): a
        # decoding step then does not copy the whole cache once per query group. On CUDA only without
        # a mask, where the fused kernels take groups; gradients keep the repeated heads (their sums
        # over a group would round differently).
        grads = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        if _SDPA_GROUPS and not grads and (q.device.type == "cpu" or mask is None):
            groups = {"enable_gqa": True}
        else:
            k, v = repeat_key_heads(k, q.shape[1]), repeat_key_heads(v, q.shape[1])
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **groups)
    if causal and key_padding_mask is None and attn_mask is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, **groups)
    visible = mask.any(dim=-1, keepdim=True)  # [B, 1, T, 1]
    mask = mask | ~visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **groups)
    return out * visible.to(out.dtype)
