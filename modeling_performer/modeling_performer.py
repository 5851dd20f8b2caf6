"""Performer models: one universal layer, one stack, five heads.

Design:
- `PerformerLayer` = self-attention, optional cross-attention, feed-forward. Every sub-layer
  goes through the same `PerformerResidual`, so the chosen norm (pre/post LayerNorm, ReZero,
  PreScaleNorm) is applied consistently, cross-attention included.
- `PerformerAttention` serves self- and cross-attention (BART style: `key_value_states`), with
  exact softmax (SDPA) or FAVOR+; the random projection is a persistent buffer, so a saved model
  reloads bit-exactly, and is redrawn only in training, from a seeded generator.
- `PerformerModel` holds the embeddings and its stacks: `encoder` (bidirectional), `decoder`
  (causal: a decoder-only model has only this one), or both for encoder-decoder models, which
  share the one embedding module. Each stack checks and embeds its own inputs, owns its rotary
  positions (`PerformerRotaryEmbedding`) and has one forward, as T5's stacks do.
- Decoding state lives in `PerformerCache` (constant size for FAVOR+ layers), never in modules.

Policy lives beside this file, not in it: argument checks at the boundary (`inputs_performer`),
saving and loading (`storage_performer`), when random projections are redrawn
(`redraw_performer`); the attention kernels are pure functions (`attention`).

Shapes: B batch, T query length, S key length, H heads, D head dim, M random features, C hidden.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutputWithCrossAttentions,
    MaskedLMOutput,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
    SequenceClassifierOutput,
)
from transformers.utils import ModelOutput, can_return_tuple, logging

from .attention import (
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
    softmax_attention,
    windowed_linear_attention,
)
from .attention_kernels import CausalLinearKernel, PerformerKernelMixin
from .cache_performer import PerformerCache, PerformerLayerCache
from .configuration_performer import PerformerConfig
from .feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init, hedgehog_key_init
from .layers_performer import (
    PerformerDecayGate,
    PerformerEmbeddings,
    PerformerHedgehogWeights,
    PerformerLayerNorm,
    PerformerMLP,
    PerformerResidual,
    PerformerRMSNorm,
    PerformerRotaryEmbedding,
    PerformerScaleNorm,
    apply_rotary,
    decay_bias,
    decay_rates,
    make_norm,
)
from .inputs_performer import (
    NotGenerative,
    check_embedding_inputs,
    check_sequence_labels,
    check_token_inputs,
    check_token_labels,
    checking_values,
    encoder_padding,
    refuse_misleading_kwargs,
    split_masks,
)
from .redraw_performer import PerformerRedrawMixin, PerformerRedrawState
from .storage_performer import PerformerStorageMixin

logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------
# Attention


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
            self.feature_map = PerformerHedgehogWeights(config)
        # Exact local window + linear part; the window never applies across sequences.
        self.local_window = config.local_window if attention_type == "favor" and not is_cross_attention else 0
        if self.local_window:
            # log g_h: the per-head weight of the linear part against the window (g = 1 at start).
            self.linear_log_weight = nn.Parameter(torch.zeros(config.num_attention_heads))
        # Decay-gated linear attention: the causal linear state forgets at a learned rate.
        self.decay = (PerformerDecayGate(config) if config.linear_decay and attention_type == "favor"
                      and self.is_causal else None)
        # The causal linear kernel is chosen here, once: its variant and its chunked sums' fast path.
        self.kernel = None
        if attention_type == "favor" and self.is_causal:
            self.kernel = CausalLinearKernel.for_layer(
                config.feature_map, self.local_window, config.sparse_cache_size if self.local_window else 0,
                config.chunk_size, config.use_fast_kernels)

    @property
    def feature_weights(self) -> Optional[Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
        """What the kernels take as `feature_weights`: the random projection, or the Hedgehog (query,
        key) maps."""
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
            log_decay = self.decay(key) if self.decay is not None else None  # from the key before the rotary
            if rotary is not None:
                query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
            out = self._self_attention(query, key, value, attention_mask, general_mask, layer_cache, log_decay)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))

    def _self_attention(self, query, key, value, attention_mask, general_mask, layer_cache, log_decay=None):
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
        feature_weights, feature_map, window = self.feature_weights, self.config.feature_map, self.local_window
        if not self.is_causal:
            if window:
                return windowed_linear_attention(query, key, value, feature_weights, feature_map, window,
                                                 self.linear_log_weight, current_mask, self.config.sink_tokens)
            return linear_attention(query, key, value, feature_weights, feature_map, current_mask)
        state = layer_cache.self_attention if layer_cache is not None else None
        out, state = self.kernel(q=query, k=key, v=value, feature_weights=feature_weights,
                                 linear_log_weight=self.linear_log_weight, key_padding_mask=current_mask, state=state,
                                 log_decay=log_decay)
        if layer_cache is not None:
            layer_cache.self_attention = state
        return out

    def _cross_attention(self, query, key_value_states, attention_mask, layer_cache):
        cached = layer_cache.cross_attention if layer_cache is not None else None
        if cached is None:
            if key_value_states is None:
                raise ValueError("cross-attention needs encoder_hidden_states (or a cache that already holds them)")
            key = self._heads(self.k_proj(key_value_states), self.k_norm)
            value = self._heads(self.v_proj(key_value_states))
            if self.attention_type == "favor":
                cached = linear_attention_state(key, value, self.feature_weights, self.config.feature_map,
                                                attention_mask)
            else:
                # The encoder padding is kept with the keys: decoding steps need not pass it again.
                padding = (attention_mask.to(torch.bool) if attention_mask is not None
                           else torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device))
                cached = (key, value, padding)
            if layer_cache is not None:
                layer_cache.cross_attention = cached
        if self.attention_type == "favor":
            return linear_attention_from_state(query, cached, self.feature_weights,
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
    """A stack of PerformerLayers over the model's embeddings (as T5's stacks share one embedding):
    checks and embeds its inputs, rotates them (`PerformerRotaryEmbedding`), runs the layers and,
    for pre-norm types, a final norm. The encoder of an encoder-decoder runs on its own this way
    (what generate() calls through `get_encoder()`)."""

    main_input_name = "input_ids"

    def __init__(self, config: PerformerConfig, embeddings: PerformerEmbeddings, num_layers: int, is_causal: bool,
                 has_cross_attention: bool, projection_offset: int):
        super().__init__()
        self.config = config
        self.is_causal = is_causal
        # Registered once, in the model that owns it: a second registration would save it twice.
        object.__setattr__(self, "embeddings", embeddings)
        types = config.attention_type if isinstance(config.attention_type, list) else [config.attention_type] * num_layers
        self.layers = nn.ModuleList(
            PerformerLayer(config, i, is_causal=is_causal, has_cross_attention=has_cross_attention,
                           attention_type=types[i], projection_offset=projection_offset) for i in range(num_layers)
        )
        self.norm = make_norm(config) if config.norm_type.startswith("pre_") else None
        self.rotary_emb = PerformerRotaryEmbedding(config) if config.position_embedding_type == "rotary" else None

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, position_ids=None,
                encoder_hidden_states=None, encoder_attention_mask=None, cache=None, output_hidden_states=None,
                **kwargs) -> BaseModelOutput:
        """input_ids [B, T] (or inputs_embeds [B, T, C]); attention_mask: padding [B, past + T] or a
        general [B, 1, T, S] mask (softmax layers); encoder_hidden_states [B, S, C] with its padding
        (cross-attention); cache: the decoder's PerformerCache, which counts the tokens taken in."""
        refuse_misleading_kwargs(kwargs, FORWARDS)
        hidden_states, padding_mask, general_mask, position_ids = self._embed(
            input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids,
            cache.get_seq_length() if cache is not None else 0)
        length = hidden_states.shape[1]
        rotary = None
        if self.rotary_emb is not None:  # [B, 1, T, D]: one rotation for every head
            rotary = tuple(t.unsqueeze(1) for t in self.rotary_emb(hidden_states, position_ids))
        cross_padding = encoder_padding(encoder_attention_mask, encoder_hidden_states)
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, padding_mask, general_mask, rotary, encoder_hidden_states,
                                  cross_padding, cache)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        if self.norm is not None:
            hidden_states = self.norm(hidden_states)
            if output_hidden_states:
                all_hidden[-1] = hidden_states
        if cache is not None:
            cache.advance(length)
        return BaseModelOutput(last_hidden_state=hidden_states,
                               hidden_states=tuple(all_hidden) if output_hidden_states else None)

    def _embed(self, input_ids, inputs_embeds, attention_mask, position_ids, token_type_ids, past_length):
        """The one place a forward's inputs are checked (`inputs_performer`), then embedded."""
        batch, length, device = check_token_inputs(self.config, input_ids, inputs_embeds)
        # Values are checked when a sequence starts; decoding steps after the prefill (tokens that
        # generate() picked itself) skip the host syncs.
        check_values = checking_values(device) and past_length == 0
        padding_mask, general_mask = split_masks(attention_mask, batch, length, past_length + length, device,
                                                 check_values)
        given_positions = position_ids is not None
        if position_ids is None:
            position_ids = _positions(padding_mask, batch, length, past_length, device)
        elif tuple(position_ids.shape) not in ((batch, length), (1, length)):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected {(batch, length)} or (1, {length})")
        else:
            position_ids = position_ids.expand(batch, length)
        check_embedding_inputs(self.config, input_ids, position_ids, token_type_ids, batch, length, check_values,
                               given_positions=given_positions)
        hidden = self.embeddings(input_ids, inputs_embeds, position_ids, token_type_ids)
        return hidden, padding_mask, general_mask, position_ids


# --------------------------------------------------------------------------------------------
# Pretrained base


def _decoder_cache(cache, use_cache, num_layers):
    """The cache a decoder forward reads and updates (a new one when use_cache asks for it)."""
    if use_cache and cache is None:
        cache = PerformerCache(num_layers)
    if cache is not None and not isinstance(cache, PerformerCache):
        raise TypeError(f"Performer decoders need a PerformerCache, got {type(cache).__name__}")
    return cache


def _positions(padding_mask, batch, length, past_length, device):
    """Position ids [B, T]: counted over real tokens when a padding mask is given, so that
    left-padded prompts start at 0."""
    if padding_mask is None:
        return torch.arange(past_length, past_length + length, device=device).expand(batch, length)
    positions = padding_mask.long().cumsum(-1) - 1
    return positions.clamp_min(0)[:, -length:]


class PerformerPreTrainedModel(PerformerStorageMixin, PerformerRedrawMixin, PerformerKernelMixin, PreTrainedModel):
    """The base of every Performer head: transformers' `PreTrainedModel` with the package's saving
    and loading (`save_pretrained` writes the modeling files and checksums; `from_pretrained`
    verifies them, renames one-stack checkpoints and rebuilds missing projections: see
    `storage_performer`), its projection redraws (`redraw_projections`, `redraw_for_step`,
    `redraw_on_steps`: see `redraw_performer`) and its kernel switches (`set_chunk_kernel`,
    `set_sparse_cache_size`: see `attention_kernels`)."""

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

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, PerformerAttention):
            if module.projection is not None:
                init.copy_(module.projection, module.draw_projection(0))
            if module.linear_log_weight is not None:
                init.zeros_(module.linear_log_weight)
        elif isinstance(module, PerformerDecayGate):
            init.copy_(module.bias, decay_bias(decay_rates(module.bias.shape[0])))
            if module.weight is not None:
                init.zeros_(module.weight)
        elif isinstance(module, PerformerHedgehogWeights):
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


class PerformerModel(NotGenerative, PerformerPreTrainedModel):
    """The bare stack: bidirectional encoder, causal decoder (`is_decoder`), or encoder-decoder
    (`is_encoder_decoder`)."""

    def __init__(self, config: PerformerConfig):
        config._normalise_and_validate()  # a head's copy, or a config changed since it was made
        super().__init__(config)
        self.embeddings = PerformerEmbeddings(config)
        sizes = config.stack_sizes()
        # `encoder`: bidirectional stack; `decoder`: causal stack (with cross-attention in an
        # encoder-decoder, or with add_cross_attention). A decoder-only model has no encoder.
        self.encoder = self.decoder = None

        def stack(num_layers, is_causal, has_cross_attention, projection_offset=0):
            return PerformerStack(config, self.embeddings, num_layers, is_causal, has_cross_attention, projection_offset)

        if config.is_encoder_decoder:
            self.encoder = stack(sizes["encoder"], is_causal=False, has_cross_attention=False)
            self.decoder = stack(sizes["decoder"], is_causal=True, has_cross_attention=True,
                                 projection_offset=DECODER_PROJECTION_OFFSET)
        elif config.is_decoder:
            self.decoder = stack(config.num_hidden_layers, is_causal=True,
                                 has_cross_attention=config.add_cross_attention)
        else:
            self.encoder = stack(config.num_hidden_layers, is_causal=False, has_cross_attention=False)
        if config.linear_decay and self.encoder is not None:
            raise ValueError(
                f"linear_decay={config.linear_decay!r} gates a causal state, and this model has a bidirectional "
                "(encoder) stack, whose linear attention sums every key at once: use linear_decay=None, or a "
                "decoder-only model (PerformerForCausalLM, or is_decoder=True)"
            )
        self.redraw_state = PerformerRedrawState()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def get_encoder(self, modality=None):
        return self.encoder

    def encode(self, input_ids=None, attention_mask=None, inputs_embeds=None, token_type_ids=None, position_ids=None,
               output_hidden_states=False) -> BaseModelOutput:
        """The bidirectional encoder on its own inputs -> BaseModelOutput."""
        if self.encoder is None:
            raise TypeError("this model has no bidirectional encoder (a decoder-only model): call the model instead")
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
        refuse_misleading_kwargs(kwargs, FORWARDS)
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
        cache = _decoder_cache(cache, use_cache, len(stack.layers))
        out = stack(input_ids, attention_mask, inputs_embeds, token_type_ids, position_ids, encoder_hidden_states,
                    encoder_attention_mask, cache, output_hidden_states)
        return PerformerModelOutput(last_hidden_state=out.last_hidden_state, cache=cache if use_cache else None,
                                    hidden_states=out.hidden_states)

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
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        cache = _decoder_cache(cache, use_cache, len(self.decoder.layers))
        out = self.decoder(decoder_input_ids, decoder_attention_mask, decoder_inputs_embeds, None, decoder_position_ids,
                           encoder_hidden, attention_mask, cache, output_hidden_states)
        return Seq2SeqModelOutput(
            last_hidden_state=out.last_hidden_state, cache=cache if use_cache else None,
            decoder_hidden_states=out.hidden_states,
            encoder_last_hidden_state=encoder_hidden, encoder_hidden_states=encoder_outputs.hidden_states,
        )


@dataclass
class PerformerModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    cache: Optional[PerformerCache] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


# --------------------------------------------------------------------------------------------
# Heads


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


class PerformerForMaskedLM(NotGenerative, PerformerPreTrainedModel):
    """A bidirectional stack and BERT's LM head (dense, activation, LayerNorm, the vocabulary
    projection tied to the input embeddings). `labels`: the token to predict at each masked
    position, -100 elsewhere. Loads a base checkpoint of either stack."""

    _single_stack = "encoder"
    _tied_weights_keys = {"lm_head.decoder.weight": "model.embeddings.word_embeddings.weight"}

    def __init__(self, config: PerformerConfig):
        config = config.with_changes(is_decoder=False, is_encoder_decoder=False)
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


class PerformerForSequenceClassification(NotGenerative, PerformerPreTrainedModel):
    """Pools the encoder output (first token, or mean over real tokens), then classifies or
    regresses; `problem_type` as in transformers."""

    _single_stack = "encoder"
    # Its loss is a mean over the batch (no `num_items_in_batch`): Trainer must divide it by the
    # accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: PerformerConfig):
        config = config.with_changes(is_decoder=False, is_encoder_decoder=False)
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
            check_sequence_labels(self.config.problem_type, self.num_labels, logits, labels)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class _PerformerGenerativeModel(PerformerPreTrainedModel, GenerationMixin):
    """A PerformerModel with the stack flags in `_stack_flags` and a bias-free vocabulary
    projection tied to the input embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.word_embeddings.weight"}
    _stack_flags: dict = {}

    def __init__(self, config: PerformerConfig):
        config = config.with_changes(**self._stack_flags)
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
    """A causal stack and a vocabulary projection tied to the input embeddings: `generate()` with a
    constant-size `PerformerCache` (greedy, sampling, beam search), `labels` as in transformers'
    causal LMs (position t predicts token t+1). Loads a base checkpoint of either stack, and
    converted Llama-family, GPT-2 and GGUF models (`conversion.convert_to_performer`)."""

    _stack_flags = {"is_decoder": True, "is_encoder_decoder": False}
    _single_stack = "decoder"

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """Continuous batching with one constant-size state per request (`batching.PerformerBatchManager`,
        the interface of transformers' manager): what `generate_batch` and `transformers serve
        --continuous-batching` run. The config's max_requests_per_batch / max_batch_tokens set the
        batch size and the prompt chunk absorbed between two decoding steps."""
        from .batching import PerformerBatchManager

        settings = continuous_batching_config
        return PerformerBatchManager(self, generation_config,
                                     max_batch_size=getattr(settings, "max_requests_per_batch", None) or 32,
                                     prefill_chunk=getattr(settings, "max_batch_tokens", None))

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


# Every forward whose argument names a near miss is checked against (`refuse_misleading_kwargs`).
FORWARDS = (PerformerModel, PerformerForMaskedLM, PerformerForSequenceClassification, PerformerForCausalLM,
            PerformerForConditionalGeneration)
# Task -> head: the one map that training, conversion, model cards and the tests read.
TASK_HEADS = {
    "base": PerformerModel,
    "mlm": PerformerForMaskedLM,
    "classification": PerformerForSequenceClassification,
    "clm": PerformerForCausalLM,
    "seq2seq": PerformerForConditionalGeneration,
}

__all__ = [
    "PerformerPreTrainedModel",
    "PerformerModel",
    "PerformerForMaskedLM",
    "PerformerForSequenceClassification",
    "PerformerForCausalLM",
    "PerformerForConditionalGeneration",
    "shift_tokens_right",
    "TASK_HEADS",
]
