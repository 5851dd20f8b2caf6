"""pipeline() with Performer models: objects and saved folders, the seq2seq pipeline included."""

import pathlib

import pytest
import torch
from transformers import AutoTokenizer, pipeline

from modeling_performer import (
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
)

from .conftest import tiny_config

TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / "configuration" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def config_for(tokenizer, **overrides):
    return tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, **overrides)


@pytest.mark.parametrize("from_folder", [False, True], ids=["object", "folder"])
def test_text_generation(tokenizer, tmp_path, from_folder):
    model = PerformerForCausalLM(config_for(tokenizer)).eval()
    if from_folder:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
        generator = pipeline("text-generation", model=str(tmp_path))
    else:
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("To be, or not", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("To be, or not")
    ids = tokenizer("To be, or not", return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    tokens = generator("To be, or not", max_new_tokens=5, do_sample=False, return_tensors=True)
    assert list(tokens[0]["generated_token_ids"]) == expected[0].tolist()
    # The text is the decoded token ids: the continuation keeps the space in front of it.
    assert out[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)


def test_tokenizer_decodes_texts_and_continuations_with_their_spaces(tokenizer):
    text = "ROMEO. I will not, sir"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    prompt = tokenizer("ROMEO. I will", add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt
    assert tokenizer.decode(prompt) + tokenizer.decode(ids[len(prompt):]) == text


def test_text_classification(tokenizer, tmp_path):
    model = PerformerForSequenceClassification(config_for(tokenizer, num_labels=2, id2label={0: "rotten", 1: "fresh"},
                                                          label2id={"rotten": 0, "fresh": 1})).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    classifier = pipeline("text-classification", model=str(tmp_path))
    result = classifier(["a fine film", "dull and long"])
    assert [r["label"] in ("rotten", "fresh") for r in result] == [True, True]
    logits = model(**tokenizer("a fine film", return_tensors="pt")).logits
    assert abs(result[0]["score"] - torch.softmax(logits, -1).max().item()) < 1e-5


def test_fill_mask(tokenizer):
    model = PerformerForMaskedLM(config_for(tokenizer)).eval()
    fill = pipeline("fill-mask", model=model, tokenizer=tokenizer)
    result = fill(f"To be, or not to {tokenizer.mask_token}", top_k=3)
    assert len(result) == 3 and all("token_str" in r for r in result)
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True)


def test_seq2seq_pipeline(tokenizer, tmp_path):
    model = PerformerForConditionalGeneration(config_for(tokenizer)).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    translate = pipeline("performer-text2text", model=str(tmp_path))
    out = translate("In the beginning", max_new_tokens=6, do_sample=False)
    inputs = tokenizer("In the beginning", return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"] == tokenizer.decode(expected[0], skip_special_tokens=True)
