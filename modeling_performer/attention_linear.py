"""Linear attention (FAVOR+, ReLU, Hedgehog maps): non-causal, chunked causal (O(T) memory) and
recurrent (one decoding step). Conventions and numerics: `attention_common`."""

from typing import Optional

import torch
import torch.nn.functional as F

from .fast_attention import gla_causal_terms
from .attention_common import (
    LinearAttentionState,
    _absorb_key,
    _check_qkv,
    _gates,
    _divide,
    _finite,
    _head_mask,
    _key_terms,
    _masked_keys,
    _query_groups,
    _query_heads,
    _resolve,
    _running_max,
    _stack_groups,
    _states_before_chunks,
    _unstack_groups,
    _with_ones,
    empty_state,
)

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
        return LinearAttentionState(kvz, stabiliser)


def linear_attention_from_state(
    q: torch.Tensor, state: LinearAttentionState, projection: torch.Tensor, feature_map="softmax"
) -> torch.Tensor:
    """q: [B, H, T, D] attends to everything summarised in state -> [B, H, T, D] in q's dtype."""
    fmap = _resolve(feature_map)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = _query_groups(fmap.queries(q, projection), state.kvz.shape[1])
        out = _divide(_query_heads(phi_q @ state.kvz, q.shape[1]))
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
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got T={q.shape[2]}, S={k.shape[2]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    fmap = _resolve(feature_map)
    batch, heads, length, head_dim = q.shape
    value_dim = v.shape[-1]
    if state is None:
        state = empty_state(batch, k.shape[1], fmap.num_features(projection), value_dim, device=q.device)
    if length == 0:
        return v.new_zeros(batch, heads, 0, value_dim), state

    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = fmap.queries(q, projection)
        logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
        out, _, new_state = _causal_terms(fmap, phi_q, logits, offset, token_max, _with_ones(v), key_padding_mask,
                                          state, chunk_size, kernel, q.dtype,
                                          log_decay=_gates(log_decay, key_padding_mask))
        out = _divide(out)
    return out.to(v.dtype), new_state


def _causal_terms(fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, chunk_size, kernel=None,
                  kernel_dtype=None, log_decay=None):
    """The unnormalised causal sums, chunk by chunk. phi_q: [B, H, T, M]; logits, offset,
    token_max as `_key_terms` returns them; v1: [B, H, T, D + 1] (values and a column of ones).
    Keys, values and the state have H_kv heads; each query head reads its group's.
    -> (sum_{j <= t} phi(q_t) phi(k_j) [v_j, 1]: [B, H, T, D + 1] at the scale exp(-stabiliser_t),
        stabiliser_t: [B, H, T] (finite), the state after the last token).
    kernel: compute them on a simple-GLA kernel instead (`fast_attention.gla_causal_terms`), in kernel_dtype.
    log_decay: [B, H_kv, T] fp32 log gates (padded steps already 0), or None.

    With a decay, g_t is the cumulative log gate inside a chunk (inclusive): key j of a chunk
    reaches query t of the same chunk at exp(g_t - g_j), the chunk's end at exp(g_C - g_j), and the
    state before the chunk reaches query t at exp(g_t). Every exponent is <= 0: nothing overflows."""
    if kernel is not None:
        return gla_causal_terms(kernel, fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state,
                                kernel_dtype, log_decay=log_decay)
    batch, query_heads, length, _ = phi_q.shape
    heads = logits.shape[1]
    groups = query_heads // heads
    value_dim = v1.shape[-1] - 1
    mask = _head_mask(key_padding_mask) if key_padding_mask is not None else None

    # Compiled and exported graphs keep the length symbolic: there the tail is always padded up to
    # whole chunks of chunk_size (possibly by zero positions) and the mask is always applied. Eager
    # mode pads only when it must (a mask costs memory in training).
    compiling = torch.compiler.is_compiling()
    chunk = chunk_size if compiling else min(chunk_size, length)
    num_chunks = (length + chunk - 1) // chunk
    padded = num_chunks * chunk - length
    if compiling or padded:
        # Padded tail positions are masked keys: they change neither maxima nor state.
        phi_q = F.pad(phi_q, (0, 0, 0, padded))
        logits = F.pad(logits, (0, 0, 0, padded))
        offset = F.pad(offset, (0, padded))
        v1 = F.pad(v1, (0, 0, 0, padded))
        token_max = F.pad(token_max, (0, padded), value=float("-inf"))
        if log_decay is not None:
            log_decay = F.pad(log_decay, (0, padded))  # padded steps decay nothing
        if mask is None:
            mask = torch.ones(batch, 1, length, dtype=torch.bool, device=phi_q.device)
        mask = F.pad(mask, (0, padded), value=False)

    # Running maximum at the end of every chunk; running[..., 0] is the incoming one.
    chunk_max = token_max.view(batch, heads, num_chunks, chunk).amax(dim=-1)
    running = _running_max(torch.cat([state.stabiliser.unsqueeze(-1), chunk_max], dim=-1))
    stabiliser = _finite(running[..., 1:])  # [B, H, NC]
    decay = torch.exp(running[..., :-1] - stabiliser)  # rescales the carried state into chunk c

    keep = None if mask is None else mask.view(batch, mask.shape[1], num_chunks, chunk, 1)
    shift = (offset.view(batch, heads, num_chunks, chunk) + stabiliser[..., None]).unsqueeze(-1)
    phi_k = _masked_keys(fmap, logits.view(batch, heads, num_chunks, chunk, logits.shape[-1]), shift, keep)
    phi_q = _stack_groups(phi_q, heads, num_chunks, chunk)  # [B, H_kv, NC, G * C, M]
    v1 = v1.view(batch, heads, num_chunks, chunk, value_dim + 1)

    # Inside each chunk: an explicit lower-triangular product (in place: the product is needed by nothing else).
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).triu(1)
    scores = phi_q @ phi_k.transpose(-1, -2)  # [B, H_kv, NC, G * C, C]
    if log_decay is None:
        scores = scores.masked_fill_(later.repeat(groups, 1), 0.0)
        chunk_log_decay = None
    else:
        g = log_decay.view(batch, heads, num_chunks, chunk).cumsum(-1)  # [B, H_kv, NC, C]
        chunk_log_decay = g[..., -1]
        within = torch.exp((g[..., :, None] - g[..., None, :]).masked_fill_(later, float("-inf")))  # [.., C, C]
        scores = (scores.view(batch, heads, num_chunks, groups, chunk, chunk) * within[:, :, :, None]).flatten(3, 4)
        phi_k = phi_k * torch.exp(chunk_log_decay[..., None] - g)[..., None]  # each key as it reaches the chunk's end
    out = scores @ v1  # [B, H_kv, NC, G * C, D + 1]

    # Across chunks: the state before chunk c, at chunk c's scale.
    chunk_kvz = (v1.transpose(-1, -2) @ phi_k).transpose(-1, -2)  # [B, H, NC, M, D + 1]
    kvz = state.kvz
    if torch.compiler.is_compiling():
        # A loop over chunks would fix their number in the graph: the state before chunk c as one
        # product instead, sum_{j < c} exp(s_j - s_c) kvz_j plus the incoming state at exp(s_in - s_c)
        # (every factor <= 1: the running maximum never decreases). O(NC^2) rather than O(NC).
        before, kvz = _states_before_chunks(kvz, chunk_kvz, running, stabiliser, chunk_log_decay)
    else:
        before = []
        gates = [None] * num_chunks if chunk_log_decay is None else torch.exp(chunk_log_decay).unbind(-1)
        # unbind once: indexing chunk_kvz[:, :, c] in the loop would make backward quadratic.
        for chunk_decay, kvz_c, gate in zip(decay.unbind(-1), chunk_kvz.unbind(2), gates):
            kvz = kvz * chunk_decay[..., None, None]
            before.append(kvz)
            kvz = (kvz if gate is None else kvz * gate[..., None, None]) + kvz_c
        before = torch.stack(before, dim=2)
    carried = phi_q @ before
    if log_decay is not None:  # the state before the chunk reaches query t at exp(g_t)
        carried = (carried.view(batch, heads, num_chunks, groups, chunk, -1)
                   * torch.exp(g)[:, :, :, None, :, None]).flatten(3, 4)
    out = out + carried

    out = _unstack_groups(out, query_heads, num_chunks, chunk)[:, :, :length]
    per_token = stabiliser[:, :, None, :, None].expand(batch, heads, groups, num_chunks, chunk)
    per_token = per_token.reshape(batch, query_heads, -1)[..., :length]
    # The running maximum as a tensor of its own (not a strided view of the chunks' maxima): a state
    # keeps one layout from the prefill on, so a compiled decoding step does not recompile for it.
    return out, per_token, LinearAttentionState(kvz, running[..., -1].clone(memory_format=torch.contiguous_format))



def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
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
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"recurrent_linear_attention takes one token at a time, got T={q.shape[2]}")
    fmap = _resolve(feature_map)
    batch, heads, _, _ = q.shape
    if state is None:
        state = empty_state(batch, k.shape[1], fmap.num_features(projection), v.shape[-1], device=q.device)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q = _query_groups(fmap.queries(q, projection), k.shape[1])  # [B, H_kv, G, M]
        gate = _gates(log_decay, key_padding_mask)
        kvz, running, _ = _absorb_key(state, k, v, projection, fmap, key_padding_mask, in_place,
                                      log_decay=None if gate is None else gate[..., 0])
        out = _divide(_query_heads(phi_q @ kvz, heads))  # [B, H, 1, D]
    return out.to(v.dtype), LinearAttentionState(kvz, running)


