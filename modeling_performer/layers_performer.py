"""The building blocks of a Performer model besides attention: norms and the residual connection,
rotary positions, the feed-forward block, the learned Hedgehog feature maps, the decay gate of
decay-gated linear attention, and the embeddings. Each is a superset of what BERT, GPT-2 and the
Llama family use, so their weights convert exactly."""

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_performer import PerformerConfig
from .feature_maps import hedgehog_init, hedgehog_key_init


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
# Rotary positions


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
    """position_ids: [B, T] -> cos, sin: [B, T, D] (times `scaling`), computed once per forward for
    every layer: cos repeated over both halves, sin with the first half negated (what `apply_rotary`
    takes, with a head axis: [B, 1, T, D])."""
    angles = position_ids.float()[:, :, None] * inv_freq
    cos, sin = angles.cos() * scaling, angles.sin() * scaling
    return torch.cat([cos, cos], dim=-1).to(dtype), torch.cat([-sin, sin], dim=-1).to(dtype)


class PerformerRotaryEmbedding(nn.Module):
    """Rotary positions as modeling_llama.py keeps them: the inverse frequencies are a buffer that is
    never saved (`inv_freq`, and `original_inv_freq`, which transformers' weight init fills again
    after from_pretrained); forward(x, position_ids [B, T]) -> (cos, sin) [B, T, D] in x's dtype
    (`rotary_cos_sin`), computed once per forward for every layer. Dynamic NTK scaling computes the
    frequencies again for positions beyond max_position_embeddings, at the length the positions
    reach, as transformers does for a sequence that grows."""

    def __init__(self, config: PerformerConfig, device=None):
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        inv_freq, self.attention_scaling = rotary_frequencies(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: PerformerConfig, device=None, seq_len=None):
        """(inverse frequencies, scaling) of the unscaled rotary: what transformers' weight init
        calls for rope_type 'default'."""
        return rotary_frequencies(config, device)

    def _apply(self, fn, recurse=True):
        # Casting the model (.half(), .to(torch.bfloat16)) would round the frequencies: they are
        # computed again in float32, once, where the cast put them.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            inv_freq, _ = rotary_frequencies(self.config, self.inv_freq.device)
            self.inv_freq, self.original_inv_freq = inv_freq, inv_freq.clone()
        return self

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, scaling = self.inv_freq.to(position_ids.device), self.attention_scaling
        if self.rope_type == "dynamic" and not torch.compiler.is_compiling():
            length = int(position_ids.max()) + 1
            if length > self.config.max_position_embeddings:
                inv_freq, scaling = rotary_frequencies(self.config, position_ids.device, seq_len=length)
        return rotary_cos_sin(position_ids, inv_freq, scaling, x.dtype)


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
# Learned feature maps


class PerformerHedgehogWeights(nn.Module):
    """The learned weights of one attention layer's Hedgehog maps: query_weight [H, D, F], one map per
    query head, and key_weight [H_kv, D, F], one per key/value head (whose keys feed one shared
    state). The map itself, the function of a query or key and these weights, is
    `feature_maps.HedgehogFeatureMap`. A module of its own so that tools can name it: the layer holds
    it as `feature_map` (peft's `modules_to_save=["feature_map"]`, and the name in saved weights)."""

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


PerformerHedgehogMap = PerformerHedgehogWeights  # its earlier name


# --------------------------------------------------------------------------------------------
# Decay gate


def decay_bias(rates: torch.Tensor) -> torch.Tensor:
    """The gate bias x with softplus(x) = rate: log a = -rate per step (rate > 0)."""
    rates = rates.double()
    return (rates + torch.log(-torch.expm1(-rates))).float()  # log(expm1(rate)), exact for tiny rates too


def decay_rates(heads: int) -> torch.Tensor:
    """Starting rates of a model trained from scratch: log-spaced from 1/16 to 1/1024 per step over the
    key/value heads (half-lives of about 11 to 710 tokens), a spread of memories as in RetNet."""
    if heads == 1:
        return torch.tensor([2.0**-7])
    return torch.logspace(-4, -10, heads, base=2.0)


class PerformerDecayGate(nn.Module):
    """The learned forgetting of a decay-gated linear layer (`linear_decay`): at each step t and
    key/value head h the state is multiplied by a_{t,h} = exp(-softplus(x_{t,h})) in (0, 1), with
    x = bias_h ("head") or x = k_t . weight_h + bias_h ("data", from the head's key before the rotary;
    weight starts at 0, so every gate starts as its head's). softplus keeps a < 1 with a gradient at
    every rate, and for tiny rates (x << 0) it is exp(x): an optimiser's step in x changes the rate by
    a factor, so a gate started almost open can still learn a short memory."""

    def __init__(self, config: PerformerConfig):
        super().__init__()
        self.bias = nn.Parameter(decay_bias(decay_rates(config.num_key_value_heads)))
        self.weight = (nn.Parameter(torch.zeros(config.num_key_value_heads, config.head_dim))
                       if config.linear_decay == "data" else None)

    def forward(self, key: torch.Tensor) -> torch.Tensor:
        """key: [B, H_kv, T, D] -> log gates [B, H_kv, T] fp32 (<= 0)."""
        batch, _, length, _ = key.shape
        if self.weight is None:
            x = self.bias.float()[None, :, None].expand(batch, -1, length)
        else:
            x = torch.einsum("bhtd,hd->bht", key.float(), self.weight.float()) + self.bias.float()[:, None]
        return -F.softplus(x)


# --------------------------------------------------------------------------------------------
# Embeddings


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

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None, token_type_ids=None):
        """Inputs as `PerformerModel._embed` checked them (`inputs_performer.check_embedding_inputs`)."""
        embeddings = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if self.position_embeddings is not None:
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        if self.LayerNorm is not None:
            embeddings = self.LayerNorm(embeddings)
        return self.dropout(embeddings)
