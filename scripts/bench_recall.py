#!/usr/bin/env python
"""Multi-query associative recall (MQAR; "Zoology", Arora et al. 2023): which attention can look
up a value by its key, trained from scratch on sequences this script generates.

A sequence holds `--pairs` key-value pairs (keys from the lower half of the vocabulary, values
from the upper half, token 0 the filler), then each key once more at a random later position, at
least `--gap` tokens after the last pair; the model must answer with the key's value there. Loss
and accuracy count only those answer positions. Every model is a 2-layer Performer decoder
(rotary positions) trained on fresh sequences at every step and scored on held-out ones
(fixed seeds, never trained on).

    python scripts/bench_recall.py                       # the table: softmax, then each linear attention, two shapes
    python scripts/bench_recall.py --attention favor --feature-map hedgehog --local-window 8 \\
        --seq-len 128 --pairs 8 --output outputs/bench/one.json   # one model, {"accuracy": ...}
    python scripts/bench_recall.py --full                # zoology's grid (widths 64-512; a GPU)
    python scripts/bench_recall.py --linearize --seq-len 128 --pairs 8   # recall beyond the window, linearized
    python scripts/bench_recall.py --passkey             # the same for a 5-digit key planted in the plays

The pass-key task: a 5-digit key (digits and marks are ids the text never uses) planted at a random
depth in a window of the bundled plays and asked for at the end; a key counts when all five digits
are right. One softmax teacher, students fitted on plain text, on text with a planted key, and on
whole unlabelled pass-key sequences (--passkey-transfer).

The table counts only where the softmax model reaches >= 99%: below that the task, not the
attention, is what failed.

What makes softmax learn it on 2 CPU cores (docs/figures/recall_recipe.json): width 128 with 4
heads (width 64 stays at the guess among the values present), and a mastery curriculum: one pair,
one more each time 95% of the last 20 steps' answers are right, on 64-token sequences while the
pairs grow and the full length after (trained at 128 tokens from the start, 2 pairs were not
learned in 1,100 steps). A quadratic ramp makes every model end on the full task, learned or not.
"""

import argparse
import functools
import hashlib
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench_common import RESULTS, add_output_arguments, provenance, results_path, save_and_draw  # noqa: E402
from devices import add_device_arguments, resolve_device  # noqa: E402

from modeling_performer import PerformerConfig, PerformerForCausalLM  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUNDLED_TEXT = ROOT / "data_cache" / "text"
FILLER = 0
# generators of training, held-out and transfer sequences, never equal
TRAIN_SEED, TEST_SEED, TRANSFER_SEED = 0, 10**6, 2 * 10**6
# The table: (sequence length, pairs) as zoology's first shapes; --full adds (256, 16) and its widths.
SHAPES = [(64, 4), (128, 8)]
FULL_SHAPES = SHAPES + [(256, 16)]
TIMED_STEPS = 256
FULL_WIDTHS = [64, 128, 256, 512]


def mqar_batch(generator: torch.Generator, batch: int, seq_len: int, pairs: int, vocab: int, gap: int):
    """-> (ids [batch, seq_len], targets [batch, seq_len]: the value at each answer position, -100 elsewhere).
    Pair i sits at positions 2i, 2i+1; each key is asked once, at distinct positions >= 2 pairs + gap."""
    half = vocab // 2
    first_query = 2 * pairs + gap
    if half - 1 < pairs:
        raise ValueError(f"vocabulary {vocab} has {half - 1} key tokens, fewer than {pairs} pairs")
    if seq_len - first_query < pairs:
        raise ValueError(f"sequence length {seq_len} leaves {seq_len - first_query} query positions after "
                         f"{pairs} pairs and a gap of {gap}: need at least {pairs}")
    keys = torch.rand(batch, half - 1, generator=generator).argsort(-1)[:, :pairs] + 1
    values = torch.randint(half, vocab, (batch, pairs), generator=generator)
    ids = torch.full((batch, seq_len), FILLER, dtype=torch.long)
    ids[:, 0:2 * pairs:2], ids[:, 1:2 * pairs:2] = keys, values
    positions = torch.rand(batch, seq_len - first_query, generator=generator).argsort(-1)[:, :pairs] + first_query
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)  # which key is asked where
    rows = torch.arange(batch)[:, None]
    ids[rows, positions] = keys.gather(1, order)
    targets = torch.full((batch, seq_len), -100, dtype=torch.long)
    targets[rows, positions] = values.gather(1, order)
    return ids, targets


def model_config(args, attention: str, feature_map: str, window: int, features: int, sparse: int,
                 vocab: int = 0) -> PerformerConfig:
    return PerformerConfig(
        vocab_size=vocab or args.vocab, hidden_size=args.hidden, num_hidden_layers=2, num_attention_heads=args.heads,
        intermediate_size=2 * args.hidden, hidden_act="gelu", norm_type="pre_layernorm", position_embedding_type="rotary",
        max_position_embeddings=max(args.seq_len, 4096), attention_type=attention, feature_map=feature_map,
        local_window=window, sparse_cache_size=sparse, num_random_features=features, chunk_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=True,
    )


def answer_loss(logits, targets):
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


@torch.no_grad()
def accuracy(model, args, device, pairs, seq_len, batches=None) -> float:
    """Answer accuracy on held-out sequences (TEST_SEED; never trained on)."""
    model.eval()
    generator = torch.Generator().manual_seed(TEST_SEED + args.seed)
    correct = total = 0
    for _ in range(batches or args.eval_batches):
        ids, targets = mqar_batch(generator, args.batch_size, seq_len, pairs, args.vocab, args.gap)
        logits = model(ids.to(device)).logits
        asked = targets != -100
        correct += (logits.argmax(-1).cpu()[asked] == targets[asked]).sum().item()
        total += asked.sum().item()
    model.train()
    return correct / total


class Curriculum:
    """Pairs per training sequence: from 1, one more each time the model answers >= MASTERY of the
    last WINDOW steps' questions right, and never fewer than a quadratic ramp to --pairs over the first
    --curriculum fraction of the steps (so every model trains on the full task at the end, learned
    or not). Recall of one pair is easy; once a model recalls two, more come quickly."""

    MASTERY, WINDOW = 0.95, 20
    # Training stops early once the full task is answered this well over this many steps.
    FINISHED, FINISH_WINDOW = 0.995, 50

    def __init__(self, args):
        self.args, self.level, self.recent = args, 1, []

    def pairs(self, step: int) -> int:
        ramp = int(self.args.curriculum * self.args.steps)
        # quadratic: slow at first, when a model that has not yet learned two pairs needs the time
        scheduled = (self.args.pairs if ramp <= 0 or step >= ramp
                     else 1 + int((self.args.pairs - 1) * (step / ramp) ** 2))
        return max(self.level, scheduled)

    def length(self, pairs: int) -> int:
        """Sequence length of a training step: --curriculum-length (shorter, cheaper, fewer
        distractors) until the model trains on all --pairs, then --seq-len."""
        if pairs >= self.args.pairs or not self.args.curriculum_length:
            return self.args.seq_len
        return min(self.args.seq_len, self.args.curriculum_length)

    def record(self, pairs: int, correct: float) -> bool:
        """One step's training accuracy; True when the model has finished the full task."""
        self.recent = (self.recent if pairs == self.level else [])[-(self.FINISH_WINDOW - 1):] + [correct]
        self.level = max(self.level, pairs)
        if self.level < self.args.pairs:
            last = self.recent[-self.WINDOW:]
            if len(last) == self.WINDOW and sum(last) / self.WINDOW >= self.MASTERY:
                self.level, self.recent = self.level + 1, []
            return False
        return len(self.recent) == self.FINISH_WINDOW and sum(self.recent) / self.FINISH_WINDOW >= self.FINISHED


class MQARSteps:
    """Training sequences of MQAR, step by step, as the curriculum grows them."""

    def __init__(self, args):
        self.args, self.curriculum = args, Curriculum(args)

    def batch(self, generator, step):
        """-> (ids, targets aligned with the logits kept, logits to keep (0 = all), what to log)."""
        pairs = self.curriculum.pairs(step)
        length = self.curriculum.length(pairs)
        ids, targets = mqar_batch(generator, self.args.batch_size, length, pairs, self.args.vocab, self.args.gap)
        return ids, targets, 0, {"pairs": pairs, "length": length}

    def record(self, logged: dict, correct: float) -> bool:
        return self.curriculum.record(logged["pairs"], correct)


def train(model, args, device, steps=None) -> dict:
    """AdamW, linear warm-up then cosine decay, fresh sequences every step (`steps`: MQARSteps by
    default, PasskeySteps for the pass-key task). -> history."""
    steps = steps or MQARSteps(args)
    torch.manual_seed(args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    warmup = max(1, int(0.1 * args.steps))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(TRAIN_SEED + args.seed)
    history, start, mastered_at = [], time.perf_counter(), None
    model.train()
    for step in range(args.steps):
        ids, targets, keep, logged = steps.batch(generator, step)
        targets = targets.to(device)
        logits = model(ids.to(device), logits_to_keep=keep).logits
        loss = answer_loss(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        asked = targets != -100
        correct = (logits.detach().argmax(-1)[asked] == targets[asked]).float().mean().item()
        done = steps.record(logged, correct)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps or done:
            entry = {"step": step + 1, **logged, "loss": round(loss.item(), 4), "train_accuracy": round(correct, 4),
                     "seconds": round(time.perf_counter() - start, 1)}
            history.append(entry)
            print(json.dumps(entry), flush=True)
        if done:  # every step's sequences are new: its accuracy is already a held-out one
            mastered_at = step + 1
            break
    return {"history": history, "train_seconds": round(time.perf_counter() - start, 1), "steps_run": step + 1,
            "mastered_at_step": mastered_at}


def run_one(args, device, attention, feature_map, window, features, sparse) -> dict:
    torch.manual_seed(args.seed)
    model = PerformerForCausalLM(model_config(args, attention, feature_map, window, features, sparse)).to(device)
    record = train(model, args, device)
    record["accuracy"] = accuracy(model, args, device, args.pairs, args.seq_len)
    for size in args.score_sparse_cache:
        model.config.sparse_cache_size = size  # a switch at inference: the same trained weights
        record.setdefault("sparse_cache_accuracy", {})[size] = accuracy(model, args, device, args.pairs, args.seq_len)
    return record


# The pass-key task: a 5-digit key planted in running text at a random depth, asked for at the end.
DIGITS = 5
ANSWERS = DIGITS + 1  # logits kept: the ask mark and the key's digits after it (the last predicts nothing)


def passkey_batch(generator: torch.Generator, stream: torch.Tensor, batch: int, length: int, min_gap: int,
                  text_vocab: int):
    """Windows of the token stream with `key-mark d1..d5` planted at a random depth and
    `ask-mark d1..d5` at the end. Digits are the ids text_vocab..text_vocab + 9, the key mark
    text_vocab + 10, the ask mark text_vocab + 11: ids the text never uses. At least `min_gap` text
    tokens lie between the planted key and the ask mark.
    -> (ids [batch, length], targets [batch, ANSWERS]: the digits at the last ANSWERS positions
    (-100 at the very last), gap [batch]: the text tokens between the planted key and the ask mark)."""
    text_len = length - 2 * ANSWERS
    if text_len - min_gap < 0:
        raise ValueError(f"length {length} leaves {text_len} text tokens, fewer than the gap {min_gap}")
    if len(stream) <= text_len:
        raise ValueError(f"the text has {len(stream)} tokens, too few for windows of {text_len}")
    starts = torch.randint(0, len(stream) - text_len, (batch, 1), generator=generator)
    text = stream[starts + torch.arange(text_len)]
    key = torch.randint(0, 10, (batch, DIGITS), generator=generator) + text_vocab
    depth = torch.randint(0, text_len - min_gap + 1, (batch, 1), generator=generator)
    position = torch.arange(text_len + ANSWERS)[None]
    # before the key the text as it is; after it the text shifted by the planted block
    body = text.gather(1, torch.where(position < depth, position, position - ANSWERS).clamp(0, text_len - 1))
    block = torch.cat([torch.full((batch, 1), text_vocab + 10), key], 1)
    planted = (position >= depth) & (position < depth + ANSWERS)
    body = torch.where(planted, block.gather(1, (position - depth).clamp(0, ANSWERS - 1)), body)
    ids = torch.cat([body, torch.full((batch, 1), text_vocab + 11), key], 1)
    targets = torch.cat([key, torch.full((batch, 1), -100)], 1)
    return ids, targets, (text_len - depth).flatten()


@functools.lru_cache(maxsize=None)  # one tokenisation per process: every student's task reads the same plays
def bundled_tokens(folder, split: str) -> tuple:
    """The plays of one split (<folder>/<split>.jsonl; the bundled ones in data_cache/text are
    prepared on first use), tokenised by the bundled tokenizer into one stream.
    -> (ids, the tokenizer's vocabulary size)."""
    import subprocess

    from transfer_attention import read_texts
    from transformers import AutoTokenizer

    from modeling_performer.bundled import tokenizer_path

    path = pathlib.Path(folder) / f"{split}.jsonl"
    if not path.exists():
        if pathlib.Path(folder).resolve() != BUNDLED_TEXT:
            raise SystemExit(f"--passkey-data: {path} does not exist")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--datasets", "text"], check=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path()))
    ids = tokenizer(read_texts(path), add_special_tokens=False)["input_ids"]
    return torch.tensor([token for row in ids for token in row]), len(tokenizer)


class PasskeySteps:
    """Pass-key training sequences over the training plays: the length doubles from
    --passkey-start-length to --passkey-length as the model masters each (the MQAR curriculum with
    lengths for pairs: mastery, a quadratic ramp, early finish)."""

    def __init__(self, args, stream, text_vocab):
        self.args, self.stream, self.text_vocab = args, stream, text_vocab
        self.lengths = [args.passkey_length]
        while self.lengths[0] // 2 >= max(args.passkey_start_length, 2 * ANSWERS + 1):
            self.lengths.insert(0, self.lengths[0] // 2)
        self.curriculum = Curriculum(argparse.Namespace(pairs=len(self.lengths), steps=args.steps,
                                                        curriculum=args.curriculum))

    def batch(self, generator, step):
        length = self.lengths[self.curriculum.pairs(step) - 1]
        ids, targets, _ = passkey_batch(generator, self.stream, self.args.batch_size, length, 0, self.text_vocab)
        return ids, targets, ANSWERS, {"length": length}

    def record(self, logged: dict, correct: float) -> bool:
        return self.curriculum.record(self.lengths.index(logged["length"]) + 1, correct)


# The table's models: name -> (attention, feature map, window, features); the window is shorter
# than every key-to-query distance (the queries start --gap tokens after the last pair).
TABLE_WINDOW = 8
MODELS = {
    "softmax": ("softmax", "softmax", 0, 64),
    "FAVOR+ M=64": ("favor", "softmax", 0, 64),
    "FAVOR+ M=256": ("favor", "softmax", 0, 256),
    "ReLU M=64": ("favor", "relu", 0, 64),
    "Hedgehog": ("favor", "hedgehog", 0, 64),
    f"Hedgehog + W{TABLE_WINDOW}": ("favor", "hedgehog", TABLE_WINDOW, 64),
}


# The slowest on a CPU (twice FAVOR+ M=64 per step, and no better at recall there): in the table
# with --full, or when --models names it.
FULL_ONLY = ("FAVOR+ M=256",)


def table(args) -> list:
    """Every model of MODELS at every shape, each in its own process (--jobs at a time), each
    result kept in outputs/bench/recall-<settings>/ as it finishes: a killed run starts again where
    it stopped. Softmax trains first: the steps it takes to solve a shape are every other model's
    budget at that shape (the same training for all; at most --steps). The Hedgehog + window models
    are also scored with a sparse cache of 2 x pairs (the same weights, switched on at inference)."""
    import concurrent.futures
    import subprocess

    shapes = args.shapes or (FULL_SHAPES if args.full else SHAPES)
    names = args.models or [name for name in MODELS if args.full or name not in FULL_ONLY]
    widths = FULL_WIDTHS if args.full else [args.hidden]
    # Finished models are kept per setting (a killed table resumes; other settings start afresh).
    folder = kept_folder(args, "recall", ignored=("jobs", "models", "shapes", "full"))  # files name those
    folder.mkdir(parents=True, exist_ok=True)

    def job(name, width, seq_len, pairs, steps):
        attention, feature_map, window, features = MODELS[name]
        out = folder / f"{name.replace(' ', '').replace('+', 'p').replace('=', '')}-d{width}-T{seq_len}-P{pairs}.json"
        cmd = [sys.executable, __file__, "--attention", attention, "--feature-map", feature_map,
               "--local-window", str(window), "--features", str(features), "--seq-len", str(seq_len),
               "--pairs", str(pairs), "--hidden", str(width), "--output", str(out), "--threads",
               str(args.threads or 1), "--seed", str(args.seed), "--steps", str(steps),
               "--heads", str(args.heads), "--lr", str(args.lr), "--batch-size", str(args.batch_size),
               "--vocab", str(args.vocab), "--gap", str(args.gap), "--device", args.device,
               "--curriculum", str(args.curriculum), "--curriculum-length", str(args.curriculum_length),
               "--weight-decay", str(args.weight_decay), "--eval-batches", str(args.eval_batches)]
        if window:
            cmd += ["--score-sparse-cache", str(2 * pairs)]
        return name, (width, seq_len, pairs), out, cmd

    def run(job):
        name, (width, seq_len, pairs), out, cmd = job
        if not out.exists():
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} T={seq_len} pairs={pairs} failed:\n{done.stderr[-2000:]}")
        return job, json.loads(out.read_text())

    grid = [(width, seq_len, pairs) for width in widths for seq_len, pairs in shapes]
    rows = []

    def collect(finished):
        for (name, (width, seq_len, pairs), _, _), record in finished:
            common = {"width": width, "seq_len": seq_len, "pairs": pairs, "train_seconds": record["train_seconds"],
                      "steps_run": record["steps_run"]}
            rows.append({"model": name, **common, "accuracy": record["accuracy"]})
            print(f"{name:28s} d={width} T={seq_len:4d} pairs={pairs:3d}  accuracy {record['accuracy']:.4f}  "
                  f"({record['train_seconds']:.0f} s, {record['steps_run']} steps)", flush=True)
            for size, value in record.get("sparse_cache_accuracy", {}).items():
                rows.append({"model": f"{name} + sparse 2P (same weights)", **common, "sparse_cache_size": int(size),
                             "accuracy": value})

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        collect(pool.map(run, [job("softmax", *shape, args.steps) for shape in grid]))
        budget = {(r["width"], r["seq_len"], r["pairs"]): r["steps_run"] for r in rows}
        collect(pool.map(run, [job(name, *shape, budget[shape]) for shape in grid
                               for name in names if name != "softmax"]))
    return rows


class MQARTask:
    """MQAR for the linearizing run: queries lie at least --gap after their pairs (--gap >= the window)."""

    name, prefix = "MQAR", "recall-linearized"

    def __init__(self, args, device, window):
        if args.gap < window:
            raise SystemExit(f"--gap {args.gap} lets queries come within the window ({window}): use --gap >= window")
        self.args, self.device = args, device

    def config(self, attention, feature_map, window, features, sparse=0):
        return model_config(self.args, attention, feature_map, window, features, sparse)

    def train(self, model):
        return train(model, self.args, self.device)

    @property
    def length(self) -> int:
        return self.args.seq_len

    def score(self, model) -> float:
        return accuracy(model, self.args, self.device, self.args.pairs, self.args.seq_len)

    def transfer_inputs(self, generator):
        return mqar_batch(generator, self.args.batch_size, self.args.seq_len, self.args.pairs, self.args.vocab,
                          self.args.gap)[0]


PASSKEY_TRANSFER = {"text": "plain text of the training plays",
                    "planted": "the same text with a key planted (digits and key mark seen, never asked for)",
                    "sequences": "whole pass-key sequences, question included (unlabelled: attention outputs "
                                 "are the targets, never the answer)"}


class PasskeyTask:
    """The pass-key task over the bundled plays: trained on the training plays at every depth, scored
    on the held-out plays with the key more than the window before the question; the student fitted
    on the training plays as --passkey-transfer says (transfer_inputs)."""

    name, prefix = "pass-key", "recall-passkey"

    def __init__(self, args, device, window):
        self.args, self.device, self.window = args, device, window
        self.train_stream, self.text_vocab = bundled_tokens(args.passkey_data, "train")
        self.test_stream, _ = bundled_tokens(args.passkey_data, "test")

    def config(self, attention, feature_map, window, features, sparse=0):
        return model_config(self.args, attention, feature_map, window, features, sparse, vocab=self.text_vocab + 12)

    def train(self, model):
        return train(model, self.args, self.device, PasskeySteps(self.args, self.train_stream, self.text_vocab))

    @property
    def length(self) -> int:
        return self.args.passkey_length

    @torch.no_grad()
    def score(self, model) -> float:
        """Keys recalled whole (all five digits; what greedy decoding after the ask mark returns),
        on the held-out plays, the key at least the window's length before the ask mark."""
        model.eval()
        generator = torch.Generator().manual_seed(TEST_SEED + self.args.seed)
        recalled = total = 0
        for _ in range(self.args.eval_batches):
            ids, targets, _ = passkey_batch(generator, self.test_stream, self.args.batch_size, self.length,
                                            self.window, self.text_vocab)
            digits = model(ids.to(self.device), logits_to_keep=ANSWERS).logits.argmax(-1).cpu()[:, :DIGITS]
            recalled += (digits == targets[:, :DIGITS]).all(-1).sum().item()
            total += len(ids)
        return recalled / total

    def transfer_inputs(self, generator):
        """--passkey-transfer: plain text of the training plays; or with a key planted (digits and
        the key mark seen, never asked for); or whole pass-key sequences, question included (no
        answer is a target: attention outputs are)."""
        length, kind = self.length, self.args.passkey_transfer
        if kind == "text":
            starts = torch.randint(0, len(self.train_stream) - length, (self.args.batch_size, 1), generator=generator)
            return self.train_stream[starts + torch.arange(length)]
        if kind == "planted":  # cut the question off a longer sequence
            return passkey_batch(generator, self.train_stream, self.args.batch_size, length + ANSWERS, 0,
                                 self.text_vocab)[0][:, :length]
        return passkey_batch(generator, self.train_stream, self.args.batch_size, length, 0, self.text_vocab)[0]


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
        student.config.sparse_cache_size = size  # a switch at inference: the same fitted weights
        name = f"Hedgehog + W{window}" + (f" + sparse {size}" if size else "")
        results[name] = task.score(student)
    # Control: a cache as long as the sequence keeps every key exact and leaves the linear part
    # empty, so the student computes the teacher's softmax: what it loses is the linear part's.
    student.config.sparse_cache_size = task.length
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
        model.config.sparse_cache_size = cache_size
        caches[name] = model(token, use_cache=True).cache
    for step in range(2, args.decode_tokens + 1):
        for name, (model, cache_size) in kinds.items():
            model.config.sparse_cache_size = cache_size
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


def kept_folder(args, prefix: str, ignored=()) -> pathlib.Path:
    """Where models finished under these settings are kept: beside --output (else outputs/bench),
    named by a fingerprint of every setting that changes them."""
    settings = {k: v for k, v in sorted(vars(args).items())
                if k not in ("output", "update_figures", "threads", *ignored)}
    fingerprint = hashlib.sha1(json.dumps(settings, default=str).encode()).hexdigest()[:10]
    return (pathlib.Path(args.output).parent if args.output else RESULTS) / f"{prefix}-{fingerprint}"


def write_record(args, name: str, record: dict) -> pathlib.Path:
    """{"settings", "date", "commit", **record} to the results file of `name` (or --output)."""
    path = results_path(args, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "update_figures")}
    path.write_text(json.dumps({"settings": settings, **provenance(), **record}, indent=1, default=str))
    return path


def shape_argument(text: str) -> tuple:
    try:
        length, pairs = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is LENGTH:PAIRS, e.g. 64:4, not {text!r}") from None
    return length, pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=["softmax", "favor"], help="one model only (default: the table)")
    parser.add_argument("--feature-map", default="softmax", choices=["softmax", "relu", "hedgehog"])
    parser.add_argument("--local-window", type=int, default=0)
    parser.add_argument("--sparse-cache-size", type=int, default=0)
    parser.add_argument("--features", type=int, default=64, help="random features M of FAVOR+ and ReLU")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--gap", type=int, default=8, help="filler tokens between the last pair and the first query")
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000, help="at most (training stops once the full task is solved)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--curriculum", type=float, default=0.8,
                        help="pairs per sequence grow from 1 as the model masters them, and at least linearly to "
                             "--pairs over this fraction of the steps (0 = the full task from the start)")
    parser.add_argument("--curriculum-length", type=int, default=64,
                        help="training sequence length while the pairs grow (0 = --seq-len throughout)")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--full", action="store_true", help="zoology's grid of widths 64-512 (meant for a GPU)")
    parser.add_argument("--jobs", type=int, default=2, help="models trained at once by the table")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="the table: only these models (default: all but " + ", ".join(FULL_ONLY) +
                             ", which --full adds)")
    parser.add_argument("--shapes", nargs="+", type=shape_argument, metavar="T:PAIRS",
                        help="the table: only these shapes (default: " + " ".join(f"{t}:{p}" for t, p in SHAPES) + ")")
    parser.add_argument("--score-sparse-cache", type=int, nargs="*", default=[],
                        help="one model: also score it with these sparse cache sizes (same weights)")
    parser.add_argument("--decoding", action="store_true",
                        help="only measure decoding with the sparse cache: cache bytes and ms per token up to "
                             "--decode-tokens (results: sparse_cache.json)")
    parser.add_argument("--linearize", action="store_true",
                        help="only the linearized model: train a softmax teacher at --seq-len/--pairs, fit Hedgehog + "
                             "window to it by attention transfer, score recall beyond the window with and without "
                             "the sparse cache (results: recall_linearized.json)")
    parser.add_argument("--passkey", action="store_true",
                        help="the linearized model on the pass-key task over the bundled plays (a softmax teacher "
                             "trained to return a planted 5-digit key, fitted to Hedgehog + window on each kind of "
                             "--passkey-transfer data; results: recall_passkey.json)")
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
    add_device_arguments(parser)
    add_output_arguments(parser, "recall")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.decoding:
        save_and_draw("sparse_cache", args, decoding_cost(args, device))
        return
    if args.linearize:
        print(f"wrote {write_record(args, 'recall_linearized', linearize(args, device))}")
        return
    if args.passkey:
        students = {}
        for kind in args.passkey_transfer:  # one teacher, one student per kind of transfer data
            print(f"-- student fitted on {PASSKEY_TRANSFER[kind]}", flush=True)
            students[kind] = linearize(argparse.Namespace(**{**vars(args), "passkey_transfer": kind}), device,
                                       PasskeyTask)
        print(f"wrote {write_record(args, 'recall_passkey', {'task': 'pass-key', 'transfer_data': PASSKEY_TRANSFER, 'by_transfer': students})}")
        return
    if args.attention:
        record = run_one(args, device, args.attention, args.feature_map, args.local_window, args.features,
                         args.sparse_cache_size)
        print(f"accuracy {record['accuracy']:.4f}; wrote {write_record(args, 'recall_one', record)}")
        return
    if args.models and "softmax" not in args.models:
        raise SystemExit("the table needs the softmax model: it decides which shapes count")
    start = time.perf_counter()
    rows = table(args)
    softmax = {(r["width"], r["seq_len"], r["pairs"]): r["accuracy"] for r in rows if r["model"] == "softmax"}
    counted = {shape: value >= 0.99 for shape, value in softmax.items()}
    for row in rows:
        row["softmax_solved"] = counted[(row["width"], row["seq_len"], row["pairs"])]
    save_and_draw("recall", args, {"results": rows, "softmax_solved": {f"d{w}-T{t}-P{p}": ok for (w, t, p), ok
                                                                        in counted.items()},
                                   # this run's wall time (models kept from a killed run are not retrained)
                                   "table_seconds": round(time.perf_counter() - start)})


if __name__ == "__main__":
    main()
