"""Performer models: one universal layer, one stack, five heads.

Design:
- `PerformerLayer` = self-attention, optional cross-attention, feed-forward. Every sub-layer
  goes through the same `PerformerResidual`, so the chosen norm (pre/post LayerNorm, ReZero,
  PreScaleNorm) is applied consistently, cross-attention included.
- `PerformerAttention` serves self- and cross-attention (BART style: `key_value_states`), with
  exact softmax (SDPA) or FAVOR+; the random projection is a persistent buffer, so a saved model
  reloads bit-exactly, and is redrawn only in training, from a seeded generator.
- `PerformerModel` holds the embeddings and the stack `encoder` (a causal decoder when
  `is_decoder`, as BERT's LM head model keeps its stack under `encoder`), plus `decoder` for
  encoder-decoder models. Encoder and decoder share the one embedding module.
- Decoding state lives in `PerformerCache` (constant size for FAVOR+ layers), never in modules.

Shapes: B batch, T query length, S key length, H heads, D head dim, M random features, C hidden.
"""

import copy
import difflib
import functools
import inspect
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from transformers import Cache, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput, can_return_tuple, logging

from .fast_attention import kernel_for as fast_kernel_for
from .attention import (
    causal_linear_attention,
    causal_sparse_windowed_attention,
    causal_windowed_attention,
    recurrent_sparse_windowed_attention,
    recurrent_windowed_attention,
    windowed_linear_attention,
    may_update_in_place,
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
    recurrent_linear_attention,
    softmax_attention,
)
from .checkpoint_performer import add_checksum, verify, weight_files
from .cache_performer import PerformerCache, PerformerLayerCache
from .configuration_performer import PerformerConfig
from .feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init, hedgehog_key_init

logger = logging.get_logger(__name__)


def checking_values() -> bool:
    """Whether to run the input checks that read tensor values (each one a host sync on a GPU).
    They run in eager mode; compiled and exported graphs (which cannot branch on values) skip
    them, as do decoding steps after the prefill (see PerformerModel._embed)."""
    return not torch.compiler.is_compiling()

# --------------------------------------------------------------------------------------------
# Norms and residual connections


class PerformerLayerNorm(nn.LayerNorm):
    pass


class PerformerScaleNorm(nn.Module):
    """g * x / |x| with a single learned scale (Nguyen & Salazar, 2019)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(hidden_size**0.5))
        self.eps = eps

    def forward(self, x):
        return x * (self.scale / x.norm(dim=-1, keepdim=True).clamp_min(self.eps))


class PerformerRMSNorm(LlamaRMSNorm):
    """transformers' RMSNorm (Llama, Mistral, Qwen): x / rms(x) * weight, normalised in fp32 and
    cast back before the weight, as Llama does; torch's fused rms_norm gives the same values in two
    ops instead of eight."""

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        normalised = F.rms_norm(hidden_states.float(), hidden_states.shape[-1:], eps=self.variance_epsilon)
        return self.weight * normalised.to(dtype)


def make_norm(config: PerformerConfig) -> nn.Module:
    if config.norm_type == "pre_scalenorm":
        return PerformerScaleNorm(config.hidden_size, config.layer_norm_eps)
    if config.norm_type == "pre_rmsnorm":
        return PerformerRMSNorm(config.hidden_size, eps=config.layer_norm_eps)
    return PerformerLayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class PerformerResidual(nn.Module):
    """x -> x + sublayer(x) with the configured norm: before (pre_*), after (post_layernorm), or a
    learned scalar gate initialised at 0 (rezero)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.norm_type = config.norm_type
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        if self.norm_type == "rezero":
            self.alpha = nn.Parameter(torch.zeros(1))
        else:
            self.norm = make_norm(config)

    def forward(self, hidden_states, sublayer):
        # `sublayer` is a closure, never an nn.Module: device-map hooks move every module argument to
        # the execution device, which fails for offloaded (meta) weights.
        if self.norm_type == "rezero":
            return hidden_states + self.alpha * self._dropout(sublayer(hidden_states))
        if self.norm_type == "post_layernorm":
            return self.norm(hidden_states + self._dropout(sublayer(hidden_states)))
        return hidden_states + self._dropout(sublayer(self.norm(hidden_states)))

    def _dropout(self, x):
        return self.dropout(x) if self.training and self.dropout.p > 0 else x


# --------------------------------------------------------------------------------------------
# Embeddings and positions


class PerformerEmbeddings(nn.Module):
    """Token (+ learned position) (+ token type) embeddings; LayerNorm after them for post-LN
    stacks (as BERT), whose layers never normalise their input."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned" else None
        )
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size > 0 else None
        )
        self.LayerNorm = (
            PerformerLayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm_type == "post_layernorm" else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, token_type_ids=None, check_values=True):
        if inputs_embeds is None:
            vocab = self.config.vocab_size
            if check_values and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
                bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
                raise ValueError(
                    f"input_ids contains {bad}, outside the vocabulary [0, {vocab}); check the tokenizer matches "
                    "the model (resize_token_embeddings after adding tokens)"
                )
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds
        if self.position_embeddings is not None:
            limit = self.config.max_position_embeddings
            if check_values and position_ids.numel() and int(position_ids.max()) >= limit:
                raise ValueError(
                    f"Position {int(position_ids.max())} is beyond max_position_embeddings={limit} of this model's "
                    "learned positions: truncate the input, or use position_embedding_type='rotary'"
                )
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            elif tuple(token_type_ids.shape) != tuple(embeddings.shape[:2]):
                raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected {tuple(embeddings.shape[:2])}")
            elif check_values and token_type_ids.numel() and int(token_type_ids.min()) < 0:
                raise ValueError(f"token_type_ids must be >= 0, got {int(token_type_ids.min())}")
            elif check_values and token_type_ids.numel() and int(token_type_ids.max()) >= self.config.type_vocab_size:
                raise ValueError(
                    f"token_type_ids contains {int(token_type_ids.max())}, but this model has type_vocab_size="
                    f"{self.config.type_vocab_size}"
                )
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None and check_values and bool((token_type_ids != 0).any()):
            raise ValueError("token_type_ids were given but this model has type_vocab_size=0")
        if self.LayerNorm is not None:
            embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)


def rotary_frequencies(config: PerformerConfig, device=None, seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """([D/2] inverse frequencies of the rotary pairs, the factor on cos and sin) for
    `config.rope_parameters`: transformers' own functions for the scaled types (linear, dynamic,
    yarn, llama3), so converted Llama-family checkpoints rotate exactly as they did."""
    rope = config.rope_parameters
    if rope["rope_type"] == "default":
        dim = config.head_dim
        return 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, device, seq_len=seq_len)
    return inv_freq.float(), float(scaling)


def rotary_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, scaling: float,
                   dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: [B, T] -> cos, sin: [B, 1, T, D] (times `scaling`), computed once per forward for
    every layer: cos repeated over both halves, sin with the first half negated (what `apply_rotary` takes)."""
    angles = position_ids.float()[:, None, :, None] * inv_freq
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates pairs (first half, second half) of x: [B, H, T, D] -> [first cos - second sin,
    second cos + first sin], the halves swapped by one roll (four ops per tensor; the same
    products and sums, rounded as often, as transformers' rotate_half, so converted models rotate
    exactly as their source in every dtype)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# --------------------------------------------------------------------------------------------
# Feed-forward


class PerformerMLP(nn.Module):
    """Two-layer MLP, or a gated linear unit (SwiGLU, GeGLU, ReGLU) with gate_proj."""

    GATED = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}

    def __init__(self, config: PerformerConfig):
        super().__init__()
        gated = config.hidden_act in self.GATED
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.act = ACT2FN[self.GATED.get(config.hidden_act, config.hidden_act)]
        self.gate_proj = nn.Linear(hidden, inner, bias=bias) if gated else None
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# Attention


class PerformerHedgehogMap(nn.Module):
    """The learned feature maps of one attention layer: query_weight [H, D, F], one map per query
    head, and key_weight [H_kv, D, F], one per key/value head (whose keys feed one shared state).
    A module of its own so that tools can name it (peft's `modules_to_save=["feature_map"]`)."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        width = config.hedgehog_dim or config.head_dim
        self.query_weight = nn.Parameter(hedgehog_init(config.num_attention_heads, config.head_dim, width)[0])
        # with hedgehog_key_scale, one more column: each key's learned scale (HedgehogFeatureMap)
        self.key_weight = nn.Parameter(hedgehog_key_init(config.num_key_value_heads, config.head_dim, width,
                                                         config.hedgehog_key_scale))

    @property
    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_weight, self.key_weight


class PerformerAttention(nn.Module):
    """Multi-head attention, exact (SDPA) or linear (FAVOR+, ReLU or Hedgehog features, optionally
    with an exact local window), for self- or cross-attention.

    `projection_id` makes every module's random projection different but reproducible.
    """

    def __init__(self, config: PerformerConfig, attention_type: str, is_causal: bool, is_cross_attention: bool,
                 projection_id: int):
        super().__init__()
        self.config = config
        self.attention_type = attention_type
        self.is_causal = is_causal and not is_cross_attention
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.projection_id = projection_id
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.attention_output_has_bias)
        # Qwen3 normalises every query and key head (before the rotary).
        self.q_norm = PerformerRMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = PerformerRMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.feature_map = self.linear_log_weight = None
        if attention_type == "favor" and config.feature_map != "hedgehog":
            # Drawn in fp32 (QR has no half-precision CPU kernel), stored in the model's dtype.
            self.register_buffer("projection", self.draw_projection(0).to(torch.get_default_dtype()), persistent=True)
        else:
            self.projection = None
        if attention_type == "favor" and config.feature_map == "hedgehog":
            self.feature_map = PerformerHedgehogMap(config)
        # Exact local window + linear part; the window never applies across sequences.
        self.local_window = config.local_window if attention_type == "favor" and not is_cross_attention else 0
        if self.local_window:
            # log g_h: the per-head weight of the linear part against the window (g = 1 at start).
            self.linear_log_weight = nn.Parameter(torch.zeros(config.num_attention_heads))

    @property
    def feature_parameters(self) -> Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """What the kernels take as `projection`: the random matrix, or the Hedgehog (query, key) weights."""
        return self.feature_map.weights if self.feature_map is not None else self.projection

    def draw_projection(self, draw: int) -> torch.Tensor:
        """The projection for the given redraw count: [M, D], same bits on every process."""
        seed = (self.config.projection_seed * SEED_STRIDE + draw * DRAW_STRIDE + self.projection_id) % (2**63)
        generator = torch.Generator().manual_seed(seed)
        return gaussian_orthogonal_random_matrix(
            self.config.num_random_features, self.head_dim, generator, self.config.projection_type == "orthogonal"
        )

    def _heads(self, x, norm=None):
        """[B, T, heads * D] -> [B, heads, T, D], RMS-normalised per head where the model does so."""
        batch, length, _ = x.shape
        x = x.view(batch, length, -1, self.head_dim)
        return (x if norm is None else norm(x)).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        general_mask: Optional[torch.Tensor] = None,
        rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        layer_cache: Optional[PerformerLayerCache] = None,
    ) -> torch.Tensor:
        """hidden_states: [B, T, C]; key_value_states: [B, S, C] (cross-attention);
        attention_mask: [B, S] padding of the keys (self-attention with a cache: past + current);
        general_mask: boolean [B, 1, T, S] (softmax layers only). -> [B, T, C]."""
        batch, length, _ = hidden_states.shape
        query = self._heads(self.q_proj(hidden_states), self.q_norm)
        if self.is_cross_attention:
            out = self._cross_attention(query, key_value_states, attention_mask, layer_cache)
        else:
            key = self._heads(self.k_proj(hidden_states), self.k_norm)
            value = self._heads(self.v_proj(hidden_states))
            if rotary is not None:
                query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
            out = self._self_attention(query, key, value, attention_mask, general_mask, layer_cache)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _self_attention(self, query, key, value, attention_mask, general_mask, layer_cache):
        length = query.shape[2]
        if self.attention_type == "softmax":
            if layer_cache is not None:
                if layer_cache.self_attention is not None:
                    past_key, past_value = layer_cache.self_attention
                    key, value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
                layer_cache.self_attention = (key, value)
            dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
            return softmax_attention(query, key, value, attention_mask, self.is_causal, general_mask, dropout)
        if general_mask is not None:
            raise ValueError(
                "A [T, S] attention mask cannot be applied by a FAVOR+ layer in linear time: pass a 2-D [B, S] "
                "padding mask, or use attention_type='softmax' (per layer, if needed) for general masks"
            )
        current_mask = None if attention_mask is None else attention_mask[:, -length:]
        features, feature_map, window = self.feature_parameters, self.config.feature_map, self.local_window
        if not self.is_causal:
            if window:
                return windowed_linear_attention(query, key, value, features, feature_map, window,
                                                 self.linear_log_weight, current_mask, self.config.sink_tokens)
            return linear_attention(query, key, value, features, feature_map, current_mask)
        state = layer_cache.self_attention if layer_cache is not None else None
        decoding = length == 1 and state is not None  # one token onto a state: the recurrent step
        # The cache owns its state: a decoding step updates it in place where that is safe.
        in_place = decoding and may_update_in_place(state)
        cache_size = self.config.sparse_cache_size if window else 0
        if cache_size:
            if decoding:
                out, state = recurrent_sparse_windowed_attention(query, key, value, features, feature_map, window,
                                                                 cache_size, self.linear_log_weight, current_mask,
                                                                 state, in_place)
            else:
                out, state = causal_sparse_windowed_attention(query, key, value, features, feature_map, window,
                                                              cache_size, self.linear_log_weight, current_mask, state)
        elif window:
            if decoding:
                out, state = recurrent_windowed_attention(query, key, value, features, feature_map, window,
                                                          self.linear_log_weight, current_mask, state, in_place)
            else:
                out, state = causal_windowed_attention(query, key, value, features, feature_map, window,
                                                       self.linear_log_weight, current_mask, state, self.config.chunk_size,
                                                       self._fast_kernel(query))
        elif decoding:
            out, state = recurrent_linear_attention(query, key, value, features, feature_map, current_mask, state,
                                                    in_place)
        else:
            out, state = causal_linear_attention(query, key, value, features, feature_map, current_mask, state,
                                                 self.config.chunk_size, self._fast_kernel(query))
        if layer_cache is not None:
            layer_cache.self_attention = state
        return out

    def _fast_kernel(self, query):
        """The Triton kernel causal sums run on (training and prefill), or None for the PyTorch ones:
        see `fast_attention.kernel_for`; never while compiling or exporting (their graphs keep PyTorch ops)."""
        if not self.config.use_fast_kernels or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return None
        return fast_kernel_for(query.device)

    def _cross_attention(self, query, key_value_states, attention_mask, layer_cache):
        cached = layer_cache.cross_attention if layer_cache is not None else None
        if cached is None:
            if key_value_states is None:
                raise ValueError("cross-attention needs encoder_hidden_states (or a cache that already holds them)")
            key = self._heads(self.k_proj(key_value_states), self.k_norm)
            value = self._heads(self.v_proj(key_value_states))
            if self.attention_type == "favor":
                cached = linear_attention_state(key, value, self.feature_parameters, self.config.feature_map,
                                                attention_mask)
            else:
                # The encoder padding is kept with the keys: decoding steps need not pass it again.
                padding = (attention_mask.to(torch.bool) if attention_mask is not None
                           else torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device))
                cached = (key, value, padding)
            if layer_cache is not None:
                layer_cache.cross_attention = cached
        if self.attention_type == "favor":
            return linear_attention_from_state(query, cached, self.feature_parameters,
                                               self.config.feature_map).to(query.dtype)
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        return softmax_attention(query, cached[0], cached[1], cached[2], False, None, dropout)


# --------------------------------------------------------------------------------------------
# Layer and stack


class PerformerLayer(GradientCheckpointingLayer):
    """Self-attention, optional cross-attention, feed-forward; each behind a PerformerResidual."""

    def __init__(self, config: PerformerConfig, layer_idx: int, is_causal: bool, has_cross_attention: bool,
                 attention_type: Optional[str] = None, projection_offset: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        attention_type = attention_type or config.layer_attention_type(layer_idx)
        self.self_attn = PerformerAttention(config, attention_type, is_causal=is_causal, is_cross_attention=False,
                                            projection_id=projection_offset + 2 * layer_idx)
        self.self_attn_residual = PerformerResidual(config)
        if has_cross_attention:
            self.cross_attn = PerformerAttention(config, config.cross_attention_type, is_causal=False,
                                                 is_cross_attention=True,
                                                 projection_id=projection_offset + 2 * layer_idx + 1)
            self.cross_attn_residual = PerformerResidual(config)
        else:
            self.cross_attn = None
        self.mlp = PerformerMLP(config)
        self.mlp_residual = PerformerResidual(config)

    def forward(self, hidden_states, attention_mask=None, general_mask=None, rotary=None, encoder_hidden_states=None,
                encoder_attention_mask=None, cache=None):
        layer_cache = cache.layer(self.layer_idx) if cache is not None else None
        hidden_states = self.self_attn_residual(
            hidden_states,
            lambda x: self.self_attn(x, attention_mask=attention_mask, general_mask=general_mask, rotary=rotary,
                                     layer_cache=layer_cache),
        )
        if self.cross_attn is not None:
            hidden_states = self.cross_attn_residual(
                hidden_states,
                lambda x: self.cross_attn(x, key_value_states=encoder_hidden_states,
                                          attention_mask=encoder_attention_mask, layer_cache=layer_cache),
            )
        return self.mlp_residual(hidden_states, lambda x: self.mlp(x))


# A projection's generator seed combines (projection_seed, draw, projection id) as
# projection_seed * SEED_STRIDE + draw * DRAW_STRIDE + id: distinct seeds while ids stay below
# DRAW_STRIDE and draws below SEED_STRIDE / DRAW_STRIDE (primes, so that the few collisions beyond
# that do not fall on a regular pattern). Changing them changes every model's projections.
SEED_STRIDE, DRAW_STRIDE = 1_000_003, 10_007
# Projection ids: encoder layers count from 0, the decoder of an encoder-decoder from here, so the
# two stacks never share a projection.
DECODER_PROJECTION_OFFSET = 1000


class PerformerStack(nn.Module):
    """A stack of PerformerLayers with a final norm for pre-norm types."""

    def __init__(self, config: PerformerConfig, num_layers: int, is_causal: bool, has_cross_attention: bool,
                 projection_offset: int):
        super().__init__()
        self.config = config
        self.is_causal = is_causal
        types = config.attention_type if isinstance(config.attention_type, list) else [config.attention_type] * num_layers
        self.layers = nn.ModuleList(
            PerformerLayer(config, i, is_causal=is_causal, has_cross_attention=has_cross_attention,
                           attention_type=types[i], projection_offset=projection_offset) for i in range(num_layers)
        )
        self.norm = make_norm(config) if config.norm_type.startswith("pre_") else None

    # Set by PerformerModel on its encoder: the model's input embedding and checks.
    embed_inputs = None
    _rotary = None
    main_input_name = "input_ids"

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, position_ids=None,
                output_hidden_states=None, **kwargs):
        """The encoder on its own (what generate() calls through `get_encoder()`): embeds the
        inputs with the model's shared embeddings, runs the stack. -> BaseModelOutput."""
        _refuse_misleading_kwargs(kwargs)
        if self.embed_inputs is None or self.is_causal:
            raise TypeError("only the encoder of a PerformerModel runs on its own; call the model instead")
        hidden, padding_mask, general_mask, position_ids = self.embed_inputs(
            input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, 0)
        last, all_hidden = self.run(hidden, padding_mask, general_mask, position_ids,
                                    output_hidden_states=bool(output_hidden_states))
        return BaseModelOutput(last_hidden_state=last, hidden_states=all_hidden)

    def _rotary_frequencies(self, position_ids) -> tuple[torch.Tensor, float]:
        """The rotary frequencies for these positions, kept as a plain attribute (nothing to save,
        nothing from_pretrained could leave empty). Dynamic NTK scaling recomputes them for
        positions beyond max_position_embeddings, at the length the positions reach, as
        transformers does for a sequence that grows."""
        if self.config.rope_parameters["rope_type"] == "dynamic" and not torch.compiler.is_compiling():
            length = int(position_ids.max()) + 1
            if length > self.config.max_position_embeddings:
                return rotary_frequencies(self.config, position_ids.device, seq_len=length)
        cached = self._rotary
        if cached is None or cached[0].device != position_ids.device or torch.compiler.is_compiling():
            cached = rotary_frequencies(self.config, position_ids.device)
            if not torch.compiler.is_compiling():
                self._rotary = cached
        return cached

    def run(self, hidden_states, attention_mask=None, general_mask=None, position_ids=None,
            encoder_hidden_states=None, encoder_attention_mask=None, cache=None, output_hidden_states=False):
        """hidden_states: embedded inputs [B, T, C]; attention_mask: padding [B, S] (bool)."""
        rotary = None
        if self.config.position_embedding_type == "rotary":
            rotary = rotary_cos_sin(position_ids, *self._rotary_frequencies(position_ids), hidden_states.dtype)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, general_mask, rotary, encoder_hidden_states,
                                  encoder_attention_mask, cache)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
            if output_hidden_states:
                all_hidden[-1] = hidden_states
        return hidden_states, tuple(all_hidden) if output_hidden_states else None


# --------------------------------------------------------------------------------------------
# Pretrained base

AUTO_MAP = {
    "AutoConfig": "configuration_performer.PerformerConfig",
    "AutoModel": "modeling_performer.PerformerModel",
    "AutoModelForMaskedLM": "modeling_performer.PerformerForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_performer.PerformerForSequenceClassification",
    "AutoModelForCausalLM": "modeling_performer.PerformerForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_performer.PerformerForConditionalGeneration",
}


def _local_folder(name_or_path, kwargs):
    """The folder holding the weight files (local path or the Hub cache), or None."""
    if name_or_path is None:  # weights given as state_dict=
        return None
    subfolder = kwargs.get("subfolder") or ""
    path = os.path.join(os.fspath(name_or_path), subfolder)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "model.safetensors.index.json"):
            cached = try_to_load_from_cache(str(name_or_path), os.path.join(subfolder, filename) if subfolder else filename,
                                            revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
            if isinstance(cached, str):
                return os.path.dirname(cached)
    except ValueError:  # not a Hub id (HFValidationError): transformers reports the real problem
        return None
    return None


def _split_masks(attention_mask, batch, query_length, key_length, device, check_values=True):
    """Validates attention_mask and returns (padding mask [B, S] bool or None, general mask
    [B, 1, T, S] bool or None). `check_values=False` skips the 0/1 check (shapes are always checked)."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be bool, integer or float 0/1, got dtype {attention_mask.dtype}")
    if not check_values:
        pass
    elif attention_mask.dtype.is_floating_point:
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(
                "attention_mask must hold 1 (attend) and 0 (padding); additive float masks (-inf) are not accepted"
            )
    elif attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, key_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but [batch, key length] = "
                f"{(batch, key_length)} was expected (with a cache: past + new tokens)"
            )
        return attention_mask, None
    if attention_mask.dim() == 3:
        attention_mask = attention_mask[:, None]
    if attention_mask.dim() == 4 and attention_mask.shape[-2:] == (query_length, key_length) \
            and attention_mask.shape[0] in (1, batch):
        return None, attention_mask
    raise ValueError(
        f"attention_mask of shape {tuple(attention_mask.shape)} not understood: give [B, S] padding "
        f"({(batch, key_length)}) or a boolean [B, 1, T, S] mask ({(batch, 1, query_length, key_length)})"
    )


def _encoder_padding(encoder_attention_mask, encoder_hidden_states):
    """Validated [B, S] padding mask of the encoder output (or None)."""
    if encoder_attention_mask is None or encoder_hidden_states is None:
        return None
    batch, length = encoder_hidden_states.shape[:2]
    padding, _ = _split_masks(encoder_attention_mask, batch, 0, length, encoder_hidden_states.device, checking_values())
    return padding


def _decoder_cache(cache, use_cache, num_layers):
    """The cache a decoder forward reads and updates (a new one when use_cache asks for it), and
    the number of tokens it already holds."""
    if use_cache and cache is None:
        cache = PerformerCache(num_layers)
    if cache is not None and not isinstance(cache, PerformerCache):
        raise TypeError(f"Performer decoders need a PerformerCache, got {type(cache).__name__}")
    return cache, cache.get_seq_length() if cache is not None else 0


def _is_decoding_state(value) -> bool:
    """A transformers Cache, or a legacy cache: per layer, a tuple of tensors (keys, values, ...)."""
    if isinstance(value, Cache):
        return True
    return (isinstance(value, (tuple, list)) and len(value) > 0
            and all(isinstance(layer, (tuple, list)) and len(layer) > 0
                    and all(isinstance(t, torch.Tensor) for t in layer) for layer in value))


def _refuse_misleading_kwargs(kwargs):
    """Like an in-tree model, forward accepts the keywords transformers passes around (Trainer,
    generate, pipelines) and ignores those it does not use. Refused, because they would silently
    give a wrong answer: a decoding state under any name but `cache` (the name before
    transformers 5.24, or a misspelling: ignored, it would restart the sequence), a request for
    attention weights, and a near miss of one of forward's own argument names (`atention_mask`)."""
    if not kwargs:
        return
    for name, value in kwargs.items():
        if _is_decoding_state(value):
            raise TypeError(f"{name}= holds a decoding state: Performer forwards take it as `cache=` (the name since "
                            "transformers 5.24)")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported: linear attention never forms the [T, S] attention weights")
    if torch.compiler.is_compiling():
        return
    for name in kwargs:
        close = difflib.get_close_matches(name, _forward_argument_names(), n=1, cutoff=0.85)
        if close and close[0] != name:
            raise TypeError(f"unexpected keyword argument {name!r}; did you mean {close[0]!r}?")


@functools.cache
def _forward_argument_names() -> tuple[str, ...]:
    """Every named argument of a Performer forward (heads included)."""
    heads = (PerformerModel, PerformerForMaskedLM, PerformerForSequenceClassification, PerformerForCausalLM,
             PerformerForConditionalGeneration)
    names = {p.name for head in heads for p in inspect.signature(head.forward).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD}
    return tuple(sorted(names - {"self"}))


def _positions(padding_mask, batch, length, past_length, device):
    """Position ids [B, T]: counted over real tokens when a padding mask is given, so that
    left-padded prompts start at 0."""
    if padding_mask is None:
        return torch.arange(past_length, past_length + length, device=device).expand(batch, length)
    positions = padding_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, -length:]


class PerformerRedrawState(nn.Module):
    """Persistent counters (a module of their own, so device maps can place them): resumed
    training continues the same sequence of seeded projection draws. `draws`: the draw the
    projections hold; `training_forwards`: optimizer steps counted by `redraw_on_steps` (the name
    is the one earlier checkpoints saved)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("draws", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long), persistent=True)


class PerformerPreTrainedModel(PreTrainedModel):
    config_class = PerformerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PerformerLayer", "PerformerEmbeddings"]
    _supports_sdpa = True
    # The decoding state is a recurrent cache object (see cache_performer.py).
    _is_stateful = True
    main_input_name = "input_ids"

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the modeling files and an `auto_map` naming every head, so the folder loads
        with `trust_remote_code=True` where this package is not installed."""
        for name, class_name in AUTO_MAP.items():
            if name != "AutoConfig" and class_name.endswith("." + type(self).__name__) and type(self)._auto_class is None:
                type(self).register_for_auto_class(name)
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for path in weight_files(str(save_directory)):
                add_checksum(path)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing_weights: bool = True, **kwargs):
        """transformers' from_pretrained, with three guarantees:
        - damaged weight files (truncated, or data that no longer matches the checksum that
          save_pretrained wrote) are refused before loading;
        - weights missing from the checkpoint are initialised, reported in the loading info and
          logged, as transformers does; `allow_missing_weights=False` refuses a checkpoint that lacks
          weights of the Performer stack instead (head weights missing from a base checkpoint are
          always initialised);
        - a missing random projection never comes back different: it is rebuilt exactly from the
          seed and the saved draw count. If the draw count is missing too while other weights of
          the stack were loaded, the projections the model was trained with are unknown: refused."""
        folder = _local_folder(pretrained_model_name_or_path, kwargs)
        if folder is not None:
            for path in weight_files(folder):
                verify(path)
            if kwargs.get("key_mapping") is None:
                kwargs["key_mapping"] = cls._stack_renaming(folder, kwargs.get("config"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        base = "" if model.base_model is model else model.base_model_prefix + "."
        missing = set(info.get("missing_keys", ()))
        stack_missing = sorted(k for k in missing if k.startswith(base) and "redraw_state" not in k)
        if stack_missing and not allow_missing_weights:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no weights for {len(stack_missing)} tensor(s) of the Performer "
                f"stack, e.g. {stack_missing[:4]}; the checkpoint is incomplete or was saved with another config "
                "(layers, attention_type). Leave allow_missing_weights at True to initialise them fresh."
            )
        model._rebuild_missing_projections(missing, base, pretrained_model_name_or_path)
        return (model, info) if want_info else model

    @classmethod
    def _stack_renaming(cls, folder: str, config=None) -> Optional[dict]:
        """A checkpoint's one-stack layers load into the other kind of one-stack model (a
        bidirectional base checkpoint into a causal LM and back), and checkpoints saved when the
        causal stack was called `encoder` still load. -> key_mapping for from_pretrained, or None."""
        if cls in (PerformerForCausalLM,):
            target = "decoder"
        elif cls in (PerformerForMaskedLM, PerformerForSequenceClassification):
            target = "encoder"
        else:
            try:
                config = config if isinstance(config, PerformerConfig) else PerformerConfig.from_pretrained(folder)
            except (OSError, ValueError):
                return None
            if config.is_encoder_decoder:
                return None
            target = "decoder" if config.is_decoder else "encoder"
        other = "encoder" if target == "decoder" else "decoder"
        keys = set()
        for path in weight_files(folder):
            if path.endswith(".safetensors"):
                with safe_open(path, "pt") as f:
                    keys.update(f.keys())
        has = {name: any(re.match(rf"^(model\.)?{name}\.layers\.", k) for k in keys) for name in (target, other)}
        if has[other] and not has[target]:
            # transformers' renamings substitute one group (\1): one renaming per part of the stack.
            return {rf"(^|model\.){other}\.{part}\.": rf"\1{target}.{part}." for part in ("layers", "norm")}
        return None

    @torch.no_grad()
    def _rebuild_missing_projections(self, missing: set, base: str, source):
        names = {module: name for name, module in self.named_modules()}
        lost = [m for m in self.favor_modules() if f"{names[m]}.projection" in missing]
        if not lost:
            return
        state = self.base_model.redraw_state
        if f"{base}redraw_state.draws" in missing:
            loaded = [k for k, _ in self.named_parameters() if k.startswith(base) and k not in missing]
            if loaded:
                raise ValueError(
                    f"{source} has trained weights but neither the random projections ({len(lost)} missing, e.g. "
                    f"{names[lost[0]]}.projection) nor the draw count (redraw_state.draws) they were drawn with: "
                    "its attention cannot be rebuilt as it was trained. Save the model with save_pretrained, which "
                    "keeps both."
                )
        draw = int(state.draws)
        for module in lost:
            module.projection.copy_(module.draw_projection(draw).to(module.projection))
        logger.info(f"Rebuilt {len(lost)} missing random projection(s) of {source} from the seed and draw {draw}")

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerformerAttention):
            if module.projection is not None:
                init.copy_(module.projection, module.draw_projection(0))
            if module.linear_log_weight is not None:
                init.zeros_(module.linear_log_weight)
        elif isinstance(module, PerformerHedgehogMap):
            init.copy_(module.query_weight, hedgehog_init(*module.query_weight.shape)[0])
            _, head_dim, width = module.query_weight.shape
            init.copy_(module.key_weight, hedgehog_key_init(module.key_weight.shape[0], head_dim, width,
                                                            self.config.hedgehog_key_scale))
        elif isinstance(module, PerformerScaleNorm):
            init.constant_(module.scale, self.config.hidden_size**0.5)
        elif isinstance(module, PerformerResidual) and module.norm_type == "rezero":
            init.zeros_(module.alpha)
        elif isinstance(module, PerformerRedrawState):
            init.zeros_(module.draws)
            init.zeros_(module.training_forwards)

    # -- random projections ------------------------------------------------------------------

    def favor_modules(self):
        return [m for m in self.modules() if isinstance(m, PerformerAttention) and m.projection is not None]

    @torch.no_grad()
    def redraw_projections(self, draw: Optional[int] = None):
        """Redraws every FAVOR+ projection. `draw` picks the seeded draw (default: the next one);
        the same draw gives the same projections on every process."""
        model = self.base_model
        draw = int(model.redraw_state.draws) + 1 if draw is None else int(draw)
        for module in self.favor_modules():
            module.projection.copy_(module.draw_projection(draw).to(module.projection))
        model.redraw_state.draws.fill_(draw)

    def redraw_for_step(self, step: int) -> bool:
        """Called after optimizer step `step` (1-based): every `feature_redraw_interval` steps the
        projections take draw step // interval, so any process and any resumed run that reaches the
        same step holds the same projections. Returns whether it redrew."""
        interval = self.config.feature_redraw_interval
        if interval <= 0 or step <= 0 or step % interval or not self.favor_modules():
            return False
        self.redraw_projections(draw=step // interval)
        return True

    def redraw_on_steps(self, optimizer: torch.optim.Optimizer):
        """For training loops of your own: counts the steps of `optimizer` (a hook after each
        `optimizer.step()`, so gradient accumulation and skipped steps count right) and redraws
        every `feature_redraw_interval` of them. Trainer users add `PerformerRedrawCallback`."""
        state = self.base_model.redraw_state

        def after_step(*_):
            state.training_forwards += 1
            self.redraw_for_step(int(state.training_forwards))

        self.base_model._redraw_driven = True
        return optimizer.register_step_post_hook(after_step)

    def train(self, mode: bool = True):
        if mode and self.config.feature_redraw_interval > 0 and not getattr(self.base_model, "_redraw_driven", False) \
                and self.favor_modules():
            logger.warning_once(
                f"feature_redraw_interval={self.config.feature_redraw_interval} counts optimizer steps, but nothing "
                "reports them yet: add PerformerRedrawCallback() to the Trainer's callbacks, or call "
                "model.redraw_on_steps(optimizer) in a loop of your own. Until then the projections stay fixed."
            )
        return super().train(mode)


class _NotGenerative:
    """For heads without generate(): calling it says which head can (can_generate() stays False)."""

    def generate(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} cannot generate text: load the checkpoint with PerformerForCausalLM "
            "(AutoModelForCausalLM) or PerformerForConditionalGeneration (AutoModelForSeq2SeqLM); for "
            "masked-token filling use pipeline('fill-mask')"
        )


class PerformerModel(_NotGenerative, PerformerPreTrainedModel):
    """The bare stack: bidirectional encoder, causal decoder (`is_decoder`), or encoder-decoder
    (`is_encoder_decoder`)."""

    def __init__(self, config: PerformerConfig):
        super().__init__(config)
        self.embeddings = PerformerEmbeddings(config)
        sizes = config.stack_sizes()
        # `encoder`: bidirectional stack; `decoder`: causal stack (with cross-attention in an
        # encoder-decoder, or with add_cross_attention). A decoder-only model has no encoder.
        self.encoder = self.decoder = None
        if config.is_encoder_decoder:
            self.encoder = PerformerStack(config, sizes["encoder"], is_causal=False, has_cross_attention=False,
                                          projection_offset=0)
            self.decoder = PerformerStack(config, sizes["decoder"], is_causal=True, has_cross_attention=True,
                                          projection_offset=DECODER_PROJECTION_OFFSET)
        elif config.is_decoder:
            self.decoder = PerformerStack(config, config.num_hidden_layers, is_causal=True,
                                          has_cross_attention=config.add_cross_attention, projection_offset=0)
        else:
            self.encoder = PerformerStack(config, config.num_hidden_layers, is_causal=False, has_cross_attention=False,
                                          projection_offset=0)
        if config.sink_tokens and self.encoder is None:
            raise ValueError(f"sink_tokens={config.sink_tokens} applies to non-causal (encoder) attention, and this "
                             "model has a causal stack only: set sink_tokens=0")
        if self.encoder is not None:
            # The encoder embeds its own inputs when called alone (generate() runs `get_encoder()`);
            # the embeddings stay one module of this model, shared with the decoder.
            self.encoder.embed_inputs = self._embed
        self.redraw_state = PerformerRedrawState()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def get_encoder(self, modality=None):
        return self.encoder

    def _embed(self, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, past_length):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}")
            shape = tuple(input_ids.shape)
        else:
            hidden_size = self.config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
                raise ValueError(
                    f"inputs_embeds must be [batch, length, hidden_size={hidden_size}], got shape {tuple(inputs_embeds.shape)}"
                )
            shape = tuple(inputs_embeds.shape[:2])
        batch, length = shape
        if batch == 0 or length == 0:
            raise ValueError(f"Empty input: batch size {batch}, sequence length {length}; give at least one token")
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        # Values are checked in eager mode when a sequence starts; decoding steps after the prefill
        # (tokens that generate() picked itself) skip the host syncs.
        check_values = checking_values() and past_length == 0
        padding_mask, general_mask = _split_masks(attention_mask, batch, length, past_length + length, device,
                                                  check_values)
        if position_ids is None:
            position_ids = _positions(padding_mask, batch, length, past_length, device)
        elif tuple(position_ids.shape) not in ((batch, length), (1, length)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected {(batch, length)} or (1, {length})")
        elif check_values and int(position_ids.min()) < 0:
            raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
        else:
            position_ids = position_ids.expand(batch, length)
        hidden = self.embeddings(input_ids, inputs_embeds, position_ids, token_type_ids, check_values)
        return hidden, padding_mask, general_mask, position_ids

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, position_ids=None,
               output_hidden_states=False):
        return self.encoder(input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids,
                            output_hidden_states=output_hidden_states)

    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.LongTensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        decoder_attention_mask: Optional[torch.Tensor] = None,
        decoder_position_ids: Optional[torch.LongTensor] = None,
        decoder_inputs_embeds: Optional[torch.Tensor] = None,
        encoder_outputs: Optional[Union[tuple, BaseModelOutput]] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[PerformerCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        **kwargs,
    ):
        _refuse_misleading_kwargs(kwargs)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states

        if self.config.is_encoder_decoder:
            return self._forward_seq2seq(input_ids, attention_mask, token_type_ids, inputs_embeds, decoder_input_ids,
                                         decoder_attention_mask, decoder_position_ids, decoder_inputs_embeds,
                                         encoder_outputs, cache, use_cache, output_hidden_states)

        is_decoder = bool(self.config.is_decoder)
        use_cache = is_decoder and (use_cache if use_cache is not None else (self.config.use_cache and not self.training))
        if not is_decoder and cache is not None:
            raise ValueError("A cache is only used by decoders (config.is_decoder=True)")
        stack = self.decoder if is_decoder else self.encoder
        cache, past_length = _decoder_cache(cache, use_cache, len(stack.layers))
        hidden, padding_mask, general_mask, position_ids = self._embed(
            input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, past_length
        )
        encoder_padding = _encoder_padding(encoder_attention_mask, encoder_hidden_states)
        last, all_hidden = stack.run(hidden, padding_mask, general_mask, position_ids, encoder_hidden_states,
                                     encoder_padding, cache, output_hidden_states)
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
        return PerformerModelOutput(last_hidden_state=last, cache=cache if use_cache else None, hidden_states=all_hidden)

    def _forward_seq2seq(self, input_ids, attention_mask, token_type_ids, inputs_embeds, decoder_input_ids,
                         decoder_attention_mask, decoder_position_ids, decoder_inputs_embeds, encoder_outputs, cache,
                         use_cache, output_hidden_states):
        if encoder_outputs is None:
            encoder_outputs = self.encode(input_ids, attention_mask, inputs_embeds, token_type_ids,
                                          output_hidden_states=output_hidden_states)
        elif not isinstance(encoder_outputs, BaseModelOutput):
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        encoder_hidden = encoder_outputs.last_hidden_state
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "The encoder-decoder model needs decoder_input_ids (or labels, from which the heads build them)"
            )
        encoder_padding = _encoder_padding(attention_mask, encoder_hidden)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache, past_length = _decoder_cache(cache, use_cache, len(self.decoder.layers))
        hidden, padding_mask, general_mask, position_ids = self._embed(
            decoder_input_ids, decoder_inputs_embeds, decoder_attention_mask, decoder_position_ids, None, past_length
        )
        last, all_hidden = self.decoder.run(hidden, padding_mask, general_mask, position_ids, encoder_hidden,
                                            encoder_padding, cache, output_hidden_states)
        if cache is not None:
            cache.seen_tokens += hidden.shape[1]
        return Seq2SeqModelOutput(
            last_hidden_state=last, cache=cache if use_cache else None, decoder_hidden_states=all_hidden,
            encoder_last_hidden_state=encoder_hidden, encoder_hidden_states=encoder_outputs.hidden_states,
        )


@dataclass
class PerformerModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Optional[PerformerCache] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


# --------------------------------------------------------------------------------------------
# Heads


def _with_flags(config: PerformerConfig, **flags) -> PerformerConfig:
    """Heads set the stack flags they need, on a copy so the caller's config is not changed."""
    if all(getattr(config, k) == v for k, v in flags.items()):
        return config
    config = copy.deepcopy(config)
    for key, value in flags.items():
        setattr(config, key, value)
    return config


def check_token_labels(labels: torch.Tensor, logits: torch.Tensor, name: str = "labels", ignore_index: int = -100):
    """Shape (always) and range (eager mode only) of per-token labels, before transformers' loss."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:-1])} (batch, length), got {tuple(labels.shape)}")
    if checking_values():
        real = labels[labels != ignore_index]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= logits.shape[-1]):
            raise ValueError(f"{name} must be in [0, {logits.shape[-1]}) or {ignore_index} (ignored), got "
                             f"{int(real.min())}..{int(real.max())}")


class PerformerLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> vocabulary (tied to the input embeddings), as BERT."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[PerformerMLP.GATED.get(config.hidden_act, config.hidden_act)]
        self.LayerNorm = PerformerLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states):
        return self.decoder(self.LayerNorm(self.act(self.dense(hidden_states))))


class PerformerForMaskedLM(_NotGenerative, PerformerPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: PerformerConfig):
        config = _with_flags(config, is_decoder=False, is_encoder_decoder=False)
        super().__init__(config)
        self.model = PerformerModel(config)
        self.lm_head = PerformerLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, value):
        self.lm_head.decoder = value

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states=None, num_items_in_batch=None, **kwargs):
        """`num_items_in_batch` (passed by Trainer) divides the summed loss by the token count of the
        whole accumulated batch, as transformers' loss functions do."""
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                             output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            check_token_labels(labels, logits)
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch)
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class PerformerForSequenceClassification(_NotGenerative, PerformerPreTrainedModel):
    """Pools the encoder output (first token, or mean over real tokens), then classifies or
    regresses; `problem_type` as in transformers."""

    # Its loss is a mean over the batch (no `num_items_in_batch`): Trainer must divide it by the
    # accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: PerformerConfig):
        config = _with_flags(config, is_decoder=False, is_encoder_decoder=False)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = PerformerModel(config)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None, inputs_embeds=None,
                labels=None, output_hidden_states=None, **kwargs):
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                             output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        if self.config.classifier_pooling == "mean":
            if attention_mask is not None and attention_mask.dim() == 2:
                weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            else:
                pooled = hidden.mean(dim=1)
        else:
            pooled = hidden[:, 0]
        logits = self.classifier(self.dropout(torch.tanh(self.dense(self.dropout(pooled)))))
        loss = None
        if labels is not None:
            self._check_labels(logits, labels)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    def _check_labels(self, logits, labels):
        """Clear errors before transformers' loss (which picks the problem type the same way)."""
        problem = self.config.problem_type
        if problem is None:
            problem = ("regression" if self.num_labels == 1 else "single_label_classification"
                       if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
        batch = logits.shape[0]
        if problem == "regression":
            if labels.numel() != batch * self.num_labels:
                raise ValueError(f"regression labels must have {batch * self.num_labels} values, got shape {tuple(labels.shape)}")
        elif problem == "single_label_classification":
            if labels.shape != (batch,):
                raise ValueError(f"single-label classification needs labels of shape ({batch},), got {tuple(labels.shape)}")
            if checking_values() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_labels):
                raise ValueError(f"labels must be in [0, {self.num_labels}), got values {int(labels.min())}..{int(labels.max())}")
        elif labels.shape != logits.shape:
            raise ValueError(f"multi-label classification needs labels of shape {tuple(logits.shape)}, got {tuple(labels.shape)}")


class _PerformerGenerativeModel(PerformerPreTrainedModel, GenerationMixin):
    """A PerformerModel with the stack flags in `_stack_flags` and a bias-free vocabulary
    projection tied to the input embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}
    _stack_flags: dict = {}

    def __init__(self, config: PerformerConfig):
        config = _with_flags(config, **self._stack_flags)
        super().__init__(config)
        self.model = PerformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() starts with an empty PerformerCache of its own (so that a compile_config can
        see a compileable cache before the first step); a cache the caller passes is used as is."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            stack = self.model.decoder
            model_kwargs["cache"] = PerformerCache(len(stack.layers))


class PerformerForCausalLM(_PerformerGenerativeModel):
    _stack_flags = {"is_decoder": True, "is_encoder_decoder": False}

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, encoder_hidden_states=None, encoder_attention_mask=None,
                token_type_ids=None, output_hidden_states=None, logits_to_keep=0,
                num_items_in_batch=None, **kwargs):
        """Position t predicts token t+1 of `labels`; `shift_labels=` (already aligned targets, as
        sequence-parallel training passes them) replaces that shift. `num_items_in_batch`: see
        transformers' ForCausalLMLoss. (`shift_labels` stays a keyword: Trainer treats every named
        argument with "label" in it as a required label.)"""
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                             encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                             cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
                             return_dict=True, **kwargs)
        hidden = outputs.last_hidden_state
        # As in-tree causal LMs: an int keeps the last n positions (0 = all), a tensor picks positions.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden = hidden[:, keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None or shift_labels is not None:
            if shift_labels is not None:
                check_token_labels(shift_labels, logits, "shift_labels")
            else:
                check_token_labels(labels, logits)
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch,
                                      shift_labels=shift_labels)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, cache=outputs.cache,
                                                   hidden_states=outputs.hidden_states)


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """labels -> decoder inputs: start token first, everything moved one step right, -100 -> pad."""
    if pad_token_id is None or decoder_start_token_id is None:
        raise ValueError("config.pad_token_id and config.decoder_start_token_id must be set to build decoder inputs")
    shifted = input_ids.new_full(input_ids.shape, decoder_start_token_id)
    shifted[:, 1:] = input_ids[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_token_id)


class PerformerForConditionalGeneration(_PerformerGenerativeModel):
    """Encoder-decoder with shared embeddings. `labels` are the target tokens; decoder inputs
    are built from them with `shift_tokens_right`, and the loss compares position t with
    label t (no second shift)."""

    _stack_flags = {"is_encoder_decoder": True, "is_decoder": False}

    def get_encoder(self, modality=None):
        return self.model.get_encoder()

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor):
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, decoder_attention_mask=None,
                decoder_position_ids=None, encoder_outputs=None, cache=None, inputs_embeds=None,
                decoder_inputs_embeds=None, labels=None, use_cache=None, token_type_ids=None,
                output_hidden_states=None, num_items_in_batch=None, **kwargs):
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)
        outputs = self.model(input_ids, attention_mask, token_type_ids, None, inputs_embeds, decoder_input_ids,
                             decoder_attention_mask, decoder_position_ids, decoder_inputs_embeds, encoder_outputs,
                             cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
                             return_dict=True, **kwargs)
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            check_token_labels(labels, logits)
            # The decoder inputs are the shifted labels: position t already predicts label t.
            loss = self.loss_function(logits, labels, self.config.vocab_size, num_items_in_batch=num_items_in_batch,
                                      shift_labels=labels)
        return Seq2SeqLMOutput(
            loss=loss, logits=logits, cache=outputs.cache, decoder_hidden_states=outputs.decoder_hidden_states,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state, encoder_hidden_states=outputs.encoder_hidden_states,
        )


__all__ = [
    "PerformerPreTrainedModel",
    "PerformerModel",
    "PerformerForMaskedLM",
    "PerformerForSequenceClassification",
    "PerformerForCausalLM",
    "PerformerForConditionalGeneration",
    "shift_tokens_right",
]
