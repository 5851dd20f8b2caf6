"""The benchmark scripts run end to end at toy sizes, save their results and draw their figures."""

import json
import pathlib
import subprocess
import sys

import pytest

from modeling_performer.recipes.commands import estimate_recipe_time

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--features", "8", "--vocab", "64"]


def run(script, *args):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_serving_measures_every_model_and_draws(tmp_path):
    out = tmp_path / "serving.json"
    run("bench_serving.py", *TINY, "--window", "4", "--batches", "1", "3", "--contexts", "24", "--new-tokens", "3",
        "--repeats", "2", "--output", str(out))
    saved = json.loads(out.read_text())
    assert saved["date"].startswith("20") and len(saved["commit"].split("+")[0]) == 40  # when and from what
    results = saved["results"]
    assert {(r["kind"], r["batch"]) for r in results} == {(k, b) for k in ("performer", "performer-window", "gpt2")
                                                           for b in (1, 3)}
    assert all(r["decode_tokens_per_s"] > 0 and r["cache_mib"] > 0 for r in results)
    for r in results:  # one record per point: the slower of two runs (the lower median), both figures kept
        assert len(r["runs_tokens_per_s"]) == 2 and r["decode_tokens_per_s"] == min(r["runs_tokens_per_s"])
    cache = {(r["kind"], r["batch"]): r["cache_mib"] for r in results}
    for kind in ("performer", "performer-window", "gpt2"):  # the cache grows with the batch
        assert cache[kind, 3] == pytest.approx(3 * cache[kind, 1])
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_bench_serving_compiles_every_models_decoding_step_and_times_it_after_warm_up(tmp_path):
    out = tmp_path / "serving.json"
    run("bench_serving.py", *TINY, "--kinds", "performer", "gpt2", "--batches", "2", "--contexts", "16",
        "--new-tokens", "7", "--compile", "--output", str(out))
    results = {r["kind"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"performer", "gpt2"}
    for r in results.values():
        assert r["compiled"] and r["compiled_graphs"] >= 1  # the decoding step really ran compiled
        assert r["timed_steps"] == 7 - 1 - 3  # gaps between the 7 steps, less the 3 that compile
    assert results["gpt2"]["cache_implementation"] == "static"  # the cache transformers can compile
    # The static cache is allocated for the whole generation up front: keys and values of the context and of
    # every new token but the last (never fed back), fp32.
    assert results["gpt2"]["cache_mib"] * 2**20 == 2 * 2 * (16 + 7 - 1) * 32 * 4


@pytest.mark.slow
def test_bench_training_measures_and_skips_quadratic_models_beyond_their_limit(tmp_path):
    out = tmp_path / "training.json"
    stdout = run("bench_training.py", *TINY, "--window", "4", "--chunk-size", "8", "--lengths", "32", "64",
                 "--softmax-max", "32", "--repeats", "1", "--output", str(out))
    results = json.loads(out.read_text())["results"]
    assert {(r["kind"], r["length"]) for r in results} == {
        ("performer", 32), ("performer-window", 32), ("softmax", 32), ("gpt2", 32), ("performer", 64),
        ("performer-window", 64)}
    assert "skipped (T > --softmax-max 32)" in stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_every_figure_redraws_from_its_saved_results(tmp_path):
    from modeling_performer.recipes import plots as plot_benchmarks

    samples = {
        "attention": {"1024": {"favor": {"seconds": 0.1, "peak_bytes": 1e8}, "sdpa": {"error": "skipped"}},
                      "2048": {"favor": {"seconds": 0.2, "peak_bytes": 2e8}, "sdpa": {"seconds": 0.3, "peak_bytes": 5e7}}},
        "decoding": {"rows": [{"context": 128, "performer_ms": 15, "gpt2_ms": 11, "performer_cache_mib": 3,
                               "gpt2_cache_mib": 3}, {"context": 4096, "performer_ms": 15, "gpt2_ms": 27,
                                                      "performer_cache_mib": 3, "gpt2_cache_mib": 96}]},
        "serving": {"results": [{"kind": k, "batch": b, "context": 1024, "decode_tokens_per_s": 10.0 * b}
                                for k in ("performer", "gpt2") for b in (1, 8)]},
        "training": {"results": [{"kind": k, "length": t, "tokens_per_s": 800.0, "peak_rss_mib": t / 10}
                                 for k in ("performer", "softmax") for t in (512, 2048)]},
    }
    for name, data in samples.items():
        source = tmp_path / f"{name}.json"
        source.write_text(json.dumps(data))
        assert plot_benchmarks.redraw(name, source).stat().st_size > 10_000


def test_benchmarks_leave_the_committed_figures_alone_unless_asked():
    import argparse

    from modeling_performer.recipes import bench_common

    parser = argparse.ArgumentParser()
    bench_common.add_output_arguments(parser, "serving")
    assert bench_common.results_path(parser.parse_args([]), "serving") == ROOT / "outputs" / "bench" / "serving.json"
    assert bench_common.results_path(parser.parse_args(["--update-figures"]), "serving") == \
        ROOT / "docs" / "figures" / "serving.json"
    assert bench_common.results_path(parser.parse_args(["--output", "x/y.json"]), "serving") == pathlib.Path("x/y.json")


def test_recipe_time_estimate_fits_fixed_and_per_layer_seconds():
    costs = {"layer_by_layer": (3.0, 0.5), "end_to_end": (1.0, 2.0), "lora": (4.0, 0.25)}
    points = [{"layers": n, **{kind: {"seconds_per_step": a + b * n} for kind, (a, b) in costs.items()}}
              for n in (1, 2, 4)]
    result = estimate_recipe_time.fit_and_estimate(points, 16)
    minutes = 0.0
    for kind, (a, b) in costs.items():
        assert result[kind]["fixed_seconds"] == pytest.approx(a)
        assert result[kind]["seconds_per_layer"] == pytest.approx(b)
        assert result[kind]["seconds_per_step"] == pytest.approx(a + 16 * b)
        minutes += (a + 16 * b) * estimate_recipe_time.RECIPE_STEPS[kind]["steps"] / 60
    assert result["minutes_per_student"] == pytest.approx(minutes)
    with pytest.raises(SystemExit, match="two different depths"):
        estimate_recipe_time.fit_and_estimate(points[:1] * 2, 16)


@pytest.mark.slow
def test_recipe_time_estimate_measures_shallow_copies_of_a_llama_and_checks_a_deeper_one(tmp_path):
    out = tmp_path / "time.json"
    shape = {"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 8, "vocab_size": 300, "num_hidden_layers": 6}
    stdout = run("estimate_recipe_time.py", "--shape", json.dumps(shape), "--seq-len", "32", "--window", "4",
                 "--layers", "1", "2", "--check-layers", "3", "--steps", "1", "--device", "cpu", "--output", str(out))
    record = json.loads(out.read_text())
    assert record["shape"]["num_hidden_layers"] == 6 and "6-layer model on cpu" in stdout
    one, two = record["measured"]
    three = record["checks"][0]
    assert (one["layers"], two["layers"], three["layers"]) == (1, 2, 3)
    per_layer = two["parameters"] - one["parameters"]  # the models differ in depth only
    assert per_layer > 0 and three["parameters"] - two["parameters"] == per_layer
    for point in (one, two, three):
        assert all(point[kind]["seconds_per_step"] > 0 for kind in ("layer_by_layer", "end_to_end", "lora"))
    assert set(three["estimated_over_measured"]) == {"layer_by_layer", "end_to_end", "lora"}
    assert record["estimate"]["minutes_per_student"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "estimate_recipe_time.py"), "--shape",
                          '{"hidden": 8}'], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown keys ['hidden']" in bad.stderr


@pytest.mark.slow
def test_bench_chat_times_student_and_teacher_in_both_modes_and_pairs_them(tmp_path):
    out = tmp_path / "chat_decode.json"
    stdout = run("bench_chat.py", "--shape", "tiny", "--window", "4", "--contexts", "8", "24", "--batches", "1", "2",
                 "--steps", "2", "--warmup", "2", "--output", str(out))
    saved = json.loads(out.read_text())
    rows = {(r["kind"], r["mode"], r["batch"], r["context"]): r for r in saved["rows"]}
    assert set(rows) == {(k, m, b, c) for k in ("student", "teacher") for m in ("eager", "compiled")
                         for b in (1, 2) for c in (8, 24)}
    for (kind, mode, batch, context), r in rows.items():
        assert r["ms_per_token"] > 0 and r["peak_rss_mib"] > 0
        assert ("prefill_s" in r) == (batch == 1) and ("ttft_s" in r) == (batch == 1 and mode == "eager")
    # The student's state does not grow with the context; the teacher's keys and values do, and with the batch.
    assert rows["student", "eager", 1, 8]["cache_mib"] == rows["student", "eager", 1, 24]["cache_mib"]
    assert rows["teacher", "eager", 1, 24]["cache_mib"] > rows["teacher", "eager", 1, 8]["cache_mib"]
    assert rows["teacher", "eager", 2, 24]["cache_mib"] == pytest.approx(2 * rows["teacher", "eager", 1, 24]["cache_mib"])
    ratio = next(e for e in saved["ratios"] if (e["student_mode"], e["teacher_mode"], e["batch"], e["context"])
                 == ("eager", "eager", 1, 24))
    assert ratio["ms_per_token_teacher_over_student"] == pytest.approx(
        rows["teacher", "eager", 1, 24]["ms_per_token"] / rows["student", "eager", 1, 24]["ms_per_token"])
    assert "teacher compiled / student compiled" in stdout
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_bench_chat_prices_the_decay_gate_against_the_ungated_student(tmp_path):
    out = tmp_path / "decay.json"
    stdout = run("bench_chat.py", "--shape", "tiny", "--window", "4", "--contexts", "8", "24", "--batches", "1",
                 "--modes", "eager", "--kinds", "student", "student_decay", "--steps", "2", "--warmup", "1",
                 "--output", str(out))
    saved = json.loads(out.read_text())
    rows = {(r["kind"], r["context"]): r for r in saved["rows"]}
    assert set(rows) == {(k, c) for k in ("student", "student_decay") for c in (8, 24)}
    # the gate adds no state: the same cache, whatever the context
    assert {r["cache_mib"] for r in rows.values()} == {rows["student", 8]["cache_mib"]}
    entry = next(e for e in saved["decay_ratios"] if e["context"] == 24)
    assert entry["ms_per_token_decay_over_student"] == pytest.approx(
        rows["student_decay", 24]["ms_per_token"] / rows["student", 24]["ms_per_token"])
    assert "decay / ungated student, eager, batch 1, context 24" in stdout
    paired = {(r["kind"], r["context"]): r["ms_per_token"] for r in saved["paired_decode"]}
    assert set(paired) == set(rows)
    assert entry["ms_per_token_paired_decay_over_student"] == pytest.approx(
        paired["student_decay", 24] / paired["student", 24])


def test_attention_timing_runs_the_decay_gated_kernels():
    from modeling_performer.recipes.attention_timing import LINEAR_METHODS, measure

    gated = [m for m in LINEAR_METHODS if "-decay" in m]
    assert gated == ["favor-decay-causal", "favor-window-decay-causal", "hedgehog-decay-causal",
                     "hedgehog-window-decay-causal"]
    for method in gated:
        timing = measure(method, 96, repeats=1, heads=2, head_dim=8, num_features=16, chunk_size=16, window=8)
        assert timing["seconds"] > 0
