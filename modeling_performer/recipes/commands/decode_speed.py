"""Batch-1 decoding ms per token of linearized students against their teacher at one context, the
models' steps alternating in this process (modeling_performer.recipes.decode_timing); with
--into, each student folder's row file (a frontier row's frontier_row.json) gets its
{"decode": {"context", "teacher_ms", "student_ms"}}.

    python scripts/decode_speed.py data_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        outputs/frontier/top3/chat/student outputs/frontier/uniform3/chat/student --context 8192
"""

import argparse
import json
import pathlib

from modeling_performer.recipes.chat_lm import write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="the teacher: a transformers folder, a .gguf file or a Performer folder")
    parser.add_argument("students", nargs="+", help="Performer causal-LM folders")
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=16, help="timed steps (median), after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--into", nargs="*",
                        help="one JSON file per student to add its times to (created if missing)")
    parser.add_argument("--output", help="JSON file for every model's times")
    args = parser.parse_args(argv)
    if args.into is not None and len(args.into) != len(args.students):
        raise SystemExit(f"--into names {len(args.into)} files for {len(args.students)} students")
    for folder in args.students:
        if not (pathlib.Path(folder) / "config.json").exists():
            raise SystemExit(f"{folder} holds no config.json: not a saved model")

    from modeling_performer.recipes import decode_timing

    models = {"teacher": decode_timing.load(args.teacher)}
    models.update({folder: decode_timing.load(folder) for folder in args.students})
    ms = decode_timing.paired_decode(models, args.context, args.steps, args.warmup)
    record = {"context": args.context, "teacher": args.teacher, "ms_per_token": ms,
              "teacher_over_student": {f: round(ms["teacher"] / ms[f], 3) for f in args.students}}
    print(json.dumps(record, indent=1))
    for folder, path in zip(args.students, args.into or []):
        target = pathlib.Path(path)
        row = json.loads(target.read_text()) if target.exists() else {}
        row["decode"] = {"context": args.context, "teacher_ms": ms["teacher"], "student_ms": ms[folder]}
        write_json(str(target), row)
    if args.output:
        from modeling_performer.recipes.bench_common import provenance

        write_json(args.output, {**record, **provenance()})


if __name__ == "__main__":
    main()
