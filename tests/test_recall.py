"""The recall benchmark (scripts/bench_recall.py) and experiments (scripts/recall_experiments.py) on
the tasks of modeling_performer.recipes.recall: the MQAR sequences, the curriculum, and smoke runs
of each mode on the CPU (a few steps: the numbers are the benchmark's, not the test's)."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from modeling_performer.recipes import recall, recall_data
from modeling_performer.recipes.recall_data import ANSWERS, DIGITS, mqar_batch, passkey_batch
from modeling_performer.recipes.recall_training import Curriculum, PasskeySteps

from .conftest import ROOT, prepare_data


def test_mqar_sequences_pose_each_key_once_after_the_pairs():
    ids, targets = mqar_batch(torch.Generator().manual_seed(0), 16, 64, 4, 64, 8)
    assert ids.shape == targets.shape == (16, 64)
    for row_ids, row_targets in zip(ids, targets):
        keys, values = row_ids[0:8:2], row_ids[1:8:2]
        assert ((keys >= 1) & (keys < 32)).all() and ((values >= 32) & (values < 64)).all()
        assert len(set(keys.tolist())) == 4  # distinct keys: each question has one answer
        asked = (row_targets != -100).nonzero().flatten()
        assert len(asked) == 4 and (asked >= 16).all()  # after the pairs and the gap
        pairing = dict(zip(keys.tolist(), values.tolist()))
        for position in asked.tolist():
            assert row_targets[position] == pairing[row_ids[position].item()]
        others = torch.ones(64, dtype=torch.bool)
        others[:8], others[asked] = False, False
        assert (row_ids[others] == recall_data.FILLER).all()
    again, _ = mqar_batch(torch.Generator().manual_seed(0), 16, 64, 4, 64, 8)
    assert torch.equal(ids, again)


@pytest.mark.parametrize("shape,message", [((64, 40, 64, 8), "fewer than 40 pairs"),
                                           ((19, 4, 64, 8), "leaves 3 query positions")])
def test_impossible_shapes_are_refused(shape, message):
    seq_len, pairs, vocab, gap = shape
    with pytest.raises(ValueError, match=message):
        mqar_batch(torch.Generator(), 2, seq_len, pairs, vocab, gap)


def test_passkey_sequences_plant_the_key_in_running_text_and_ask_for_it_at_the_end():
    stream, vocab = torch.arange(1000) % 50, 50  # text ids below 50; digits 50-59, marks 60 and 61
    ids, targets, gap = passkey_batch(torch.Generator().manual_seed(0), stream, 32, 40, 7, vocab)
    assert ids.shape == (32, 40) and targets.shape == (32, ANSWERS) and (gap >= 7).all()
    assert (targets[:, -1] == -100).all()
    for row, target, row_gap in zip(ids, targets, gap.tolist()):
        key = target[:DIGITS]
        assert ((key >= vocab) & (key < vocab + 10)).all()
        assert row[-ANSWERS] == vocab + 11 and torch.equal(row[-DIGITS:], key)  # ask mark, then the key
        text_len = 40 - 2 * ANSWERS
        depth = text_len - row_gap
        assert row[depth] == vocab + 10 and torch.equal(row[depth + 1:depth + ANSWERS], key)  # the planted key
        text = torch.cat([row[:depth], row[depth + ANSWERS:-ANSWERS]])
        assert len(text) == text_len and (text < vocab).all()
        assert (torch.diff(text) % 50 == 1).all()  # one unbroken window of the stream around the key
    assert len(set(gap.tolist())) > 5  # planted at many depths
    again = passkey_batch(torch.Generator().manual_seed(0), stream, 32, 40, 7, vocab)
    assert all(torch.equal(a, b) for a, b in zip((ids, targets, gap), again))
    with pytest.raises(ValueError, match="fewer than the gap"):
        passkey_batch(torch.Generator(), stream, 2, 20, 9, vocab)


@pytest.mark.parametrize("kind,key_marks,ask_marks", [("text", 0, 0), ("planted", 1, 0), ("sequences", 1, 1)])
def test_passkey_students_are_fitted_on_text_with_or_without_the_key_and_question(kind, key_marks, ask_marks):
    task = recall.PasskeyTask.__new__(recall.PasskeyTask)
    task.args = SimpleNamespace(passkey_length=40, batch_size=16, passkey_transfer=kind)
    task.train_stream, task.text_vocab = torch.arange(1000) % 50, 50
    ids = task.transfer_inputs(torch.Generator().manual_seed(0))
    assert ids.shape == (16, 40)
    assert ((ids == 60).sum(1) == key_marks).all() and ((ids == 61).sum(1) == ask_marks).all()
    assert ((ids >= 50).sum(1) == key_marks * ANSWERS + ask_marks * ANSWERS).all()


def test_passkey_training_doubles_the_length_on_mastery():
    args = SimpleNamespace(passkey_length=128, passkey_start_length=32, steps=1000, curriculum=0.8, batch_size=4)
    steps = PasskeySteps(args, torch.arange(500) % 50, 50)
    assert steps.lengths == [32, 64, 128]
    generator = torch.Generator().manual_seed(0)
    ids, targets, keep, logged = steps.batch(generator, 0)
    assert ids.shape == (4, 32) and keep == ANSWERS == targets.shape[1] and logged == {"length": 32}
    for _ in range(Curriculum.WINDOW):
        steps.record(logged, 1.0)
    assert steps.batch(generator, 1)[0].shape == (4, 64)


def test_curriculum_advances_on_mastery_and_never_falls_behind_its_ramp():
    curriculum = Curriculum(SimpleNamespace(pairs=4, steps=1000, curriculum=0.8))
    assert curriculum.pairs(0) == 1
    for _ in range(Curriculum.WINDOW - 1):
        assert not curriculum.record(1, 1.0)
    assert curriculum.pairs(10) == 1  # not yet a full window of mastery
    curriculum.record(1, 1.0)
    assert curriculum.pairs(20) == 2
    for _ in range(100):
        curriculum.record(2, 0.5)  # not mastered: stays, until the ramp takes over
    # the ramp: 1 + 3 (step / 800)^2 pairs
    assert curriculum.pairs(100) == 2 and curriculum.pairs(600) == 2 and curriculum.pairs(700) == 3
    assert curriculum.pairs(790) == 3 and curriculum.pairs(800) == 4
    finished = [curriculum.record(4, 1.0) for _ in range(Curriculum.FINISH_WINDOW)]
    assert not any(finished[:-1]) and finished[-1]


def run_script(*args, tmp_path, script="bench_recall.py"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


EXPERIMENTS = "recall_experiments.py"
SMALL = ["--seq-len", "32", "--pairs", "2", "--gap", "4", "--vocab", "32", "--hidden", "32", "--heads", "2",
         "--batch-size", "8", "--eval-batches", "1", "--threads", "1"]


def test_one_model_writes_accuracy_at_the_top_level(tmp_path):
    out = tmp_path / "one.json"
    run_script("--attention", "favor", "--feature-map", "hedgehog", "--local-window", "2", "--steps", "6",
               "--score-sparse-cache", "2", "--output", str(out), *SMALL, tmp_path=tmp_path)
    record = json.loads(out.read_text())
    assert 0.0 <= record["accuracy"] <= 1.0
    assert record["settings"]["local_window"] == 2 and "commit" in record and "date" in record
    assert set(record["sparse_cache_accuracy"]) == {"2"}
    assert record["steps_run"] == 6 and len(record["history"]) >= 1


def test_linearize_and_decoding_modes_write_their_results(tmp_path):
    out = tmp_path / "linearized.json"
    run_script("linearize", "--linearize-window", "2", "--linearize-cache", "2", "--steps", "4",
               "--transfer-steps", "3", "--swap-features", "16", "--output", str(out), *SMALL, tmp_path=tmp_path,
               script=EXPERIMENTS)
    record = json.loads(out.read_text())
    assert set(record["accuracy"]) == {"softmax teacher", "FAVOR+ M=16 swap (no fitting)", "Hedgehog + W2",
                                       "Hedgehog + W2 + sparse 2", "Hedgehog + W2 + sparse 32 (every key exact: control)"}
    # the control computes the teacher's softmax exactly: the same answers
    control = record["accuracy"]["Hedgehog + W2 + sparse 32 (every key exact: control)"]
    assert control == pytest.approx(record["accuracy"]["softmax teacher"], abs=1 / 16)
    decoding = tmp_path / "sparse.json"
    run_script("decoding", "--decode-tokens", "600", "--decode-window", "4", "--decode-cache", "4", "--threads", "1",
               "--output", str(decoding), tmp_path=tmp_path, script=EXPERIMENTS)
    record = json.loads(decoding.read_text())
    sparse = record["decoding"]["hedgehog + W4 + sparse 4"]
    assert [p["tokens"] for p in sparse] == [300, 600] and record["ratios"]["sparse_cache_bytes_constant"]
    softmax = record["decoding"]["softmax"]
    assert softmax[1]["cache_bytes"] > softmax[0]["cache_bytes"]  # the KV cache grows; the sparse one does not
    assert decoding.with_suffix(".png").exists()


def test_passkey_mode_linearizes_a_teacher_of_the_planted_key(tmp_path):
    prepare_data(tmp_path / "data", "text", max_rows=20)
    out = tmp_path / "passkey.json"
    run_script("passkey", "--passkey-data", str(tmp_path / "data" / "text"), "--passkey-length", "32",
               "--passkey-start-length", "16", "--linearize-window", "4", "--linearize-cache", "8", "--steps", "4",
               "--transfer-steps", "3", "--swap-features", "16", "--hidden", "32", "--heads", "2", "--batch-size", "8",
               "--eval-batches", "1", "--threads", "1", "--output", str(out), tmp_path=tmp_path, script=EXPERIMENTS)
    record = json.loads(out.read_text())
    assert record["task"] == "pass-key" and set(record["by_transfer"]) == {"text", "planted", "sequences"}
    teachers = [student.pop("teacher") for student in record["by_transfer"].values()]
    assert teachers[0]["history"][-1] == {**teachers[0]["history"][-1], "step": 4, "length": 32}
    assert teachers[1] == teachers[2] == teachers[0]  # one teacher, fitted three ways
    assert len(list(tmp_path.glob("recall-passkey-*/teacher"))) == 1
    assert len(list(tmp_path.glob("recall-passkey-*/student"))) == 3
    for student in record["by_transfer"].values():
        assert set(student["accuracy"]) == {"softmax teacher", "FAVOR+ M=16 swap (no fitting)", "Hedgehog + W4",
                                            "Hedgehog + W4 + sparse 8", "Hedgehog + W4 + sparse 32 (every key exact: control)"}
        assert all(0.0 <= value <= 1.0 for value in student["accuracy"].values())
    with pytest.raises(AssertionError, match="does not exist"):
        run_script("passkey", "--passkey-data", str(tmp_path / "nowhere"), tmp_path=tmp_path, script=EXPERIMENTS)


def test_table_gives_every_model_the_steps_softmax_took_and_resumes(tmp_path):
    out = tmp_path / "recall.json"
    common = ["--shapes", "32:2", "--steps", "3", "--output", str(out), "--jobs", "2", *SMALL]
    run_script("--models", "softmax", *common, tmp_path=tmp_path)
    [softmax] = tmp_path.glob("recall-*/softmax-d32-T32-P2.json")
    kept = json.loads(softmax.read_text())
    assert kept["steps_run"] == 3
    softmax.write_text(json.dumps({**kept, "steps_run": 2}))  # as if softmax had solved the shape in 2 steps
    args = ["--models", "softmax", "Hedgehog + W8", *common]
    run_script(*args, tmp_path=tmp_path)
    record = json.loads(out.read_text())
    models = [row["model"] for row in record["results"]]
    assert models == ["softmax", "Hedgehog + W8", "Hedgehog + W8 + sparse 2P (same weights)"]
    assert [row["steps_run"] for row in record["results"]] == [2, 2, 2]  # softmax's budget, kept softmax reused
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["seq_len"] == 32 for row in record["results"])
    assert set(record["softmax_solved"]) == {"d32-T32-P2"} and out.with_suffix(".png").exists()
    assert record["table_seconds"] >= 0
    # A second run finds every model done: nothing is trained again.
    finished = sorted(tmp_path.glob("recall-*/*-d32-T32-P2.json"))
    assert len(finished) == 2
    stamps = {path: path.stat().st_mtime_ns for path in finished}
    run_script(*args, tmp_path=tmp_path)
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    with pytest.raises(AssertionError, match="needs the softmax model"):
        run_script("--models", "Hedgehog", *SMALL, tmp_path=tmp_path)
