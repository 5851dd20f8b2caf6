"""Decoding cache: a constant-size recurrent state per FAVOR+ layer.

One entry per decoder layer:
- self-attention: FAVOR+ layers keep a `LinearAttentionState` (kv [B, H, M, D], normaliser
  [B, H, M], stabiliser [B, H]) whose size never depends on the number of tokens seen; with a
  local window, a `WindowedAttentionState` adds the last W keys/values and their padding mask
  (still constant in size), and a sparse cache (`SparseWindowState`) the L pairs kept exactly
  beyond the window with their scores; softmax layers keep keys/values [B, H, S, D] as any transformer
  cache does.
- cross-attention (seq2seq, or a decoder with cross-attention): computed once from the encoder
  output and reused at every step (FAVOR+: the same state type; softmax: keys/values and the
  encoder padding mask [B, S]).

The cache owns its tensors: outside autograd, a decoding step writes the new linear sums into
the old ones (`attention.may_update_in_place`). To continue one prefix two ways, copy.deepcopy
the cache first (as with any transformers cache, which every step mutates).
"""

from typing import Optional, Union

import torch
from transformers import Cache

from .attention import LinearAttentionState, SparseWindowState, WindowedAttentionState

KeyValues = tuple[torch.Tensor, torch.Tensor]
KeyValuesMask = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
LayerState = Union[LinearAttentionState, WindowedAttentionState, SparseWindowState, KeyValues, KeyValuesMask]


def _map_state(state: Optional[LayerState], fn) -> Optional[LayerState]:
    if state is None:
        return None
    mapped = [fn(t) for t in state]
    return type(state)(*mapped) if hasattr(state, "_fields") else tuple(mapped)


class PerformerLayerCache:
    """The cached states of one decoder layer."""

    is_compileable = True
    supports_early_init = False
    is_sliding = False
    is_croppable = False

    def __init__(self):
        self.self_attention: Optional[LayerState] = None
        self.cross_attention: Optional[LayerState] = None

    def states(self):
        return [s for s in (self.self_attention, self.cross_attention) if s is not None]

    def apply(self, fn):
        self.self_attention = _map_state(self.self_attention, fn)
        self.cross_attention = _map_state(self.cross_attention, fn)

    def reset(self):
        self.self_attention = None
        self.cross_attention = None

    def __repr__(self):
        kinds = [type(s).__name__ for s in self.states()]
        return f"PerformerLayerCache({', '.join(kinds) or 'empty'})"


class PerformerCache(Cache):
    """Recurrent cache for Performer decoders (see the module docstring).

    `get_seq_length` counts the tokens absorbed so far (padding included, as position offsets
    need). Beam search reorders it with `reorder_cache`; it cannot be cropped, because a FAVOR+
    state cannot forget tokens.
    """

    def __init__(self, num_layers: int = 0):
        super().__init__(layers=[PerformerLayerCache() for _ in range(num_layers)])
        self.seen_tokens = 0

    def layer(self, layer_idx: int) -> PerformerLayerCache:
        while len(self.layers) <= layer_idx:
            self.layers.append(PerformerLayerCache())
        return self.layers[layer_idx]

    def advance(self, num_tokens: int) -> None:
        """Counts the tokens one forward absorbed (every layer has taken them in)."""
        self.seen_tokens += num_tokens

    def set_seq_length(self, num_tokens: int) -> None:
        """Sets the count of tokens held, for a cache whose rows were assembled outside a forward
        (continuous batching: rows of different lengths, joined and dropped)."""
        self.seen_tokens = num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def has_previous_state(self, layer_idx: Optional[int] = None, state_idx: Optional[int] = None) -> bool:
        return self.seen_tokens > 0

    def reset(self):
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "PerformerCache cannot be cropped: a FAVOR+ state sums every token it has seen and cannot forget one. "
            "Assisted and speculative decoding, which need cropping, are not supported; re-run the prefix instead."
        )

    @property
    def is_compileable(self) -> bool:
        # After the prefill every linear layer's state has a fixed shape: generate() may compile
        # the decoding step (softmax layers' growing keys/values make it recompile, so hybrid
        # stacks gain little).
        return True

    @property
    def is_linear(self) -> list[bool]:
        # Performer forwards take 2-D padding masks: generate() must not build 4-D masks for them.
        return [True] * len(self.layers)

    @property
    def is_initialized(self) -> bool:
        return self.seen_tokens > 0

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            for state in layer.states():
                return state[0].shape[0]
        return -1

    def num_bytes(self) -> int:
        """Total size of every cached tensor, in bytes."""
        return sum(t.numel() * t.element_size() for layer in self.layers for s in layer.states() for t in s)

    def __repr__(self):
        return f"PerformerCache(seen_tokens={self.seen_tokens}, layers={self.layers})"


def cache_bytes(cache) -> int:
    """Bytes a decoding cache holds: PerformerCache.num_bytes(), or a transformers cache's keys and
    values (the softmax models a Performer is compared with)."""
    if hasattr(cache, "num_bytes"):
        return cache.num_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
