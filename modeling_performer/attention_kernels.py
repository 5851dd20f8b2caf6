"""The causal linear attention a layer runs, chosen once when the layer is built.

A `CausalLinearKernel` holds a layer's options (feature map, exact window, sparse cache, chunk size)
and the chunked sums' fast path (fla's Triton kernel, where a CUDA device and fla are there), and
names its three modes; every argument is a keyword:

- `chunked(...)`: many tokens at once, causal, in chunks of `chunk_size` (training, and the prompt
  of a generation, from a state or from nothing) -> (out, the state after the last token);
- `step(...)`: one token onto a state, the recurrent form (decoding; the state is updated in place
  where that is safe, see `attention_common.may_update_in_place`) -> (out, the new state);
- `__call__(...)`: whichever of the two the input is (one token onto a state is a step).

The kernels themselves stay pure functions, one variant per file (`attention`). Which chunked sums
run is the layer's own: `PerformerConfig(use_fast_kernels=...)` when it is built, then
`PerformerPreTrainedModel.set_chunk_kernel(...)` for a whole model.
"""

from typing import Callable, Optional, Sequence

import torch

from .attention_linear import causal_linear_attention, recurrent_linear_attention
from .attention_common import may_update_in_place
from .attention_sparse import causal_sparse_windowed_attention, recurrent_sparse_windowed_attention
from .attention_window import causal_windowed_attention, recurrent_windowed_attention
from .fast_attention import kernel_for


class CausalLinearKernel:
    """The causal linear attention of one layer (see the module docstring).

    feature_map: "softmax" (FAVOR+), "relu" or "hedgehog"; window: the exact local window (0: none);
    cache_size: the sparse cache's entries (needs a window; 0: none); chunk_size: the chunked pass's
    block; sums: the chunked sums' fast path (fla's `chunk_simple_gla` signature) or None for the
    PyTorch ones, run for tensors on `sums_devices` only."""

    def __init__(self, feature_map: str, window: int = 0, cache_size: int = 0, chunk_size: int = 128,
                 sums: Optional[Callable] = None, sums_devices: Sequence[str] = ("cuda",)):
        if cache_size and not window:
            raise ValueError("the sparse cache sits beside an exact window: give the kernel a window too")
        self.feature_map, self.window, self.cache_size, self.chunk_size = feature_map, window, cache_size, chunk_size
        self.sums, self.sums_devices = sums, tuple(sums_devices)

    @classmethod
    def for_layer(cls, feature_map: str, window: int, cache_size: int, chunk_size: int, use_fast_kernels: bool):
        """The kernel a layer with these options runs: the fast chunked sums when asked for, a CUDA
        device is there and fla imports (`fast_attention.kernel_for`, which logs which path, once)."""
        sums = None
        if use_fast_kernels:
            sums = kernel_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(feature_map, window, cache_size, chunk_size, sums)

    def with_sums(self, sums: Optional[Callable], sums_devices: Sequence[str] = ("cuda",)) -> "CausalLinearKernel":
        """The same kernel on other chunked sums (None: the PyTorch ones)."""
        return CausalLinearKernel(self.feature_map, self.window, self.cache_size, self.chunk_size, sums, sums_devices)

    def with_cache_size(self, cache_size: int) -> "CausalLinearKernel":
        """The same kernel with a sparse cache of `cache_size` entries (0: none; a kernel without a
        window keeps none)."""
        return CausalLinearKernel(self.feature_map, self.window, cache_size if self.window else 0, self.chunk_size,
                                  self.sums, self.sums_devices)

    @property
    def variant(self) -> str:
        """"linear", "window" or "sparse" (window + sparse cache)."""
        return "sparse" if self.cache_size else "window" if self.window else "linear"

    def _sums_for(self, q: torch.Tensor) -> Optional[Callable]:
        # Graphs that are compiled or exported keep the PyTorch ops.
        if self.sums is None or q.device.type not in self.sums_devices:
            return None
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        return self.sums

    def chunked(self, *, q, k, v, feature_weights, linear_log_weight=None, key_padding_mask=None, state=None,
                log_decay=None):
        """q [B, H, T, D], k and v [B, H_kv, T, D]; feature_weights: the random projection or the Hedgehog
        (query, key) weights; linear_log_weight [H]: the linear part's log weight against the window;
        key_padding_mask [B, T]; state: the state before these tokens (None: nothing seen yet);
        log_decay [B, H_kv, T]: the log gates of a decaying state (None: additive).
        -> (out [B, H, T, D], the state after the last token)."""
        if self.cache_size:
            if log_decay is not None:
                raise ValueError("the sparse cache is defined for an additive state: it takes no log_decay")
            return causal_sparse_windowed_attention(q, k, v, feature_weights, self.feature_map, self.window,
                                                    self.cache_size, linear_log_weight, key_padding_mask, state)
        if self.window:
            return causal_windowed_attention(q, k, v, feature_weights, self.feature_map, self.window,
                                             linear_log_weight, key_padding_mask, state, self.chunk_size,
                                             self._sums_for(q), log_decay=log_decay)
        return causal_linear_attention(q, k, v, feature_weights, self.feature_map, key_padding_mask, state,
                                       self.chunk_size, self._sums_for(q), log_decay=log_decay)

    prefill = chunked  # a prompt is a chunked pass that keeps its state

    def step(self, *, q, k, v, feature_weights, state, linear_log_weight=None, key_padding_mask=None, log_decay=None):
        """One token (T = 1) onto `state`; arguments as `chunked`'s. -> (out [B, H, 1, D], the new state)."""
        in_place = may_update_in_place(state)
        if self.cache_size:
            if log_decay is not None:
                raise ValueError("the sparse cache is defined for an additive state: it takes no log_decay")
            return recurrent_sparse_windowed_attention(q, k, v, feature_weights, self.feature_map, self.window,
                                                       self.cache_size, linear_log_weight, key_padding_mask, state,
                                                       in_place)
        if self.window:
            return recurrent_windowed_attention(q, k, v, feature_weights, self.feature_map, self.window,
                                                linear_log_weight, key_padding_mask, state, in_place,
                                                log_decay=log_decay)
        return recurrent_linear_attention(q, k, v, feature_weights, self.feature_map, key_padding_mask, state,
                                          in_place, log_decay=log_decay)

    def __call__(self, *, q, k, v, feature_weights, linear_log_weight=None, key_padding_mask=None, state=None,
                 log_decay=None):
        """`step` for one token onto a state, `chunked` for anything else; -> (out, state)."""
        mode = self.step if q.shape[2] == 1 and state is not None else self.chunked
        return mode(q=q, k=k, v=v, feature_weights=feature_weights, linear_log_weight=linear_log_weight,
                    key_padding_mask=key_padding_mask, state=state, log_decay=log_decay)

    def __repr__(self):
        sums = "PyTorch" if self.sums is None else getattr(self.sums, "__name__", "custom")
        return (f"CausalLinearKernel({self.variant}, feature_map={self.feature_map!r}, window={self.window}, "
                f"cache_size={self.cache_size}, chunk_size={self.chunk_size}, sums={sums} on {self.sums_devices})")


class PerformerKernelMixin:
    """The kernel switches of `PerformerPreTrainedModel`, for a model already built."""

    def _causal_linear_layers(self):
        return [m for m in self.modules() if isinstance(getattr(m, "kernel", None), CausalLinearKernel)]

    def set_chunk_kernel(self, sums=None, devices=("cuda",)) -> None:
        """The chunked sums every causal linear layer runs for tensors on `devices`: a function of
        fla's `chunk_simple_gla` signature, or None for the PyTorch kernels everywhere (what
        `PerformerConfig(use_fast_kernels=False)` chooses when the model is built)."""
        for module in self._causal_linear_layers():
            module.kernel = module.kernel.with_sums(sums, devices)

    def set_sparse_cache_size(self, size: int) -> None:
        """Switches the sparse cache of every windowed causal layer to `size` entries (0: none), the
        fitted weights unchanged: a switch at inference. Caches made before the switch do not carry
        over; the config says the new size, so a save keeps it."""
        if size < 0:
            raise ValueError(f"sparse_cache_size cannot be negative, got {size}")
        if size and not self.config.local_window:
            raise ValueError(f"sparse_cache_size={size} needs an exact local window, but local_window=0")
        self.config.sparse_cache_size = size
        for module in self._causal_linear_layers():
            module.kernel = module.kernel.with_cache_size(size)
