"""train.py on data the user brings: local files in every format, columns of other names, labels
from the data, a tokenizer trained in the same run, and one clear error per bad input before
anything is written."""

import csv
import json
import pathlib
import random

import pytest
import torch

from .conftest import prepare_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
from modeling_performer.recipes import data_sources
from modeling_performer.recipes.commands import train
from modeling_performer.recipes.commands import convert_to_performer


TINY = {"model_type": "performer", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "num_random_features": 16, "chunk_size": 16,
        "hidden_dropout_prob": 0.0, "max_position_embeddings": 64}
TOPICS = {"text": "play", "rotten_tomatoes": "film review", "speeches": "political speech"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpora")
    prepare_data(out, *TOPICS)
    (out / "tiny.json").write_text(json.dumps(TINY))
    return out


def topic_csv(corpora, path, per_topic=150):
    """Passages of three corpora labelled by where they come from, in columns `passage` and
    `topic` (and an `id`), shuffled: a 3-class topic task with names the script does not expect."""
    rows = []
    for name, topic in TOPICS.items():
        passages = []
        for split in ("train", "validation", "test"):
            for line in open(corpora / name / f"{split}.jsonl"):
                words = json.loads(line)["text"].split()
                passages += [" ".join(words[i:i + 30]) for i in range(0, len(words), 30)]
        rows += [(passage, topic) for passage in passages[:per_topic]]
    random.Random(0).shuffle(rows)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "passage", "topic"])
        writer.writerows((i, passage, topic) for i, (passage, topic) in enumerate(rows))
    return path


def base_args(corpora, output, *extra):
    return ["--config", str(corpora / "tiny.json"), "--output", str(output), "--eval-steps", "30", "--batch-size", "16",
            "--seq-len", "48", "--learning-rate", "3e-3", "--quiet", "--device", "cpu", *extra]


@pytest.mark.slow
def test_three_topics_from_a_csv_with_its_own_tokenizer(corpora, tmp_path):
    data = topic_csv(corpora, tmp_path / "topics.csv")
    output = tmp_path / "topics-model"
    metrics = train.main(["--task", "classification", "--data", str(data), "--text-column", "passage",
                          "--label-column", "topic", "--train-tokenizer", "400", "--max-steps", "60",
                          *base_args(corpora, output)])
    assert metrics["num_labels"] == 3 and metrics["data"] == "topics.csv"
    # better than the majority class of the training split, on the held-out test split
    assert metrics["test_accuracy"] > metrics["test_majority_accuracy"] + 0.2, metrics
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "film review", "1": "play", "2": "political speech"}
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    card = ModelCard.load(output / "README.md")
    assert card.data.datasets == ["topics.csv"] and card.data.model_name == "topics-model"
    assert card.data.license == "unknown"  # own data: the licence is not ours to claim
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(tokenizer) <= 400 + 8  # the vocabulary trained in this run, not the bundled 8,000
    model = AutoModelForSequenceClassification.from_pretrained(output).eval()
    assert model.config.id2label[2] == "political speech"
    assert torch.isfinite(model(**tokenizer(["thou art"], return_tensors="pt")).logits).all()
    # Only what belongs on the Hub; checkpoints (optimizer states, training args) live beside it
    names = {p.name for p in output.iterdir()}
    assert not any(n.startswith("checkpoint-") or n == "training_args.bin" for n in names), names
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "topics-model.checkpoints").iterdir())


@pytest.mark.slow
def test_language_model_on_a_text_file_and_regression_on_jsonl(corpora, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in open(corpora / "text" / "train.jsonl")))
    metrics = train.main(["--task", "clm", "--data", str(text), "--max-steps", "4", "--gradient-checkpointing",
                          *base_args(corpora, tmp_path / "lm"), "--eval-steps", "4"])
    assert metrics["data"] == "book.txt" and metrics["validation_perplexity"] > 1
    plain = train.main(["--task", "clm", "--data", str(text), "--max-steps", "4", *base_args(corpora, tmp_path / "lm2"),
                        "--eval-steps", "4"])
    assert len(plain["train_loss_history"]) == 4
    # recomputing activations changes memory, not the numbers
    assert [h[1] for h in plain["train_loss_history"]] == pytest.approx([h[1] for h in metrics["train_loss_history"]],
                                                                        rel=1e-5)

    folder = tmp_path / "scores"
    folder.mkdir()
    rows = [json.loads(line) for line in open(corpora / "rotten_tomatoes" / "train.jsonl")]
    with open(folder / "train.jsonl", "w") as handle:  # no validation or test file: cut from train
        for row in rows:
            handle.write(json.dumps({"review": row["text"], "score": float(row["label"]) * 4 + 1}) + "\n")
    metrics = train.main(["--task", "classification", "--data", str(folder), "--text-column", "review",
                          "--label-column", "score", "--max-steps", "4", *base_args(corpora, tmp_path / "reg")])
    config = json.loads((tmp_path / "reg" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert "test_mse" in metrics and "test_mean_label_mse" in metrics


def test_split_files_and_formats(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 3} for i in range(50)]
    single = tmp_path / "all.jsonl"
    single.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, name = data_sources.load_splits(str(single))
    assert name == "all.jsonl" and [len(splits[s]) for s in data_sources.SPLITS] == [40, 5, 5]
    again, _ = data_sources.load_splits(str(single))
    assert list(again["test"]["text"]) == list(splits["test"]["text"])  # a fixed seed
    everything = sorted(t for s in data_sources.SPLITS for t in splits[s]["text"])
    assert everything == sorted(r["text"] for r in rows)  # nothing lost or repeated
    import pandas as pd

    folder = tmp_path / "folder"
    folder.mkdir()
    frame = pd.DataFrame(rows)
    frame[:30].to_parquet(folder / "train.parquet")
    frame[30:40].to_parquet(folder / "dev.parquet")
    frame[40:].to_parquet(folder / "test.parquet")
    splits, name = data_sources.load_splits(str(folder))
    assert name == "folder" and list(splits["validation"]["text"]) == [f"row {i}" for i in range(30, 40)]
    count, id2label, encode, problem = data_sources.label_encoding(splits, "label")
    assert (count, problem, id2label[2]) == (3, "single_label_classification", "LABEL_2")


def expect_error(argv, output, *fragments):
    with pytest.raises(SystemExit) as raised:
        train.main(argv)
    message = str(raised.value.code)
    for fragment in fragments:
        assert fragment in message, message
    assert not output.exists() and not pathlib.Path(f"{output}.checkpoints").exists(), "written before the error"
    return message


def test_bad_input_is_refused_before_anything_is_written(corpora, tmp_path):
    data = topic_csv(corpora, tmp_path / "topics.csv", per_topic=20)
    output = tmp_path / "never"
    common = ["--task", "classification", "--data", str(data), *base_args(corpora, output)]
    expect_error(common, output, "no column 'text'", "id, passage, topic")
    expect_error([*common, "--text-column", "passage", "--label-column", "subject"], output,
                 "no column 'subject'", "--label-column")
    expect_error([*common, "--text-column", "passage", "--label-column", "topic", "--num-labels", "2"],
                 output, "--num-labels 2", "3 classes")
    ints = tmp_path / "ints.csv"
    ints.write_text("text,label\n" + "".join(f"row {i},{i % 4}\n" for i in range(40)))
    expect_error(["--task", "classification", "--data", str(ints), "--num-labels", "3",
                        *base_args(corpora, output)], output, "outside 0..2", "[3]")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    expect_error(["--task", "clm", "--data", str(broken), *base_args(corpora, output)], output,
                 "cannot read", "broken.jsonl")
    expect_error(["--task", "clm", "--data", str(tmp_path / "absent.csv"), *base_args(corpora, output)],
                 output, "absent.csv does not exist")
    expect_error(["--task", "clm", "--data", "someone/some-dataset", *base_args(corpora, output)], output,
                 "Hub is offline")


def test_train_tokenizer_never_replaces_the_bundled_one_unless_named(corpora, tmp_path, monkeypatch):
    import hashlib

    from modeling_performer.recipes import tokenizer_training as train_tokenizer

    bundled = ROOT / "configuration" / "tokenizer" / "tokenizer.json"
    before = hashlib.sha256(bundled.read_bytes()).hexdigest()
    monkeypatch.chdir(tmp_path)
    train_tokenizer.main(["--corpus", str(corpora / "text" / "train.jsonl"), "--vocab-size", "200"])
    assert (tmp_path / "outputs" / "tokenizer" / "tokenizer.json").exists()
    assert hashlib.sha256(bundled.read_bytes()).hexdigest() == before


class StandInHub:
    """The two HfApi calls push_folder makes, against a local folder (never a real endpoint)."""

    def __init__(self, root):
        self.root, self.repos = root, []

    def __call__(self, *args, **kwargs):
        return self

    def create_repo(self, repo_id, exist_ok=False, private=False):
        self.repos.append(repo_id)

    def upload_folder(self, folder_path, repo_id, commit_message=None):
        import shutil

        shutil.copytree(folder_path, self.root / repo_id)
        return f"local://{repo_id}"


@pytest.mark.slow
def test_bf16_on_cpu_learns_and_push_to_hub_uploads_the_model_folder_only(corpora, tmp_path, monkeypatch):
    import huggingface_hub

    hub = StandInHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    output = tmp_path / "lm-bf16"
    metrics = train.main(["--task", "clm", "--data", str(corpora / "text"), "--max-steps", "30", "--bf16",
                          "--gradient-accumulation-steps", "2", "--push-to-hub", "--hub-model-id", "someone/tiny-lm",
                          *base_args(corpora, output)])
    losses = [loss for _, loss, _ in metrics["train_loss_history"]]
    assert metrics["precision"] == "bf16" and losses[-1] < losses[0] - 0.5, losses
    assert metrics["global_batch_size"] == 32
    assert hub.repos == ["someone/tiny-lm"]
    uploaded = {p.name for p in (tmp_path / "hub" / "someone" / "tiny-lm").iterdir()}
    assert uploaded == {p.name for p in output.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.json"} <= uploaded
    assert not any(n.startswith("checkpoint-") or n.endswith((".bin", ".pt")) for n in uploaded), uploaded
    card = (output / "README.md").read_text()
    assert 'from_pretrained("someone/tiny-lm"' in card and ".final-partial" not in card
    from huggingface_hub import ModelCard

    data = ModelCard.load(output / "README.md").data
    assert data.model_name == "tiny-lm" and data.datasets == ["text"] and data.pipeline_tag == "text-generation"


def test_push_to_hub_needs_a_repository_and_fp16_needs_a_gpu(corpora, tmp_path):
    output = tmp_path / "never"
    expect_error(["--task", "clm", "--push-to-hub", *base_args(corpora, output)], output, "--hub-model-id")
    expect_error(["--task", "clm", "--fp16", *base_args(corpora, output)], output, "--fp16 needs a GPU")
    expect_error(["--task", "clm", *base_args(corpora, output), "--device", "cuda:3"], output, "no CUDA GPU")


@pytest.mark.slow
def test_a_model_trained_from_a_converted_one_names_its_base_model(corpora, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    source = tmp_path / "llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(source)
    tokenizer.save_pretrained(source)
    (source / "README.md").write_text("---\nlicense: mit\n---\n# a tiny llama\n")
    convert_to_performer.main([str(source), str(tmp_path / "converted"), "--base-model", "someone/tiny-llama"])
    provenance = json.loads((tmp_path / "converted" / "provenance.json").read_text())
    assert provenance["base_model"] == "someone/tiny-llama" and provenance["license"] == "mit"
    output = tmp_path / "tuned"
    train.main(["--task", "clm", "--init", str(tmp_path / "converted"), "--data", str(corpora / "text"),
                "--max-steps", "2", *base_args(corpora, output)[2:]])
    from huggingface_hub import ModelCard

    data = ModelCard.load(output / "README.md").data
    assert data.base_model == "someone/tiny-llama" and data.license == "mit"
