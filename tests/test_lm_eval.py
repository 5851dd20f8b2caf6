"""lm-evaluation-harness on the bundled tasks (configuration/lm_eval): it runs offline on a Performer
folder, and its perplexity agrees with scripts/evaluate_lm.py on the same text and block length."""

import glob
import json
import math
import shutil
import subprocess
import sys

import pytest

from modeling_performer.bundled import lm_eval_tasks_path

from .conftest import ROOT, prepare_data

pytest.importorskip("lm_eval", reason="the eval extra: pip install .[eval]")

TASKS = ("performer_plays_ppl", "performer_plays_next_line")


def lm_eval(folder, out, *tasks, limit=8):
    executable = shutil.which("lm_eval", path=str(ROOT / ".venv" / "bin")) or shutil.which("lm_eval")
    done = subprocess.run([executable, "run", "--model", "hf", "--model_args",
                           f"pretrained={folder},trust_remote_code=True", "--include_path", str(lm_eval_tasks_path()),
                           "--tasks", *tasks, "--limit", str(limit), "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return json.loads(open(path).read())


def tasks_module():
    """The tasks' dataset module (a file beside the YAMLs, as lm_eval imports it)."""
    sys.path.insert(0, str(lm_eval_tasks_path()))
    try:
        import performer_tasks
    finally:
        sys.path.pop(0)
    return performer_tasks


def test_tasks_run_offline_and_perplexity_agrees_with_evaluate_lm(tiny_chat_folder, tmp_path):
    folder, model, tokenizer = tiny_chat_folder
    results = lm_eval(folder, tmp_path / "lm_eval", *TASKS)
    choice = results["results"]["performer_plays_next_line"]
    assert results["n-samples"]["performer_plays_next_line"]["effective"] == 8
    assert 0 <= choice["acc,none"] <= 1 and 0 <= choice["acc_norm,none"] <= 1

    # lm_eval scores each work in rolling windows of the model's length (256) and reports per byte;
    # evaluate_lm scores the same text (the works as its rows) in blocks of 256 tokens. Per token, they agree.
    performer_tasks = tasks_module()
    rolling = results["results"]["performer_plays_ppl"]
    documents = performer_tasks.works()["test"]["text"]
    size = sum(len(text.encode("utf-8")) for text in documents)
    tokens = sum(len(tokenizer(text, add_special_tokens=False).input_ids) for text in documents)
    harness = math.exp(math.log(rolling["byte_perplexity,none"]) * size / tokens)
    assert rolling["bits_per_byte,none"] == pytest.approx(math.log2(rolling["byte_perplexity,none"]), rel=1e-6)

    output, works = tmp_path / "evaluate_lm.json", tmp_path / "works.jsonl"
    works.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate_lm.py"), str(folder), "--seq-len", "256",
                           "--data", str(works), "--position-edges", "--output", str(output),
                           "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = json.loads(output.read_text())[str(folder)]["perplexity_256"]
    assert ours < 0.2 * len(tokenizer)  # a fitted model, far from uniform: the agreement is not trivial
    assert harness == pytest.approx(ours, rel=0.01)


def test_the_shipped_plays_are_the_prepared_test_split(tmp_path):
    """The tasks' data is a copy of scripts/prepare_data.py's held-out test plays: it must not drift."""
    prepare_data(tmp_path, "text", max_rows=0)
    prepared = (tmp_path / "text" / "test.jsonl").read_text()
    assert (lm_eval_tasks_path() / "plays_test.jsonl").read_text() == prepared


def test_the_next_line_task_is_the_same_everywhere_and_its_answers_follow_their_context():
    performer_tasks = tasks_module()
    rows = performer_tasks.next_lines()["test"]
    assert rows.to_list() == performer_tasks.next_lines()["test"].to_list()
    assert len(rows) > 150
    passages = [json.loads(line)["text"] for line in open(performer_tasks.DATA)]
    for row in rows.select(range(20)):
        assert len(set(row["choices"])) == performer_tasks.CHOICES
        answer = row["choices"][row["label"]]
        assert any(row["context"].split("\n")[-1] in p and answer in p.split(row["context"].split("\n")[-1], 1)[1]
                   for p in passages)
