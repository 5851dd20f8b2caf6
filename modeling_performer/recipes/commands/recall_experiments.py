"""Recall experiments beyond the benchmark table (scripts/bench_recall.py), on the tasks of
modeling_performer.recipes.recall:

    python scripts/recall_experiments.py linearize --seq-len 128 --pairs 8   # recall beyond the window, linearized
    python scripts/recall_experiments.py passkey    # the same for a 5-digit key planted in the plays
    python scripts/recall_experiments.py decoding   # cache bytes and ms per token of the sparse cache

linearize: a softmax teacher trained at --seq-len/--pairs, fitted to Hedgehog + window by attention
transfer, scored beyond the window with and without the sparse cache (recall_linearized.json).
passkey: one softmax teacher trained to return a planted key, students fitted on plain text, on
text with a planted key, and on whole unlabelled pass-key sequences (recall_passkey.json).
decoding: decoding with the sparse cache up to --decode-tokens (sparse_cache.json).
"""

import argparse
import json
import time

import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.recipes.bench_common import add_output_arguments, save_and_draw
from modeling_performer.recipes.devices import resolve_device
from modeling_performer.recipes.recall import (
    PASSKEY_TRANSFER,
    MQARTask,
    PasskeyTask,
    add_task_arguments,
    kept_folder,
    write_record,
)
from modeling_performer.recipes.recall_data import BUNDLED_TEXT, TRANSFER_SEED

TIMED_STEPS = 256


def linearize(args, device, task_class=MQARTask) -> dict:
    """Recall beyond the window after linearizing: a softmax teacher trained on the task, copied into
    Hedgehog + window layers and fitted by attention transfer on unlabelled sequences (the attention
    outputs only: no answer is ever a target), then scored on held-out sequences whose questions all
    lie more than --linearize-window tokens after what they ask for, with the sparse cache off and on
    (the same weights), beside the teacher and a FAVOR+ swap of the teacher (no fitting)."""
    from modeling_performer.transfer import transfer_attention

    window = args.linearize_window
    task = task_class(args, device, window)
    # Teacher and fitted student are kept per setting: scoring other cache sizes reuses them.
    # The teacher does not depend on how it is linearized: one teacher for every transfer setting.
    transfer_settings = ("linearize_cache", "linearize_window", "swap_features", "transfer_steps", "transfer_lr",
                         "end_to_end_steps", "passkey_transfer")
    teacher_folder = kept_folder(args, task.prefix, ignored=transfer_settings) / "teacher"
    student_folder = kept_folder(args, task.prefix, ignored=("linearize_cache",)) / "student"
    if (teacher_folder / "training.json").exists():
        teacher = PerformerForCausalLM.from_pretrained(teacher_folder).to(device)
        record = {"task": task.name, "teacher": json.loads((teacher_folder / "training.json").read_text())}
    else:
        torch.manual_seed(args.seed)
        teacher = PerformerForCausalLM(task.config("softmax", "softmax", 0, args.features)).to(device)
        record = {"task": task.name, "teacher": task.train(teacher)}
        teacher.save_pretrained(teacher_folder)
        (teacher_folder / "training.json").write_text(json.dumps(record["teacher"]))  # last: the folder is complete
    teacher.eval()
    results = {"softmax teacher": task.score(teacher)}

    def copy_of(feature_map, window, features, sparse=0):
        student = PerformerForCausalLM(task.config("favor", feature_map, window, features, sparse)).to(device)
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        assert not unexpected, unexpected
        return student.eval()

    results[f"FAVOR+ M={args.swap_features} swap (no fitting)"] = task.score(copy_of("softmax", 0, args.swap_features))
    if (student_folder / "transfer.json").exists():
        student = PerformerForCausalLM.from_pretrained(student_folder).to(device).eval()
        record["transfer_loss"] = json.loads((student_folder / "transfer.json").read_text())
    else:
        student = copy_of("hedgehog", window, args.features)
        generator = torch.Generator().manual_seed(TRANSFER_SEED + args.seed)
        batches = [task.transfer_inputs(generator) for _ in range(args.transfer_steps + args.end_to_end_steps)]
        fit = transfer_attention(teacher, student, lambda step: {"input_ids": batches[step].to(device)},
                                 steps=args.transfer_steps, learning_rate=args.transfer_lr,
                                 end_to_end_steps=args.end_to_end_steps, progress=False)
        record["transfer_loss"] = {"first": round(fit["loss"][0], 4), "last": round(fit["loss"][-1], 4)}
        student.save_pretrained(student_folder)
        (student_folder / "transfer.json").write_text(json.dumps(record["transfer_loss"]))
    for size in [0] + args.linearize_cache:
        student.set_sparse_cache_size(size)  # a switch at inference: the same fitted weights
        name = f"Hedgehog + W{window}" + (f" + sparse {size}" if size else "")
        results[name] = task.score(student)
    # Control: a cache as long as the sequence keeps every key exact and leaves the linear part
    # empty, so the student computes the teacher's softmax: what it loses is the linear part's.
    student.set_sparse_cache_size(task.length)
    results[f"Hedgehog + W{window} + sparse {task.length} (every key exact: control)"] = task.score(student)
    teacher_accuracy = results["softmax teacher"]
    record["accuracy"] = results
    # a share of the teacher's recall (None where the teacher recalls nothing: the task failed, not the student)
    record["of_teacher"] = {name: round(value / teacher_accuracy, 4) if teacher_accuracy else None
                            for name, value in results.items()}
    for name, value in results.items():
        share = record["of_teacher"][name]
        print(f"{name:40s} {value:.4f}" + (f"  ({share:.1%} of the teacher)" if share is not None else ""))
    return record


@torch.no_grad()
def decoding_cost(args, device) -> dict:
    """Cache bytes and time per decoded token up to --decode-tokens, for Hedgehog + window with and
    without the sparse cache (one model, the cache size a switch) and the softmax stack's growing KV
    cache beside them. Token by token from one prompt token; the three decode in lockstep, one step
    each in turn, so that whatever else the machine does falls on all three alike."""
    shape = dict(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024, position_embedding_type="rotary", max_position_embeddings=args.decode_tokens,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    window, size = args.decode_window, args.decode_cache
    torch.manual_seed(0)
    softmax = PerformerForCausalLM(PerformerConfig(**shape, attention_type="softmax")).to(device).eval()
    torch.manual_seed(0)
    linear = PerformerForCausalLM(PerformerConfig(**shape, feature_map="hedgehog", local_window=window)).to(device).eval()
    kinds = {"softmax": (softmax, 0), f"hedgehog + W{window}": (linear, 0),
             f"hedgehog + W{window} + sparse {size}": (linear, size)}
    marks = sorted(m for m in {1024, 4096, 16384, args.decode_tokens // 2, args.decode_tokens}
                   if TIMED_STEPS < m <= args.decode_tokens)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    caches, spent, results = {}, dict.fromkeys(kinds, 0.0), {name: [] for name in kinds}
    for name, (model, cache_size) in kinds.items():
        model.set_sparse_cache_size(cache_size)
        caches[name] = model(token, use_cache=True).cache
    for step in range(2, args.decode_tokens + 1):
        for name, (model, cache_size) in kinds.items():
            model.set_sparse_cache_size(cache_size)
            clock = time.perf_counter()
            model(token, cache=caches[name], use_cache=True)
            if any(m - TIMED_STEPS < step <= m for m in marks):
                spent[name] += time.perf_counter() - clock
            if step in marks:  # the mean over the TIMED_STEPS steps that end here
                results[name].append({"tokens": step, "cache_bytes": caches[name].num_bytes(),
                                      "ms_per_token": round(spent[name] * 1000 / TIMED_STEPS, 3)})
                spent[name] = 0.0
        if step in marks:
            print(step, json.dumps({name: points[-1] for name, points in results.items()}), flush=True)
    plain, sparse = results[f"hedgehog + W{window}"], results[f"hedgehog + W{window} + sparse {size}"]
    return {"decoding": results, "ratios": {
        "sparse_over_window_ms_per_token": [round(b["ms_per_token"] / a["ms_per_token"], 3)
                                            for a, b in zip(plain, sparse)],
        "sparse_cache_bytes_constant": len({p["cache_bytes"] for p in sparse}) == 1,
        "softmax_over_sparse_cache_bytes": [round(c["cache_bytes"] / b["cache_bytes"], 2)
                                            for b, c in zip(sparse, results["softmax"])]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["linearize", "passkey", "decoding"])
    add_task_arguments(parser)
    parser.add_argument("--passkey-length", type=int, default=128, help="pass-key sequence length")
    parser.add_argument("--passkey-transfer", nargs="+", default=list(PASSKEY_TRANSFER),
                        choices=list(PASSKEY_TRANSFER), help="students fitted on each of: " +
                        "; ".join(f"{k}: {v}" for k, v in PASSKEY_TRANSFER.items()))
    parser.add_argument("--passkey-data", default=str(BUNDLED_TEXT),
                        help="folder of train.jsonl and test.jsonl ('text' rows): the plays, prepared on first use")
    parser.add_argument("--passkey-start-length", type=int, default=32,
                        help="pass-key training starts at this length and doubles up to --passkey-length")
    parser.add_argument("--linearize-window", type=int, default=8)
    parser.add_argument("--linearize-cache", type=int, nargs="+", default=[4, 8, 16],
                        help="sparse cache sizes to score the fitted student with (0 = off is always scored)")
    parser.add_argument("--swap-features", type=int, default=256)
    parser.add_argument("--transfer-steps", type=int, default=300)
    parser.add_argument("--transfer-lr", type=float, default=1e-2)
    parser.add_argument("--end-to-end-steps", type=int, default=0)
    parser.add_argument("--decode-tokens", type=int, default=16384)
    parser.add_argument("--decode-window", type=int, default=64)
    parser.add_argument("--decode-cache", type=int, default=64)
    add_output_arguments(parser, "{recall_linearized,recall_passkey,sparse_cache}")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.experiment == "decoding":
        save_and_draw("sparse_cache", args, decoding_cost(args, device))
        return
    if args.experiment == "linearize":
        print(f"wrote {write_record(args, 'recall_linearized', linearize(args, device))}")
        return
    if args.experiment == "passkey":
        students = {}
        for kind in args.passkey_transfer:  # one teacher, one student per kind of transfer data
            print(f"-- student fitted on {PASSKEY_TRANSFER[kind]}", flush=True)
            students[kind] = linearize(argparse.Namespace(**{**vars(args), "passkey_transfer": kind}), device,
                                       PasskeyTask)
        print(f"wrote {write_record(args, 'recall_passkey', {'task': 'pass-key', 'transfer_data': PASSKEY_TRANSFER, 'by_transfer': students})}")
        return


if __name__ == "__main__":
    main()
