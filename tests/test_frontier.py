"""The frontier table (modeling_performer.recipes.frontier, `chat_lm.py frontier`): each row's
columns come from its results file, each target is judged on its bound, the recommended row is the
one meeting most targets, and the command assembles rows from run folders and results files."""

import json
import pathlib
import re

import pytest

from modeling_performer.recipes import frontier
from modeling_performer.recipes.commands import chat_lm

from .conftest import ROOT

FIGURES = ROOT / "docs" / "figures" / "smollm2"
RESULTS = FIGURES / "maps-w64-full.json"  # the maps-only recipe run at the full budget (a frontier row)


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


def test_a_budget_curve_gathers_the_rows_of_one_configuration_by_fitting_tokens():
    record = results()
    full = frontier.row_of("full", record, 1.0, "full")
    half = frontier.row_of("half", results(transfer={**record["transfer"], "steps": 60, "end_to_end_steps": 50}),
                           0.5, "screening")
    hybrid = frontier.row_of("hybrid", results(student={**record["student"], "attention_type": ["softmax", "favor"]}),
                             1.0, "full")
    assert [r["name"] for r in frontier.budget_rows([full, hybrid, half], "full")] == ["half", "full"]
    assert [r["name"] for r in frontier.budget_rows([full, hybrid, half], "hybrid")] == ["hybrid"]
    # Screening chooses the configuration; its full run is the one recommended, even where it reads less.
    half["documents"] = {n: {**r, "fraction": 1.0} for n, r in half["documents"].items()}
    half["targets"] = frontier.verdicts(half)
    assert frontier.best_row([full, hybrid, half])["name"] == "half"
    assert frontier.recommended([full, hybrid, half])["name"] == "full"
    assert frontier.recommended([hybrid, half])["name"] == "half" and frontier.recommended([]) is None
    assert full["tokens_needed"] == record["curve_tokens_needed"]


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
    assert record["rows"][1]["measured"] == {k: json.loads(RESULTS.read_text())[k] for k in ("date", "commit")}
    with pytest.raises(SystemExit, match="missing"):
        chat_lm.main(["frontier", str(tmp_path), "--output", str(output), "--rows", "nothing"])
    # A later table from one new row keeps the earlier rows, as they were measured, and their ranking.
    (tmp_path / "shared" / "layers.json").unlink()
    (row / "results.json").write_text(json.dumps({**json.loads(RESULTS.read_text()), "date": "2027-01-01"}))
    later = tmp_path / "later.json"
    chat_lm.main(["frontier", str(tmp_path), "--output", str(later), "--rows", "top3", "--previous", str(output)])
    again = json.loads(later.read_text())
    assert [r["name"] for r in again["rows"]] == ["full", "top3"]
    assert again["rows"][0] == record["rows"][1] and again["rows"][1]["measured"]["date"] == "2027-01-01"
    assert again["ranking"] == [3, 1, 2]


def test_the_recipes_defaults_are_the_recommended_row_and_the_results_file_is_its_run():
    """`bash scripts/convert_recipe.sh chat-lm` with no settings makes the frontier's recommended row,
    and the README's results file is that command's run, at the recipe's full budget."""
    from modeling_performer.transfer import RECIPE_SETTINGS

    record = json.loads((FIGURES / "frontier.json").read_text())
    best = next(row for row in record["rows"] if row["name"] == record["recommended"])
    recipe = (ROOT / "scripts" / "convert_recipe.sh").read_text()

    def default(variable):
        return re.search(r"\$\{" + variable + r":-([^}]*)\}", recipe).group(1)

    assert best["name"].startswith("top") and default("CHAT_SOFTMAX_LAYERS") == f"top:{len(best['softmax_layers'])}"
    assert best["softmax_layers"] == sorted(record["ranking"][:len(best["softmax_layers"])])
    assert int(default("CHAT_LORA_RANK")) == best["lora_rank"]
    assert int(default("CHAT_SPARSE_CACHE")) == best["sparse_cache_size"]
    assert best["local_window"] == RECIPE_SETTINGS["local_window"] and best["linear_decay"] is None
    assert best["budget"] == 1.0 and best["evaluation"] == "full"
    readme = json.loads((FIGURES / "results.json").read_text())
    assert frontier.kept_layers(readme["student"]) == best["softmax_layers"]
    assert readme["student"]["sparse_cache_size"] == best["sparse_cache_size"]
    assert readme["transfer"]["lora_rank"] == best["lora_rank"]
    assert readme["transfer"]["steps"] + readme["transfer"]["end_to_end_steps"] == (
        int(default("CHAT_LAYER_STEPS")) + int(default("CHAT_KL_STEPS")))
