"""Fitting throughput of attention transfer, with and without the teacher computed once
(`transfer.TeacherCache`): the same steps timed in one process, the variants taking turns so that a
busy machine slows each alike (what scripts/bench_transfer.py measures).

Per stage (layer by layer, next-token KL), the median seconds per step of three variants:
- `teacher`: the teacher runs in every step (no cache);
- `filling`: the first fit with a cache, which runs the teacher and stores what it gives;
- `cached`: a later fit on the same rows, which reads it back and never runs the teacher.
Tokens per second are the rows' real tokens over those seconds."""

import statistics
import tempfile
import time

VARIANTS = ("teacher", "filling", "cached")


def row_batches(tokenizer, texts, seq_len, count):
    """The `count` longest rows, each one sequence cut at seq_len (the recipe's --whole-rows batches of one)."""
    import torch

    rows = [tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len] for text in texts]
    rows = [torch.tensor([row]) for row in sorted((r for r in rows if len(r)), key=len, reverse=True)[:count]]
    if len(rows) < count:
        raise ValueError(f"{count} rows wanted, the data holds {len(rows)}")
    return [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in rows]


def time_fit(load_teacher, load_student, batches, steps, kl_steps, cache, fit_options):
    """One fit of `steps` layer-by-layer and `kl_steps` KL steps; -> {stage: [seconds per step]}.
    A step's time runs from its batch being asked for to the next one's (the last: to the fit's end)."""
    from ..transfer import transfer_attention

    teacher, student = load_teacher(), load_student()
    stamps = []

    def get_batch(step):
        stamps.append(time.perf_counter())
        return batches[step % len(batches)]

    transfer_attention(teacher, student, get_batch, steps, progress=False, end_to_end_steps=kl_steps,
                       end_to_end_loss="next_token_kl", teacher_cache=cache, **fit_options)
    stamps.append(time.perf_counter())
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"layers": seconds[:steps], "kl": seconds[steps:]}


def measure(load_teacher, load_student, batches, steps=2, kl_steps=2, rounds=2, top_k=64, fit_options=None):
    """Each round: an uncached fit, a fit that fills a fresh cache, and one that reads it. The first
    step of every stage is left out (warm-up). -> {stage: {variant: {"seconds": median per step,
    "tokens_per_second": ...}}, "ratio": {stage: teacher seconds / cached seconds}}."""
    from ..transfer import TeacherCache

    fit_options = dict(fit_options or {})
    times = {stage: {variant: [] for variant in VARIANTS} for stage in ("layers", "kl")}
    tokens = statistics.mean(int(batch["attention_mask"].sum()) for batch in batches)
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as directory:
            for variant in VARIANTS:
                cache = None if variant == "teacher" else TeacherCache(directory, top_k=top_k)
                measured = time_fit(load_teacher, load_student, batches, steps, kl_steps, cache, fit_options)
                if variant == "cached" and cache.misses:
                    raise RuntimeError(f"the cached fit ran the teacher {cache.misses} times")
                for stage, seconds in measured.items():
                    times[stage][variant] += seconds[1:]
    result = {stage: {variant: {"seconds": round(statistics.median(values), 3),
                                "tokens_per_second": round(tokens / statistics.median(values), 1),
                                "steps_timed": len(values)}
                      for variant, values in variants.items()}
              for stage, variants in times.items()}
    result["ratio"] = {stage: round(result[stage]["teacher"]["seconds"] / result[stage]["cached"]["seconds"], 3)
                       for stage in ("layers", "kl")}
    result["tokens_per_step"] = tokens
    return result


def projected_minutes(result: dict, layer_steps: int, kl_steps: int) -> dict:
    """{variant: minutes of `layer_steps` + `kl_steps` steps at the measured seconds per step}."""
    return {variant: round((layer_steps * result["layers"][variant]["seconds"]
                            + kl_steps * result["kl"][variant]["seconds"]) / 60, 1) for variant in VARIANTS}
