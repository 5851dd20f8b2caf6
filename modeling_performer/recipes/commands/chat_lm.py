"""The chat-lm recipe's own steps (scripts/convert_recipe.sh chat-lm runs them in order):

    python scripts/chat_lm.py data TEACHER ROWS.jsonl        # the teacher's transcripts + plain text, to fit on
    python scripts/chat_lm.py finish FITTED OUT --sparse-cache-size 64   # the recommended folder
    python scripts/chat_lm.py evaluate TEACHER STUDENT --output results.json --snapshots DIR/snapshot-*.pt
    python scripts/chat_lm.py rank-layers TEACHER STUDENT --output layers.json   # which layers keep softmax

data: the teacher (a softmax Performer folder of the chat model) answers, greedily through its chat
template, the short prompts of configuration/chat/prompts.jsonl, and questions about a fact or a
pass key hidden in documents of 300-2,000 tokens cut from the bundled corpora's training split;
the transcripts are packed into rows of at most --seq-len tokens (none cut), followed by as many
windows of plain training text. Rows for `transfer_attention.py --whole-rows`.

evaluate: teacher against student on the corpora's test split and facts, names and questions no
step fitted: perplexity at 512 / 2,048 / 8,192 / 16,384 tokens (top-1 agreement and KL to the
teacher at 512 and 2,048), the cache's bytes, a fact in a 300 / 1,000 / 2,000 / 4,000-token
document asked through the chat template (the student with and without its sparse cache), pass
keys, short chat questions, and the quality after each transfer snapshot. Each part is kept as it
finishes (OUTPUT.partial.json), so a killed run resumes where it stopped with the same command.

rank-layers: every linear layer of STUDENT scored one at a time on the training split (the teacher
with that layer linear, or the student with that layer exact again: --direction), by the planted
answers' log-probability and the KL to the teacher; the ranking goes to OUTPUT, and
`convert_to_performer.py --softmax-layers` takes its first k (modeling_performer.recipes.layer_choice).
"""

import argparse
import json
import math
import pathlib
import random
import time

from modeling_performer.recipes.chat_lm import write_atomically, write_json

DOCUMENT_LENGTHS = (300, 1000, 2000, 4000)
PASSKEY_LENGTHS = (1000, 2000)
PPL_LENGTHS = (512, 2048, 8192, 16384)
PARTS = ("language", "documents", "passkey", "chat", "curve")


def load(folder, device, precision="fp32", **overrides):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_performer  # noqa: F401 (registers the Performer with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder, **overrides).to(device).eval()
    if precision != "fp32":  # bf16 / fp16 weights on an accelerator: generation and scoring in that precision
        model.to(torch.bfloat16 if precision == "bf16" else torch.float16)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.set_grad_enabled(False)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- data
def data(args):
    from modeling_performer.recipes import chat_lm, devices

    device, precision = devices.setup(args)
    output = pathlib.Path(args.output)
    if output.exists():
        print(f"{output} exists; nothing to do")
        return
    teacher, tokenizer = load(args.teacher, device, precision)
    ids = chat_lm.corpus_ids(tokenizer, "train")
    lengths = [300, 600, 1000, 1500, 2000]
    per = max(args.documents // len(lengths), 1)
    items = (chat_lm.chat_prompts()[:args.prompts]
             + chat_lm.fact_items(tokenizer, ids, "train", lengths, per)
             + chat_lm.passkey_items(tokenizer, ids, "train", [600, 1500], max(args.passkeys // 2, 1)))
    # Replies are kept as they come (OUTPUT.replies.jsonl), so a killed run asks only what is left.
    kept_path = output.with_name(output.name + ".replies.jsonl")
    kept = [json.loads(line) for line in kept_path.read_text().splitlines()] if kept_path.exists() else []
    with open(kept_path, "a") as handle:
        for start in range(len(kept), len(items), args.batch_size * 4):
            part = items[start:start + args.batch_size * 4]
            tokens = [args.prompt_tokens if item["task"] == "prompt" else args.answer_tokens for item in part]
            replies = chat_lm.generate_answers(teacher, tokenizer, part, max(tokens), args.batch_size,
                                               desc=f"teacher transcripts {start + len(part)}/{len(items)}")
            for reply in replies:
                handle.write(json.dumps(reply) + "\n")
                kept.append(reply)
            handle.flush()
    transcripts = [chat_lm.transcript(tokenizer, item, reply) for item, reply in zip(items, kept)]
    random.Random(0).shuffle(transcripts)
    rows = chat_lm.pack_rows(tokenizer, transcripts, args.seq_len)
    rows += chat_lm.plain_rows(tokenizer, ids, args.seq_len, args.plain_rows, seed=3)
    write_atomically(output, "".join(json.dumps({"text": row}) + "\n" for row in rows))
    right = sum(chat_lm.is_correct(reply, item["answers"]) for item, reply in zip(items, kept) if item["answers"])
    asked = sum(1 for item in items if item["answers"])
    print(json.dumps({"rows": len(rows), "transcript_rows": len(rows) - args.plain_rows, "transcripts": len(items),
                      "teacher_right_on_training_documents": f"{right}/{asked}"}))


# -------------------------------------------------------------------------------------------- finish
def finish(args):
    from modeling_performer.checkpoint_performer import fresh_stage, publish_folder

    output = pathlib.Path(args.output)
    if (output / "config.json").exists():
        print(f"{output} is complete; nothing to do")
        return
    model, tokenizer = load(args.fitted, "cpu", sparse_cache_size=args.sparse_cache_size)
    stage = pathlib.Path(fresh_stage(str(output)))
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    metrics = pathlib.Path(args.fitted) / "transfer_metrics.json"
    if metrics.exists():
        (stage / "transfer_metrics.json").write_text(metrics.read_text())
    publish_folder(str(stage), str(output))
    print(f"{output}: {args.fitted} with a sparse cache of {args.sparse_cache_size}")


# ------------------------------------------------------------------------------------------ evaluate
def windows(ids: dict, length: int, tokens: int) -> list:
    """Non-overlapping windows of `length` tokens, about `tokens` in all (at least one), taken from
    the corpora in turn."""
    from modeling_performer.recipes.chat_lm import CORPORA

    count = max(tokens // length, 1)
    found, offsets = [], {c: 0 for c in CORPORA}
    while len(found) < count:
        added = False
        for corpus in CORPORA:
            if len(found) < count and offsets[corpus] + length <= len(ids[corpus]):
                found.append(ids[corpus][offsets[corpus]:offsets[corpus] + length])
                offsets[corpus] += length
                added = True
        if not added:
            joined = [t for c in CORPORA for t in ids[c]]
            if len(joined) < length:
                raise SystemExit(f"the test texts hold {len(joined)} tokens: too few for a window of {length}")
            found.append(joined[:length])
    return found


def _forward(model, ids):
    out = model.base_model(input_ids=ids, use_cache=True)
    return out.last_hidden_state, out.cache


def language_scores(teacher, students: dict, windows_, chunk: int = 1024) -> dict:
    """For the teacher and each student ({name: model}): perplexity over the windows' next tokens,
    and the cache's bytes after the last window; for each student also the perplexity ratio to the
    teacher, top-1 agreement and mean KL(teacher || student)."""
    import torch

    from modeling_performer.cache_performer import cache_bytes

    models = {"teacher": teacher, **students}
    nll = dict.fromkeys(models, 0.0)
    agree, kl = dict.fromkeys(students, 0), dict.fromkeys(students, 0.0)
    caches, n = {}, 0
    device = next(teacher.parameters()).device
    for window in windows_:
        ids = torch.tensor([window], device=device)
        hidden = {}
        for name, model in models.items():
            hidden[name], cache = _forward(model, ids)
            caches[name] = cache_bytes(cache)
            del cache
        for a in range(0, ids.shape[1] - 1, chunk):
            b = min(a + chunk, ids.shape[1] - 1)
            target = ids[0, a + 1:b + 1]
            logp = {name: model.get_output_embeddings()(hidden[name][0, a:b]).float().log_softmax(-1)
                    for name, model in models.items()}
            for name in models:
                nll[name] += -logp[name].gather(-1, target[:, None]).sum().item()
            for name in students:
                agree[name] += (logp["teacher"].argmax(-1) == logp[name].argmax(-1)).sum().item()
                kl[name] += (logp["teacher"].exp() * (logp["teacher"] - logp[name])).sum().item()
            n += b - a
    out = {"teacher": {"perplexity": round(math.exp(nll["teacher"] / n), 3), "cache_bytes": caches["teacher"]},
           "tokens": n, "windows": len(windows_)}
    for name in students:
        out[name] = {"perplexity": round(math.exp(nll[name] / n), 3),
                     "ratio": round(math.exp((nll[name] - nll["teacher"]) / n), 4),
                     "top1_agreement": round(agree[name] / n, 4), "kl": round(kl[name] / n, 4),
                     "cache_bytes": caches[name]}
    return out


def answer_part(model, tokenizer, items, max_new_tokens, batch_size, desc):
    from modeling_performer.recipes import chat_lm

    replies = chat_lm.generate_answers(model, tokenizer, items, max_new_tokens, batch_size, desc=desc)
    by_length = {}
    for item, reply in zip(items, replies):
        by_length.setdefault(str(item["length"]), []).append(chat_lm.is_correct(reply, item["answers"]))
    return {"accuracy": {k: round(sum(v) / len(v), 4) for k, v in by_length.items()},
            "right": {k: sum(v) for k, v in by_length.items()}, "asked": {k: len(v) for k, v in by_length.items()},
            "replies": replies}


def evaluate(args):
    from modeling_performer.recipes import chat_lm, devices

    device, precision = devices.setup(args)
    output = pathlib.Path(args.output)
    partial_path = output.with_name(output.name + ".partial.json")
    record = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    record.setdefault("minutes", {})

    def part(name, compute):
        if name in record:
            print(f"== {name}: kept from {partial_path}")
            return record[name]
        print(f"== {name}", flush=True)
        start = time.time()
        record[name] = compute()
        record["minutes"][f"evaluate-{name}"] = round((time.time() - start) / 60, 2)
        write_json(partial_path, record)
        return record[name]

    teacher, tokenizer = load(args.teacher, device, precision)
    # --local-window: the same fitted maps under another exact window (a switch, no fitting)
    window = {} if args.local_window is None else {"local_window": args.local_window}
    student, _ = load(args.student, device, precision, **window)
    bare, _ = load(args.student, device, precision, sparse_cache_size=0, **window)
    cache_size = student.config.sparse_cache_size
    wanted = set(args.parts)
    ids = chat_lm.corpus_ids(tokenizer, "test")
    students = {"student": student, **({"student_without_sparse_cache": bare} if cache_size else {})}
    for length in args.ppl_lengths if "language" in wanted else ():
        part(f"language-{length}", lambda: language_scores(teacher, students,
                                                           windows(ids, length, max(args.ppl_tokens, length))))
    documents = chat_lm.fact_items(tokenizer, ids, "test", args.document_lengths, args.per_length)
    passkeys = chat_lm.passkey_items(tokenizer, ids, "test", args.passkey_lengths, args.passkey_per_length)
    questions = chat_lm.chat_questions()
    runs = {"teacher": teacher, "student": student}
    if cache_size:
        runs["student_without_sparse_cache"] = bare
    for name, model in runs.items():
        if "documents" in wanted:
            part(f"documents-{name}", lambda: answer_part(model, tokenizer, documents, args.answer_tokens,
                                                          args.batch_size, f"documents, {name}"))
        if "passkey" in wanted:
            part(f"passkey-{name}", lambda: answer_part(model, tokenizer, passkeys, args.answer_tokens,
                                                        args.batch_size, f"pass keys, {name}"))
    for name in ("teacher", "student") if "chat" in wanted else ():
        part(f"chat-{name}", lambda: answer_part(runs[name], tokenizer, questions, args.chat_tokens, 8,
                                                 f"chat, {name}"))
    # Quality against transfer steps: the snapshots, and the converted student before any fitting.
    curve_items = [item for item in documents if item["length"] in args.curve_lengths]
    curve_windows = windows(ids, 2048, args.curve_tokens)
    from modeling_performer.transfer import load_snapshot

    for snapshot in [None, *args.snapshots] if "curve" in wanted else ():
        key = "curve-" + ("0" if snapshot is None else pathlib.Path(snapshot).stem.split("-")[-1])

        def compute(snapshot=snapshot):
            # the student's configuration (its sparse cache too) at every point of the curve
            model, _ = load(args.unfitted if snapshot is None else args.student, device, precision,
                            sparse_cache_size=cache_size)
            if snapshot is not None:
                load_snapshot(model, snapshot)
            return {"ppl_2048": language_scores(teacher, {"student": model}, curve_windows)["student"]["perplexity"],
                    "documents": answer_part(model, tokenizer, curve_items, args.answer_tokens, args.batch_size,
                                             f"curve {key}")["accuracy"]}

        if snapshot is None and not args.unfitted:
            continue
        part(key, compute)

    def final_point():  # the finished student on the curve's windows, beside the teacher there
        scores = language_scores(teacher, {"student": student}, curve_windows)
        return {"teacher": scores["teacher"]["perplexity"], "student": scores["student"]["perplexity"]}

    if "curve" in wanted:
        part("curve-final", final_point)
    record["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    record["sparse_cache_size"] = cache_size
    write_json(partial_path, record)
    print(f"evaluation kept in {partial_path}; python scripts/chat_lm.py report assembles the results file")


# -------------------------------------------------------------------------------------------- report
FITTING_STEPS = ("convert-teacher", "convert-linear", "chat-rank-layers", "convert-converted", "chat-data",
                 "chat-transfer", "chat-finish")


def report(args):
    from transformers import AutoTokenizer

    from modeling_performer.recipes import chat_lm, plots
    from modeling_performer.recipes.bench_common import provenance

    folder = pathlib.Path(args.folder)
    partial_path = folder / "results.json.partial.json"
    if not partial_path.exists():
        raise SystemExit(f"{partial_path} is missing: run python scripts/chat_lm.py evaluate first")
    from modeling_performer.recipes.frontier import read_minutes

    # the last record of each fitting step ("(resumed)" marks a part)
    recorded = read_minutes(pathlib.Path(args.minutes or folder.parent / "minutes.tsv"))
    minutes = {name: value for name, value in recorded.items() if name in FITTING_STEPS}
    tokenizer = AutoTokenizer.from_pretrained(folder / "teacher")
    transfer = json.loads((folder / "fitted" / "transfer_metrics.json").read_text())
    rows = [json.loads(line)["text"] for line in (folder / "rows.jsonl").read_text().splitlines() if line.strip()]
    rows_tokens = [min(len(tokenizer(r, add_special_tokens=False)["input_ids"]), transfer["seq_len"]) for r in rows]
    student_config = json.loads((folder / "student" / "config.json").read_text())

    def shown(path):
        path = path.resolve()
        return str(path.relative_to(chat_lm.ROOT)) if path.is_relative_to(chat_lm.ROOT) else str(path)

    results = chat_lm.assemble_results(json.loads(partial_path.read_text()), minutes, transfer, rows_tokens,
                                       shown(folder / "student"), shown(folder / "teacher"), student_config,
                                       json.loads((folder / "teacher" / "provenance.json").read_text())["source"])
    import torch

    results.update(provenance(), threads=torch.get_num_threads())
    output = pathlib.Path(args.output)
    write_json(output, results)
    plots.plot_chat_lm(results, output.with_suffix(".png"))
    print(json.dumps(results["targets"], indent=1))
    print(f"wrote {output} and {output.with_suffix('.png')}")


def frontier(args):
    from modeling_performer.recipes import frontier as rows_of, plots
    from modeling_performer.recipes.bench_common import provenance

    root = pathlib.Path(args.root)
    shared = rows_of.read_minutes(root / "shared" / "minutes.tsv")
    ranking_file = root / "shared" / "layers.json"
    ranking = json.loads(ranking_file.read_text()) if ranking_file.exists() else None
    names = args.rows or sorted(p.parent.name for p in root.glob("*/results.json"))
    rows = []
    for name in names:
        folder = root / name
        if not (folder / "results.json").exists():
            raise SystemExit(f"{folder}/results.json is missing: run bash scripts/chat_frontier.sh {name}")
        steps = dict(shared)
        if name.startswith("top") and ranking:  # the measured choice's own cost
            steps.setdefault("chat-rank-layers", ranking["minutes"])
        rows.append(rows_of.read_row(folder, name, steps))
    for item in args.results:  # NAME=FILE: a results file of a whole recipe run (budget 1, full evaluation)
        name, _, path = item.partition("=")
        results = json.loads(pathlib.Path(path).read_text())
        rows.append(rows_of.row_of(name, results, 1.0, "full"))
    now = provenance()
    if args.previous:  # the rows of an earlier table that were not run again, as they were measured
        earlier = json.loads(pathlib.Path(args.previous).read_text())
        names = {row["name"] for row in rows}
        kept = [{**row, "measured": row.get("measured") or {k: earlier.get(k) for k in ("date", "commit")}}
                for row in earlier["rows"] if row["name"] not in names]
        rows = kept + rows
    best = rows_of.recommended(rows)
    record = {"rows": rows, "recommended": best and best["name"],
              "targets": {k: {"column": c, "bound": round(b, 4), "kind": kind}
                          for k, (c, b, kind) in rows_of.TARGETS.items()},
              "ranking": ranking["ranking"] if ranking else (earlier["ranking"] if args.previous else None),
              **now}
    output = pathlib.Path(args.output)
    write_json(output, record)
    plots.plot_frontier(record, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}; recommended: {record['recommended']}")


def rank_layers(args):
    from modeling_performer.recipes import devices, layer_choice

    device, _ = devices.setup(args)
    try:
        result = layer_choice.rank_layers(args.teacher, args.student, args.output, args.direction, args.documents,
                                          args.document_length, args.kl_tokens, device=device)
    except layer_choice.LayerChoiceError as error:
        raise SystemExit(f"rank-layers: {error}") from error
    print(layer_choice.format_ranking(result))
    print(f"wrote {args.output}")


def main(argv=None):
    from modeling_performer.recipes import devices

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("data", help="the teacher's transcripts and plain text, as rows to fit on")
    p.add_argument("teacher")
    p.add_argument("output", help=".jsonl of rows (a 'text' field each)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--documents", type=int, default=100, help="document questions (%(default)s)")
    p.add_argument("--passkeys", type=int, default=24, help="pass-key questions (%(default)s)")
    p.add_argument("--prompts", type=int, default=64, help="short prompts answered (%(default)s)")
    p.add_argument("--plain-rows", type=int, default=120, help="rows of plain text (%(default)s)")
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    devices.add_device_arguments(p)
    p.set_defaults(func=data)
    p = commands.add_parser("finish", help="the fitted student with its sparse cache on: the recommended folder")
    p.add_argument("fitted")
    p.add_argument("output")
    p.add_argument("--sparse-cache-size", type=int, default=64)
    p.set_defaults(func=finish)
    p = commands.add_parser("evaluate", help="teacher against student on held-out text and questions")
    p.add_argument("teacher")
    p.add_argument("student")
    p.add_argument("--output", required=True)
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="what to measure (all)")
    p.add_argument("--local-window", type=int, help="score the student under this exact window instead of its own")
    p.add_argument("--unfitted", help="the converted student before transfer (the curve's first point)")
    p.add_argument("--snapshots", nargs="*", default=[], help="transfer snapshots (snapshot-STEP.pt), in order")
    p.add_argument("--ppl-lengths", type=int, nargs="+", default=list(PPL_LENGTHS))
    p.add_argument("--ppl-tokens", type=int, default=8192,
                   help="tokens scored per length (at least one window; %(default)s)")
    p.add_argument("--curve-tokens", type=int, default=4096, help="tokens scored at 2,048 per curve point")
    p.add_argument("--document-lengths", type=int, nargs="+", default=list(DOCUMENT_LENGTHS))
    p.add_argument("--passkey-lengths", type=int, nargs="+", default=list(PASSKEY_LENGTHS))
    p.add_argument("--curve-lengths", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--per-length", type=int, default=12, help="document questions per length (%(default)s)")
    p.add_argument("--passkey-per-length", type=int, default=8, help="(%(default)s)")
    p.add_argument("--answer-tokens", type=int, default=40)
    p.add_argument("--chat-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    devices.add_device_arguments(p)
    p.set_defaults(func=evaluate)
    p = commands.add_parser("report", help="the results file and its figure, from an evaluated recipe folder")
    p.add_argument("folder", help="the recipe's chat folder (teacher/, fitted/, student/, rows.jsonl, ...)")
    p.add_argument("--output", required=True, help="results .json (the figure goes beside it as .png)")
    p.add_argument("--minutes", help="minutes.tsv of the recipe (default: beside FOLDER)")
    p.set_defaults(func=report)
    p = commands.add_parser("frontier", help="the quality/cost table of scripts/chat_frontier.sh's rows")
    p.add_argument("root", help="chat_frontier.sh's output folder (outputs/frontier)")
    p.add_argument("--output", required=True, help="frontier .json (the figure goes beside it as .png)")
    p.add_argument("--rows", nargs="*", default=[], help="row folders under ROOT (default: every one with results)")
    p.add_argument("--results", nargs="*", default=[], metavar="NAME=FILE",
                   help="rows from results files of whole recipe runs (e.g. the committed maps-only one)")
    p.add_argument("--previous", metavar="FILE",
                   help="an earlier frontier .json: its rows not among the new ones are kept as measured then")
    p.set_defaults(func=frontier)
    p = commands.add_parser("rank-layers", help="which layers should keep softmax attention, measured")
    p.add_argument("teacher")
    p.add_argument("student", help="a linear (or hybrid) conversion of the teacher, fitted or not")
    p.add_argument("--output", required=True, help="the ranking's .json")
    p.add_argument("--direction", choices=("ablate", "restore"), default="ablate",
                   help="ablate: the teacher with one layer linear (default); restore: the student with one "
                        "layer exact (for fitted students)")
    p.add_argument("--documents", type=int, default=16, help="training questions asked (%(default)s)")
    p.add_argument("--document-length", type=int, default=1000, help="their documents' tokens (%(default)s)")
    p.add_argument("--kl-tokens", type=int, default=3072, help="plain training tokens for the KL (%(default)s)")
    devices.add_device_arguments(p)
    p.set_defaults(func=rank_layers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
