"""Attention kernels as pure functions.

Shapes: B batch, H heads, T query length, S key length, D head dim, M random features.
All FAVOR+ functions share one calling convention:

    fn(q, k, v, projection, feature_map, key_padding_mask=None, state=None, ...)

with q: [B, H, T, D], k/v: [B, H_kv, S, D], projection W: [M, D] (Hedgehog: the query and key
maps [H, D, F], [H_kv, D, F]), feature_map a name ("softmax", "relu", "hedgehog") or a feature-map
class, key_padding_mask: [B, S] (True / 1 = real token). Grouped-query attention: H_kv divides H,
query head h reads key/value head h // (H / H_kv); states hold one entry per key/value head. The causal
functions take and return a `LinearAttentionState`, so a sequence can be split anywhere and
resumed: prefill with `causal_linear_attention`, then decode with `recurrent_linear_attention`.

Numerics (the key stabiliser): keys use exp(r - m) where m is a running
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

    kvz: [B, H, M, D + 1], the sum of phi(k) v^T with the sum of phi(k) as its last column (one
    tensor, laid out for the step's products: a decoding step reads and writes it whole);
    stabiliser: [B, H] the constant both are scaled by (exp(-stabiliser)); -inf when empty.
    """

    kvz: torch.Tensor
    stabiliser: torch.Tensor

    @property
    def kv(self) -> torch.Tensor:
        return self.kvz[..., :-1]

    @property
    def normaliser(self) -> torch.Tensor:
        return self.kvz[..., -1]


def empty_state(batch: int, heads: int, num_features: int, head_dim: int, device=None) -> LinearAttentionState:
    return LinearAttentionState(
        torch.zeros(batch, heads, num_features, head_dim + 1, device=device),
        torch.full((batch, heads), float("-inf"), device=device),
    )


def _resolve(feature_map):
    return get_feature_map(feature_map) if isinstance(feature_map, str) else feature_map


def _finite(m: torch.Tensor) -> torch.Tensor:
    """A stabiliser usable in a subtraction: -inf (nothing seen yet) becomes 0."""
    return torch.where(torch.isinf(m), 0.0, m)


def _check_qkv(q, k, v, key_padding_mask):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, T, D] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(
            f"Incompatible q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}: "
            "q [B, H, T, D], k [B, H_kv, S, D], v [B, H_kv, S, Dv] with H a multiple of H_kv expected"
        )
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must have shape [B, S] = {(k.shape[0], k.shape[2])}, got "
            f"{tuple(key_padding_mask.shape)}; a general [T, S] mask cannot be applied by FAVOR+ "
            "in linear time (use attention_type='softmax' for such masks)"
        )


def _head_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """A key mask [B, S] (every head alike) or [B, H_kv, S] (one per key/value head, as the sparse
    cache folds different keys per head) -> bool [B, 1 or H_kv, S]."""
    mask = key_padding_mask.to(torch.bool)
    return mask[:, None, :] if mask.dim() == 2 else mask


def _key_terms(k, projection, fmap, key_padding_mask):
    """Returns key logits [B, H, S, M], offsets [B, H, S] (r = logits - offset) and per-token
    maxima of r [B, H, S] (-inf where padded). key_padding_mask: [B, S] or [B, H, S]."""
    logits, offset = fmap.key_logits(k, projection)
    token_max = fmap.token_max(logits, offset)
    if key_padding_mask is not None:
        token_max = token_max.masked_fill(~_head_mask(key_padding_mask), float("-inf"))
    return logits, offset, token_max


def _masked_keys(fmap, logits, shift, keep):
    """phi(k) with padded keys zeroed. shift: [..., S, 1] offset + stabiliser; keep: [B, 1, ..., S, 1]
    bool (or None). Padded logits are set to the map's padding logit first (-inf for FAVOR+: they take
    no part in the stabiliser, so exp(r - m) could overflow there, and inf * 0 would poison the
    state with NaN)."""
    if keep is None:
        return fmap.keys(logits, shift)
    phi_k = fmap.keys(logits.masked_fill(~keep, fmap.padding_logit), shift)
    return phi_k * keep.to(phi_k.dtype)


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """v: [..., S, D] -> [..., S, D + 1] fp32. The extra column of ones makes one matrix product
    give both phi(k)^T v and the normaliser sum of phi(k)."""
    return torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)


def _query_groups(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Query-side [B, H, T, X] -> [B, H_kv, H / H_kv * T, X]: the queries of each key/value head's
    group side by side, for products with a per-key/value-head state."""
    return x.reshape(x.shape[0], kv_heads, -1, x.shape[-1])


def _stack_groups(x: torch.Tensor, kv_heads: int, num_blocks: int, block: int) -> torch.Tensor:
    """Query-side [B, H, NB * C, X] -> [B, H_kv, NB, G * C, X]: in each block of C positions, the G
    query heads of a key/value head stacked as G * C rows, so that a product with that key/value
    head's block reads it as it is (nothing key-side copied per query head)."""
    batch, heads, _, width = x.shape
    x = x.reshape(batch, kv_heads, heads // kv_heads, num_blocks, block, width).transpose(2, 3)
    return x.reshape(batch, kv_heads, num_blocks, heads // kv_heads * block, width)


def _unstack_groups(x: torch.Tensor, heads: int, num_blocks: int, block: int) -> torch.Tensor:
    """Inverse of `_stack_groups`: [B, H_kv, NB, G * C, ...] -> [B, H, NB * C, ...]."""
    batch, kv_heads = x.shape[:2]
    x = x.reshape(batch, kv_heads, num_blocks, heads // kv_heads, block, *x.shape[4:]).transpose(2, 3)
    return x.reshape(batch, heads, num_blocks * block, *x.shape[5:])


def _query_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `_query_groups`: [B, H_kv, G * T, X] -> [B, H, T, X]."""
    return x.reshape(x.shape[0], heads, -1, x.shape[-1])


def repeat_key_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key-side [B, H_kv, ...] -> [B, H, ...], each key/value head repeated for its group (the
    exact parts, whose cost is per query head anyway)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _divide(augmented: torch.Tensor) -> torch.Tensor:
    """[..., D + 1] (numerator, normaliser) -> [..., D]; rows whose normaliser underflowed -> 0."""
    numerator, denominator = augmented[..., :-1], augmented[..., -1:]
    valid = denominator > _DENOMINATOR_FLOOR
    return torch.where(valid, numerator / torch.where(valid, denominator, 1.0), 0.0)




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
) -> tuple[torch.Tensor, LinearAttentionState]:
    """Causal FAVOR+, chunk by chunk: a masked C x C product inside each chunk plus the running
    state of all earlier chunks. O(T) time and memory.

    q, k, v: [B, H, T, D] (query t sees keys <= t, plus everything in `state`).
    Returns ([B, H, T, D] in v's dtype, the state after the last token).
    kernel: a simple-GLA kernel in fla's signature to compute the sums on (`fast_attention`), or None.
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
                                          state, chunk_size, kernel, q.dtype)
        out = _divide(out)
    return out.to(v.dtype), new_state


def _causal_terms(fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, chunk_size, kernel=None,
                  kernel_dtype=None):
    """The unnormalised causal sums, chunk by chunk. phi_q: [B, H, T, M]; logits, offset,
    token_max as `_key_terms` returns them; v1: [B, H, T, D + 1] (values and a column of ones).
    Keys, values and the state have H_kv heads; each query head reads its group's.
    -> (sum_{j <= t} phi(q_t) phi(k_j) [v_j, 1]: [B, H, T, D + 1] at the scale exp(-stabiliser_t),
        stabiliser_t: [B, H, T] (finite), the state after the last token).
    kernel: compute them on a simple-GLA kernel instead (`fast_attention.gla_causal_terms`), in kernel_dtype."""
    if kernel is not None:
        from .fast_attention import gla_causal_terms

        return gla_causal_terms(kernel, fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state,
                                kernel_dtype)
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
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=phi_q.device).triu(1).repeat(groups, 1)
    out = (phi_q @ phi_k.transpose(-1, -2)).masked_fill_(later, 0.0) @ v1  # [B, H_kv, NC, G * C, D + 1]

    # Across chunks: the state before chunk c, at chunk c's scale.
    chunk_kvz = (v1.transpose(-1, -2) @ phi_k).transpose(-1, -2)  # [B, H, NC, M, D + 1]
    kvz = state.kvz
    if torch.compiler.is_compiling():
        # A loop over chunks would fix their number in the graph: the state before chunk c as one
        # product instead, sum_{j < c} exp(s_j - s_c) kvz_j plus the incoming state at exp(s_in - s_c)
        # (every factor <= 1: the running maximum never decreases). O(NC^2) rather than O(NC).
        before, kvz = _states_before_chunks(kvz, chunk_kvz, running, stabiliser)
    else:
        before = []
        # unbind once: indexing chunk_kvz[:, :, c] in the loop would make backward quadratic.
        for chunk_decay, kvz_c in zip(decay.unbind(-1), chunk_kvz.unbind(2)):
            kvz = kvz * chunk_decay[..., None, None]
            before.append(kvz)
            kvz = kvz + kvz_c
        before = torch.stack(before, dim=2)
    out = out + phi_q @ before

    out = _unstack_groups(out, query_heads, num_chunks, chunk)[:, :, :length]
    per_token = stabiliser[:, :, None, :, None].expand(batch, heads, groups, num_chunks, chunk)
    per_token = per_token.reshape(batch, query_heads, -1)[..., :length]
    # The running maximum as a tensor of its own (not a strided view of the chunks' maxima): a state
    # keeps one layout from the prefill on, so a compiled decoding step does not recompile for it.
    return out, per_token, LinearAttentionState(kvz, running[..., -1].clone(memory_format=torch.contiguous_format))


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """Cumulative maximum over the last dimension (ONNX has no cummax: compiled and exported
    graphs take the maximum under a triangular mask instead)."""
    if not torch.compiler.is_compiling():
        return torch.cummax(x, dim=-1).values
    n = x.shape[-1]
    upto = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return x[..., None, :].masked_fill(~upto, float("-inf")).amax(-1)


def _states_before_chunks(kvz, chunk_kvz, running, stabiliser):
    """Loop-free carry of the chunked kernel. kvz: incoming joined state [B, H, M, D + 1] at scale
    running[..., 0]; chunk_kvz: [B, H, NC, M, D + 1], chunk j at scale stabiliser[..., j].
    -> (states before each chunk at that chunk's scale [B, H, NC, M, D + 1], state after the last)."""
    num_chunks = chunk_kvz.shape[2]
    earlier = torch.ones(num_chunks, num_chunks, dtype=torch.bool, device=kvz.device).tril(-1)
    gap = (stabiliser[..., None, :] - stabiliser[..., :, None]).masked_fill(~earlier, float("-inf"))
    weights = torch.exp(gap)  # [B, H, c, j]: exp(s_j - s_c) for j < c, else 0
    incoming = torch.exp(running[..., :1] - stabiliser)  # [B, H, NC]
    carried = (weights @ chunk_kvz.flatten(-2)).view(chunk_kvz.shape)
    before = carried + incoming[..., None, None] * kvz[:, :, None]
    after = before[:, :, -1] + chunk_kvz[:, :, -1]
    return before, after


def _absorb_key(state, k, v, projection, fmap, key_padding_mask, in_place=False):
    """Adds one key/value (k, v: [B, H, 1, D]; key_padding_mask: [B, 1], [B, H, 1] or None) to a linear state.
    -> (joined state [B, H, M, D + 1] at the new scale, new running maximum [B, H] (-inf while
    empty), its finite version). in_place: state.kvz itself is rescaled and added to (two passes
    over it instead of five, no new tensor) and returned. The rescaling pass always runs (its
    factor is exactly 1 where no head's maximum grew): asking whether it may be skipped would
    synchronise with the host at every layer of every step."""
    if not fmap.calibrated:
        return _absorb_bounded_key(state, k, v, projection, fmap, key_padding_mask, in_place)
    logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
    running = torch.maximum(state.stabiliser, token_max[..., 0])
    stabiliser = _finite(running)
    decay = torch.exp(state.stabiliser - stabiliser)[..., None, None]
    keep = None if key_padding_mask is None else _head_mask(key_padding_mask)[..., None]
    shift = (offset + stabiliser[..., None]).unsqueeze(-1)
    phi_k = _masked_keys(fmap, logits, shift, keep)[:, :, 0]  # [B, H, M]
    outer = (phi_k.unsqueeze(-1), _with_ones(v)[:, :, 0].unsqueeze(-2))
    if in_place:
        kvz = state.kvz.mul_(decay).addcmul_(*outer)
    else:
        kvz = state.kvz * decay + outer[0] * outer[1]
    return kvz, running, stabiliser


def _absorb_bounded_key(state, k, v, projection, fmap, key_padding_mask, in_place):
    """`_absorb_key` for a map without a stabiliser (ReLU, Hedgehog): token maxima are 0, so the
    running maximum is -inf until the first real key and 0 from then on, and the state is all
    zeros while it is -inf. The rescaling factor is therefore 1, or multiplies zeros: the key's
    features are simply added (a padded key's are zeroed), with the same result in fewer passes."""
    phi_k = fmap.key_features(k, projection)[:, :, 0]  # [B, H, M]
    if key_padding_mask is None:
        running = state.stabiliser.clamp_min(0.0)
    else:
        real = _head_mask(key_padding_mask)[..., 0]  # [B, 1 or H]
        phi_k = torch.where(real[..., None], phi_k, 0.0)
        running = state.stabiliser.masked_fill(real, 0.0)
    outer = (phi_k.unsqueeze(-1), _with_ones(v)[:, :, 0].unsqueeze(-2))
    kvz = state.kvz.addcmul_(*outer) if in_place else state.kvz + outer[0] * outer[1]
    return kvz, running, running.clamp_min(0.0)  # the finite stabiliser: -inf and 0 both give 0


def may_update_in_place(state) -> bool:
    """Whether a decoding step may overwrite this state's linear sums instead of copying them:
    only outside autograd and tracing (nothing can need the old values), on a plain contiguous
    tensor, and not on an inference tensor outside inference mode (torch refuses that)."""
    kvz = state.kvz
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and kvz.is_contiguous()
            and (torch.is_inference_mode_enabled() or not kvz.is_inference()))


def recurrent_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[LinearAttentionState] = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, LinearAttentionState]:
    """One decoding step of causal FAVOR+. q, k, v: [B, H, 1, D] -> ([B, H, 1, D], new state).

    Cost and memory are independent of how many tokens the state has absorbed. With in_place the
    step writes the new state into `state.kvz` (the old values are gone: for a state nothing
    else holds, outside autograd; see `may_update_in_place`).
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
        kvz, running, _ = _absorb_key(state, k, v, projection, fmap, key_padding_mask, in_place)
        out = _divide(_query_heads(phi_q @ kvz, heads))  # [B, H, 1, D]
    return out.to(v.dtype), LinearAttentionState(kvz, running)


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


def _window_state_for(state, fmap, projection, k, v, window):
    """The incoming state, or an empty one of the right shapes; a state built for another
    window is refused."""
    if state is None:
        batch, heads, _, head_dim = k.shape
        return empty_window_state(batch, heads, fmap.num_features(projection), head_dim, v.shape[-1], window,
                                  k.device, k.dtype)
    if state.keys.shape[2] != window:
        raise ValueError(f"the state holds {state.keys.shape[2]} keys but local window is {window}")
    return state


def _check_window(window, q, k):
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"local window must be a positive integer, got {window!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"local-window attention needs as many queries as keys, got T={q.shape[2]}, S={k.shape[2]}")


def _window_scores(q, keys, allowed):
    """q: [..., C, D], keys: [..., K, D], allowed: bool broadcastable to [..., C, K].
    -> (sum_j exp(s - m) v-weights [..., C, K] (0 where not allowed), m: [..., C] (-inf if none))."""
    scores = (q.float() @ keys.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    scores = scores.masked_fill_(~allowed, float("-inf"))
    top = scores.amax(dim=-1)  # (its backward reads the scores: they are not overwritten below)
    weights = (scores - _finite(top)[..., None]).exp_()  # exp(-inf) = 0 where not allowed
    return weights, top


def _combine(window_num, window_den, window_max, linear, linear_stabiliser, query_log_scale, linear_log_weight,
             calibrated):
    """One normaliser for both parts. window_num: [B, H, T, D], window_den, window_max: [B, H, T];
    linear: [B, H, T, D + 1] (phi(q) sums at the scale exp(-linear_stabiliser)); query_log_scale:
    [B, H, T] or None; linear_log_weight: [H] or None. -> [B, H, T, D] fp32."""
    heads = linear.shape[1]
    log_weight = (linear_log_weight.float().view(1, heads, 1) if linear_log_weight is not None
                  else linear.new_zeros(1, heads, 1))
    if query_log_scale is not None:  # None: no factor was removed from the queries (an uncalibrated map)
        log_weight = log_weight + query_log_scale
    if calibrated:
        log_weight = log_weight + linear_stabiliser - _finite(window_max)
    return _mix(torch.cat([window_num, window_den[..., None]], dim=-1), linear, log_weight[..., None])


def _mix(window_part, linear, log_weight):
    """window_part (numerator and denominator) + exp(log_weight) * linear, normalised. window_part,
    linear: [..., D + 1]; log_weight broadcastable to [..., 1]. Both parts are scaled by
    exp(-max(a, 0)): neither factor can overflow, the ratio is unchanged. -> [..., D]."""
    top = log_weight.clamp_min(0.0)
    return _divide(window_part * torch.exp(-top) + linear * torch.exp(log_weight - top))


def _mix_uncalibrated(window_part, linear, linear_log_weight):
    """`_combine` for an uncalibrated map, in the grouped layout of a decoding step: window_part
    (numerator and denominator) and linear: [B, H_kv, G, D + 1]; linear_log_weight: [H] or None.
    Nothing to add for the queries' scale. -> [B, H_kv, G, D]."""
    if linear_log_weight is None:  # both factors are exactly 1
        return _divide(window_part + linear)
    return _mix(window_part, linear, linear_log_weight.float().view(1, *window_part.shape[1:3], 1))


def _exact_attention(q, k, v, key_padding_mask):
    """Softmax attention over every real key, by the window part's own formula (fp32; a row
    without real keys gives 0, as in the windowed path). q: [B, H, T, D], k, v: [B, H_kv, T, D]."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        heads = q.shape[1]
        k, v = repeat_key_heads(k, heads), repeat_key_heads(v, heads)
        allowed = (key_padding_mask.to(torch.bool)[:, None, None, :] if key_padding_mask is not None
                   else torch.ones((), dtype=torch.bool, device=q.device))
        weights, _ = _window_scores(q, k, allowed)
        out = _divide(weights @ _with_ones(v))
    return out.to(v.dtype)


def windowed_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
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
    _check_qkv(q, k, v, key_padding_mask)
    _check_window(window, q, k)
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens must be an integer >= 0, got {sink_tokens!r}")
    fmap = _resolve(feature_map)
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
        phi_q, log_scale = fmap.queries_with_log_scale(q, projection)
        logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
        stabiliser = token_max.amax(dim=-1)  # [B, H]: one constant for every key
        shift = (offset + _finite(stabiliser)[..., None]).unsqueeze(-1)
        phi_k = _masked_keys(fmap, logits, shift, mask[:, None, :length, None])
        # The window and its band corrections are per query head: each key/value head serves its group.
        k, v, phi_k, stabiliser = (repeat_key_heads(x, heads) for x in (k, v, phi_k, stabiliser))
        pad = (0, 0, 0, padded)
        phi_q, phi_k, v1 = F.pad(phi_q, pad), F.pad(phi_k, pad), F.pad(_with_ones(v), pad)

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
        weights, top = _window_scores(blocks(F.pad(q.float(), pad)), band(k.float()).transpose(-1, -2), key_ok & near)
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

        window_num, window_den, top, linear = flat(window_num), flat(window_den), flat(top), flat(linear)
        if sink_tokens:
            window_num, window_den, top, linear, log_scale = _add_sinks(
                q, k, v1[..., :length, :], phi_q[..., :length, :], phi_k[..., :length, :], mask[:, :length], window,
                sink_tokens, (window_num, window_den, top, linear, log_scale), fmap.calibrated)
        # The normaliser is a sum of positive terms: rounding must not make it negative.
        linear = torch.cat([linear[..., :-1], linear[..., -1:].clamp_min(0.0)], dim=-1)
        out = _combine(window_num, window_den, top, linear, _finite(stabiliser)[..., None], log_scale,
                       linear_log_weight, fmap.calibrated)
    return out.to(v.dtype)


def _add_sinks(q, k, v1, phi_q, phi_k, mask, window, sink_tokens, parts, calibrated):
    """Moves the first `sink_tokens` real keys of every row from the linear part to the exact one
    for the queries whose window does not hold them (attention sinks: [CLS] and the like, which
    many heads of a softmax model attend to from everywhere). q, k: [B, H, T, D] (keys already per
    query head), v1: [B, H, T, D + 1], phi_q, phi_k: [B, H, T, M], mask: [B, T] bool; parts: the
    window's numerator, denominator and maximum, the linear sums and the queries' log scale, as
    `_combine` takes them. The exact part is rescaled to the new maximum; an uncalibrated map's
    linear part stays weighed against the window's own maximum (as with a sparse cache)."""
    window_num, window_den, top, linear, log_scale = parts
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
    new_top = torch.maximum(top, scores.amax(dim=-1))
    rescale = torch.exp(_finite(top) - _finite(new_top))  # window weights were taken at exp(-top)
    sink_v1 = pick(v1)
    exact = torch.exp(scores - _finite(new_top)[..., None]) @ sink_v1  # exp(-inf) = 0 where not moved
    window_num = window_num * rescale[..., None] + exact[..., :-1]
    window_den = window_den * rescale + exact[..., -1]
    linear = linear - ((phi_q @ pick(phi_k).transpose(-1, -2)) * moved) @ sink_v1
    if not calibrated:
        log_scale = log_scale + _finite(top) - _finite(new_top)
    return window_num, window_den, new_top, linear, log_scale


def _causal_window_terms(q, keys, values, key_mask, window):
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
    q = _stack_groups(F.pad(q.float(), (0, 0, 0, num_blocks * block - length)), kv_heads, num_blocks, block)
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
    weights, top = _window_scores(q, band(keys).transpose(-1, -2), allowed)  # [B, H_kv, NB, G * C, 2C]
    numerator = weights @ band(values).transpose(-1, -2)
    return tuple(_unstack_groups(x, heads, num_blocks, block)[:, :, :length] for x in (numerator, weights.sum(-1), top))


def causal_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[WindowedAttentionState] = None,
    chunk_size: int = 128,
    kernel=None,
) -> tuple[torch.Tensor, WindowedAttentionState]:
    """Causal linear attention plus an exact window of the last W keys (query t sees t-W+1..t
    exactly and every earlier key through the linear part). q, k, v: [B, H, T, D] ->
    ([B, H, T, D], state). The linear part is causal linear attention over the keys delayed by W
    positions (the state's buffer first), so it costs what `causal_linear_attention` costs; the
    window adds a [W, 2W] score block per W queries. kernel: as in `causal_linear_attention` (the
    linear part; the window's band stays here)."""
    _check_qkv(q, k, v, key_padding_mask)
    _check_window(window, q, k)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    fmap = _resolve(feature_map)
    batch, heads, length, head_dim = q.shape
    state = _window_state_for(state, fmap, projection, k, v, window)
    if length == 0:
        return v.new_zeros(batch, heads, 0, v.shape[-1]), state
    mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=q.device))
    keys = torch.cat([state.keys.to(k.dtype), k], dim=2)  # [B, H, W + T, D]
    values = torch.cat([state.values.to(v.dtype), v], dim=2)
    key_mask = torch.cat([state.key_mask, mask], dim=1)
    with torch.autocast(device_type=q.device.type, enabled=False):
        phi_q, log_scale = fmap.queries_with_log_scale(q, projection)
        delayed_mask = key_mask[:, :length]
        logits, offset, token_max = _key_terms(keys[:, :, :length], projection, fmap, delayed_mask)
        linear_state = LinearAttentionState(state.kvz, state.stabiliser)
        linear, linear_stabiliser, linear_state = _causal_terms(
            fmap, phi_q, logits, offset, token_max, _with_ones(values[:, :, :length]), delayed_mask, linear_state,
            chunk_size, kernel, q.dtype,
        )
        window_num, window_den, window_max = _causal_window_terms(q, keys, values, key_mask, window)
        out = _combine(window_num, window_den, window_max, linear, linear_stabiliser, log_scale, linear_log_weight,
                       fmap.calibrated)
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
    projection: torch.Tensor,
    feature_map="softmax",
    window: int = 64,
    linear_log_weight: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    state: Optional[WindowedAttentionState] = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, WindowedAttentionState]:
    """One decoding step of causal windowed attention. q, k, v: [B, H, 1, D] -> ([B, H, 1, D], state).
    The oldest buffered key leaves the window into the linear state; the new key joins the buffer.
    in_place: as in `recurrent_linear_attention` (the linear part of the state)."""
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"recurrent_windowed_attention takes one token at a time, got T={q.shape[2]}")
    _check_window(window, q, k)
    fmap = _resolve(feature_map)
    batch = q.shape[0]
    state = _window_state_for(state, fmap, projection, k, v, window)
    mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
            else torch.ones(batch, 1, dtype=torch.bool, device=q.device))
    heads, kv_heads = q.shape[1], k.shape[1]
    with torch.autocast(device_type=q.device.type, enabled=False):
        kvz, running, stabiliser = _absorb_key(state, state.keys[:, :, :1], state.values[:, :, :1], projection, fmap,
                                               state.key_mask[:, :1], in_place)
        if fmap.calibrated:
            phi_q, log_scale = fmap.queries_with_log_scale(q, projection)
        else:  # nothing removed from the queries: no log scale to add
            phi_q, log_scale = fmap.queries(q, projection), None
        # Every product runs per key/value head with its group's queries side by side ([B, H_kv, G, X]):
        # nothing key-side is repeated per query head.
        linear = _query_groups(phi_q, kv_heads) @ kvz  # [B, H_kv, G, D + 1]
        keys = torch.cat([state.keys[:, :, 1:], k.to(state.keys.dtype)], dim=2)
        values = torch.cat([state.values[:, :, 1:], v.to(state.values.dtype)], dim=2)
        key_mask = torch.cat([state.key_mask[:, 1:], mask], dim=1)
        weights, top = _window_scores(_query_groups(q, kv_heads), keys, key_mask[:, None, None, :])
        window_part = torch.cat([weights @ values.float(), weights.sum(-1, keepdim=True)], dim=-1)  # [B, H_kv, G, D + 1]
        if fmap.calibrated:
            window_part = _query_heads(window_part, heads)
            out = _combine(window_part[..., :-1], window_part[..., -1], top.view(batch, heads, 1),
                           _query_heads(linear, heads), repeat_key_heads(stabiliser, heads)[..., None], log_scale,
                           linear_log_weight, True)
        else:
            out = _query_heads(_mix_uncalibrated(window_part, linear, linear_log_weight), heads)
    new_state = WindowedAttentionState(kvz, running, keys, values, key_mask)
    return out.to(v.dtype), new_state


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


def _sparse_state_for(state, fmap, projection, k, v, window, cache_size):
    """The incoming state, or an empty one; a state of another window or cache size is refused."""
    if not isinstance(cache_size, int) or isinstance(cache_size, bool) or cache_size < 1:
        raise ValueError(f"sparse cache size must be a positive integer, got {cache_size!r}")
    if state is None:
        batch, heads, _, head_dim = k.shape
        return empty_sparse_window_state(batch, heads, fmap.num_features(projection), head_dim, v.shape[-1], window,
                                         cache_size, k.device, k.dtype)
    if not isinstance(state, SparseWindowState):
        raise ValueError(f"a {type(state).__name__} holds no sparse cache: it cannot continue with sparse cache "
                         f"size {cache_size}")
    if state.keys.shape[2] != window:
        raise ValueError(f"the state holds {state.keys.shape[2]} keys but local window is {window}")
    if state.cache_mask.shape[-1] != cache_size:
        raise ValueError(f"the state's sparse cache holds {state.cache_mask.shape[-1]} pairs, not {cache_size}")
    return state


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N] or [B, H, N, X], index: [B, H, K] -> the K entries of each row."""
    if x.dim() == 3:
        return x.gather(2, index)
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def _own_features(k, projection, fmap):
    """phi(k) of each key at its own scale (the key as a query of the state): [B, H, S, M]."""
    logits, offset = fmap.key_logits(k, projection)
    shift = (offset + _finite(fmap.token_max(logits, offset))).unsqueeze(-1)
    return fmap.keys(logits, shift)


def _recall_error(v, recalled):
    """Squared distance of each value from what the state returned for its key: [B, H, S]."""
    return (v.float() - _divide(recalled)).pow(2).sum(-1)


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


def _kept(member, cache_size, *candidates):
    """The members [B, H, N] of candidate tensors, first in arrival order, in cache_size slots:
    -> (tensors..., mask)."""
    count = member.shape[-1]
    order = ((~member).long() * count + torch.arange(count, device=member.device)).argsort(-1)[..., :cache_size]
    return (*(_take(x, order) for x in candidates), _take(member, order))


def _merge_exact(first, second):
    """Two exact parts (numerator [..., D], denominator [...], max [...]) at their own scales -> one."""
    top = torch.maximum(first[2], second[2])
    scale = _finite(top)
    a, b = torch.exp(first[2] - scale), torch.exp(second[2] - scale)
    return first[0] * a[..., None] + second[0] * b[..., None], first[1] * a + second[1] * b, top


def _combine_with_cache(window_part, cache_part, linear, linear_scale, log_scale, linear_log_weight, calibrated):
    """`_combine` of window, cache and linear part. A calibrated map's linear part has its absolute
    scale; an uncalibrated map's (ReLU, Hedgehog) was set against the window alone, through g_h and
    the window's maximum score m_w: its weight stays g_h exp(m_w) phi(q).S, so a cached key enters
    at its softmax weight relative to the window, and without cached keys nothing changes."""
    numerator, denominator, top = _merge_exact(window_part, cache_part)
    if not calibrated:
        log_scale = log_scale + _finite(window_part[2]) - _finite(top)
    return _combine(numerator, denominator, top, linear, linear_scale, log_scale, linear_log_weight, calibrated)


def _sparse_segment(q, k, v, mask, projection, fmap, window, linear_log_weight, state):
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
        phi_q, log_scale = fmap.queries_with_log_scale(q, projection)
        # The new keys read the state beside the queries, as one more member of their head's group.
        both = torch.cat([phi_q.view(batch, kv_heads, groups, steps, -1),
                          _own_features(k, projection, fmap)[:, :, None]], dim=2).flatten(1, 2)
        logits, offset, token_max = _key_terms(_take(candidate_keys, fold), projection, fmap, folded)
        terms, term_scale, linear_state = _causal_terms(
            fmap, both, logits, offset, token_max, _with_ones(_take(candidate_values, fold)), folded,
            LinearAttentionState(state.kvz, state.stabiliser), steps)
        terms = terms.view(batch, kv_heads, groups + 1, steps, -1)
        term_scale = term_scale.view(batch, kv_heads, groups + 1, steps)
        linear = terms[:, :, :groups].reshape(batch, heads, steps, -1)
        linear_scale = term_scale[:, :, :groups].reshape(batch, heads, steps)
        new_scores = _recall_error(v, terms[:, :, groups])
        window_part = _causal_window_terms(q, keys, values, key_mask, window)
        weights, top = _window_scores(q, repeat_key_heads(candidate_keys, heads), repeat_key_heads(member, heads))
        cache_part = (weights @ repeat_key_heads(candidate_values, heads).float(), weights.sum(-1), top)
        out = _combine_with_cache(window_part, cache_part, linear, linear_scale, log_scale, linear_log_weight,
                                  fmap.calibrated)
    kept = _kept(member[:, :, -1], cache_size, candidate_keys, candidate_values, scores)
    key_scores = torch.cat([state.key_scores, new_scores], dim=-1)[:, :, steps:]
    new_state = SparseWindowState(*linear_state, keys[:, :, steps:], values[:, :, steps:], key_mask[:, steps:],
                                  key_scores, kept[0], kept[1], kept[3], kept[2])
    return out.to(v.dtype), new_state


def causal_sparse_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
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
    _check_qkv(q, k, v, key_padding_mask)
    _check_window(window, q, k)
    fmap = _resolve(feature_map)
    batch, _, length, _ = q.shape
    state = _sparse_state_for(state, fmap, projection, k, v, window, cache_size)
    mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=q.device))
    outputs = []
    for start in range(0, length, window):
        end = min(start + window, length)
        out, state = _sparse_segment(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], mask[:, start:end],
                                     projection, fmap, window, linear_log_weight, state)
        outputs.append(out)
    if not outputs:
        return v.new_zeros(batch, q.shape[1], 0, v.shape[-1]), state
    return torch.cat(outputs, dim=2), state


def recurrent_sparse_windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
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
    _check_qkv(q, k, v, key_padding_mask)
    if q.shape[2] != 1 or k.shape[2] != 1:
        raise ValueError(f"recurrent_sparse_windowed_attention takes one token at a time, got T={q.shape[2]}")
    _check_window(window, q, k)
    fmap = _resolve(feature_map)
    batch, heads = q.shape[:2]
    kv_heads = k.shape[1]
    state = _sparse_state_for(state, fmap, projection, k, v, window, cache_size)
    mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
            else torch.ones(batch, 1, dtype=torch.bool, device=q.device))
    candidate_keys = torch.cat([state.cache_keys, state.keys[:, :, :1]], dim=2)
    candidate_values = torch.cat([state.cache_values, state.values[:, :, :1]], dim=2)
    valid = torch.cat([state.cache_mask, state.key_mask[:, None, :1].expand(batch, kv_heads, 1)], dim=-1)
    scores = torch.cat([state.cache_scores, state.key_scores[:, :, :1]], dim=-1)
    lowest = scores.masked_fill(~valid, float("inf")).argmin(-1, keepdim=True)  # the first minimum: the oldest
    folded = valid.sum(-1, keepdim=True) > cache_size  # [B, H_kv, 1]
    member = valid & ~(folded & (torch.arange(cache_size + 1, device=q.device) == lowest))
    with torch.autocast(device_type=q.device.type, enabled=False):
        kvz, running, stabiliser = _absorb_key(state, _take(candidate_keys, lowest), _take(candidate_values, lowest),
                                               projection, fmap, folded, in_place)
        phi_q, log_scale = fmap.queries_with_log_scale(q, projection)
        linear = _query_heads(_query_groups(phi_q, kv_heads) @ kvz, heads)  # [B, H, 1, D + 1]
        new_score = _recall_error(v, _own_features(k, projection, fmap) @ kvz)  # [B, H_kv, 1]

        keys = torch.cat([state.keys[:, :, 1:], k.to(state.keys.dtype)], dim=2)
        values = torch.cat([state.values[:, :, 1:], v.to(state.values.dtype)], dim=2)
        key_mask = torch.cat([state.key_mask[:, 1:], mask], dim=1)
        weights, top = _window_scores(q, repeat_key_heads(keys, heads), key_mask[:, None, None, :])
        window_part = (weights @ repeat_key_heads(values, heads).float(), weights.sum(-1), top)
        weights, top = _window_scores(q, repeat_key_heads(candidate_keys, heads),
                                      repeat_key_heads(member, heads)[:, :, None, :])
        cache_part = (weights @ repeat_key_heads(candidate_values, heads).float(), weights.sum(-1), top)
        out = _combine_with_cache(window_part, cache_part, linear, repeat_key_heads(stabiliser, heads)[..., None],
                                  log_scale, linear_log_weight, fmap.calibrated)
    kept = _kept(member, cache_size, candidate_keys, candidate_values, scores)
    key_scores = torch.cat([state.key_scores[:, :, 1:], new_score], dim=-1)
    new_state = SparseWindowState(kvz, running, keys, values, key_mask, key_scores, kept[0], kept[1], kept[3], kept[2])
    return out.to(v.dtype), new_state


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
    k, v = repeat_key_heads(k, q.shape[1]), repeat_key_heads(v, q.shape[1])
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
