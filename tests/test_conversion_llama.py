"""Conversion of Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) into Performers. Tiny random
checkpoints of each family with non-default settings (grouped and multi-query key/value heads,
llama3 / yarn / linear / dynamic rotary scaling, q/k/v biases, q/k norms, tied and untied heads,
norms and biases moved off their initial values): softmax conversion reproduces the source's
logits to 1e-4 on a left-padded batch and its greedy text; linear conversions decode the same with
and without their cache."""

import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import modeling_performer  # noqa: F401
from modeling_performer.conversion import ConversionError, convert_to_performer, save_converted

from .helpers import FAMILIES, tiny_source

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "convert_to_performer.py"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")


def left_padded(tokenizer):
    texts = ["To be, or not to be, that is the question", "Now is the winter"]
    tokenizer.padding_side = "left"
    return tokenizer(texts, padding=True, return_tensors="pt")


def positions(mask):
    """What generate() gives decoder-only models: positions counted over real tokens."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@pytest.mark.parametrize("family", FAMILIES, ids=list(FAMILIES))
def test_llama_family_softmax_conversion_is_exact(family, tokenizer, tmp_path):
    source = tiny_source(family, tmp_path / "source", tokenizer)
    model, _ = convert_to_performer(tmp_path / "source", attention_type="softmax")
    save_converted(model, tokenizer, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    config = source.config
    assert model.config.num_key_value_heads == config.num_key_value_heads
    assert model.config.tie_word_embeddings == config.tie_word_embeddings
    assert (model.lm_head.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()) \
        == config.tie_word_embeddings
    batch = left_padded(tokenizer)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = source(**batch, position_ids=positions(batch["attention_mask"])).logits
        actual = model(**batch).logits
    assert (actual - expected)[mask].abs().max() < 1e-4
    greedy = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(model.generate(**batch, **greedy), source.generate(**batch, **greedy))


@pytest.mark.parametrize("family", ["llama-gqa-llama3-untied", "qwen3-qk-norm-head-dim"])
def test_llama_family_linear_conversion_decodes_the_same_with_and_without_its_cache(family, tokenizer, tmp_path):
    source = tiny_source(family, tmp_path / "source", tokenizer)
    model, _ = convert_to_performer(tmp_path / "source", feature_map="hedgehog", local_window=4)
    assert model.config.attention_type == "favor" and model.config.local_window == 4
    maps = model.model.decoder.layers[0].self_attn.feature_map
    assert maps.key_weight.shape[0] == source.config.num_key_value_heads
    assert maps.query_weight.shape[0] == source.config.num_attention_heads
    batch = left_padded(tokenizer)
    greedy = dict(max_new_tokens=8, do_sample=False)
    cached = model.generate(**batch, **greedy)
    assert torch.equal(cached, model.generate(**batch, **greedy, use_cache=False))
    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache
    # one linear state and one window buffer per key/value head
    state = cache.layers[0].self_attention
    assert state.kvz.shape[1] == source.config.num_key_value_heads and state.keys.shape[1:3] == (
        source.config.num_key_value_heads, 4)


def test_sliding_window_and_other_unmappable_sources_are_refused(tokenizer, tmp_path):
    tiny_source("mistral-gqa", tmp_path / "mistral", tokenizer, sliding_window=8)
    with pytest.raises(ConversionError, match="sliding window of 8 tokens"):
        convert_to_performer(tmp_path / "mistral")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "mistral"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "sliding window" in done.stderr and not (tmp_path / "out").exists()
    tiny_source("qwen2-biases-yarn", tmp_path / "qwen2", tokenizer, use_sliding_window=True, sliding_window=8,
                max_window_layers=1)
    with pytest.raises(ConversionError, match="sliding window"):
        convert_to_performer(tmp_path / "qwen2")
    tiny_source("llama-mqa-linear-tied", tmp_path / "gelu", tokenizer, hidden_act="tanh")
    with pytest.raises(ConversionError, match="hidden_act='tanh'"):
        convert_to_performer(tmp_path / "gelu")
    tiny_source("llama-mqa-linear-tied", tmp_path / "longrope", tokenizer, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 16})
    with pytest.raises(ConversionError, match="longrope"):
        convert_to_performer(tmp_path / "longrope")


def test_a_hub_id_offline_says_the_hub_is_offline():
    with pytest.raises(ConversionError, match="Hub is offline"):
        convert_to_performer("meta-llama/Llama-3.2-1B")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_and_rotary_compute_what_llama_computes(dtype):
    """The fused rms_norm and the roll-based rotary against transformers' Llama functions. The
    rotary does the same products and sums, rounded as often: equal bit for bit. The fused norm's
    reduction may round differently on other CPUs: a tolerance."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    from modeling_performer.layers_performer import PerformerRMSNorm, apply_rotary, rotary_cos_sin

    g = torch.Generator().manual_seed(0)
    ours, theirs = PerformerRMSNorm(48, eps=1e-5).to(dtype), LlamaRMSNorm(48, eps=1e-5).to(dtype)
    weight = torch.randn(48, generator=g).to(dtype)
    ours.weight.data, theirs.weight.data = weight.clone(), weight.clone()
    x = (3 * torch.randn(2, 5, 48, generator=g)).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x))

    q, k = (torch.randn(2, 3, 5, 16, generator=g).to(dtype) for _ in range(2))
    positions = torch.arange(7, 12).expand(2, 5)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    cos, sin = (t.unsqueeze(1) for t in rotary_cos_sin(positions, inv_freq, 1.0, dtype))
    angles = positions[:, :, None].float() * inv_freq
    full = torch.cat([angles, angles], dim=-1)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, full.cos().to(dtype), full.sin().to(dtype))
    assert torch.equal(apply_rotary(q, cos, sin), expected_q) and torch.equal(apply_rotary(k, cos, sin), expected_k)


def test_a_hybrid_conversion_keeps_the_chosen_layers_exact_and_caches_keys_for_them_only(tokenizer, tmp_path):
    family = "llama-gqa-llama3-untied"
    source = tiny_source(family, tmp_path / "source", tokenizer, num_hidden_layers=3)
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "source"), str(tmp_path / "hybrid"),
                           "--feature-map", "hedgehog", "--local-window", "4", "--softmax-layers", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hybrid").eval()
    assert model.config.attention_type == ["favor", "softmax", "favor"]
    layers = model.model.decoder.layers
    assert layers[1].self_attn.feature_map is None and layers[0].self_attn.feature_map is not None
    # the kept layer is the softmax conversion's layer, weight for weight (that conversion is the teacher's logits)
    exact, _ = convert_to_performer(tmp_path / "source", attention_type="softmax")
    for ours, kept in zip(model.model.decoder.layers[1].state_dict().items(),
                          exact.model.decoder.layers[1].state_dict().items()):
        assert ours[0] == kept[0] and torch.equal(ours[1], kept[1])
    batch = left_padded(tokenizer)
    greedy = dict(max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**batch, **greedy), model.generate(**batch, **greedy, use_cache=False))
    with torch.no_grad():
        cache = model(**batch, use_cache=True).cache
    config, (rows, length) = source.config, batch["input_ids"].shape
    head_dim = config.hidden_size // config.num_attention_heads
    keys, values = cache.layers[1].self_attention
    assert keys.shape == values.shape == (rows, config.num_key_value_heads, length, head_dim)
    linear = sum(t.numel() * t.element_size() for i in (0, 2) for t in cache.layers[i].self_attention)
    assert cache.num_bytes() == linear + 2 * keys.numel() * keys.element_size()
    assert type(cache.layers[0].self_attention).__name__ == "WindowedAttentionState"


@pytest.mark.parametrize("layers, reason", [([3], "outside"), ([1, 1], "twice"), ([0, 1], "all 2 layers")])
def test_a_hybrid_conversion_refuses_layers_it_cannot_keep(tokenizer, tmp_path, layers, reason):
    tiny_source("mistral-gqa", tmp_path / "source", tokenizer)
    with pytest.raises(ConversionError, match=reason):
        convert_to_performer(tmp_path / "source", softmax_layers=layers)
    with pytest.raises(ConversionError, match="attention_type must be 'favor'"):
        convert_to_performer(tmp_path / "source", attention_type="softmax", softmax_layers=[0])
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "source"), str(tmp_path / "out"),
                           "--softmax-layers", "one"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "comma-separated layer indices" in done.stderr
    assert not (tmp_path / "out").exists()
