"""PerformerConfig: every value it refuses, with a message that names the problem, whether typed
into the constructor, read from a folder on disk, or left for a model to find; the earlier names it
still takes; and the model-dependent checks that every head's config goes through."""

import json

import pytest
from transformers import AutoConfig

from modeling_performer import PerformerConfig, PerformerForCausalLM, PerformerModel

from .conftest import tiny_config
from .helpers import sink_tiny_config, sparse_tiny_config



def key_scale_config(**overrides):
    """A Hedgehog config whose key maps learn each key's scale."""
    return tiny_config(**{"feature_map": "hedgehog", "hedgehog_dim": 8, "hedgehog_key_scale": True, **overrides})


# (name, config the change applies to, change, what the message says)
REFUSED = [
    # shapes and choices
    ("indivisible-heads", tiny_config, {"hidden_size": 30}, "divisible"),
    ("attention-type", tiny_config, {"attention_type": "sparse"}, "valid values"),
    ("norm-type", tiny_config, {"norm_type": "batchnorm"}, "valid values"),
    ("activation", tiny_config, {"hidden_act": "tanh"}, "valid values"),
    ("feature-map", tiny_config, {"feature_map": "cosine"}, "valid values"),
    ("positions", tiny_config, {"position_embedding_type": "alibi"}, "valid values"),
    ("misspelled-key", tiny_config, {"attention_tpye": "favor"}, "Unknown PerformerConfig key"),
    ("per-layer-list", tiny_config, {"attention_type": ["favor"]}, "one entry per layer"),
    ("no-features", tiny_config, {"num_random_features": 0}, "positive"),
    # numbers
    ("layer-norm-eps", tiny_config, {"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ("pad-token", tiny_config, {"pad_token_id": 99}, "pad_token_id=99 is outside the vocabulary"),
    ("eos-token", tiny_config, {"eos_token_id": -1}, "eos_token_id=-1 is outside"),
    ("type-vocab", tiny_config, {"type_vocab_size": -1}, "type_vocab_size"),
    ("chunk-size", tiny_config, {"chunk_size": 0}, "chunk_size must be a positive integer"),
    ("dropout", tiny_config, {"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be in"),
    ("redraw-interval", tiny_config, {"feature_redraw_interval": -2}, "feature_redraw_interval"),
    ("fast-kernels", tiny_config, {"use_fast_kernels": "no"}, "use_fast_kernels"),
    # the exact local window
    ("window-negative", tiny_config, {"local_window": -1}, "local_window"),
    ("window-fraction", tiny_config, {"local_window": 2.5}, "local_window"),
    ("hedgehog-width", tiny_config, {"hedgehog_dim": 0}, "hedgehog_dim"),
    ("window-map", tiny_config, {"feature_map": "cosine", "local_window": 4}, "hedgehog"),
    ("window-on-softmax", tiny_config, {"local_window": 4, "attention_type": "softmax"}, "already exact"),
    # the sparse cache
    ("sparse-negative", sparse_tiny_config, {"sparse_cache_size": -1}, "sparse_cache_size"),
    ("sparse-fraction", sparse_tiny_config, {"sparse_cache_size": 1.5}, "sparse_cache_size"),
    ("sparse-without-window", sparse_tiny_config, {"sparse_cache_size": 4, "local_window": 0}, "local_window > 0"),
    # sink tokens
    ("sinks-negative", sink_tiny_config, {"sink_tokens": -1}, "sink_tokens must be"),
    ("sinks-bool", sink_tiny_config, {"sink_tokens": True}, "sink_tokens must be"),
    ("sinks-without-window", sink_tiny_config, {"local_window": 0}, "local_window=0"),
    ("sinks-in-a-decoder", sink_tiny_config, {"is_decoder": True}, "decoder only"),
    # learned key scales
    ("key-scale-int", key_scale_config, {"hedgehog_key_scale": 1}, "True or False"),
    ("key-scale-relu", key_scale_config, {"feature_map": "relu"}, "feature_map='hedgehog'"),
    # a decaying state
    ("decay-unknown", tiny_config, {"linear_decay": "yes"}, "valid values"),
    ("decay-all-softmax", tiny_config, {"linear_decay": "head", "attention_type": "softmax"}, "every layer uses"),
    ("decay-sparse-cache", tiny_config, {"linear_decay": "head", "local_window": 4, "sparse_cache_size": 2}, "sparse"),
]


@pytest.mark.parametrize("build,change,message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refused_values_name_the_problem(build, change, message):
    build()  # the config it starts from is valid
    with pytest.raises(ValueError, match=message):
        build(**change)


def test_a_misspelled_key_in_a_saved_config_is_named_and_a_set_attribute_is_kept(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["hidden_sise"] = 64
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'hidden_sise'.*did you mean 'hidden_size'"):
        AutoConfig.from_pretrained(tmp_path)
    # An attribute someone set on the config before saving is kept, never dropped.
    data = {k: v for k, v in data.items() if k != "hidden_sise"} | {"experiment_note": "run 3"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert AutoConfig.from_pretrained(tmp_path).experiment_note == "run 3"
    with pytest.raises(ValueError, match="experiment_note"):
        PerformerConfig(experiment_note="run 3")  # typed into the constructor: refused


def test_invalid_config_files_are_refused_by_the_config_and_by_the_model(tmp_path):
    PerformerForCausalLM(tiny_config()).save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for change, match in (({"norm_type": "layernorm"}, "valid values"), ({"hidden_sise": 32}, "hidden_sise"),
                          ({"num_random_features": 0}, "positive")):
        (tmp_path / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            AutoConfig.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match=match):
            PerformerForCausalLM.from_pretrained(tmp_path)


def test_earlier_names_are_aliases():
    config = PerformerConfig(d_model=64, num_layers=3, num_heads=8, activation="relu", nb_features=32,
                             attention_type="causal_linear")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.hidden_act,
            config.num_random_features, config.attention_type) == (64, 3, 8, "relu", 32, "favor")


def test_an_encoder_refuses_a_decay():
    with pytest.raises(ValueError, match="bidirectional"):
        PerformerModel(tiny_config(linear_decay="head"))
    with pytest.raises(ValueError, match="bidirectional"):
        PerformerModel(tiny_config(linear_decay="data", is_encoder_decoder=True))
    PerformerModel(tiny_config(linear_decay="data", is_decoder=True))  # a decoder takes it


def test_models_without_an_encoder_refuse_sinks():
    """The head's causal copy of an encoder config goes through the config's own check."""
    with pytest.raises(ValueError, match="decoder only"):
        PerformerForCausalLM(sink_tiny_config())
    changed = sink_tiny_config()
    changed.is_decoder = True  # changed after it was checked
    with pytest.raises(ValueError, match="decoder only"):
        PerformerModel(changed)
    assert PerformerModel(sink_tiny_config()).encoder is not None  # an encoder takes them


def test_a_derived_config_is_checked_as_the_constructor_checks_and_leaves_its_source_alone():
    config = sink_tiny_config()
    with pytest.raises(ValueError, match="decoder only"):
        config.with_changes(is_decoder=True)
    with pytest.raises(ValueError, match="Unknown PerformerConfig key.*is_decodr"):
        config.with_changes(is_decodr=True)
    assert config.with_changes(is_decoder=False) is config  # nothing to change: the same object
    causal = tiny_config().with_changes(is_decoder=True, chunk_size=8)
    assert (causal.is_decoder, causal.chunk_size) == (True, 8)
    assert tiny_config().is_decoder is False and config.is_decoder is False
