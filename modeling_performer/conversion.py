"""Conversion of pretrained softmax Transformers (BERT, RoBERTa, MiniLM, GPT-2, the Llama family:
Llama, Mistral, Qwen2, Qwen3; or a Performer trained with softmax attention) into Performers.
A decoder may also come as a GGUF file (llama.cpp's format, quantized or not): transformers
dequantizes it to float32 and the same mapping applies.

The converted model keeps every weight of the source; only the attention computation changes
(`attention_type="favor"`), or nothing at all (`attention_type="softmax"`, which reproduces the
source's hidden states and is how the mapping is tested).

    model, tokenizer = convert_to_performer("path/to/bert", attention_type="favor")
    model, tokenizer = convert_to_performer("path/to/SmolLM2-135M-Instruct.Q4_1.gguf", attention_type="softmax")
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch
from transformers.utils import logging

from .checkpoint_performer import fresh_stage, publish_folder
from .configuration_performer import PerformerConfig
from .layers_performer import PerformerDecayGate, decay_bias
from .modeling_performer import TASK_HEADS, PerformerForConditionalGeneration

logger = logging.get_logger(__name__)

ENCODER_TYPES = ("bert", "roberta")
# Pre-RMSNorm decoders with a gated MLP, rotary positions and grouped key/value heads.
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DECODER_TYPES = ("gpt2", *LLAMA_TYPES)
SUPPORTED_TYPES = ENCODER_TYPES + DECODER_TYPES
# The heads a conversion makes: every task of TASK_HEADS but seq2seq. The longer names that
# `head=` also takes are aliases of two of them.
HEADS = {task: cls for task, cls in TASK_HEADS.items() if task != "seq2seq"}
HEAD_ALIASES = {"masked-lm": "mlm", "causal-lm": "clm"}
# Source architecture (config.architectures[0]) -> the Performer head it becomes by default.
DEFAULT_HEADS = {
    "BertModel": "base", "BertForMaskedLM": "mlm", "BertForPreTraining": "mlm",
    "BertForSequenceClassification": "classification",
    "RobertaModel": "base", "RobertaForMaskedLM": "mlm", "RobertaForSequenceClassification": "classification",
    "GPT2Model": "base", "GPT2LMHeadModel": "clm",
    "LlamaModel": "base", "LlamaForCausalLM": "clm", "MistralModel": "base", "MistralForCausalLM": "clm",
    "Qwen2Model": "base", "Qwen2ForCausalLM": "clm", "Qwen3Model": "base", "Qwen3ForCausalLM": "clm",
}
# GGUF `general.architecture` values whose transformers model type converts (llama.cpp stores
# Mistral checkpoints as "llama").
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")
# The gated MLP's activation -> the Performer's gated unit.
GATED_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu"}
class ConversionError(ValueError):
    """The source checkpoint cannot be converted (unsupported architecture or option)."""


# Weights that a softmax source lacks (or a linear source has and a softmax target drops): drawn from
# the seed or set to their starting values, to be fitted by attention transfer.
LINEAR_ONLY_WEIGHTS = ("projection", "draws", "training_forwards", "feature_map.query_weight", "feature_map.key_weight",
                       "linear_log_weight", "decay.bias", "decay.weight")
# The rate a converted model's decay gates start at: log a = -2^-20 per step, so that the oldest key of
# an 8,192-token context keeps exp(-2^-7) = 99.2% of its weight (the converted model is the ungated
# one to that). Fitting moves it: softplus(x) ~ exp(x) there, so every step of the optimiser in x
# changes the rate by a factor.
CONVERSION_DECAY_RATE = 2.0**-20


def start_gates_open(model, fresh_keys):
    """Sets the decay gates a conversion did not load (`fresh_keys`: the missing state-dict keys) to
    the almost open gate of CONVERSION_DECAY_RATE, the same for every token (data gates' key weights
    0), so that the converted model starts at the ungated conversion instead of a model trained from
    scratch's spread of memories. Returns the number of gates set."""
    fresh = set(fresh_keys)
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, PerformerDecayGate) and f"{name}.bias" in fresh:
            with torch.no_grad():
                module.bias.copy_(decay_bias(torch.full_like(module.bias, CONVERSION_DECAY_RATE)))
                if module.weight is not None:
                    module.weight.zero_()
            count += 1
    return count


def _convert_performer(source, config, attention_type, num_random_features, head, overrides):
    """A saved Performer (its config: `config`) with other attention options (a softmax Performer
    made linear). `head` is "auto" or one of HEADS."""
    from transformers import AutoTokenizer

    classes = {cls.__name__: cls for cls in (*HEADS.values(), PerformerForConditionalGeneration)}
    architecture = (config.architectures or ["PerformerModel"])[0]
    if head == "auto":
        if architecture not in classes:
            raise ConversionError(f"{source}: unknown Performer architecture {architecture!r}")
        cls = classes[architecture]
    else:
        cls = HEADS[head]
    source_model = cls.from_pretrained(source, dtype=torch.float32)
    # use_cache: training (Trainer) saves it off; the converted model decodes with its cache again.
    values = {k: v for k, v in config.to_diff_dict().items()
              if k not in ("architectures", "auto_map", "dtype", "use_cache")}
    values["attention_type"] = attention_type
    if num_random_features is not None:
        values["num_random_features"] = num_random_features
    values.update(overrides)
    try:
        target_config = PerformerConfig(**{k: v for k, v in values.items() if k != "model_type"})
    except (TypeError, ValueError) as error:
        raise ConversionError(f"the new attention options are not valid for {source}: {error}") from error
    model = cls(target_config)
    result = model.load_state_dict(source_model.state_dict(), strict=False)
    lost = [k for k in [*result.missing_keys, *result.unexpected_keys] if not k.endswith(LINEAR_ONLY_WEIGHTS)]
    if lost:
        raise ConversionError(f"{source}: weights that do not carry over to the new attention: {lost[:8]}")
    start_gates_open(model, result.missing_keys)
    model.tie_weights()
    return model.eval(), AutoTokenizer.from_pretrained(source)


def check_gguf(path: str) -> dict:
    """Reads a GGUF file's header and tensor table (no weights): {"architecture", "name",
    "license"} from its metadata. A missing, truncated or corrupt file, or an architecture that
    does not convert, raises ConversionError naming the problem."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such GGUF file")
    try:
        import gguf
    except ImportError:
        raise ConversionError("reading a GGUF file needs the gguf package: pip install gguf "
                              "(or modeling-performer[gguf])") from None
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path)
        facts = {key: reader.fields[f"general.{key}"].contents() if f"general.{key}" in reader.fields else None
                 for key in ("architecture", "name", "license")}
        end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as error:  # the reader fails in many ways on a cut or damaged file
        raise ConversionError(f"{path} is not a readable GGUF file (truncated or corrupt: {error})") from None
    if facts["architecture"] is None:
        raise ConversionError(f"{path}: the GGUF file names no architecture (general.architecture)")
    if end > size or not reader.tensors:
        raise ConversionError(f"{path} is truncated: its tensors need {end:,} bytes, the file has {size:,}")
    if facts["architecture"] not in GGUF_ARCHITECTURES:
        raise ConversionError(f"{path}: GGUF architecture {facts['architecture']!r} does not convert; supported: "
                              f"{list(GGUF_ARCHITECTURES)} (checkpoint folders also: {list(SUPPORTED_TYPES)})")
    return facts


def resolve_source(source: str, gguf_file: Optional[str] = None) -> tuple[str, Optional[str]]:
    """(folder, gguf_file). A local folder as it is; a `.gguf` path splits into its folder and file
    name; anything else is taken for a Hub model id and downloaded (weights, config, tokenizer, or
    just `gguf_file`) where the Hub is reachable. Offline, the error says so. A GGUF file is checked
    (check_gguf) before anything else reads it."""
    if gguf_file is None and source.endswith(".gguf"):
        source, gguf_file = os.path.split(os.path.abspath(source))
    if gguf_file is not None and os.path.basename(gguf_file) != gguf_file:
        raise ConversionError(f"gguf_file must be a file name inside SOURCE, not a path: {gguf_file!r}")
    if os.path.isdir(source):
        if gguf_file is not None:
            check_gguf(os.path.join(source, gguf_file))
        return source, gguf_file
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source):
        raise ConversionError(f"SOURCE must be a local model folder or a Hub model id; {source!r} is not a folder")
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise ConversionError(
            f"{source!r} is not a local folder, and the Hub is offline (HF_HUB_OFFLINE=1): download the model to a "
            "folder first (huggingface-cli download) and pass the folder"
        )
    patterns = [gguf_file] if gguf_file else ["*.json", "*.safetensors", "*.model", "*.txt"]
    try:
        folder = snapshot_download(source, allow_patterns=patterns)
    except Exception as error:  # network, authentication, unknown repository: all mean "no source"
        raise ConversionError(f"could not download {source!r} from the Hub: {error}") from error
    if gguf_file is not None:
        check_gguf(os.path.join(folder, gguf_file))
    return folder, gguf_file


def _source_config(source, gguf_file=None):
    from transformers import AutoConfig

    if not os.path.isdir(source):
        raise ConversionError(f"SOURCE must be a local model folder (config.json + weights); {source!r} is not a folder")
    if gguf_file is not None:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file)
    elif not os.path.isfile(os.path.join(source, "config.json")):
        raise ConversionError(f"{source!r} has no config.json: not a transformers model folder")
    else:
        config = AutoConfig.from_pretrained(source)
    if config.model_type == PerformerConfig.model_type:
        return config
    if config.model_type not in SUPPORTED_TYPES:
        raise ConversionError(
            f"Unsupported source model_type {config.model_type!r}: convert_to_performer maps {list(SUPPORTED_TYPES)} "
            "and saved Performers (MiniLM checkpoints are model_type 'bert')"
        )
    if config.model_type in ENCODER_TYPES:
        position = getattr(config, "position_embedding_type", "absolute")
        if position != "absolute":
            raise ConversionError(f"position_embedding_type={position!r} is not supported; only 'absolute' positions map")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ConversionError("BERT-family decoders / cross-attention checkpoints are not supported; convert an encoder")
    elif config.model_type in LLAMA_TYPES:
        _check_llama_family(config)
    else:
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(config, flag, False):
                raise ConversionError(f"GPT-2 checkpoints with {flag}=True are not supported")
        if not getattr(config, "scale_attn_weights", True):
            raise ConversionError("GPT-2 checkpoints with scale_attn_weights=False are not supported")
    return config


def _check_llama_family(config):
    """What a Llama-family checkpoint may use that the Performer does not reproduce exactly."""
    name = config.model_type
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or (
            name == "mistral" and window is not None and window < config.max_position_embeddings):
        raise ConversionError(
            f"this {name} checkpoint attends within a sliding window of {window} tokens (shorter than its "
            f"{config.max_position_embeddings} positions), which the Performer's softmax layers do not reproduce; "
            "convert a checkpoint without a sliding window (sliding_window=null), or set it to null in config.json "
            "if the model never sees inputs longer than the window"
        )
    if config.hidden_act not in GATED_ACTIVATIONS:
        raise ConversionError(f"{name} checkpoints with hidden_act={config.hidden_act!r} are not supported; valid: "
                              f"{sorted(GATED_ACTIVATIONS)}")
    if (getattr(config, "pretraining_tp", 1) or 1) > 1:
        raise ConversionError(f"{name} checkpoints with pretraining_tp > 1 are not supported")


def _position_offset(config) -> int:
    """RoBERTa's position table starts at pad_token_id + 1; the first rows are never used."""
    return config.pad_token_id + 1 if config.model_type == "roberta" else 0


def performer_config(source_config, attention_type="favor", num_random_features: Optional[int] = None,
                     **overrides) -> PerformerConfig:
    """The PerformerConfig with the source's shapes, norms, activation and positions."""
    c = source_config
    if c.model_type in ENCODER_TYPES:
        values = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, hidden_act=c.hidden_act,
            norm_type="post_layernorm", position_embedding_type="learned",
            max_position_embeddings=c.max_position_embeddings - _position_offset(c), type_vocab_size=c.type_vocab_size,
            hidden_dropout_prob=c.hidden_dropout_prob, attention_probs_dropout_prob=c.attention_probs_dropout_prob,
            layer_norm_eps=c.layer_norm_eps, initializer_range=c.initializer_range, pad_token_id=c.pad_token_id,
            bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
            tie_word_embeddings=True,
        )
    elif c.model_type in LLAMA_TYPES:
        heads = c.num_attention_heads
        values = dict(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=heads, num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, intermediate_size=c.intermediate_size,
            hidden_act=GATED_ACTIVATIONS[c.hidden_act], norm_type="pre_rmsnorm", layer_norm_eps=c.rms_norm_eps,
            # Qwen2 has biases on q/k/v only; the others one switch for all four.
            attention_bias=True if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False)),
            attention_output_bias=False if c.model_type == "qwen2" else None,
            mlp_bias=bool(getattr(c, "mlp_bias", False)), qk_norm=c.model_type == "qwen3",
            position_embedding_type="rotary", rope_parameters=dict(c.rope_parameters),
            max_position_embeddings=c.max_position_embeddings, type_vocab_size=0, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=float(getattr(c, "attention_dropout", 0.0) or 0.0),
            initializer_range=c.initializer_range, pad_token_id=getattr(c, "pad_token_id", None),
            bos_token_id=getattr(c, "bos_token_id", None), eos_token_id=getattr(c, "eos_token_id", None),
            tie_word_embeddings=bool(c.tie_word_embeddings), is_decoder=True,
        )
    else:
        values = dict(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
            intermediate_size=c.n_inner or 4 * c.n_embd, hidden_act=c.activation_function, norm_type="pre_layernorm",
            position_embedding_type="learned", max_position_embeddings=c.n_positions, type_vocab_size=0,
            hidden_dropout_prob=c.resid_pdrop, attention_probs_dropout_prob=c.attn_pdrop,
            layer_norm_eps=c.layer_norm_epsilon, initializer_range=c.initializer_range,
            pad_token_id=getattr(c, "pad_token_id", None), bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
            tie_word_embeddings=True, is_decoder=True,
        )
    values["attention_type"] = attention_type
    if num_random_features is not None:
        values["num_random_features"] = num_random_features
    for key in ("num_labels", "id2label", "label2id", "problem_type"):
        if key not in overrides and getattr(c, "architectures", None) and "SequenceClassification" in c.architectures[0]:
            overrides[key] = getattr(c, key)
    values.update(overrides)
    try:
        return PerformerConfig(**values)
    except ValueError as error:
        raise ConversionError(f"the {c.model_type} checkpoint's settings have no Performer equivalent: {error}") from error


def _encoder_weights(base: dict, config) -> dict:
    """BertModel / RobertaModel state dict -> PerformerModel state dict (post-LN encoder)."""
    out = {
        "embeddings.word_embeddings.weight": base.pop("embeddings.word_embeddings.weight"),
        "embeddings.position_embeddings.weight": base.pop("embeddings.position_embeddings.weight")[_position_offset(config):],
        "embeddings.token_type_embeddings.weight": base.pop("embeddings.token_type_embeddings.weight"),
        "embeddings.LayerNorm.weight": base.pop("embeddings.LayerNorm.weight"),
        "embeddings.LayerNorm.bias": base.pop("embeddings.LayerNorm.bias"),
    }
    names = {
        "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
        "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.o_proj",
        "attention.output.LayerNorm": "self_attn_residual.norm", "intermediate.dense": "mlp.up_proj",
        "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_residual.norm",
    }
    pattern = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
    for key in [k for k in base if k.startswith("encoder.layer.")]:
        match = pattern.match(key)
        if match and match.group(2) in names:
            out[f"encoder.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"] = base.pop(key)
    return out


def _gpt2_weights(base: dict, config) -> dict:
    """GPT2Model state dict -> PerformerModel state dict (pre-LN decoder). GPT-2's Conv1D stores
    weights as [in, out]: transposed here."""
    hidden = config.n_embd
    out = {"embeddings.word_embeddings.weight": base.pop("wte.weight"),
           "embeddings.position_embeddings.weight": base.pop("wpe.weight"),
           "decoder.norm.weight": base.pop("ln_f.weight"), "decoder.norm.bias": base.pop("ln_f.bias")}
    for i in range(config.n_layer):
        p, q = f"h.{i}.", f"decoder.layers.{i}."
        for name, target in (("ln_1", "self_attn_residual.norm"), ("ln_2", "mlp_residual.norm")):
            out[q + target + ".weight"] = base.pop(p + name + ".weight")
            out[q + target + ".bias"] = base.pop(p + name + ".bias")
        qkv_w, qkv_b = base.pop(p + "attn.c_attn.weight").t(), base.pop(p + "attn.c_attn.bias")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[q + f"self_attn.{name}.weight"] = qkv_w[j * hidden:(j + 1) * hidden]
            out[q + f"self_attn.{name}.bias"] = qkv_b[j * hidden:(j + 1) * hidden]
        for source, target in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
                               ("mlp.c_proj", "mlp.down_proj")):
            out[q + target + ".weight"] = base.pop(p + source + ".weight").t()
            out[q + target + ".bias"] = base.pop(p + source + ".bias")
    return out


def _llama_weights(base: dict, config) -> dict:
    """LlamaModel / MistralModel / Qwen2Model / Qwen3Model state dict -> PerformerModel state dict
    (pre-RMSNorm decoder). The names already match inside attention and MLP; biases and q/k norms
    come along where the source has them."""
    out = {"embeddings.word_embeddings.weight": base.pop("embed_tokens.weight"),
           "decoder.norm.weight": base.pop("norm.weight")}
    names = {"input_layernorm": "self_attn_residual.norm", "post_attention_layernorm": "mlp_residual.norm"}
    pattern = re.compile(r"layers\.(\d+)\.([a-z_]+)\.(.+)$")
    for key in [k for k in base if k.startswith("layers.")]:
        match = pattern.match(key)
        if match and (match.group(2) in names or match.group(2) in ("self_attn", "mlp")):
            part = names.get(match.group(2), match.group(2))
            out[f"decoder.layers.{match.group(1)}.{part}.{match.group(3)}"] = base.pop(key)
    return out


WEIGHT_MAPS = {"bert": _encoder_weights, "roberta": _encoder_weights, "gpt2": _gpt2_weights,
               **{name: _llama_weights for name in LLAMA_TYPES}}


def _move_weights(state: dict, out: dict, source: str, target: str):
    """Moves source.{weight,bias} to target.{weight,bias} when the source has them."""
    for suffix in (".weight", ".bias"):
        if source + suffix in state:
            out[target + suffix] = state.pop(source + suffix)


def _head_weights(head: str, model_type: str, state: dict, tied: bool = True) -> dict:
    """Head weights of the source (base model stripped off) -> Performer head names. What the source
    lacks stays freshly initialised (and is reported by convert_to_performer)."""
    out = {}
    if head == "mlm":
        prefix, norm = ("cls.predictions.", "transform.LayerNorm") if model_type == "bert" else ("lm_head.", "layer_norm")
        _move_weights(state, out, prefix + ("transform.dense" if model_type == "bert" else "dense"), "lm_head.dense")
        _move_weights(state, out, prefix + norm, "lm_head.LayerNorm")
        if prefix + "bias" in state:
            out["lm_head.decoder.bias"] = state.pop(prefix + "bias")
        state.pop(prefix + "decoder.bias", None)  # the same tensor under a second name
        state.pop(prefix + "decoder.weight", None)  # tied to the word embeddings
    elif head == "classification":
        if model_type == "bert":
            _move_weights(state, out, "pooler.dense", "dense")
            _move_weights(state, out, "classifier", "classifier")
        else:
            _move_weights(state, out, "classifier.dense", "dense")
            _move_weights(state, out, "classifier.out_proj", "classifier")
    elif head == "clm":
        if model_type in LLAMA_TYPES and not tied:
            _move_weights(state, out, "lm_head", "lm_head")
        state.pop("lm_head.weight", None)  # tied to the word embeddings
    return out


BASE_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel", "gpt2": "GPT2Model", "llama": "LlamaModel",
                "mistral": "MistralModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}
CAUSAL_LM_CLASSES = {"gpt2": "GPT2LMHeadModel", **{name: BASE_CLASSES[name][:-len("Model")] + "ForCausalLM"
                                                   for name in LLAMA_TYPES}}
# Source weights that have no counterpart and carry nothing a Performer head uses.
IGNORED_SOURCE_WEIGHTS = ("cls.seq_relationship.", "position_ids", ".attn.bias", ".attn.masked_bias")


def _ignored(key: str) -> bool:
    return any(part in key for part in IGNORED_SOURCE_WEIGHTS)


def hybrid_attention(attention_type, softmax_layers, num_layers: int):
    """The attention types of a hybrid conversion: the layers `softmax_layers` names (0-based) keep
    exact softmax attention (with a key/value cache of their own), every other layer gets
    `attention_type`. No layers named: `attention_type` unchanged."""
    if softmax_layers is None or len(softmax_layers) == 0:
        return attention_type
    layers = [int(i) for i in softmax_layers]
    if len(set(layers)) != len(layers):
        raise ConversionError(f"softmax_layers names a layer twice: {layers}")
    outside = [i for i in layers if not 0 <= i < num_layers]
    if outside:
        raise ConversionError(f"softmax_layers {outside} are outside the model's {num_layers} layers (0 to {num_layers - 1})")
    if not isinstance(attention_type, str) or attention_type != "favor":
        raise ConversionError(f"softmax_layers chooses the layers that stay exact in a linear conversion, so "
                              f"attention_type must be 'favor' (got {attention_type!r})")
    if len(layers) == num_layers:
        raise ConversionError(f"softmax_layers names all {num_layers} layers: that is attention_type='softmax'")
    return ["softmax" if i in layers else attention_type for i in range(num_layers)]


def convert_to_performer(source: str, attention_type: str = "favor", num_random_features: Optional[int] = None,
                         head: str = "auto", gguf_file: Optional[str] = None, softmax_layers=None,
                         **config_overrides):
    """Loads a BERT / RoBERTa / MiniLM / GPT-2 / Llama / Mistral / Qwen2 / Qwen3 checkpoint (a local
    folder, or a Hub model id where the Hub is reachable), or a saved Performer (typically one trained
    with softmax attention, to be made linear), and returns (performer_model, tokenizer).

    A GGUF file is a source too: its path (`"folder/model.Q4_1.gguf"`), or `source` its folder (or Hub
    id) and `gguf_file` its name. Its weights are dequantized to float32 and its tokenizer (chat
    template included) comes from the file.

    head: "auto" (from the source's architecture), "base", "mlm" (or "masked-lm"), "classification" or
    "clm" (or "causal-lm"). softmax_layers: layer indices that keep exact softmax attention in a
    linear conversion (a hybrid stack; see `hybrid_attention`). config_overrides go to
    PerformerConfig (e.g. num_labels=2, classifier_pooling="mean").
    Every source weight is mapped or the conversion fails (a "base" conversion drops the source's
    head on purpose); head weights the source does not have are initialised as in a fresh model and
    logged.
    """
    import transformers
    from transformers import AutoTokenizer

    source, gguf_file = resolve_source(os.fspath(source), gguf_file)
    source_config = _source_config(source, gguf_file)
    from_file = {"gguf_file": gguf_file} if gguf_file is not None else {}
    head = HEAD_ALIASES.get(head, head)
    if head != "auto" and head not in HEADS:
        raise ConversionError(f"Unknown head {head!r}; valid: {list(HEADS)}, {list(HEAD_ALIASES)} or 'auto'")
    model_type = source_config.model_type
    num_layers = getattr(source_config, "num_hidden_layers", None) or getattr(source_config, "n_layer", None)
    attention_type = hybrid_attention(attention_type, softmax_layers, num_layers)
    if model_type == PerformerConfig.model_type:
        return _convert_performer(source, source_config, attention_type, num_random_features, head, config_overrides)
    # A GGUF file names no architecture: a decoder stored with its LM head is a causal LM.
    unnamed = CAUSAL_LM_CLASSES[model_type] if gguf_file is not None else BASE_CLASSES[model_type]
    architecture = (getattr(source_config, "architectures", None) or [unnamed])[0]
    if head == "auto":
        if architecture not in DEFAULT_HEADS:
            raise ConversionError(f"Cannot infer the head for architecture {architecture!r}; pass head= one of {list(HEADS)}")
        head = DEFAULT_HEADS[architecture]
    if (head == "clm" and model_type not in DECODER_TYPES) or (
            head in ("mlm", "classification") and model_type not in ENCODER_TYPES):
        raise ConversionError(f"A {model_type} checkpoint cannot become a Performer {head!r} head ({HEADS[head].__name__})")

    class_name = architecture if architecture in DEFAULT_HEADS else BASE_CLASSES[model_type]
    source_model = getattr(transformers, class_name).from_pretrained(source, dtype=torch.float32, **from_file)
    state = dict(source_model.state_dict())  # the source model is dropped after this: no copies needed
    if source_model.base_model is source_model:
        base, state = state, {}
    else:
        prefix = source_model.base_model_prefix + "."
        base = {k[len(prefix):]: state.pop(k) for k in list(state) if k.startswith(prefix)}
    for key in [k for k in base if k.startswith("pooler.")]:
        state[key] = base.pop(key)  # BERT's pooler is the classification head's dense layer

    config = performer_config(source_config, attention_type, num_random_features, **config_overrides)
    weights = WEIGHT_MAPS[model_type](base, source_config)
    model = HEADS[head](config)
    if head == "base":  # the source's head (and BERT's pooler) is dropped on purpose: say so
        dropped = sorted({k.rsplit(".", 1)[0] for k in state if not _ignored(k)})
        if dropped:
            logger.warning(
                "A base Performer has no place for the source's %s; pass head='classification' (or the source's own "
                "head) to keep them", ", ".join(dropped)
            )
        state = {}
    else:
        weights = {model.base_model_prefix + "." + k: v for k, v in weights.items()}
        weights.update(_head_weights(head, model_type, state, tied=config.tie_word_embeddings))
    leftover = [k for k in [*base, *state] if not _ignored(k)]
    if leftover:
        raise ConversionError(f"Source weights without a Performer counterpart: {leftover[:8]}")

    target = model.state_dict()
    for key, value in weights.items():
        if key not in target:
            raise ConversionError(f"Mapped weight {key!r} does not exist in {type(model).__name__}")
        if target[key].shape != value.shape:
            raise ConversionError(f"{key}: source shape {tuple(value.shape)} != Performer shape {tuple(target[key].shape)}")
    missing = model.load_state_dict(weights, strict=False).missing_keys
    start_gates_open(model, missing)
    # Not in any softmax source: drawn from the seed (projections) or set to their documented
    # starting values (Hedgehog maps, window weights), to be fitted by attention transfer.
    fresh = [k for k in missing if not k.endswith(LINEAR_ONLY_WEIGHTS)
             and k not in ("lm_head.decoder.weight", "lm_head.weight")]
    if any(k.startswith(model.base_model_prefix + ".") or head == "base" for k in fresh):
        raise ConversionError(f"Performer weights the source does not provide: {fresh[:8]}")
    if fresh:
        logger.warning(
            "%s has no weights for %s: initialised fresh, train them before use", class_name, ", ".join(fresh)
        )
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source, **from_file)
    return model.eval(), tokenizer


def save_converted(model, tokenizer, output: str):
    """Writes a folder that AutoModel (and the head's Auto class) loads, tokenizer included. It is
    assembled aside and moved into place with config.json last: a conversion killed while saving
    leaves no folder that loads, and running it again completes it."""
    stage = fresh_stage(output)
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    publish_folder(stage, output)
