"""The frontier table (modeling_performer.recipes.frontier, `chat_lm.py frontier`): each row's
columns come from its results file, each target is judged on its bound, the recommended row is the
one meeting most targets, and the command assembles rows from run folders and results files."""

import json
import pathlib

import pytest

from modeling_performer.recipes import frontier
from modeling_performer.recipes.commands import chat_lm

from .conftest import ROOT

RESULTS = ROOT / "docs" / "figures" / "smollm2" / "results.json"


def results(**changes):
    record = json.loads(RESULTS.read_text())
    for key, value in changes.items():
        record[key] = value
    return record


def test_a_row_reads_its_columns_from_the_results_file_and_judges_each_target():
    record = results()
    row = frontier.row_of("maps-w64", record, 1.0, "full")
    assert row["perplexity_ratio"]["2048"] == record["perplexity"]["2048"]["student_ratio"]
    assert row["documents"]["1000"]["fraction"] == record["documents"]["1000"]["fraction_of_teacher"]
    assert row["cache_fraction_8192"] == record["cache_bytes"]["8192"]["fraction"]
    steps = record["transfer"]["steps"] + record["transfer"]["end_to_end_steps"]
    assert row["fitting"]["tokens"] == steps * record["fitted_tokens_per_step"]
    assert row["fitting"]["minutes"] == pytest.approx(record["minutes"]["fitting_total"], abs=0.11)
    assert row["softmax_layers"] == [] and row["lora_rank"] == 0
    assert row["targets"]["documents_1000"] is False  # 0 of 12 against the teacher's 9
    assert row["targets"]["perplexity_512"] is (record["perplexity"]["512"]["student_ratio"] <= 1.05)
    assert row["targets"]["cache_8192"] is (record["cache_bytes"]["8192"]["fraction"] <= 1 / 8)
    assert row["targets"]["decode_8192"] is None  # not measured for this row
    assert frontier.row_of("x", record, 1.0, "full", decode={"teacher_ms": 30.0, "student_ms": 10.0}
                           )["targets"]["decode_8192"] is True


def test_shared_steps_count_in_a_rows_fitting_minutes_once():
    record = results()
    alone = frontier.row_of("a", record, 0.5, "screening")
    shared = frontier.row_of("a", record, 0.5, "screening", shared_minutes={"chat-data": 20.0, "chat-rank-layers": 4.0})
    # the row ran its own data step: the shared one is not added again; the ranking is
    assert shared["fitting"]["minutes"] == pytest.approx(alone["fitting"]["minutes"] + 4.0, abs=0.11)


def test_the_recommended_row_meets_the_most_targets_then_reads_best():
    record = results()
    weak = frontier.row_of("weak", record, 1.0, "full")
    strong_record = results(documents={n: {**r, "student": r["teacher"], "fraction_of_teacher": 1.0}
                                       for n, r in record["documents"].items()})
    strong = frontier.row_of("strong", strong_record, 1.0, "full")
    assert frontier.best_row([weak, strong])["name"] == "strong"
    assert frontier.best_row([]) is None
    # A row that reads but fits for longer is closer than one that is quick and reads nothing.
    reads = frontier.row_of("reads", results(documents={n: {**r, "student": r["teacher"] / 2, "fraction_of_teacher": 0.5}
                                                        for n, r in record["documents"].items()},
                                             minutes={**record["minutes"], "fitting": {"chat-transfer": 90.0}}),
                            1.0, "full")
    assert reads["targets"]["fitting_minutes"] is False and weak["targets"]["fitting_minutes"] is True
    assert frontier.best_row([weak, reads])["name"] == "reads"


def test_the_command_assembles_rows_from_folders_and_results_files(tmp_path):
    row = tmp_path / "top3"
    row.mkdir()
    (row / "results.json").write_text(RESULTS.read_text())
    (row / "frontier_row.json").write_text(json.dumps({"budget": 0.5, "evaluation": "screening"}))
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "minutes.tsv").write_text("chat-rank-layers-extra\t2.5\n")
    (tmp_path / "shared" / "layers.json").write_text(json.dumps({"ranking": [3, 1, 2], "minutes": 1.5}))
    output = tmp_path / "frontier.json"
    chat_lm.main(["frontier", str(tmp_path), "--output", str(output), "--results", f"full={RESULTS}"])
    record = json.loads(output.read_text())
    assert [r["name"] for r in record["rows"]] == ["top3", "full"]
    assert record["rows"][0]["budget"] == 0.5 and record["rows"][0]["evaluation"] == "screening"
    assert record["rows"][0]["fitting"]["by_step"]["chat-rank-layers"] == 1.5
    assert record["ranking"] == [3, 1, 2] and record["recommended"] in {"top3", "full"}
    assert pathlib.Path(output.with_suffix(".png")).exists()
    with pytest.raises(SystemExit, match="missing"):
        chat_lm.main(["frontier", str(tmp_path), "--output", str(output), "--rows", "nothing"])
