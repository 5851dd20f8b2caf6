"""Attention transfer: fits the linear attention of STUDENT (its feature maps and window weights,
nothing else) so that every layer reproduces the softmax attention output of TEACHER on its own
layer inputs, and writes the result to OUTPUT (loads with AutoModel* like STUDENT).

    python scripts/convert_to_performer.py $MINILM outputs/minilm-hh --feature-map hedgehog --local-window 64
    python scripts/transfer_attention.py $MINILM outputs/minilm-hh outputs/minilm-hh-transferred

TEACHER: a softmax Performer folder of the student's shape, or an original BERT / RoBERTa / MiniLM
/ GPT-2 / Llama / Mistral / Qwen2 / Qwen3 folder (converted with exact softmax attention on the fly). --data: a .txt file or a
.jsonl file with a `text` field (default: the bundled Shakespeare training plays, prepared by
scripts/prepare_data.py). --end-to-end-steps N adds a second stage after the layer-by-layer one:
the whole student run on the same text, every layer's hidden states pulled towards the teacher's
(the same tensors move; still no labels). The defaults are the settings of the README's results
(modeling_performer.transfer.RECIPE_SETTINGS, which scripts/convert_recipe.sh runs too).
Interrupted runs resume from OUTPUT/transfer_state.pt with the same command and reach the same result.
"""

import argparse
import json
import pathlib
import sys
import time

from modeling_performer.recipes import ROOT  # the repository the command runs in
EPOCH_SEEDS = 100_003  # the window order of epoch e under --seed s comes from seed s * EPOCH_SEEDS + e


def load_teacher(path: str, student):
    from modeling_performer import PerformerPreTrainedModel
    from modeling_performer.conversion import ConversionError, convert_to_performer
    from transformers import AutoConfig

    import modeling_performer

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "performer":
        architecture = (config.architectures or ["PerformerModel"])[0]
        cls = getattr(modeling_performer, architecture, None)
        if cls is None or not issubclass(cls, PerformerPreTrainedModel):
            raise SystemExit(f"{path}: unknown Performer architecture {architecture!r}")
        return cls.from_pretrained(path)
    try:
        model, _ = convert_to_performer(path, "softmax", None)
    except ConversionError as error:
        raise SystemExit(f"transfer_attention: the teacher cannot be converted: {error}")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="softmax Performer folder, or a folder that convert_to_performer maps "
                                        "(BERT/RoBERTa/MiniLM/GPT-2/Llama/Mistral/Qwen2/Qwen3)")
    parser.add_argument("student", help="Performer folder with linear attention (e.g. --feature-map hedgehog)")
    parser.add_argument("output", help="folder for the fitted student (resumable working state inside)")
    parser.add_argument("--data", help="unlabelled text: .txt, or .jsonl with a 'text' field")
    from modeling_performer.transfer import RECIPE_SETTINGS as default  # the settings of the README's results

    parser.add_argument("--steps", type=int, default=default["steps"], help="layer-by-layer steps (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="windows per step (%(default)s)")
    parser.add_argument("--seq-len", type=int, default=default["seq_len"], help="tokens per window (%(default)s)")
    parser.add_argument("--learning-rate", type=float, default=default["learning_rate"], help="(%(default)s)")
    parser.add_argument("--end-to-end-steps", type=int, default=default["end_to_end_steps"],
                        help="steps of the second stage, on the whole stack's hidden states (%(default)s; 0: none)")
    parser.add_argument("--end-to-end-learning-rate", type=float, default=default["end_to_end_learning_rate"],
                        help="learning rate of the second stage (%(default)s)")
    parser.add_argument("--end-to-end-loss", choices=["hidden-states", "next-token-kl"], default="hidden-states",
                        help="second stage: match every layer's hidden states, or distil the teacher's next-token "
                             "distribution (causal LMs) (%(default)s)")
    parser.add_argument("--kl-positions", type=int, default=512,
                        help="next-token-kl: positions scored per sequence, drawn each step (0: all; %(default)s)")
    parser.add_argument("--whole-rows", action="store_true",
                        help="each --data row is one sequence (cut at --seq-len, padded on the right in a batch) "
                             "instead of the rows' tokens cut into --seq-len windows")
    parser.add_argument("--snapshots", type=int, nargs="*", default=[],
                        help="steps after which the fitted tensors are also kept (OUTPUT/snapshot-STEP.pt)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="low-rank updates of the linear layers' projections, trained in the end-to-end stage "
                             "beside the maps and merged at the end (0: maps only; %(default)s)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="their scale's numerator (2 * rank)")
    parser.add_argument("--lora-learning-rate", type=float, default=None, help="(the end-to-end learning rate)")
    parser.add_argument("--lora-targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"],
                        help="projections that get updates (%(default)s)")
    parser.add_argument("--teacher-cache", metavar="DIR",
                        help="keep what the teacher gives for each batch here and read it back when the same batch "
                             "comes again (another fit on the same --data, a resumed run)")
    parser.add_argument("--teacher-top-k", type=int, default=64,
                        help="with --teacher-cache: the teacher's most likely tokens kept per position for the "
                             "next-token KL, the rest as one outcome (0: every token; %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from modeling_performer.recipes import devices

    devices.add_device_arguments(parser, training=True, checkpointing=False)
    args = parser.parse_args(argv)
    if args.batch_size % args.gradient_accumulation_steps:
        raise SystemExit(f"--batch-size {args.batch_size} does not split into {args.gradient_accumulation_steps} "
                         "micro-batches (--gradient-accumulation-steps)")
    device, precision = devices.setup(args)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    import modeling_performer
    from modeling_performer.checkpoint_performer import fresh_stage, publish_folder
    from modeling_performer.transfer import (TeacherCache, TransferError, attention_errors, hidden_state_error,
                                             transfer_attention)

    output = pathlib.Path(args.output)
    if (output / "transfer_metrics.json").exists() and (output / "config.json").exists():
        print(f"{output} is complete (config.json and transfer_metrics.json); nothing to do")
        return
    config = AutoConfig.from_pretrained(args.student)
    architecture = (config.architectures or ["PerformerModel"])[0]
    student = getattr(modeling_performer, architecture).from_pretrained(args.student).to(device)
    teacher = load_teacher(args.teacher, student).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.student)

    data = pathlib.Path(args.data) if args.data else ROOT / "data_cache" / "text" / "train.jsonl"
    if not data.exists():
        if args.data:
            raise SystemExit(f"--data {data} does not exist")
        import subprocess

        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--datasets", "text"], check=True)
    from modeling_performer.recipes.texts import read_texts, token_windows

    if args.whole_rows:
        windows = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:args.seq_len])
                   for text in read_texts(data)]
        windows = [row for row in windows if len(row)]
        if not windows:
            raise SystemExit(f"{data} holds no text")
        top = max(int(row.max()) for row in windows)
    else:
        windows = token_windows(tokenizer, read_texts(data), args.seq_len)
        top = int(windows.max())
    if top >= student.config.vocab_size:
        raise SystemExit("the tokenizer produces ids beyond the student's vocabulary: use the student's own tokenizer")
    per_epoch = max(len(windows) // args.batch_size, 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def assemble(rows):
        if not args.whole_rows:
            ids = windows[rows]
            return ids, torch.ones_like(ids)
        chosen = [windows[int(r)] for r in rows]
        width = max(len(row) for row in chosen)
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(chosen):
            ids[i, :len(row)], mask[i, :len(row)] = row, 1
        return ids, mask

    counted = {"tokens": 0}

    def get_batch(step):
        batch = batch_at(step)
        counted["tokens"] += int(batch["attention_mask"].sum())
        return batch

    def batch_at(step):
        epoch, index = divmod(step, per_epoch)
        # one seeded order per (seed, epoch): seeds apart by more than any run's epoch count (a prime)
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed * EPOCH_SEEDS + epoch))
        rows = order[index * args.batch_size: (index + 1) * args.batch_size]
        ids, mask = assemble(rows)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

    # A fixed probe batch from the end of the order of epoch 0 (reported, not a held-out score).
    probe = batch_at(per_epoch - 1)
    try:
        cache = TeacherCache(args.teacher_cache, top_k=args.teacher_top_k) if args.teacher_cache else None
        before = attention_errors(teacher, student, probe)
        hidden_before = hidden_state_error(teacher, student, probe)
        output.mkdir(parents=True, exist_ok=True)
        start = time.time()
        history = transfer_attention(teacher, student, get_batch, args.steps, args.learning_rate,
                                     checkpoint_dir=str(output), progress=not args.quiet,
                                     end_to_end_steps=args.end_to_end_steps,
                                     end_to_end_learning_rate=args.end_to_end_learning_rate,
                                     accumulation_steps=args.gradient_accumulation_steps,
                                     autocast=lambda: devices.autocast(device, precision),
                                     end_to_end_loss=args.end_to_end_loss.replace("-", "_"),
                                     kl_positions=args.kl_positions, snapshot_steps=tuple(args.snapshots),
                                     lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                     lora_learning_rate=args.lora_learning_rate, lora_targets=tuple(args.lora_targets),
                                     teacher_cache=cache)
    except TransferError as error:
        raise SystemExit(f"transfer_attention: {error}")
    seconds = time.time() - start
    after = attention_errors(teacher, student, probe)
    hidden_after = hidden_state_error(teacher, student, probe)
    # Assembled aside and moved into place with config.json last: a kill during the save leaves
    # no folder that loads, and the same command finishes the job.
    stage = pathlib.Path(fresh_stage(str(output)))
    student.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    metrics = {
        "teacher": args.teacher, "student": args.student, "data": str(data), "steps": args.steps,
        "batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "device": device.type, "precision": precision, "seq_len": args.seq_len, "learning_rate": args.learning_rate,
        "end_to_end_steps": args.end_to_end_steps, "end_to_end_loss": args.end_to_end_loss,
        "kl_positions": args.kl_positions, "whole_rows": args.whole_rows, "snapshots": args.snapshots,
        "end_to_end_learning_rate": history["end_to_end_learning_rate"],
        "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_learning_rate": args.lora_learning_rate,
        "lora_targets": args.lora_targets if args.lora_rank else [],
        # What this invocation did: a resumed run counts only its own part, so these differ
        # from an uninterrupted run's while everything else is the same.
        "this_run": {"seconds": round(seconds, 1), "tokens": counted["tokens"],
                     "tokens_per_second": round(counted["tokens"] / max(seconds, 1e-9), 1),
                     "teacher_cache_read": None if cache is None else cache.hits,
                     "teacher_cache_computed": None if cache is None else cache.misses},
        "teacher_cache": None if cache is None else {"directory": args.teacher_cache, "top_k": args.teacher_top_k},
        "loss_first": history["loss"][:1],
        "loss_last": history["loss"][-1:], "end_to_end_loss_first": history["end_to_end_loss"][:1],
        "end_to_end_loss_last": history["end_to_end_loss"][-1:],
        "probe_error_before": before, "probe_error_after": after,
        "probe_hidden_error_before": hidden_before, "probe_hidden_error_after": hidden_after,
    }
    (stage / "transfer_metrics.json").write_text(json.dumps(metrics, indent=2))
    publish_folder(str(stage), str(output))
    print(json.dumps({**{k: metrics[k] for k in ("steps", "loss_first", "loss_last", "end_to_end_steps",
                                                  "end_to_end_loss_last")},
                      "seconds_this_run": metrics["this_run"]["seconds"]}))


if __name__ == "__main__":
    main()
