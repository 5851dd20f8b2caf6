"""A window plus a sparse cache of the worst-reproduced key/value pairs, over a linear state:
chunked causal and recurrent."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .attention_common import (
    LinearAttentionState,
    absorb_key,
    causal_sums,
    divide_by_normaliser,
    finite_stabiliser,
    group_queries,
    kernel_inputs,
    key_terms,
    repeat_key_heads,
    ungroup_queries,
    with_ones,
)
from .attention_window import (
    causal_window_terms,
    combine_window,
    window_scores,
    empty_window_state,
)

# --------------------------------------------------------------------------------------------
# Window + sparse cache + linear state
#
# With a sparse cache of L pairs per key/value head (training-free; after LoLA, McDermott et al.
# 2025), a key/value pair that leaves the window is not always folded into the linear state.
# Every pair is scored as it enters the window by how badly the linear state of that step
# reproduces its value: the self-recall error |v_j - phi(k_j).S_j / phi(k_j).z_j|^2, the key's
# own features as the query (S_j, z_j: the state that query j reads). When the pair leaves the
# window W steps later it joins the cache; whenever the cache then holds more than L pairs, the
# one with the lowest score (the oldest of equal scores) is folded into the state. So the cache
# holds the L worst-reproduced pairs of all that have left the window (a streaming top-L), and
# queries attend to window and cache exactly under the one normaliser of the linear part.
# Scoring on entry rather than on exit is what lets W steps run as one block: every pair that
# leaves during a block was scored before it, so the block's folds, outputs and its own keys'
# scores need no loop over tokens, and one pass, any split and token-by-token decoding agree (up
# to the rounding of two scores within it of each other). Memory: W + L pairs, W + L scores and
# the state per key/value head, whatever the length.


class SparseWindowState(NamedTuple):
    """Decoding state of a windowed layer with a sparse cache, constant in size. The first five
    fields as in `WindowedAttentionState`; key_scores: [B, H, W] the buffered keys' scores;
    cache_keys: [B, H, L, D], cache_values: [B, H, L, D], cache_mask: [B, H, L] bool (False where a
    slot is empty), cache_scores: [B, H, L]; cache slots in the order their pairs arrived."""

    kvz: torch.Tensor
    stabiliser: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor
    key_scores: torch.Tensor
    cache_keys: torch.Tensor
    cache_values: torch.Tensor
    cache_mask: torch.Tensor
    cache_scores: torch.Tensor

    kv = LinearAttentionState.kv
    normaliser = LinearAttentionState.normaliser


def empty_sparse_window_state(batch, heads, num_features, head_dim, value_dim, window, cache_size, device=None,
                              dtype=torch.float32):
    window_state = empty_window_state(batch, heads, num_features, head_dim, value_dim, window, device, dtype)
    return SparseWindowState(
        *window_state,
        torch.zeros(batch, heads, window, device=device),
        torch.zeros(batch, heads, cache_size, head_dim, device=device, dtype=dtype),
        torch.zeros(batch, heads, cache_size, value_dim, device=device, dtype=dtype),
        torch.zeros(batch, heads, cache_size, dtype=torch.bool, device=device),
        torch.zeros(batch, heads, cache_size, device=device),
    )


def _sparse_state_for(state, fmap, feature_weights, k, v, window, cache_size):
    """The incoming state, or an empty one; a state of another window or cache size is refused."""
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
        raise ValueError(f"sparse cache size must be a positive integer, got {cache_size!r}")
    if state is None:
        batch, heads, _, head_dim = k.shape
        return empty_sparse_window_state(batch, heads, fmap.num_features(feature_weights), head_dim, v.shape[-1], window,
                                         cache_size, k.device, k.dtype)
    if not isinstance(state, SparseWindowState):
        raise ValueError(f"a {type(state).__name__} holds no sparse cache: it cannot continue with sparse cache "
                         f"size {cache_size}")
    if state.keys.shape[2] != window:
        raise ValueError(f"the state holds {state.keys.shape[2]} keys but local window is {window}")
    if state.cache_mask.shape[-1] != cache_size:
        raise ValueError(f"the state's sparse cache holds {state.cache_mask.shape[-1]} pairs, not {cache_size}")
    return state


def _gather_entries(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N] or [B, H, N, X], index: [B, H, K] -> the K entries of each row."""
    if x.dim() == 3:
        return x.gather(2, index)
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def _own_features(k, feature_weights, fmap):
    """phi(k) of each key at its own scale (the key as a query of the state): [B, H, S, M]."""
    logits, offset = fmap.key_logits(k, feature_weights)
    shift = (offset + finite_stabiliser(fmap.token_max(logits, offset))).unsqueeze(-1)
    return fmap.keys(logits, shift)


def _recall_error(v, recalled):
    """Squared distance of each value from what the state returned for its key: [B, H, S]."""
    return (v.float() - divide_by_normaliser(recalled)).pow(2).sum(-1)


def _streaming_cache(scores, valid, cache_size, steps):
    """The cache over `steps` steps. scores, valid: [B, H, N], N = cache_size + steps candidates in
    arrival order: the cache's slots, then the pair leaving the window at each step. After step t
    the cache is the top cache_size of the candidates present by (score, arrival), so membership
    is a count, not a loop: j is in iff fewer than cache_size present candidates rank above it.
    -> (member [B, H, steps, N]: in the cache after step t; folded [B, H, steps]: step t folds a
    pair into the state; fold [B, H, steps]: which candidate)."""
    count = scores.shape[-1]
    index = torch.arange(count, device=scores.device)
    scores = scores.masked_fill(~valid, 0.0)
    above = (scores[..., :, None] > scores[..., None, :]) | (
        (scores[..., :, None] == scores[..., None, :]) & (index[:, None] > index[None, :]))
    above = above & valid[..., :, None]  # [B, H, i, j]: i ranks above j
    arrived = index[None, :] < cache_size + torch.arange(1, steps + 1, device=scores.device)[:, None]  # [steps, N]
    ranked_above = arrived.float() @ above.float()  # [B, H, steps, N]
    present = arrived & valid[..., None, :]
    member = present & (ranked_above < cache_size)
    out = present & ~member
    newly = out & ~F.pad(out, (0, 0, 1, 0))[..., :-1, :]  # at most one per step
    return member, newly.any(-1), newly.float().argmax(-1)


def _cache_members(member, cache_size, *candidates):
    """The members [B, H, N] of candidate tensors, first in arrival order, in cache_size slots:
    -> (tensors..., mask)."""
    count = member.shape[-1]
    order = ((~member).long() * count + torch.arange(count, device=member.device)).argsort(-1)[..., :cache_size]
    return (*(_gather_entries(x, order) for x in candidates), _gather_entries(member, order))


def _merge_exact(first, second):
    """Two exact parts (numerator [..., D], denominator [...], max [...]) at their own scales -> one."""
    score_max = torch.maximum(first[2], second[2])
    scale = finite_stabiliser(score_max)
    a, b = torch.exp(first[2] - scale), torch.exp(second[2] - scale)
    return first[0] * a[..., None] + second[0] * b[..., None], first[1] * a + second[1] * b, score_max


def _combine_with_cache(window_part, cache_part, linear, linear_scale, log_scale, linear_log_weight, calibrated):
    """`combine_window` of window, cache and linear part. A calibrated map's linear part has its absolute
    scale; an uncalibrated map's (ReLU, Hedgehog) was set against the window alone, through g_h and
    the window's maximum score m_w: its weight stays g_h exp(m_w) phi(q).S, so a cached key enters
    at its softmax weight relative to the window, and without cached keys nothing changes."""
    numerator, denominator, score_max = _merge_exact(window_part, cache_part)
    if not calibrated:
        log_scale = log_scale + finite_stabiliser(window_part[2]) - finite_stabiliser(score_max)
    return combine_window(numerator, denominator, score_max, linear, linear_scale, log_scale, linear_log_weight,
                          calibrated)


def _sparse_segment(q, k, v, mask, feature_weights, fmap, window, linear_log_weight, state):
    """Up to W steps of window + sparse cache + linear attention (see above)."""
    batch, heads, steps, _ = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    cache_size = state.cache_mask.shape[-1]
    keys = torch.cat([state.keys.to(k.dtype), k], dim=2)  # [B, H_kv, W + C, D]
    values = torch.cat([state.values.to(v.dtype), v], dim=2)
    key_mask = torch.cat([state.key_mask, mask], dim=1)
    candidate_keys = torch.cat([state.cache_keys.to(k.dtype), keys[:, :, :steps]], dim=2)
    candidate_values = torch.cat([state.cache_values.to(v.dtype), values[:, :, :steps]], dim=2)
    valid = torch.cat([state.cache_mask, key_mask[:, None, :steps].expand(batch, kv_heads, steps)], dim=-1)
    scores = torch.cat([state.cache_scores, state.key_scores[:, :, :steps]], dim=-1)
    member, folded, fold = _streaming_cache(scores, valid, cache_size, steps)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q, log_scale = fmap.queries_with_log_scale(q, feature_weights)
        # The new keys read the state beside the queries, as one more member of their head's group.
        both = torch.cat([phi_q.view(batch, kv_heads, groups, steps, -1),
                          _own_features(k, feature_weights, fmap)[:, :, None]], dim=2).flatten(1, 2)
        logits, offset, token_max = key_terms(_gather_entries(candidate_keys, fold), feature_weights, fmap, folded)
        terms, term_scale, linear_state = causal_sums(
            fmap, both, logits, offset, token_max, with_ones(_gather_entries(candidate_values, fold)), folded,
            LinearAttentionState(state.kvz, state.stabiliser), steps)
        terms = terms.view(batch, kv_heads, groups + 1, steps, -1)
        term_scale = term_scale.view(batch, kv_heads, groups + 1, steps)
        linear = terms[:, :, :groups].reshape(batch, heads, steps, -1)
        linear_scale = term_scale[:, :, :groups].reshape(batch, heads, steps)
        new_scores = _recall_error(v, terms[:, :, groups])
        window_part = causal_window_terms(q, keys, values, key_mask, window)
        weights, score_max = window_scores(q, repeat_key_heads(candidate_keys, heads), repeat_key_heads(member, heads))
        cache_part = (weights @ repeat_key_heads(candidate_values, heads).float(), weights.sum(-1), score_max)
        out = _combine_with_cache(window_part, cache_part, linear, linear_scale, log_scale, linear_log_weight,
                                  fmap.calibrated)
    kept = _cache_members(member[:, :, -1], cache_size, candidate_keys, candidate_values, scores)
    key_scores = torch.cat([state.key_scores, new_scores], dim=-1)[:, :, steps:]
    new_state = SparseWindowState(*linear_state, keys[:, :, steps:], values[:, :, steps:], key_mask[:, steps:],
                                  key_scores, kept[0], kept[1], kept[3], kept[2])
    return out.to(v.dtype), new_state


def causal_sparse_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    cache_size: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[SparseWindowState] = None,
) -> tuple[torch.Tensor, SparseWindowState]:
    """Causal linear attention with an exact window of the last W keys and an exact sparse cache of
    the `cache_size` pairs that left the window worst reproduced by the linear state (see above).
    q, k, v: [B, H, T, D] -> ([B, H, T, D], state). Blocks of W steps: per block, [W, 2W] window
    scores, [W, L + W] cache scores and a W x W linear block; O(T) time, constant memory carried."""
    fmap, mask = kernel_inputs(q, k, v, feature_map, key_padding_mask, window=window, default_mask=True)
    batch, _, length, _ = q.shape
    state = _sparse_state_for(state, fmap, feature_weights, k, v, window, cache_size)
    outputs = []
    for start in range(0, length, window):
        end = min(start + window, length)
        out, state = _sparse_segment(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask[:, start:end],
                                     feature_weights, fmap, window, linear_log_weight, state)
        outputs.append(out)
    if not outputs:
        return v.new_zeros(batch, q.shape[1], 0, v.shape[-1]), state
    return torch.cat(outputs, dim=2), state


def recurrent_sparse_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    cache_size: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[SparseWindowState] = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, SparseWindowState]:
    """One decoding step of `causal_sparse_windowed_attention`. q, k, v: [B, H, 1, D]. The oldest
    buffered pair joins the cache; if that makes L + 1, the lowest-scored one (the oldest of equal
    scores) is folded into the linear state (in place where `in_place`)."""
    fmap, mask = kernel_inputs(q, k, v, feature_map, key_padding_mask, mode="step",
                               name="recurrent_sparse_windowed_attention", window=window, default_mask=True)
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    state = _sparse_state_for(state, fmap, feature_weights, k, v, window, cache_size)
    candidate_keys = torch.cat([state.cache_keys, state.keys[:, :, :1]], dim=2)
    candidate_values = torch.cat([state.cache_values, state.values[:, :, :1]], dim=2)
    valid = torch.cat([state.cache_mask, state.key_mask[:, None, :1].expand(batch, kv_heads, 1)], dim=-1)
    scores = torch.cat([state.cache_scores, state.key_scores[:, :, :1]], dim=-1)
    lowest = scores.masked_fill(~valid, float("inf")).argmin(-1, keepdim=True)  # the first minimum: the oldest
    folded = valid.sum(-1, keepdim=True) > cache_size  # [B, H_kv, 1]
    member = valid & ~(folded & (torch.arange(cache_size + 1, device=q.device) == lowest))
    with torch.autocast(device_type=q.device.type, enabled=False):
        leaving = _gather_entries(candidate_keys, lowest), _gather_entries(candidate_values, lowest)
        kvz, running, stabiliser = absorb_key(state, *leaving, feature_weights, fmap, folded, in_place)
        phi_q, log_scale = fmap.queries_with_log_scale(q, feature_weights)
        linear = ungroup_queries(group_queries(phi_q, kv_heads) @ kvz, heads)  # [B, H, 1, D + 1]
        new_score = _recall_error(v, _own_features(k, feature_weights, fmap) @ kvz)  # [B, H_kv, 1]

        keys = torch.cat([state.keys[:, :, 1:], k.to(state.keys.dtype)], dim=2)
        values = torch.cat([state.values[:, :, 1:], v.to(state.values.dtype)], dim=2)
        key_mask = torch.cat([state.key_mask[:, 1:], mask], dim=1)
        weights, score_max = window_scores(q, repeat_key_heads(keys, heads), key_mask[:, None, None, :])
        window_part = (weights @ repeat_key_heads(values, heads).float(), weights.sum(-1), score_max)
        weights, score_max = window_scores(q, repeat_key_heads(candidate_keys, heads),
                                     repeat_key_heads(member, heads)[:, :, None, :])
        cache_part = (weights @ repeat_key_heads(candidate_values, heads).float(), weights.sum(-1), score_max)
        out = _combine_with_cache(window_part, cache_part, linear, repeat_key_heads(stabiliser, heads)[..., None],
                                  log_scale, linear_log_weight, fmap.calibrated)
    kept = _cache_members(member, cache_size, candidate_keys, candidate_values, scores)
    key_scores = torch.cat([state.key_scores[:, :, 1:], new_score], dim=-1)
    new_state = SparseWindowState(kvz, running, keys, values, key_mask, key_scores, kept[0], kept[1], kept[3], kept[2])
    return out.to(v.dtype), new_state


