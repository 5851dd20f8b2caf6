"""The building blocks every linear attention variant is made of, public so that a new variant (or
a reader) needs this module and no other:

- the state: `LinearAttentionState`, `empty_state`, `absorb_key` (one key into a state),
  `may_update_in_place`;
- the key stabiliser: `key_terms`, `masked_key_features`, `running_max`, `finite_stabiliser`;
- the chunked causal sums: `causal_sums` (PyTorch; `fast_attention.causal_sums_on` runs fla's
  kernel instead), `states_before_chunks` (their loop-free carry), `decay_gates` (the log gates of
  a decaying state);
- grouped-query layouts: `group_queries` / `ungroup_queries`, `stack_groups` / `unstack_groups`,
  `repeat_key_heads`;
- the opening every kernel starts with (`kernel_inputs`: checks and defaults) and its end
  (`with_ones` for the normaliser column, `divide_by_normaliser`).

Shapes: B batch, H heads, T query length, S key length, D head dim, M random features.
All FAVOR+ functions share one calling convention:

    fn(q, k, v, feature_weights, feature_map, key_padding_mask=None, state=None, ...)

with q: [B, H, T, D], k/v: [B, H_kv, S, D], feature_weights what the feature map multiplies by
(FAVOR+ and ReLU: the random projection W [M, D]; Hedgehog: the learned query and key maps
[H, D, F], [H_kv, D, F]), feature_map a name ("softmax", "relu", "hedgehog") or a feature-map
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


def resolve_feature_map(feature_map):
    """A feature map's name ("softmax", "relu", "hedgehog") -> its class (`feature_maps`); a class
    passes through."""
    return get_feature_map(feature_map) if isinstance(feature_map, str) else feature_map


def finite_stabiliser(stabiliser: torch.Tensor) -> torch.Tensor:
    """A stabiliser usable in a subtraction: -inf (nothing seen yet) becomes 0."""
    return torch.where(torch.isinf(stabiliser), 0.0, stabiliser)


def check_qkv(q, k, v, key_padding_mask):
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


def kernel_inputs(q, k, v, feature_map, key_padding_mask=None, *, mode="chunked", name="", window=None,
                  chunk_size=None, default_mask=False):
    """What every kernel does first: checks q/k/v and the mask (`check_qkv`), then, by `mode`,
    "step" one token of each (the recurrent form, `name` in the error), "chunked" as many queries
    as keys (causal), "full" anything (non-causal); a `window` must be a positive integer and
    `chunk_size` positive. -> (the feature map, the key mask: as given, or with default_mask a bool
    [B, S] that is all True where none was given)."""
    check_qkv(q, k, v, key_padding_mask)
    if mode == "step" and (q.shape[2] != 1 or k.shape[2] != 1):
        raise ValueError(f"{name or 'a decoding step'} takes one token at a time, got T={q.shape[2]}")
    if window is not None:
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"local window must be a positive integer, got {window!r}")
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"local-window attention needs as many queries as keys, got T={q.shape[2]}, "
                             f"S={k.shape[2]}")
    if mode == "chunked" and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got T={q.shape[2]}, S={k.shape[2]}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    mask = key_padding_mask
    if default_mask:
        mask = (key_padding_mask.to(torch.bool) if key_padding_mask is not None
                else torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device))
    return resolve_feature_map(feature_map), mask


def head_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """A key mask [B, S] (every head alike) or [B, H_kv, S] (one per key/value head, as the sparse
    cache folds different keys per head) -> bool [B, 1 or H_kv, S]."""
    mask = key_padding_mask.to(torch.bool)
    return mask[:, None, :] if mask.dim() == 2 else mask


def key_terms(k, feature_weights, fmap, key_padding_mask):
    """Returns key logits [B, H, S, M], offsets [B, H, S] (r = logits - offset) and per-token
    maxima of r [B, H, S] (-inf where padded). key_padding_mask: [B, S] or [B, H, S]."""
    logits, offset = fmap.key_logits(k, feature_weights)
    token_max = fmap.token_max(logits, offset)
    if key_padding_mask is not None:
        token_max = token_max.masked_fill(~head_mask(key_padding_mask), float("-inf"))
    return logits, offset, token_max


def masked_key_features(fmap, logits, shift, keep):
    """phi(k) with padded keys zeroed. shift: [..., S, 1] offset + stabiliser; keep: [B, 1, ..., S, 1]
    bool (or None). Padded logits are set to the map's padding logit first (-inf for FAVOR+: they take
    no part in the stabiliser, so exp(r - m) could overflow there, and inf * 0 would poison the
    state with NaN)."""
    if keep is None:
        return fmap.keys(logits, shift)
    phi_k = fmap.keys(logits.masked_fill(~keep, fmap.padding_logit), shift)
    return phi_k * keep.to(phi_k.dtype)


def decay_gates(log_decay, key_padding_mask):
    """The per-step log decays [B, H, T] in fp32 with padded steps set to 0: a padding token is not
    a step, so it decays nothing (a left-padded row then equals the same row alone). None stays None.
    key_padding_mask: [B, T] (the current tokens), or None."""
    if log_decay is None:
        return None
    log_decay = log_decay.float()
    if key_padding_mask is not None:
        log_decay = log_decay.masked_fill(~key_padding_mask.to(torch.bool)[:, None, :], 0.0)
    return log_decay


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """v: [..., S, D] -> [..., S, D + 1] fp32. The extra column of ones makes one matrix product
    give both phi(k)^T v and the normaliser sum of phi(k)."""
    return torch.cat([v.float(), v.new_ones(*v.shape[:-1], 1, dtype=torch.float32)], dim=-1)


def group_queries(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Query-side [B, H, T, X] -> [B, H_kv, H / H_kv * T, X]: the queries of each key/value head's
    group side by side, for products with a per-key/value-head state."""
    return x.reshape(x.shape[0], kv_heads, -1, x.shape[-1])


def stack_groups(x: torch.Tensor, kv_heads: int, num_blocks: int, block: int) -> torch.Tensor:
    """Query-side [B, H, NB * C, X] -> [B, H_kv, NB, G * C, X]: in each block of C positions, the G
    query heads of a key/value head stacked as G * C rows, so that a product with that key/value
    head's block reads it as it is (nothing key-side copied per query head)."""
    batch, heads, _, width = x.shape
    x = x.reshape(batch, kv_heads, heads // kv_heads, num_blocks, block, width).transpose(2, 3)
    return x.reshape(batch, kv_heads, num_blocks, heads // kv_heads * block, width)


def unstack_groups(x: torch.Tensor, heads: int, num_blocks: int, block: int) -> torch.Tensor:
    """Inverse of `stack_groups`: [B, H_kv, NB, G * C, ...] -> [B, H, NB * C, ...]."""
    batch, kv_heads = x.shape[:2]
    x = x.reshape(batch, kv_heads, num_blocks, heads // kv_heads, block, *x.shape[4:]).transpose(2, 3)
    return x.reshape(batch, heads, num_blocks * block, *x.shape[5:])


def ungroup_queries(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of `group_queries`: [B, H_kv, G * T, X] -> [B, H, T, X]."""
    return x.reshape(x.shape[0], heads, -1, x.shape[-1])


def repeat_key_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Key-side [B, H_kv, ...] -> [B, H, ...], each key/value head repeated for its group (the
    exact parts, whose cost is per query head anyway)."""
    groups = heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def divide_by_normaliser(augmented: torch.Tensor) -> torch.Tensor:
    """[..., D + 1] (numerator, normaliser) -> [..., D]; rows whose normaliser underflowed -> 0."""
    numerator, denominator = augmented[..., :-1], augmented[..., -1:]
    valid = denominator > _DENOMINATOR_FLOOR
    return torch.where(valid, numerator / torch.where(valid, denominator, 1.0), 0.0)






# --------------------------------------------------------------------------------------------
# The key stabiliser: running maxima and rescaled states


def running_max(x: torch.Tensor) -> torch.Tensor:
    """Cumulative maximum over the last dimension (ONNX has no cummax: compiled and exported
    graphs take the maximum under a triangular mask instead)."""
    if not torch.compiler.is_compiling():
        return torch.cummax(x, dim=-1).values
    n = x.shape[-1]
    upto = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return x[..., None, :].masked_fill(~upto, float("-inf")).amax(-1)


def states_before_chunks(kvz, chunk_kvz, running, stabiliser, chunk_log_decay=None):
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


def absorb_key(state, k, v, feature_weights, fmap, key_padding_mask, in_place=False, log_decay=None):
    """Adds one key/value (k, v: [B, H, 1, D]; key_padding_mask: [B, 1], [B, H, 1] or None) to a linear state.
    -> (joined state [B, H, M, D + 1] at the new scale, new running maximum [B, H] (-inf while
    empty), its finite version). in_place: state.kvz itself is rescaled and added to (two passes
    over it instead of five, no new tensor) and returned. The rescaling pass always runs (its
    factor is exactly 1 where no head's maximum grew): asking whether it may be skipped would
    synchronise with the host at every layer of every step. log_decay: [B, H] (<= 0) the step's
    log gate: the old sums are multiplied by exp(log_decay) before the key is added (None: no decay)."""
    if not fmap.calibrated:
        return _absorb_bounded_key(state, k, v, feature_weights, fmap, key_padding_mask, in_place, log_decay)
    logits, offset, token_max = key_terms(k, feature_weights, fmap, key_padding_mask)
    running = torch.maximum(state.stabiliser, token_max[..., 0])
    stabiliser = finite_stabiliser(running)
    rescale = state.stabiliser - stabiliser
    if log_decay is not None:
        rescale = rescale + log_decay
    decay = torch.exp(rescale)[..., None, None]
    keep = None if key_padding_mask is None else head_mask(key_padding_mask)[..., None]
    shift = (offset + stabiliser[..., None]).unsqueeze(-1)
    phi_k = masked_key_features(fmap, logits, shift, keep)[:, :, 0]  # [B, H, M]
    outer = (phi_k.unsqueeze(-1), with_ones(v)[:, :, 0].unsqueeze(-2))
    if in_place:
        kvz = state.kvz.mul_(decay).addcmul_(*outer)
    else:
        kvz = state.kvz * decay + outer[0] * outer[1]
    return kvz, running, stabiliser


def _absorb_bounded_key(state, k, v, feature_weights, fmap, key_padding_mask, in_place, log_decay=None):
    """`absorb_key` for a map without a stabiliser (ReLU, Hedgehog): token maxima are 0, so the
    running maximum is -inf until the first real key and 0 from then on, and the state is all
    zeros while it is -inf. The rescaling factor is therefore 1, or multiplies zeros: the key's
    features are simply added (a padded key's are zeroed), with the same result in fewer passes.
    A decay (log_decay [B, H]) multiplies the old sums first."""
    phi_k = fmap.key_features(k, feature_weights)[:, :, 0]  # [B, H, M]
    if key_padding_mask is None:
        running = state.stabiliser.clamp_min(0.0)
    else:
        real = head_mask(key_padding_mask)[..., 0]  # [B, 1 or H]
        phi_k = torch.where(real[..., None], phi_k, 0.0)
        running = state.stabiliser.masked_fill(real, 0.0)
    outer = (phi_k.unsqueeze(-1), with_ones(v)[:, :, 0].unsqueeze(-2))
    kvz = state.kvz
    if log_decay is not None:
        gate = torch.exp(log_decay)[..., None, None]
        kvz = kvz.mul_(gate) if in_place else kvz * gate
    kvz = kvz.addcmul_(*outer) if in_place else kvz + outer[0] * outer[1]
    return kvz, running, running.clamp_min(0.0)  # the finite stabiliser: -inf and 0 both give 0


# --------------------------------------------------------------------------------------------
# The chunked causal sums every causal variant's linear part runs on


def causal_sums(fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, chunk_size, log_decay=None):
    """The unnormalised causal sums, chunk by chunk. phi_q: [B, H, T, M]; logits, offset,
    token_max as `key_terms` returns them; v1: [B, H, T, D + 1] (values and a column of ones).
    Keys, values and the state have H_kv heads; each query head reads its group's.
    -> (sum_{j <= t} phi(q_t) phi(k_j) [v_j, 1]: [B, H, T, D + 1] at the scale exp(-stabiliser_t),
        stabiliser_t: [B, H, T] (finite), the state after the last token).
    (`fast_attention.causal_sums_on` computes the same on fla's simple-GLA kernel where one is given.)
    log_decay: [B, H_kv, T] fp32 log gates (padded steps already 0), or None.

    With a decay, g_t is the cumulative log gate inside a chunk (inclusive): key j of a chunk
    reaches query t of the same chunk at exp(g_t - g_j), the chunk's end at exp(g_C - g_j), and the
    state before the chunk reaches query t at exp(g_t). Every exponent is <= 0: nothing overflows."""
    batch, query_heads, length, _ = phi_q.shape
    heads = logits.shape[1]
    groups = query_heads // heads
    value_dim = v1.shape[-1] - 1
    mask = head_mask(key_padding_mask) if key_padding_mask is not None else None

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
    running = running_max(torch.cat([state.stabiliser.unsqueeze(-1), chunk_max], dim=-1))
    stabiliser = finite_stabiliser(running[..., 1:])  # [B, H, NC]
    decay = torch.exp(running[..., :-1] - stabiliser)  # rescales the carried state into chunk c

    keep = None if mask is None else mask.view(batch, mask.shape[1], num_chunks, chunk, 1)
    shift = (offset.view(batch, heads, num_chunks, chunk) + stabiliser[..., None]).unsqueeze(-1)
    phi_k = masked_key_features(fmap, logits.view(batch, heads, num_chunks, chunk, logits.shape[-1]), shift, keep)
    phi_q = stack_groups(phi_q, heads, num_chunks, chunk)  # [B, H_kv, NC, G * C, M]
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
        before, kvz = states_before_chunks(kvz, chunk_kvz, running, stabiliser, chunk_log_decay)
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

    out = unstack_groups(out, query_heads, num_chunks, chunk)[:, :, :length]
    per_token = stabiliser[:, :, None, :, None].expand(batch, heads, groups, num_chunks, chunk)
    per_token = per_token.reshape(batch, query_heads, -1)[..., :length]
    # The running maximum as a tensor of its own (not a strided view of the chunks' maxima): a state
    # keeps one layout from the prefill on, so a compiled decoding step does not recompile for it.
    return out, per_token, LinearAttentionState(kvz, running[..., -1].clone(memory_format=torch.contiguous_format))


def may_update_in_place(state) -> bool:
    """Whether a decoding step may overwrite this state's linear sums instead of copying them:
    only outside autograd and tracing (nothing can need the old values), on a plain contiguous
    tensor, and not on an inference tensor outside inference mode (torch refuses that)."""
    kvz = state.kvz
    return (not torch.is_grad_enabled() and not torch.compiler.is_compiling() and kvz.is_contiguous()
            and (torch.is_inference_mode_enabled() or not kvz.is_inference()))


