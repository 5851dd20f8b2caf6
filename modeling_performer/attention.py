"""Attention kernels as pure functions.

Shapes: B batch, H heads, T query length, S key length, D head dim, M random features.
All FAVOR+ functions share one calling convention:

    fn(q, k, v, projection, feature_map, key_padding_mask=None, state=None, ...)

with q: [B, H, T, D], k/v: [B, H, S, D], projection W: [M, D], feature_map a name ("softmax",
"relu") or a feature-map class, key_padding_mask: [B, S] (True / 1 = real token). The causal
functions take and return a `LinearAttentionState`, so a sequence can be split anywhere and
resumed: prefill with `causal_linear_attention`, then decode with `recurrent_linear_attention`.

Numerics (see DESIGN.md, "The key stabiliser"): keys use exp(r - m) where m is a running
maximum over unmasked keys and features. The carried state is rescaled by exp(m_old - m_new)
whenever m grows, so the one-pass, chunked and token-by-token paths agree up to rounding. States
and normalisers are fp32 whatever the input dtype (autocast is switched off inside), and a
query whose normaliser underflows (it overlaps no key in fp32) returns 0 instead of dividing by
an epsilon (an additive epsilon would not cancel and would break that agreement). The stabiliser is detached:
the output does not depend on it, so its gradient is exactly zero.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .feature_maps import get_feature_map

# A normaliser below the smallest normal fp32 number has underflowed: the query overlaps no key
# in fp32 and the estimate is meaningless. Such rows return 0 with zero gradient (dividing by a
# clamped denominator would send gradients of 1/tiny ~ 1e38 back and overflow).
_DENOMINATOR_FLOOR = torch.finfo(torch.float32).tiny


class LinearAttentionState(NamedTuple):
    """Running FAVOR+ state (all fp32).

    kv: [B, H, M, D] sum of phi(k) v^T; normaliser: [B, H, M] sum of phi(k);
    stabiliser: [B, H] the constant both are scaled by (exp(-stabiliser)); -inf when empty.
    """

    kv: torch.Tensor
    normaliser: torch.Tensor
    stabiliser: torch.Tensor


def empty_state(batch: int, heads: int, num_features: int, head_dim: int, device=None) -> LinearAttentionState:
    return LinearAttentionState(
        torch.zeros(batch, heads, num_features, head_dim, device=device),
        torch.zeros(batch, heads, num_features, device=device),
        torch.full((batch, heads), float("-inf"), device=device),
    )


def _resolve(feature_map):
    return get_feature_map(feature_map) if isinstance(feature_map, str) else feature_map


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A stabiliser usable in a subtraction: -inf (nothing seen yet) becomes 0."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _check_qkv(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, T, D] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"Incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: "
            "q [B, H, T, D], k [B, H, S, D], v [B, H, S, Dv] expected"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must have shape [B, S] = {(k.shape[0], k.shape[2])}, got "
            f"{tuple(key_padding_mask.shape)}; a general [T, S] mask cannot be applied by FAVOR+ "
            "in linear time (use attention_type='softmax' for such masks)"
        )


def _key_terms(k, projection, fmap, key_padding_mask):
    """Returns key logits [B, H, S, M], offsets [B, H, S] (r = logits - offset) and per-token
    maxima of r [B, H, S] (-inf where padded)."""
    logits, offset = fmap.key_logits(k, projection)
    token_max = fmap.token_max(logits, offset)
    if key_padding_mask is not None:
        keep = key_padding_mask.to(torch.bool)[:, None, :]
        token_max = token_max.masked_fill(~keep, float("-inf"))
    return logits, offset, token_max


def _masked_keys(fmap, logits, shift, keep):
    """phi(k) with padded keys zeroed. shift: [..., S, 1] offset + stabiliser; keep: [B, 1, ..., S, 1]
    bool (or None). Padded logits are set to -inf first: they take no part in the stabiliser, so
    exp(r - m) could overflow there, and inf * 0 would poison the state with NaN."""
    if keep is None:
        return fmap.keys(logits, shift)
    phi_k = fmap.keys(logits.masked_fill(~keep, float("-inf")), shift)
    return phi_k * keep.to(phi_k.dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """v: [..., S, D] -> [..., S, D + 1] fp32. The extra column of ones makes one matrix product
    give both phi(k)^T v and the normaliser sum of phi(k)."""
    return torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)


def _divide(augmented: torch.Tensor) -> torch.Tensor:
    """[..., D + 1] (numerator, normaliser) -> [..., D]; rows whose normaliser underflowed -> 0."""
    numerator, denominator = augmented[..., :-1], augmented[..., -1:]
    valid = denominator > _DENOMINATOR_FLOOR
    safe = torch.where(valid, denominator, torch.ones_like(denominator))
    return torch.where(valid, numerator / safe, torch.zeros_like(numerator))


def _join(state: LinearAttentionState) -> torch.Tensor:
    return torch.cat([state.kv, state.normaliser.unsqueeze(-1)], dim=-1)


# --------------------------------------------------------------------------------------------
# Non-causal


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> LinearAttentionState:
    """Summarises all keys/values once (encoder self-attention, cross-attention cache).

    k, v: [B, H, S, D] -> state with kv [B, H, M, D], normaliser [B, H, M], stabiliser [B, H].
    """
    fmap = _resolve(feature_map)
    with torch.autocast(device_type=k.device.type, enabled=False):
        logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
        stabiliser = token_max.amax(dim=-1) if token_max.shape[-1] > 0 else token_max.new_full(token_max.shape[:2], float("-inf"))
        keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, :, None]
        shift = (offset + _finite(stabiliser)[..., None]).unsqueeze(-1)
        phi_k = _masked_keys(fmap, logits, shift, keep)
        # (v^T phi_k)^T rather than phi_k^T v: backward then yields phi_k's gradient in its own
        # layout instead of a transposed one that would be copied.
        kvz = (_with_ones(v).transpose(-1, -2) @ phi_k).transpose(-1, -2)
        return LinearAttentionState(kvz[..., :-1], kvz[..., -1], stabiliser)


def linear_attention_from_state(
    q: torch.Tensor, state: LinearAttentionState, projection: torch.Tensor, feature_map="softmax"
) -> torch.Tensor:
    """q: [B, H, T, D] attends to everything summarised in state -> [B, H, T, D] in q's dtype."""
    fmap = _resolve(feature_map)
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = _divide(fmap.queries(q, projection) @ _join(state))
    return out.to(q.dtype)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Non-causal FAVOR+: every query sees every unmasked key. -> [B, H, T, D]."""
    _check_qkv(q, k, v, key_padding_mask)
    state = linear_attention_state(k, v, projection, feature_map, key_padding_mask)
    return linear_attention_from_state(q, state, projection, feature_map).to(v.dtype)


# --------------------------------------------------------------------------------------------
# Causal


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[LinearAttentionState] = None,
    chunk_size: int = 128,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Causal FAVOR+, chunk by chunk: a masked C x C product inside each chunk plus the running
    state of all earlier chunks. O(T) time and memory.

    q, k, v: [B, H, T, D] (query t sees keys <= t, plus everything in `state`).
    Returns ([B, H, T, D] in v's dtype, the state after the last token).
    """
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got T={q.shape[2]}, S={k.shape[2]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    fmap = _resolve(feature_map)
    batch, heads, length, head_dim = q.shape
    value_dim = v.shape[-1]
    num_features = projection.shape[0]
    if state is None:
        state = empty_state(batch, heads, num_features, value_dim, device=q.device)
    if length == 0:
        return v.new_zeros(batch, heads, 0, value_dim), state

    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = fmap.queries(q, projection)
        logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
        v1 = _with_ones(v)  # [B, H, T, D + 1]
        mask = key_padding_mask.to(torch.bool) if key_padding_mask is not None else None

        chunk = min(chunk_size, length)
        padded = -length % chunk
        if padded:
            # Padded tail positions are masked keys: they change neither maxima nor state.
            phi_q = F.pad(phi_q, (0, 0, 0, padded))
            logits = F.pad(logits, (0, 0, 0, padded))
            offset = F.pad(offset, (0, padded))
            v1 = F.pad(v1, (0, 0, 0, padded))
            token_max = F.pad(token_max, (0, padded), value=float("-inf"))
            if mask is None:
                mask = torch.ones(batch, length, dtype=torch.bool, device=q.device)
            mask = F.pad(mask, (0, padded), value=False)
        num_chunks = (length + padded) // chunk

        # Running maximum at the end of every chunk; running[..., 0] is the incoming one.
        chunk_max = token_max.view(batch, heads, num_chunks, chunk).amax(dim=-1)
        running = torch.cummax(torch.cat([state.stabiliser.unsqueeze(-1), chunk_max], dim=-1), dim=-1).values
        stabiliser = _finite(running[..., 1:])  # [B, H, NC]
        decay = torch.exp(running[..., :-1] - stabiliser)  # rescales the carried state into chunk c

        keep = None if mask is None else mask.view(batch, 1, num_chunks, chunk, 1)
        shift = (offset.view(batch, heads, num_chunks, chunk) + stabiliser[..., None]).unsqueeze(-1)
        phi_k = _masked_keys(fmap, logits.view(batch, heads, num_chunks, chunk, num_features), shift, keep)
        phi_q = phi_q.view(batch, heads, num_chunks, chunk, num_features)
        v1 = v1.view(batch, heads, num_chunks, chunk, value_dim + 1)

        # Inside each chunk: an explicit lower-triangular product.
        out = (phi_q @ phi_k.transpose(-1, -2)).tril() @ v1  # [B, H, NC, C, D + 1]

        # Across chunks: the state before chunk c, at chunk c's scale.
        chunk_kvz = (v1.transpose(-1, -2) @ phi_k).transpose(-1, -2)  # [B, H, NC, M, D + 1]
        kvz = _join(state)
        before = []
        # unbind once: indexing chunk_kvz[:, :, c] in the loop would make backward quadratic.
        for chunk_decay, kvz_c in zip(decay.unbind(-1), chunk_kvz.unbind(2)):
            kvz = kvz * chunk_decay[..., None, None]
            before.append(kvz)
            kvz = kvz + kvz_c
        out = out + phi_q @ torch.stack(before, dim=2)

        out = _divide(out).reshape(batch, heads, num_chunks * chunk, value_dim)[:, :, :length]
        new_state = LinearAttentionState(kvz[..., :-1], kvz[..., -1], running[..., -1])
    return out.to(v.dtype), new_state


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[LinearAttentionState] = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal FAVOR+. q, k, v: [B, H, 1, D] -> ([B, H, 1, D], new state).

    Cost and memory are independent of how many tokens the state has absorbed.
    """
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"recurrent_linear_attention takes one token at a time, got T={q.shape[2]}")
    fmap = _resolve(feature_map)
    batch, heads, _, _ = q.shape
    if state is None:
        state = empty_state(batch, heads, projection.shape[0], v.shape[-1], device=q.device)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = fmap.queries(q, projection)[:, :, 0]  # [B, H, M]
        logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
        running = torch.maximum(state.stabiliser, token_max[..., 0])
        stabiliser = _finite(running)
        decay = torch.exp(state.stabiliser - stabiliser)
        keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, :, None]
        shift = (offset + stabiliser[..., None]).unsqueeze(-1)
        phi_k = _masked_keys(fmap, logits, shift, keep)[:, :, 0]  # [B, H, M]
        kvz = _join(state) * decay[..., None, None] + phi_k.unsqueeze(-1) * _with_ones(v)[:, :, 0].unsqueeze(-2)
        out = _divide(phi_q.unsqueeze(-2) @ kvz)  # [B, H, 1, D]
        kv, z = kvz[..., :-1], kvz[..., -1]
    return out.to(v.dtype), LinearAttentionState(kv, z, running)


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
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    if causal and key_padding_mask is None and attn_mask is None and q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    visible = mask.any(dim=-1, keepdim=True)  # [B, 1, T, 1]
    mask = mask | ~visible
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out * visible.to(out.dtype)


# --------------------------------------------------------------------------------------------
# Naive O(T^2) references (tests only)


def naive_linear_attention(q, k, v, projection, feature_map="softmax", key_padding_mask=None, causal=False):
    """The T x S matrix phi(q) phi(k)^T written out, in float64, with one global key constant."""
    fmap = _resolve(feature_map)
    q, k, v, projection = q.double(), k.double(), v.double(), projection.double()
    head_dim = q.shape[-1]
    qs, ks = q * head_dim**-0.25, k * head_dim**-0.25
    if fmap.name == "softmax":
        logits_q = qs @ projection.T
        phi_q = torch.exp(logits_q - logits_q.amax(-1, keepdim=True))
        r = ks @ projection.T - ks.pow(2).sum(-1, keepdim=True) / 2
        valid = r if key_padding_mask is None else r.masked_fill(~key_padding_mask.bool()[:, None, :, None], float("-inf"))
        phi_k = torch.exp(r - valid.amax(dim=(-1, -2), keepdim=True))
    else:
        phi_q = torch.relu(qs @ projection.T) + fmap.epsilon
        phi_k = torch.relu(ks @ projection.T) + fmap.epsilon
    scores = phi_q @ phi_k.transpose(-1, -2)
    mask = build_attention_mask(q.shape[2], k.shape[2], key_padding_mask, causal, device=q.device)
    if mask is not None:
        scores = scores * mask
    return scores @ v / scores.sum(-1, keepdim=True).clamp_min(1e-300)


def naive_softmax_attention(q, k, v, key_padding_mask=None, causal=False):
    """softmax(q k^T / sqrt(D)) v written out."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = build_attention_mask(q.shape[2], k.shape[2], key_padding_mask, causal, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v
