"""Configuration of Performer models: one config class serves every head (as BART's does)."""

import copy
import difflib
from typing import Any

from transformers import PreTrainedConfig
from transformers.utils import logging

from .feature_maps import FEATURE_MAPS

logger = logging.get_logger(__name__)

ATTENTION_TYPES = ("favor", "softmax")
# Names used by earlier Performer code bases, accepted and normalised.
ATTENTION_TYPE_ALIASES = {"linear": "favor", "causal_linear": "favor", "performer": "favor", "full": "softmax"}
HIDDEN_ACTS = ("gelu", "gelu_new", "relu", "silu", "swiglu", "geglu", "reglu")
NORM_TYPES = ("pre_layernorm", "post_layernorm", "rezero", "pre_scalenorm", "pre_rmsnorm")
POSITION_TYPES = ("rotary", "learned")
POOLING_TYPES = ("cls", "mean")
PROJECTION_TYPES = ("orthogonal", "iid")
LINEAR_DECAYS = (None, "head", "data")

# Keys that transformers itself writes into or passes through a config; anything else that is not
# a field or an alias is a typo and is rejected rather than silently stored.
_TRANSFORMERS_KEYS = {
    "model_type", "transformers_version", "architectures", "auto_map", "torch_dtype", "num_labels",
    "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
    "_attn_implementation", "_attn_implementation_autoset", "experts_implementation", "per_layer_config",
    "use_return_dict", "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "pruned_heads", "torchscript", "task_specific_params", "finetuning_task", "tokenizer_class",
    "prefix", "sep_token_id", "cls_token_id", "mask_token_id", "unk_token_id", "base_model_prefix",
    # Folded into rope_parameters by transformers (names of earlier configs and of Llama's).
    "rope_theta", "rope_scaling",
}
# What transformers' rope utilities compute besides the default rotary (modeling_rope_utils).
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


class PerformerConfig(PreTrainedConfig):
    r"""Configuration for every Performer head.

    Canonical transformers names are used throughout; names from earlier Performer code bases are
    accepted as aliases (`d_model`, `num_layers`, `num_heads`, `activation`, `nb_features`).
    Invalid values and unknown keys raise `ValueError` naming the valid choices.

    Example:

    ```python
    >>> from modeling_performer import PerformerConfig, PerformerForCausalLM
    >>> config = PerformerConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4)
    >>> model = PerformerForCausalLM(config)
    >>> model.config.num_hidden_layers
    4

    ```
    """

    model_type = "performer"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "d_model": "hidden_size",
        "num_layers": "num_hidden_layers",
        "num_heads": "num_attention_heads",
        "activation": "hidden_act",
        "nb_features": "num_random_features",
    }

    vocab_size: int = 32000
    hidden_size: int = 512
    num_hidden_layers: int = 6
    # Seq2seq stacks; None means num_hidden_layers.
    encoder_layers: int | None = None
    decoder_layers: int | None = None
    num_attention_heads: int = 8
    # Grouped-query attention: heads of keys/values, each shared by num_attention_heads /
    # num_key_value_heads query heads (1 = multi-query). None = num_attention_heads. Linear layers keep
    # one state per key/value head, so the decoding cache shrinks by the same factor.
    num_key_value_heads: int | None = None
    # Width of one head; None = hidden_size / num_attention_heads (Qwen3 sets it explicitly).
    head_dim: int | None = None
    # Biases of q/k/v_proj, of o_proj (None = as attention_bias; Qwen2 has q/k/v biases only), of the MLP.
    attention_bias: bool = True
    attention_output_bias: bool | None = None
    mlp_bias: bool = True
    # RMSNorm of every query and key head before the rotary (Qwen3).
    qk_norm: bool = False
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    # "favor" | "softmax", or one entry per layer for a hybrid stack.
    attention_type: str | list[str] = "favor"
    # Cross-attention sees a fixed encoder output once: exact softmax is cheap enough by default.
    cross_attention_type: str = "softmax"
    # Linear-attention features: "softmax" (FAVOR+ random features), "relu", or "hedgehog" (learned
    # per-head maps [softmax(xW), softmax(-xW)], trained like any weight or fitted by attention transfer).
    feature_map: str = "softmax"
    # Width F of each half of a Hedgehog map (2F features per head); None = the head dimension.
    hedgehog_dim: int | None = None
    # Hedgehog key maps with one more column u: each key's features scaled by a learned
    # exp(16 tanh(k.u / 16)) (1 at the start), so that keys can draw unequal total weight as in softmax.
    hedgehog_key_scale: bool = False
    # Exact softmax over the keys with |i - j| < local_window (j <= i when causal), the linear part
    # for the rest, under one normaliser. 0 = off. Self-attention of linear layers only.
    local_window: int = 0
    # Causal layers with a window: also keep exactly the sparse_cache_size key/value pairs (per
    # key/value head) that left the window worst reproduced by the linear state; the rest fold into
    # it. Training-free, constant memory (window + cache + state). 0 = off. Decoders only: an
    # encoder's window is two-sided and its linear part sees every key.
    sparse_cache_size: int = 0
    # Non-causal layers with a window: the first sink_tokens real tokens of every sequence (e.g.
    # [CLS]) are attended exactly by every query, beside the window (attention sinks: heads of
    # BERT-like models give [CLS] a tenth or more of their weight from everywhere). 0 = off. Encoders
    # only: a model without a non-causal stack refuses it.
    sink_tokens: int = 0
    # Decay-gated linear attention (the causal linear layers of a decoder): at every step the state is
    # multiplied by a learned gate a in (0, 1] before the new key is added, so that old keys fade instead
    # of crowding a state that only adds. None = the additive state; "head": one learned rate per
    # key/value head (RetNet, simple GLA); "data": a rate per token and key/value head computed from
    # its key (GLA, Mamba2). log a = -softplus(x) (`layers_performer.PerformerDecayGate`).
    linear_decay: str | None = None
    num_random_features: int = 256
    projection_type: str = "orthogonal"
    # Redraw the random projection every this many training steps (0 = never). Eval never redraws.
    feature_redraw_interval: int = 0
    # Seed of every projection draw: identical projections on every process.
    projection_seed: int = 0
    # Chunk length of causal FAVOR+ (a C x C product per chunk plus a running state). 64, as fla's chunk
    # kernels use: on CPU a SmolLM2-shaped Hedgehog + window model prefills 8k tokens 13% faster than with 128.
    chunk_size: int = 64
    # Causal linear attention on flash-linear-attention's Triton kernels where they can run (a CUDA
    # device, `pip install "modeling-performer[cuda]"`); False forces the PyTorch kernels everywhere.
    use_fast_kernels: bool = True
    norm_type: str = "pre_layernorm"
    position_embedding_type: str = "rotary"
    max_position_embeddings: int = 2048
    # Rotary frequencies in transformers' format: {"rope_type": "default" | "linear" | "dynamic" | "yarn" |
    # "llama3", "rope_theta": 10000.0, "factor": ...}, computed by transformers' rope utilities. `rope_theta=`
    # (and Llama's older `rope_scaling=`) are accepted and folded in.
    rope_parameters: dict | None = None
    # Token types (segment embeddings, as BERT); 0 disables them.
    type_vocab_size: int = 0
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout: float | None = None
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    classifier_pooling: str = "cls"
    tie_word_embeddings: bool = True
    is_decoder: bool = False
    # Decoder-only stack with cross-attention to an external encoder output.
    add_cross_attention: bool = False
    is_encoder_decoder: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    decoder_start_token_id: int | None = None

    def __post_init__(self, **kwargs: Any):
        unknown = self._unknown_keys(kwargs)
        if unknown:
            valid = sorted(f.name for f in self.__dataclass_fields__.values() if not f.name.startswith("_"))
            raise ValueError(f"Unknown PerformerConfig key(s) {unknown}. Valid keys: {valid} (aliases: {sorted(self.attribute_map)})")
        super().__post_init__(**kwargs)
        if self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.bos_token_id if self.bos_token_id is not None else self.pad_token_id
        self._normalise_and_validate()

    @classmethod
    def _unknown_keys(cls, keys) -> list[str]:
        allowed = set(cls.attribute_map) | _TRANSFORMERS_KEYS | set(cls.__dataclass_fields__)
        return sorted(k for k in keys if k not in allowed and not cls._is_generation_key(k))

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Loads a saved config. Unknown keys are typos when typed into the constructor, but in a saved
        config.json they are attributes someone set on the config before saving: they are kept (with a
        warning), never dropped, and the folder still loads."""
        other = config_dict.get("model_type")
        if other is not None and other != cls.model_type:
            raise ValueError(
                f"This config.json describes a {other!r} model, not a Performer (model_type {cls.model_type!r}): load it "
                "with its own class, or convert a BERT/RoBERTa/GPT-2 checkpoint with scripts/convert_to_performer.py"
            )
        extra = {k: config_dict[k] for k in cls._unknown_keys(config_dict)}
        valid = [f for f in cls.__dataclass_fields__ if not f.startswith("_")] + list(cls.attribute_map)
        for key in extra:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.9)
            if close:
                raise ValueError(f"Unknown PerformerConfig key {key!r} in the saved config: did you mean {close[0]!r}?")
        if extra:
            logger.warning(f"PerformerConfig: keeping attribute(s) {sorted(extra)} that are not Performer options")
            config_dict = {k: v for k, v in config_dict.items() if k not in extra}
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        for key, value in extra.items():
            setattr(config, key, value)
        return result

    def with_changes(self, **changes) -> "PerformerConfig":
        """This config with `changes` applied, checked as the constructor checks every value (the
        heads derive their stack's config this way). Returns `self` when nothing changes; never
        changes `self`."""
        unknown = sorted(key for key in changes if not hasattr(self, key))
        if unknown:
            raise ValueError(f"Unknown PerformerConfig key(s) {unknown}")
        if all(getattr(self, key) == value for key, value in changes.items()):
            return self
        config = copy.deepcopy(self)
        for key, value in changes.items():
            setattr(config, key, value)
        config._normalise_and_validate()
        return config

    @staticmethod
    def _is_generation_key(key: str) -> bool:
        from transformers import GenerationConfig

        return key in GenerationConfig._get_default_generation_params()

    def _normalise_and_validate(self):
        def choose(name, value, valid):
            if value not in valid:
                raise ValueError(f"Invalid {name}={value!r}; valid values: {list(valid)}")
            return value

        def count(name, meaning):  # an integer >= 0 (bool refused)
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 ({meaning}), got {value!r}")

        def attention(value):
            value = ATTENTION_TYPE_ALIASES.get(value, value)
            return choose("attention_type", value, ATTENTION_TYPES)

        if isinstance(self.attention_type, (list, tuple)):
            self.attention_type = [attention(a) for a in self.attention_type]
            for stack, n in self.stack_sizes().items():
                if len(self.attention_type) != n:
                    raise ValueError(
                        f"attention_type lists one entry per layer: got {len(self.attention_type)} entries for the "
                        f"{n}-layer {stack} stack"
                    )
        else:
            self.attention_type = attention(self.attention_type)
        self.cross_attention_type = ATTENTION_TYPE_ALIASES.get(self.cross_attention_type, self.cross_attention_type)
        choose("cross_attention_type", self.cross_attention_type, ATTENTION_TYPES)
        choose("hidden_act", self.hidden_act, HIDDEN_ACTS)
        choose("feature_map", self.feature_map, tuple(FEATURE_MAPS))
        choose("norm_type", self.norm_type, NORM_TYPES)
        choose("position_embedding_type", self.position_embedding_type, POSITION_TYPES)
        choose("classifier_pooling", self.classifier_pooling, POOLING_TYPES)
        choose("projection_type", self.projection_type, PROJECTION_TYPES)
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_random_features", "chunk_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.hedgehog_dim is not None and (not isinstance(self.hedgehog_dim, int) or self.hedgehog_dim < 1):
            raise ValueError(f"hedgehog_dim must be a positive integer or None (= head dimension), got {self.hedgehog_dim!r}")
        if not isinstance(self.hedgehog_key_scale, bool):
            raise ValueError(f"hedgehog_key_scale must be True or False, got {self.hedgehog_key_scale!r}")
        if self.hedgehog_key_scale and self.feature_map != "hedgehog":
            raise ValueError(f"hedgehog_key_scale scales the keys of learned Hedgehog maps, but feature_map="
                             f"{self.feature_map!r}: set feature_map='hedgehog'")
        count("local_window", "0 = no window")
        count("sparse_cache_size", "0 = off")
        if self.sparse_cache_size and not self.local_window:
            raise ValueError(
                f"sparse_cache_size={self.sparse_cache_size} keeps pairs that left the local window, but local_window=0: "
                "set local_window > 0 (e.g. 64) as well"
            )
        count("sink_tokens", "0 = off")
        if self.sink_tokens and not self.local_window:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} adds exact keys to the local window, but local_window=0: set "
                "local_window > 0 (e.g. 64) as well"
            )
        if self.sink_tokens and self.is_decoder and not self.is_encoder_decoder:
            raise ValueError(
                f"sink_tokens={self.sink_tokens} applies to non-causal (encoder) attention, and this model is a "
                "decoder only: set sink_tokens=0 (a decoder's window can keep pairs exactly with sparse_cache_size)"
            )
        types = self.attention_type if isinstance(self.attention_type, list) else [self.attention_type]
        if self.local_window and "favor" not in types:
            raise ValueError(
                f"local_window={self.local_window} combines an exact window with linear attention, but every layer "
                "uses attention_type='softmax' (already exact): set local_window=0, or make some layers 'favor'"
            )
        choose("linear_decay", self.linear_decay, LINEAR_DECAYS)
        if self.linear_decay and "favor" not in types:
            raise ValueError(
                f"linear_decay={self.linear_decay!r} gates the state of linear attention, but every layer uses "
                "attention_type='softmax': set linear_decay=None, or make some layers 'favor'"
            )
        if self.linear_decay and self.sparse_cache_size:
            raise ValueError(
                f"linear_decay={self.linear_decay!r} with sparse_cache_size={self.sparse_cache_size}: the sparse "
                "cache scores pairs against an additive state and is not defined for a decaying one; set "
                "sparse_cache_size=0 (a decaying state keeps recent keys by itself) or linear_decay=None"
            )
        if not isinstance(self.use_fast_kernels, bool):
            raise ValueError(f"use_fast_kernels must be True or False, got {self.use_fast_kernels!r}")
        for name in ("encoder_layers", "decoder_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        for name in ("head_dim", "num_key_value_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): each key/value head serves a whole group of query heads"
            )
        self._validate_rope()
        if self.feature_redraw_interval < 0:
            raise ValueError(f"feature_redraw_interval must be >= 0 (0 = never), got {self.feature_redraw_interval}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be an integer >= 0 (0 = no token types), got {self.type_vocab_size!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name, None)
            ids = value if isinstance(value, (list, tuple)) else [value]
            if any(i is not None and not (isinstance(i, int) and 0 <= i < self.vocab_size) for i in ids):
                raise ValueError(f"{name}={value!r} is outside the vocabulary [0, {self.vocab_size})")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    def _validate_rope(self):
        """rope_parameters as transformers standardised it (rope_theta folded in), restricted to the
        types this model computes, each with the keys its transformers function needs."""
        rope = dict(self.rope_parameters or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", 10000.0)
        self.rope_parameters = rope
        if rope["rope_type"] not in ROPE_TYPES:
            raise ValueError(f"Invalid rope_parameters['rope_type']={rope['rope_type']!r}; valid values: {list(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters['partial_rotary_factor']={rope['partial_rotary_factor']} is not supported: the rotary "
                "turns every dimension of a head"
            )
        if self.position_embedding_type != "rotary":
            # Learned positions: no rotary settings (transformers' checks of them, which also run when the config
            # is saved, would refuse head dimensions that only a rotary needs even).
            self.rope_parameters = None
            return
        if self.head_dim % 2:
            raise ValueError(
                f"rotary positions rotate pairs of dimensions and need an even head dimension, got {self.head_dim}; "
                "change head_dim (or hidden_size / num_attention_heads), or use position_embedding_type='learned'"
            )
        try:
            self.validate_rope()
        except KeyError as error:
            raise ValueError(f"rope_parameters of type {rope['rope_type']!r} lack {error}") from error

    @property
    def attention_output_has_bias(self) -> bool:
        return self.attention_bias if self.attention_output_bias is None else self.attention_output_bias

    def stack_sizes(self) -> dict[str, int]:
        if self.is_encoder_decoder:
            return {"encoder": self.encoder_layers or self.num_hidden_layers,
                    "decoder": self.decoder_layers or self.num_hidden_layers}
        return {"decoder" if self.is_decoder else "encoder": self.num_hidden_layers}

    def layer_attention_type(self, layer_idx: int) -> str:
        if isinstance(self.attention_type, list):
            return self.attention_type[layer_idx]
        return self.attention_type
