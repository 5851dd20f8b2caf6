"""Linear attention with an exact local softmax window under one normaliser: non-causal, chunked
causal and recurrent."""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .fast_attention import causal_sums_on
from .attention_common import (
    LinearAttentionState,
    absorb_key,
    decay_gates,
    divide_by_normaliser,
    empty_state,
    finite_stabiliser,
    group_queries,
    kernel_inputs,
    key_terms,
    masked_key_features,
    repeat_key_heads,
    stack_groups,
    ungroup_queries,
    unstack_groups,
    with_ones,
)

# --------------------------------------------------------------------------------------------
# Linear attention combined with an exact local window
#
# Query i attends exactly (softmax scores s_ij = q_i.k_j / sqrt(D)) to the keys with |i - j| < W
# (and j <= i when causal); every other unmasked key goes through the linear part. One
# normaliser serves both:
#
#   out_i = (sum_win exp(s_ij - m_i) v_j + g_h phi(q_i).S_i) / (sum_win exp(s_ij - m_i) + g_h phi(q_i).z_i)
#
# with m_i the maximum score over the window, g_h = exp(linear_log_weight_h), and S_i, z_i the
# linear sums over the keys outside the window. For FAVOR+ (a calibrated map) phi(q).phi(k) is
# the unbiased estimate of exp(s), so it is taken at the window's scale exp(-m_i): with g_h = 1
# the combined normaliser estimates softmax's own. Each path computes the same quantities, so
# one pass, chunk by chunk and token by token agree to rounding.


class WindowedAttentionState(NamedTuple):
    """Decoding state of a windowed layer, constant in size.

    kvz, stabiliser: the linear state of the keys that have left the window (as in
    `LinearAttentionState`); keys: [B, H, W, D], values: [B, H, W, D], key_mask: [B, W] bool, the
    last W keys (oldest first; False where a slot is empty or padded).
    """

    kvz: torch.Tensor
    stabiliser: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    key_mask: torch.Tensor

    kv = LinearAttentionState.kv
    normaliser = LinearAttentionState.normaliser


def empty_window_state(batch, heads, num_features, head_dim, value_dim, window, device=None, dtype=torch.float32):
    linear = empty_state(batch, heads, num_features, value_dim, device=device)
    return WindowedAttentionState(
        *linear,
        torch.zeros(batch, heads, window, head_dim, device=device, dtype=dtype),
        torch.zeros(batch, heads, window, value_dim, device=device, dtype=dtype),
        torch.zeros(batch, window, dtype=torch.bool, device=device),
    )


def _window_state_for(state, fmap, feature_weights, k, v, window):
    """The incoming state, or an empty one of the right shapes; a state built for another
    window is refused."""
    if state is None:
        batch, heads, _, head_dim = k.shape
        return empty_window_state(batch, heads, fmap.num_features(feature_weights), head_dim, v.shape[-1], window,
                                  k.device, k.dtype)
    if state.keys.shape[2] != window:
        raise ValueError(f"the state holds {state.keys.shape[2]} keys but local window is {window}")
    return state


def window_scores(q, keys, allowed):
    """q: [..., C, D], keys: [..., K, D], allowed: bool broadcastable to [..., C, K].
    -> (the weights exp(s - window_max) [..., C, K] (0 where not allowed), window_max: each query's
    largest allowed score s [..., C] (-inf if none))."""
    scores = (q.float() @ keys.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    scores = scores.masked_fill_(~allowed, float("-inf"))
    window_max = scores.amax(dim=-1)  # (its backward reads the scores: they are not overwritten below)
    weights = (scores - finite_stabiliser(window_max)[..., None]).exp_()  # exp(-inf) = 0 where not allowed
    return weights, window_max


def combine_window(window_num, window_den, window_max, linear, linear_stabiliser, query_log_scale,
                   linear_log_weight, calibrated):
    """One normaliser for both parts. window_num: [B, H, T, D], window_den, window_max: [B, H, T];
    linear: [B, H, T, D + 1] (phi(q) sums at the scale exp(-linear_stabiliser)); query_log_scale:
    [B, H, T] or None; linear_log_weight: [H] or None. -> [B, H, T, D] fp32."""
    heads = linear.shape[1]
    log_weight = (linear_log_weight.float().view(1, heads, 1) if linear_log_weight is not None
                  else linear.new_zeros(1, heads, 1))
    if query_log_scale is not None:  # None: no factor was removed from the queries (an uncalibrated map)
        log_weight = log_weight + query_log_scale
    if calibrated:
        log_weight = log_weight + linear_stabiliser - finite_stabiliser(window_max)
    return _mix(torch.cat([window_num, window_den[..., None]], dim=-1), linear, log_weight[..., None])


def _mix(window_part, linear, log_weight):
    """window_part (numerator and denominator) + exp(log_weight) * linear, normalised. window_part,
    linear: [..., D + 1]; log_weight broadcastable to [..., 1]. Both parts are scaled by
    exp(-max(a, 0)): neither factor can overflow, the ratio is unchanged. -> [..., D]."""
    shift = log_weight.clamp_min(0.0)
    return divide_by_normaliser(window_part * torch.exp(-shift) + linear * torch.exp(log_weight - shift))


def _mix_uncalibrated(window_part, linear, linear_log_weight):
    """`combine_window` for an uncalibrated map, in the grouped layout of a decoding step: window_part
    (numerator and denominator) and linear: [B, H_kv, G, D + 1]; linear_log_weight: [H] or None.
    Nothing to add for the queries' scale. -> [B, H_kv, G, D]."""
    if linear_log_weight is None:  # both factors are exactly 1
        return divide_by_normaliser(window_part + linear)
    return _mix(window_part, linear, linear_log_weight.float().view(1, *window_part.shape[1:3], 1))


def _exact_attention(q, k, v, key_padding_mask):
    """Softmax attention over every real key, by the window part's own formula (fp32; a row
    without real keys gives 0, as in the windowed path). q: [B, H, T, D], k, v: [B, H_kv, T, D]."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        heads = q.shape[1]
        k, v = repeat_key_heads(k, heads), repeat_key_heads(v, heads)
        allowed = (key_padding_mask.to(torch.bool)[:, None, None, :] if key_padding_mask is not None
                   else torch.ones((), dtype=torch.bool, device=q.device))
        weights, _ = window_scores(q, k, allowed)
        out = divide_by_normaliser(weights @ with_ones(v))
    return out.to(v.dtype)


def windowed_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    sink_tokens: int = 0,
) -> torch.Tensor:
    """Non-causal linear attention plus an exact window |i - j| < W. q, k, v: [B, H, T, D] -> [B, H, T, D].

    Blocks of C = W positions: the window of block b lies in blocks b-1..b+1 (a band of 3C keys,
    a strided view), where the exact scores are computed; an input shorter than 3W is one block whose
    band is the whole input (T keys per query instead of 3W). The linear part is phi(q) times the state of all
    keys, minus phi(q) phi(k)^T [v, 1] over the window's keys (a sum of positive terms minus a
    part of it; cancellation only matters where the window already dominates the output).
    O(T (W + M) D) time and O(T) memory (no T x T matrix from T = 3W on). linear_log_weight: [H], log g_h (None = 0).
    sink_tokens: the first S real keys of each row (e.g. [CLS]) are exact for every query as well
    (`_add_sinks`): O(T S D) more. Inputs of at most W tokens have every key inside every query's
    window: exact softmax attention, computed directly (a short sentence costs what it costs softmax).
    """
    fmap, _ = kernel_inputs(q, k, v, feature_map, key_padding_mask, mode="full", window=window)
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    batch, heads, length, head_dim = q.shape
    # An exported graph serves every length: it keeps the banded path, right for all of them.
    exporting = torch.compiler.is_exporting()
    if length <= window and not exporting:  # |i - j| < W for every pair: the linear part sums no key
        return _exact_attention(q, k, v, key_padding_mask)
    dense = length < 3 * window and not exporting  # fewer keys per query than a band of three blocks
    block = length if dense else window
    num_blocks = (length + block - 1) // block  # not -(-T // C): exported integer division truncates
    padded = num_blocks * block - length
    with torch.autocast(device_type=q.device.type, enabled=False):
        mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
                else torch.ones(batch, length, dtype=torch.bool, device=q.device))
        mask = F.pad(mask, (0, padded), value=False)
        phi_q, log_scale = fmap.queries_with_log_scale(q, feature_weights)
        logits, offset, token_max = key_terms(k, feature_weights, fmap, key_padding_mask)
        stabiliser = token_max.amax(dim=-1)  # [B, H]: one constant for every key
        shift = (offset + finite_stabiliser(stabiliser)[..., None]).unsqueeze(-1)
        phi_k = masked_key_features(fmap, logits, shift, mask[:, None, :length, None])
        # The window and its band corrections are per query head: each key/value head serves its group.
        k, v, phi_k, stabiliser = (repeat_key_heads(x, heads) for x in (k, v, phi_k, stabiliser))
        pad = (0, 0, 0, padded)
        phi_q, phi_k, v1 = F.pad(phi_q, pad), F.pad(phi_k, pad), F.pad(with_ones(v), pad)

        def blocks(x):  # [B, H, NB * C, X] -> [B, H, NB, C, X]
            return x.view(x.shape[0], x.shape[1], num_blocks, block, x.shape[-1])

        def band(x):  # blocks b-1, b, b+1 of x as a strided view (no copy): [B, H, NB, X, 3C]
            if dense:  # the one block's band is the whole input: [B, H, 1, X, T]
                return x.transpose(-1, -2).unsqueeze(2)
            return F.pad(x, (0, 0, block, block + padded)).unfold(2, 3 * block, block)

        # distance d = j - i between key slot a' of the band and query slot a of block b
        local = torch.arange(block, device=q.device)
        band_keys = torch.arange(block if dense else 3 * block, device=q.device) - (0 if dense else block)
        distance = band_keys[None, :] - local[:, None]  # [C, 3C] ([T, T] dense)
        near = distance.abs() < window
        key_ok = band(mask[:, None, :length, None].float())[..., 0, :].bool()[:, :, :, None, :]  # [B, 1, NB, 1, 3C]
        weights, score_max = window_scores(blocks(F.pad(q.float(), pad)), band(k.float()).transpose(-1, -2),
                                           key_ok & near)
        v1_band = band(v1[..., :length, :]).transpose(-1, -2)  # [B, H, NB, 3C, D + 1]
        exact = weights @ v1_band  # [..., D + 1]: numerator and, in the ones column, the denominator
        window_num, window_den = exact[..., :-1], exact[..., -1]

        # Linear part: every key through the one global state, minus the window's own share
        # (phi of padded keys is already 0). No per-block states: memory stays that of linear_attention.
        total = (v1.transpose(-1, -2) @ phi_k).transpose(-1, -2)  # [B, H, M, D + 1]
        phi_qb = blocks(phi_q)
        inside = (phi_qb @ band(phi_k[..., :length, :])) * near.to(phi_q.dtype)
        linear = phi_qb @ total.unsqueeze(2) - inside @ v1_band

        def flat(x):
            return x.reshape(batch, heads, num_blocks * block, *x.shape[4:])[:, :, :length]

        window_num, window_den, score_max, linear = flat(window_num), flat(window_den), flat(score_max), flat(linear)
        if sink_tokens:
            window_num, window_den, score_max, linear, log_scale = _add_sinks(
                q, k, v1[..., :length, :], phi_q[..., :length, :], phi_k[..., :length, :], mask[:, :length], window,
                sink_tokens, (window_num, window_den, score_max, linear, log_scale), fmap.calibrated)
        # The normaliser is a sum of positive terms: rounding must not make it negative.
        linear = torch.cat([linear[..., :-1], linear[..., -1:].clamp_min(0.0)], dim=-1)
        out = combine_window(window_num, window_den, score_max, linear, finite_stabiliser(stabiliser)[..., None],
                             log_scale, linear_log_weight, fmap.calibrated)
    return out.to(v.dtype)


def _add_sinks(q, k, v1, phi_q, phi_k, mask, window, sink_tokens, parts, calibrated):
    """Moves the first `sink_tokens` real keys of every row from the linear part to the exact one
    for the queries whose window does not hold them (attention sinks: [CLS] and the like, which
    many heads of a softmax model attend to from everywhere). q, k: [B, H, T, D] (keys already per
    query head), v1: [B, H, T, D + 1], phi_q, phi_k: [B, H, T, M], mask: [B, T] bool; parts: the
    window's numerator, denominator and maximum, the linear sums and the queries' log scale, as
    `combine_window` takes them. The exact part is rescaled to the new maximum; an uncalibrated map's
    linear part stays weighed against the window's own maximum (as with a sparse cache)."""
    window_num, window_den, score_max, linear, log_scale = parts
    length = q.shape[2]
    positions = torch.arange(length, device=q.device)
    # the positions of each row's first S real tokens: [B, S], and whether the row has that many
    is_sink = mask & (mask.long().cumsum(1) <= sink_tokens)
    order = torch.where(is_sink, positions, positions + length).argsort(dim=1)[:, :sink_tokens]
    real = is_sink.gather(1, order)

    def pick(x):  # [B, H, T, X] -> the sinks' rows [B, H, S, X]
        return x.gather(2, order[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))

    # a sink moves only for the queries that see it outside the window (inside, it is exact already)
    moved = real[:, None, None, :] & ((positions[None, None, :, None] - order[:, None, None, :]).abs() >= window)
    scores = (q.float() @ pick(k).float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B, H, T, S]
    scores = scores.masked_fill(~moved, float("-inf"))
    new_max = torch.maximum(score_max, scores.amax(dim=-1))
    # the window weights were taken at exp(-score_max)
    rescale = torch.exp(finite_stabiliser(score_max) - finite_stabiliser(new_max))
    sink_v1 = pick(v1)
    exact = torch.exp(scores - finite_stabiliser(new_max)[..., None]) @ sink_v1  # exp(-inf) = 0 where not moved
    window_num = window_num * rescale[..., None] + exact[..., :-1]
    window_den = window_den * rescale + exact[..., -1]
    linear = linear - ((phi_q @ pick(phi_k).transpose(-1, -2)) * moved) @ sink_v1
    if not calibrated:
        log_scale = log_scale + finite_stabiliser(score_max) - finite_stabiliser(new_max)
    return window_num, window_den, new_max, linear, log_scale


def causal_window_terms(q, keys, values, key_mask, window):
    """Exact part of causal windowed attention. q: [B, H, T, D]; keys/values: [B, H_kv, W + T, D],
    the W keys before the first query then the T new ones; key_mask: [B, W + T]. Query t sees
    combined positions t+1 .. t+W. -> (numerator [B, H, T, D], denominator [B, H, T], max [B, H, T]).
    Blocks of C = W queries read a band of the next 2C keys. The G = H / H_kv query heads of a
    key/value head are stacked as one block of G * C rows, so every product reads the key/value head's
    band as it is: nothing key-side is copied per query head."""
    heads, length = q.shape[1:3]
    kv_heads = keys.shape[1]
    block = window
    num_blocks = (length + block - 1) // block  # not -(-T // C): exported integer division truncates
    q = stack_groups(F.pad(q.float(), (0, 0, 0, num_blocks * block - length)), kv_heads, num_blocks, block)
    total = (num_blocks + 1) * block
    extra = total - keys.shape[2]
    keys, values = F.pad(keys.float(), (0, 0, 0, extra)), F.pad(values.float(), (0, 0, 0, extra))
    key_mask = F.pad(key_mask, (0, extra), value=False)

    def band(x):  # [B, H_kv, (NB + 1) C, X] -> blocks b and b+1 as a strided view: [B, H_kv, NB, X, 2C]
        return x.unfold(2, 2 * block, block)

    local = torch.arange(block, device=q.device)
    ahead = torch.arange(2 * block, device=q.device)[None, :] - local[:, None]  # key slot a' - query slot a
    near = ((ahead >= 1) & (ahead <= window)).repeat(heads // kv_heads, 1)  # [G * C, 2C]
    allowed = near & band(key_mask[:, None, :, None])[..., 0, :].bool()[:, :, :, None, :]
    weights, score_max = window_scores(q, band(keys).transpose(-1, -2), allowed)  # [B, H_kv, NB, G * C, 2C]
    numerator = weights @ band(values).transpose(-1, -2)
    parts = (numerator, weights.sum(-1), score_max)
    return tuple(unstack_groups(x, heads, num_blocks, block)[:, :, :length] for x in parts)


def causal_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[WindowedAttentionState] = None,
    chunk_size: int = 128,
    kernel=None,
    log_decay: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, WindowedAttentionState]:
    """Causal linear attention plus an exact window of the last W keys (query t sees t-W+1..t
    exactly and every earlier key through the linear part). q, k, v: [B, H, T, D] ->
    ([B, H, T, D], state). The linear part is causal linear attention over the keys delayed by W
    positions (the state's buffer first), so it costs what `causal_linear_attention` costs; the
    window adds a [W, 2W] score block per W queries. kernel: as in `causal_linear_attention` (the
    linear part; the window's band stays here). log_decay: [B, H_kv, T], the linear state's log gate
    at each step (as in `causal_linear_attention`): the window stays exact, and a key enters the
    state when it leaves the window, at weight 1, decaying from then on (key j reaches query t >= j + W
    at exp(sum_{j + W < s <= t} log_decay_s)): no step in any key's weight at the window's edge."""
    fmap, mask = kernel_inputs(q, k, v, feature_map, key_padding_mask, window=window, chunk_size=chunk_size,
                               default_mask=True)
    batch, heads, length, head_dim = q.shape
    state = _window_state_for(state, fmap, feature_weights, k, v, window)
    if length == 0:
        return v.new_zeros(batch, heads, 0, v.shape[-1]), state
    keys = torch.cat([state.keys.to(k.dtype), k], dim=2)  # [B, H, W + T, D]
    values = torch.cat([state.values.to(v.dtype), v], dim=2)
    key_mask = torch.cat([state.key_mask, mask], dim=1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q, log_scale = fmap.queries_with_log_scale(q, feature_weights)
        delayed_mask = key_mask[:, :length]
        logits, offset, token_max = key_terms(keys[:, :, :length], feature_weights, fmap, delayed_mask)
        linear_state = LinearAttentionState(state.kvz, state.stabiliser)
        linear, linear_stabiliser, linear_state = causal_sums_on(
            kernel, fmap, phi_q, logits, offset, token_max, with_ones(values[:, :, :length]), delayed_mask,
            linear_state, chunk_size, q.dtype, log_decay=decay_gates(log_decay, mask),
        )
        window_num, window_den, window_max = causal_window_terms(q, keys, values, key_mask, window)
        out = combine_window(window_num, window_den, window_max, linear, linear_stabiliser, log_scale,
                             linear_log_weight, fmap.calibrated)
    # Contiguous copies (W tokens each): the state keeps one layout from the prefill on, so a compiled
    # decoding step does not recompile for the buffers' strides.
    new_state = WindowedAttentionState(*linear_state, *(x.clone(memory_format=torch.contiguous_format)
                                                        for x in (keys[:, :, length:], values[:, :, length:],
                                                                  key_mask[:, length:])))
    return out.to(v.dtype), new_state


def recurrent_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_weights: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[WindowedAttentionState] = None,
    in_place: bool = False,
    log_decay: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, WindowedAttentionState]:
    """One decoding step of causal windowed attention. q, k, v: [B, H, 1, D] -> ([B, H, 1, D], state).
    The oldest buffered key leaves the window into the linear state; the new key joins the buffer.
    in_place: as in `recurrent_linear_attention` (the linear part of the state). log_decay:
    [B, H_kv, 1], the step's log gate, as in `causal_windowed_attention`."""
    fmap, mask = kernel_inputs(q, k, v, feature_map, key_padding_mask, mode="step",
                               name="recurrent_windowed_attention", window=window, default_mask=True)
    batch = q.shape[0]
    state = _window_state_for(state, fmap, feature_weights, k, v, window)
    heads, kv_heads = q.shape[1], k.shape[1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        gate = decay_gates(log_decay, mask)
        kvz, running, stabiliser = absorb_key(state, state.keys[:, :, :1], state.values[:, :, :1], feature_weights, fmap,
                                              state.key_mask[:, :1], in_place,
                                              log_decay=None if gate is None else gate[..., 0])
        if fmap.calibrated:
            phi_q, log_scale = fmap.queries_with_log_scale(q, feature_weights)
        else:  # nothing removed from the queries: no log scale to add
            phi_q, log_scale = fmap.queries(q, feature_weights), None
        # Every product runs per key/value head with its group's queries side by side ([B, H_kv, G, X]):
        # nothing key-side is repeated per query head.
        linear = group_queries(phi_q, kv_heads) @ kvz  # [B, H_kv, G, D + 1]
        keys = torch.cat([state.keys[:, :, 1:], k.to(state.keys.dtype)], dim=2)
        values = torch.cat([state.values[:, :, 1:], v.to(state.values.dtype)], dim=2)
        key_mask = torch.cat([state.key_mask[:, 1:], mask], dim=1)
        weights, score_max = window_scores(group_queries(q, kv_heads), keys, key_mask[:, None, None, :])
        window_part = torch.cat([weights @ values.float(), weights.sum(-1, keepdim=True)], dim=-1)  # [B, H_kv, G, D + 1]
        if fmap.calibrated:
            window_part = ungroup_queries(window_part, heads)
            out = combine_window(window_part[..., :-1], window_part[..., -1], score_max.view(batch, heads, 1),
                                 ungroup_queries(linear, heads), repeat_key_heads(stabiliser, heads)[..., None],
                                 log_scale, linear_log_weight, True)
        else:
            out = ungroup_queries(_mix_uncalibrated(window_part, linear, linear_log_weight), heads)
    new_state = WindowedAttentionState(kvz, running, keys, values, key_mask)
    return out.to(v.dtype), new_state


