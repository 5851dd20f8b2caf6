"""Attention kernels as pure functions: the public names, one import away.

Each variant lives in a file of its own (a flat layout: the Hub's remote-code loader copies
single-dot imports only):

- `attention_common`: the running state, the key stabiliser and what every linear variant shares
  (the calling convention and the numerics are described there);
- `attention_linear`: linear attention, non-causal, chunked causal and recurrent;
- `attention_window`: linear attention plus an exact local softmax window under one normaliser;
- `attention_sparse`: the window plus a sparse cache of the worst-reproduced key/value pairs;
- `attention_softmax`: exact softmax attention (SDPA);
- `fast_attention`: the CUDA fast path of the chunked causal sums (fla's Triton kernels);
- `reference_attention`: quadratic-time references the tests hold every variant to.

`causal_linear_variant` picks among the causal ones by a layer's options.
"""

from .attention_common import LinearAttentionState, empty_state, may_update_in_place, repeat_key_heads
from .attention_linear import (
    causal_linear_attention,
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
    recurrent_linear_attention,
)
from .attention_softmax import build_attention_mask, softmax_attention
from .attention_sparse import (
    SparseWindowState,
    causal_sparse_windowed_attention,
    empty_sparse_window_state,
    recurrent_sparse_windowed_attention,
)
from .attention_window import (
    WindowedAttentionState,
    causal_windowed_attention,
    empty_window_state,
    recurrent_windowed_attention,
    windowed_linear_attention,
)



def causal_linear_variant(q, k, v, features, feature_map, window, cache_size, linear_log_weight, key_padding_mask,
                          state, chunk_size, kernel_for=None, log_decay=None):
    """Causal linear attention of the variant a layer's options name: plain (window 0), with an
    exact window, or with a window and a sparse cache (cache_size > 0). One token onto a state is a
    decoding step (the recurrent kernel, updating the state in place where that is safe, see
    `may_update_in_place`); anything else is chunked, on the kernel `kernel_for(q)` returns (None:
    the PyTorch one; asked only when chunking, never in a decoding step). log_decay: [B, H_kv, T], the
    log gates of a decaying state (None: additive; the sparse cache has none).
    -> (out [B, H, T, D], the new state)."""
    decoding = q.shape[2] == 1 and state is not None
    in_place = decoding and may_update_in_place(state)
    if cache_size:
        if log_decay is not None:
            raise ValueError("the sparse cache is defined for an additive state: it takes no log_decay")
        if decoding:
            return recurrent_sparse_windowed_attention(q, k, v, features, feature_map, window, cache_size,
                                                       linear_log_weight, key_padding_mask, state, in_place)
        return causal_sparse_windowed_attention(q, k, v, features, feature_map, window, cache_size, linear_log_weight,
                                                key_padding_mask, state)
    if window:
        if decoding:
            return recurrent_windowed_attention(q, k, v, features, feature_map, window, linear_log_weight,
                                                key_padding_mask, state, in_place, log_decay=log_decay)
        return causal_windowed_attention(q, k, v, features, feature_map, window, linear_log_weight, key_padding_mask,
                                         state, chunk_size, kernel_for(q) if kernel_for else None, log_decay=log_decay)
    if decoding:
        return recurrent_linear_attention(q, k, v, features, feature_map, key_padding_mask, state, in_place,
                                          log_decay=log_decay)
    return causal_linear_attention(q, k, v, features, feature_map, key_padding_mask, state, chunk_size,
                                   kernel_for(q) if kernel_for else None, log_decay=log_decay)


__all__ = [
    "LinearAttentionState",
    "SparseWindowState",
    "WindowedAttentionState",
    "build_attention_mask",
    "causal_linear_attention",
    "causal_linear_variant",
    "causal_sparse_windowed_attention",
    "causal_windowed_attention",
    "empty_sparse_window_state",
    "empty_state",
    "empty_window_state",
    "linear_attention",
    "linear_attention_from_state",
    "linear_attention_state",
    "may_update_in_place",
    "recurrent_linear_attention",
    "recurrent_sparse_windowed_attention",
    "recurrent_windowed_attention",
    "repeat_key_heads",
    "softmax_attention",
    "windowed_linear_attention",
]
