"""Attention kernels as pure functions: the public names, one import away.

Each variant lives in a file of its own (a flat layout: the Hub's remote-code loader copies
single-dot imports only):

- `attention_common`: the public building blocks the variants share (the running state, the key
  stabiliser, the chunked causal sums, grouped-query layouts; the calling convention and the
  numerics are described there);
- `attention_linear`: linear attention, non-causal, chunked causal and recurrent;
- `attention_window`: linear attention plus an exact local softmax window under one normaliser;
- `attention_sparse`: the window plus a sparse cache of the worst-reproduced key/value pairs;
- `attention_softmax`: exact softmax attention (SDPA);
- `fast_attention`: the CUDA fast path of the chunked causal sums (fla's Triton kernels);
- `reference_attention`: quadratic-time references the tests hold every variant to.

`attention_kernels.CausalLinearKernel` is the causal one a layer runs, chosen once by its options.
"""

from .attention_kernels import CausalLinearKernel
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

__all__ = [
    "CausalLinearKernel",
    "LinearAttentionState",
    "SparseWindowState",
    "WindowedAttentionState",
    "build_attention_mask",
    "causal_linear_attention",
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
