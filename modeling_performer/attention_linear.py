"""Linear attention (FAVOR+, ReLU, Hedgehog maps): non-causal, chunked causal (O(T) memory) and
recurrent (one decoding step). Conventions and numerics: `attention_common`."""

from typing import Optional

import torch

from .fast_attention import causal_sums_on
from .attention_common import (
    LinearAttentionState,
    absorb_key,
    check_qkv,
    decay_gates,
    divide_by_normaliser,
    empty_state,
    finite_stabiliser,
    group_queries,
    kernel_inputs,
    key_terms,
    masked_key_features,
    resolve_feature_map,
    ungroup_queries,
    with_ones,
)

# --------------------------------------------------------------------------------------------
# Non-causal


def linear_attention_state(
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> LinearAttentionState:
    """Summarises all keys/values once (encoder self-attention, cross-attention cache).

    k, v: [B, H, S, D] -> state with kv [B, H, M, D], normaliser [B, H, M], stabiliser [B, H].
    """
    fmap = resolve_feature_map(feature_map)
    with torch.autocast(device_type=k.device.type, enabled=False):
        logits, offset, token_max = key_terms(k, feature_weights, fmap, key_padding_mask)
        stabiliser = token_max.amax(dim=-1) if token_max.shape[-1] > 0 else token_max.new_full(token_max.shape[:2], float("-inf"))
        keep = None if key_padding_mask is None else key_padding_mask.to(torch.bool)[:, None, :, None]
        shift = (offset + finite_stabiliser(stabiliser)[..., None]).unsqueeze(-1)
        phi_k = masked_key_features(fmap, logits, shift, keep)
        # (v^T phi_k)^T rather than phi_k^T v: backward then yields phi_k's gradient in its own
        # layout instead of a transposed one that would be copied.
        kvz = (with_ones(v).transpose(-1, -2) @ phi_k).transpose(-1, -2)
        return LinearAttentionState(kvz, stabiliser)


def linear_attention_from_state(
    q: torch.Tensor, state: LinearAttentionState, feature_weights: torch.Tensor, feature_map="softmax"
) -> torch.Tensor:
    """q: [B, H, T, D] attends to everything summarised in state -> [B, H, T, D] in q's dtype."""
    fmap = resolve_feature_map(feature_map)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = group_queries(fmap.queries(q, feature_weights), state.kvz.shape[1])
        out = divide_by_normaliser(ungroup_queries(phi_q @ state.kvz, q.shape[1]))
    return out.to(q.dtype)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Non-causal FAVOR+: every query sees every unmasked key. -> [B, H, T, D]."""
    check_qkv(q, k, v, key_padding_mask)
    state = linear_attention_state(k, v, feature_weights, feature_map, key_padding_mask)
    return linear_attention_from_state(q, state, feature_weights, feature_map).to(v.dtype)


# --------------------------------------------------------------------------------------------
# Causal


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[LinearAttentionState] = None,
    chunk_size: int = 128,
    kernel=None,
    log_decay: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Causal FAVOR+, chunk by chunk: a masked C x C product inside each chunk plus the running
    state of all earlier chunks. O(T) time and memory.

    q, k, v: [B, H, T, D] (query t sees keys <= t, plus everything in `state`).
    Returns ([B, H, T, D] in v's dtype, the state after the last token).
    kernel: a simple-GLA kernel in fla's signature to compute the sums on (`fast_attention`), or None.
    log_decay: [B, H_kv, T] (<= 0), the state's log gate at each step (decay-gated linear attention):
    S_t = exp(log_decay_t) S_{t-1} + phi(k_t) [v_t, 1]^T, so key j reaches query t weighed by
    exp(sum_{j < s <= t} log_decay_s), in the numerator and the normaliser alike. Padded steps
    decay nothing. None: no decay (the additive state).
    """
    fmap, _ = kernel_inputs(q, k, v, feature_map, key_padding_mask, chunk_size=chunk_size)
    batch, heads, length, head_dim = q.shape
    value_dim = v.shape[-1]
    if state is None:
        state = empty_state(batch, k.shape[1], fmap.num_features(feature_weights), value_dim, device=q.device)
    if length == 0:
        return v.new_zeros(batch, heads, 0, value_dim), state

    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = fmap.queries(q, feature_weights)
        logits, offset, token_max = key_terms(k, feature_weights, fmap, key_padding_mask)
        out, _, new_state = causal_sums_on(kernel, fmap, phi_q, logits, offset, token_max, with_ones(v),
                                           key_padding_mask, state, chunk_size, q.dtype,
                                           log_decay=decay_gates(log_decay, key_padding_mask))
        out = divide_by_normaliser(out)
    return out.to(v.dtype), new_state


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[LinearAttentionState] = None,
    in_place: bool = False,
    log_decay: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal FAVOR+. q, k, v: [B, H, 1, D] -> ([B, H, 1, D], new state).

    Cost and memory are independent of how many tokens the state has absorbed. With in_place the
    step writes the new state into `state.kvz` (the old values are gone: for a state nothing
    else holds, outside autograd; see `may_update_in_place`). log_decay: [B, H_kv, 1], the step's
    log gate, as in `causal_linear_attention`.
    """
    fmap, _ = kernel_inputs(q, k, v, feature_map, key_padding_mask, mode="step", name="recurrent_linear_attention")
    batch, heads, _, _ = q.shape
    if state is None:
        state = empty_state(batch, k.shape[1], fmap.num_features(feature_weights), v.shape[-1], device=q.device)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = group_queries(fmap.queries(q, feature_weights), k.shape[1])  # [B, H_kv, G, M]
        gate = decay_gates(log_decay, key_padding_mask)
        kvz, running, _ = absorb_key(state, k, v, feature_weights, fmap, key_padding_mask, in_place,
                                     log_decay=None if gate is None else gate[..., 0])
        out = divide_by_normaliser(ungroup_queries(phi_q @ kvz, heads))  # [B, H, 1, D]
    return out.to(v.dtype), LinearAttentionState(kvz, running)


