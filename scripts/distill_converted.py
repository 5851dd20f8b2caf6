#!/usr/bin/env python
"""Distils a converted FAVOR+ Performer towards its softmax teacher before task fine-tuning: the
student's hidden states after every layer are pulled to the teacher's (mean squared error on real
tokens) on unlabelled text. The teacher is the same checkpoint converted with
--attention-type softmax (identical to the source model), so only the attention approximation is
being corrected.

    python scripts/distill_converted.py outputs/convert/minilm-softmax-cls outputs/convert/minilm-favor-cls \\
        outputs/convert/minilm-favor-distilled --steps 200

STUDENT's head (e.g. the classifier's pooler) is kept and saved unchanged with the distilled stack.
"""

import argparse
import json
import math
import pathlib
import shutil
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher", help="a Performer folder with attention_type softmax (the exact model)")
    parser.add_argument("student", help="the same model converted with attention_type favor")
    parser.add_argument("output")
    parser.add_argument("--data", default=str(ROOT / "data_cache" / "rotten_tomatoes" / "train.jsonl"),
                        help="JSON lines with a 'text' field (labels, if any, are not used)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoConfig, AutoTokenizer

    import modeling_performer
    from modeling_performer.checkpoint_performer import publish_folder, save_atomically

    output = pathlib.Path(args.output)
    if (output / "distillation.json").exists() and (output / "config.json").exists():
        print(f"{output} is complete (config.json and distillation.json); nothing to do")
        return
    torch.manual_seed(args.seed)

    def load(folder):
        architecture = AutoConfig.from_pretrained(folder).architectures[0]
        return getattr(modeling_performer, architecture).from_pretrained(folder)

    teacher, student = load(args.teacher).eval(), load(args.student)
    if teacher.config.attention_type != "softmax":
        raise SystemExit(f"the teacher must use softmax attention, {args.teacher} has {teacher.config.attention_type!r}")
    for module in student.modules():  # match the teacher exactly; the saved config keeps its dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    texts = [json.loads(line)["text"] for line in open(args.data)]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed)).tolist()
    optimizer = torch.optim.AdamW(student.base_model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    student.train()
    start, history, first = time.time(), [], 0
    state_path = output / "distill_state.pt"  # working state: a killed run resumes from here
    if state_path.exists():
        saved = torch.load(state_path, weights_only=True)
        student.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        first, history = saved["step"], saved["history"]
        print(f"resuming at step {first} from {state_path}", flush=True)
    for step in range(first, args.steps):
        picked = [texts[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        batch = tokenizer(picked, padding=True, truncation=True, max_length=args.seq_len, return_tensors="pt")
        with torch.no_grad():
            target = teacher.base_model(**batch, output_hidden_states=True).hidden_states
        hidden = student.base_model(**batch, output_hidden_states=True).hidden_states
        mask = batch["attention_mask"].bool()
        # layer 0 is the (shared, unchanged) embedding output
        loss = sum(torch.nn.functional.mse_loss(h[mask], t[mask]) for h, t in zip(hidden[1:], target[1:]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        history.append(loss.item())
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step}: distillation loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
        if (step + 1) % 25 == 0 or step == args.steps - 1:
            output.mkdir(parents=True, exist_ok=True)
            save_atomically({"model": student.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "step": step + 1, "history": history}, str(state_path))
    student.eval()
    # Assembled aside, moved into place with config.json last: no half-saved folder ever loads.
    stage = output / ".final-partial"
    if stage.exists():
        shutil.rmtree(stage)
    student.save_pretrained(stage)
    tokenizer.save_pretrained(stage)
    summary = {"steps": args.steps, "first_loss": history[0], "last_loss": history[-1],
               "seconds_this_run": round(time.time() - start, 1)}
    (stage / "distillation.json").write_text(json.dumps(summary, indent=2))
    publish_folder(str(stage), str(output))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
