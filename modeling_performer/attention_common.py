"""What every linear attention variant shares: the running state and its key stabiliser, the
checks on q/k/v, grouped-query reshapes, the key terms and the division by the normaliser.

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

from typing import NamedTuple

import torch

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


def _gates(log_decay, key_padding_mask):
    """The per-step log decays [B, H, T] in fp32 with padded steps set to 0: a padding token is not
    a step, so it decays nothing (a left-padded row then equals the same row alone). None stays None.
    key_padding_mask: [B, T] (the current tokens), or None."""
    if log_decay is None:
        return None
    log_decay = log_decay.float()
    if key_padding_mask is not None:
        log_decay = log_decay.masked_fill(~key_padding_mask.to(torch.bool)[:, None, :], 0.0)
    return log_decay


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
# The key stabiliser: running maxima and rescaled states


def _running_max(x: torch.Tensor) -> torch.Tensor:
    """Cumulative maximum over the last dimension (ONNX has no cummax: compiled and exported
    graphs take the maximum under a triangular mask instead)."""
    if not torch.compiler.is_compiling():
        return torch.cummax(x, dim=-1).values
    n = x.shape[-1]
    upto = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return x[..., None, :].masked_fill(~upto, float("-inf")).amax(-1)


def _states_before_chunks(kvz, chunk_kvz, running, stabiliser, chunk_log_decay=None):
    """Loop-free carry of the chunked kernel. kvz: incoming joined state [B, H, M, D + 1] at scale
    running[..., 0]; chunk_kvz: [B, H, NC, M, D + 1], chunk j at scale stabiliser[..., j];
    chunk_log_decay: [B, H, NC] the log decay of the whole of chunk j (None: no decay).
    -> (states before each chunk at that chunk's scale [B, H, NC, M, D + 1], state after the last)."""
    num_chunks = chunk_kvz.shape[2]
    earlier = torch.ones(num_chunks, num_chunks, dtype=torch.bool, device=kvz.device).tril(-1)
    gap = stabiliser[..., None, :] - stabiliser[..., :, None]  # [B, H, c, j]: s_j - s_c
    incoming = running[..., :1] - stabiliser  # [B, H, NC]
    if chunk_log_decay is not None:
        # chunk j's sums decay through chunks j+1 .. c-1; the incoming state through chunks 0 .. c-1
        through = chunk_log_decay.cumsum(-1)
        before_c = through - chunk_log_decay
        gap = gap + before_c[..., :, None] - through[..., None, :]
        incoming = incoming + before_c
    weights = torch.exp(gap.masked_fill(~earlier, float("-inf")))  # 0 unless j < c
    carried = (weights @ chunk_kvz.flatten(-2)).view(chunk_kvz.shape)
    before = carried + torch.exp(incoming)[..., None, None] * kvz[:, :, None]
    last = before[:, :, -1]
    if chunk_log_decay is not None:
        last = last * torch.exp(chunk_log_decay[..., -1])[..., None, None]
    return before, last + chunk_kvz[:, :, -1]


def _absorb_key(state, k, v, projection, fmap, key_padding_mask, in_place=False, log_decay=None):
    """Adds one key/value (k, v: [B, H, 1, D]; key_padding_mask: [B, 1], [B, H, 1] or None) to a linear state.
    -> (joined state [B, H, M, D + 1] at the new scale, new running maximum [B, H] (-inf while
    empty), its finite version). in_place: state.kvz itself is rescaled and added to (two passes
    over it instead of five, no new tensor) and returned. The rescaling pass always runs (its
    factor is exactly 1 where no head's maximum grew): asking whether it may be skipped would
    synchronise with the host at every layer of every step. log_decay: [B, H] (<= 0) the step's
    log gate: the old sums are multiplied by exp(log_decay) before the key is added (None: no decay)."""
    if not fmap.calibrated:
        return _absorb_bounded_key(state, k, v, projection, fmap, key_padding_mask, in_place, log_decay)
    logits, offset, token_max = _key_terms(k, projection, fmap, key_padding_mask)
    running = torch.maximum(state.stabiliser, token_max[..., 0])
    stabiliser = _finite(running)
    rescale = state.stabiliser - stabiliser
    if log_decay is not None:
        rescale = rescale + log_decay
    decay = torch.exp(rescale)[..., None, None]
    keep = None if key_padding_mask is None else _head_mask(key_padding_mask)[..., None]
    shift = (offset + stabiliser[..., None]).unsqueeze(-1)
    phi_k = _masked_keys(fmap, logits, shift, keep)[:, :, 0]  # [B, H, M]
    outer = (phi_k.unsqueeze(-1), _with_ones(v)[:, :, 0].unsqueeze(-2))
    if in_place:
        kvz = state.kvz.mul_(decay).addcmul_(*outer)
    else:
        kvz = state.kvz * decay + outer[0] * outer[1]
    return kvz, running, stabiliser


def _absorb_bounded_key(state, k, v, projection, fmap, key_padding_mask, in_place, log_decay=None):
    """`_absorb_key` for a map without a stabiliser (ReLU, Hedgehog): token maxima are 0, so the
    running maximum is -inf until the first real key and 0 from then on, and the state is all
    zeros while it is -inf. The rescaling factor is therefore 1, or multiplies zeros: the key's
    features are simply added (a padded key's are zeroed), with the same result in fewer passes.
    A decay (log_decay [B, H]) multiplies the old sums first."""
    phi_k = fmap.key_features(k, projection)[:, :, 0]  # [B, H, M]
    if key_padding_mask is None:
        running = state.stabiliser.clamp_min(0.0)
    else:
        real = _head_mask(key_padding_mask)[..., 0]  # [B, 1 or H]
        phi_k = torch.where(real[..., None], phi_k, 0.0)
        running = state.stabiliser.masked_fill(real, 0.0)
    outer = (phi_k.unsqueeze(-1), _with_ones(v)[:, :, 0].unsqueeze(-2))
    kvz = state.kvz
    if log_decay is not None:
        gate = torch.exp(log_decay)[..., None, None]
        kvz = kvz.mul_(gate) if in_place else kvz * gate
    kvz = kvz.addcmul_(*outer) if in_place else kvz + outer[0] * outer[1]
    return kvz, running, running.clamp_min(0.0)  # the finite stabiliser: -inf and 0 both give 0


def may_update_in_place(state) -> bool:
    """Whether a decoding step may overwrite this state's linear sums instead of copying them:
    only outside autograd and tracing (nothing can need the old values), on a plain contiguous
    tensor, and not on an inference tensor outside inference mode (torch refuses that)."""
    kvz = state.kvz
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and kvz.is_contiguous()
            and (torch.is_inference_mode_enabled() or not kvz.is_inference()))


