"""Data preparation, tokenizer and Trainer recipes on small slices (real data, offline)."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch

from .conftest import prepare_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
from modeling_performer.recipes import tokenizer_training as train_tokenizer
from modeling_performer.recipes.commands import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small slice of both corpora, prepared by the real script (downloads are cached)."""
    out = tmp_path_factory.mktemp("data")
    prepare_data(out, "text", "rotten_tomatoes", "speeches")
    # The parallel corpus comes from Debian packages: where apt cannot fetch them, the seq2seq
    # tests are skipped with the script's own explanation.
    bible = prepare_data(out, "bible", check=False)
    (out / "bible-unavailable.txt").write_text(bible.stderr if bible.returncode else "")
    return out


def need_bible(data):
    reason = (data / "bible-unavailable.txt").read_text()
    if reason:
        pytest.skip(f"parallel corpus unavailable here: {reason.strip().splitlines()[-1]}")


def read(path):
    return [json.loads(line) for line in open(path)]


def test_prepare_data_writes_splits(data):
    for name in ("text", "rotten_tomatoes", "speeches"):
        for split in ("train", "validation", "test"):
            rows = read(data / name / f"{split}.jsonl")
            assert 0 < len(rows) <= 60
            assert all(r["text"].strip() for r in rows)
    assert {r["label"] for r in read(data / "rotten_tomatoes" / "train.jsonl")} == {0, 1}
    plays = {split: {r["source"] for r in read(data / "text" / f"{split}.jsonl")} for split in ("train", "test")}
    assert not plays["train"] & plays["test"]  # whole plays are held out
    speeches = {split: {r["text"] for r in read(data / "speeches" / f"{split}.jsonl")} for split in ("train", "test")}
    assert not speeches["train"] & speeches["test"] and min(map(len, speeches["test"])) > 100  # whole speeches
    again = subprocess.run([sys.executable, str(SCRIPTS / "prepare_data.py"), "--output", str(data)],
                           capture_output=True, text=True, timeout=120)
    assert "already prepared" in again.stdout


def test_prepare_bible_pairs(data):
    need_bible(data)
    pairs = read(data / "bible" / "train.jsonl")
    assert 0 < len(pairs) <= 60 and all(p["en"] and p["es"] for p in pairs)


def test_tokenizer_round_trip_and_sentencepiece_ids(data, tmp_path):
    texts = [r["text"] for r in read(data / "text" / "train.jsonl")]
    sp = train_tokenizer.train_sentencepiece(texts, 400, str(tmp_path / "spm"))
    fast = train_tokenizer.to_fast_tokenizer(sp)
    fast.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    held_out = [r["text"] for r in read(data / "text" / "validation.jsonl")][:30]
    for text in held_out:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert ids == sp.encode(train_tokenizer.fold(text))
        assert loaded.decode(ids) == train_tokenizer.fold(text) or loaded.unk_token_id in ids
    assert [loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id,
            loaded.mask_token_id] == [0, 1, 2, 3, 4]


def test_shipped_tokenizer_loads_offline():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    text = "To be, or not to be, that is the question."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids and len(tokenizer) >= 1000


TINY = {"model_type": "performer", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "num_random_features": 16, "chunk_size": 16,
        "hidden_dropout_prob": 0.0, "max_position_embeddings": 64}


@pytest.mark.slow
@pytest.mark.parametrize("task", ["clm", "mlm", "classification", "seq2seq"])
def test_trainer_recipe_learns_saves_and_reloads(task, data, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    dataset = data / {"classification": "rotten_tomatoes", "seq2seq": "bible"}.get(task, "text")
    output = tmp_path / "out"
    extra = ["--bleu-rows", "8"]
    if task == "seq2seq":
        need_bible(data)
        sp = train_tokenizer.train_sentencepiece(train_tokenizer.read_texts(dataset / "train.jsonl", 0, ("en", "es")),
                                                 300, str(tmp_path / "spm"))
        train_tokenizer.to_fast_tokenizer(sp).save_pretrained(tmp_path / "tok")
        extra += ["--tokenizer", str(tmp_path / "tok")]
    metrics = train.main(["--task", task, "--config", str(config), "--data", str(dataset), "--output", str(output),
                          "--max-steps", "40", "--eval-steps", "20", "--batch-size", "8", "--seq-len", "32",
                          "--learning-rate", "3e-3", "--quiet", *extra])
    state = json.loads(next(pathlib.Path(f"{output}.checkpoints").glob("checkpoint-*/trainer_state.json")).read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert losses[-1] < losses[0], losses
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if isinstance(v, float))
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    batch = tokenizer(["To be, or not to be"], return_tensors="pt")
    if task == "seq2seq":
        batch["decoder_input_ids"] = batch["input_ids"]
    assert torch.isfinite(model(**batch).last_hidden_state).all()
    assert (output / "model.safetensors").exists() and (output / "modeling_performer.py").exists()
    from huggingface_hub import ModelCard

    card = ModelCard.load(output / "README.md")
    assert card.data.library_name == "transformers" and "performer" in card.data.tags
    assert card.data.eval_results and all(r.metric_value == r.metric_value for r in card.data.eval_results)
    if task == "classification":
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
    elif task == "seq2seq":
        assert 0.0 <= metrics["test_bleu"] <= 100.0 and 0.0 <= metrics["test_chrf"] <= 100.0
    else:
        assert metrics["validation_perplexity"] > 1.0


@pytest.mark.slow
def test_llama_teacher_preset_trains_as_a_transformers_llama_and_converts_exactly(data, tmp_path):
    """The linearizing recipe's teacher: train.py trains the llama-small-decoder preset as a
    LlamaForCausalLM, which the converter maps onto a softmax Performer with the same logits."""
    output = tmp_path / "llama"
    with pytest.raises(SystemExit, match="without Performer options"):
        train.main(["--task", "clm", "--config", "llama-small-decoder", "--attention-type", "favor", "--data",
                    str(data / "text"), "--output", str(output)])
    assert not output.exists()
    metrics = train.main(["--task", "clm", "--config", "llama-small-decoder", "--data", str(data / "text"),
                          "--output", str(output), "--max-steps", "30", "--eval-steps", "15", "--batch-size", "8",
                          "--seq-len", "32", "--learning-rate", "3e-3", "--quiet"])
    assert metrics["model_type"] == "llama" and metrics["validation_perplexity"] > 1.0
    losses = [loss for _, loss, _ in metrics["train_loss_history"]]
    assert losses[-1] < losses[0], losses
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from modeling_performer.conversion import convert_to_performer

    teacher = AutoModelForCausalLM.from_pretrained(output).eval()
    assert type(teacher) is LlamaForCausalLM and teacher.config.num_key_value_heads == 2
    performer, _ = convert_to_performer(output, attention_type="softmax")
    batch = AutoTokenizer.from_pretrained(output)(["To be, or not to be, that is the question"], return_tensors="pt")
    with torch.no_grad():
        assert (performer(**batch).logits - teacher(**batch).logits).abs().max() < 1e-4
