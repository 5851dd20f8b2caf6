"""The recall tasks that scripts/bench_recall.py and scripts/recall_experiments.py train and score
models on: multi-query associative recall (MQAR; "Zoology", Arora et al. 2023) and a pass-key
planted in the bundled plays, their curriculum, the training loop and the records.

MQAR: a sequence holds `--pairs` key-value pairs (keys from the lower half of the vocabulary,
values from the upper half, token 0 the filler), then each key once more at a random later
position, at least `--gap` tokens after the last pair; the model must answer with the key's value
there. Loss and accuracy count only those answer positions. Every model is a 2-layer Performer
decoder (rotary positions) trained on fresh sequences at every step and scored on held-out ones
(fixed seeds, never trained on).

The pass-key task: a 5-digit key (digits and marks are ids the text never uses) planted at a random
depth in a window of the bundled plays and asked for at the end; a key counts when all five digits
are right.

What makes softmax learn MQAR on 2 CPU cores (docs/figures/recall_recipe.json): width 128 with 4
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

from modeling_performer import PerformerConfig

from . import ROOT
from .bench_common import RESULTS, provenance, results_path
from .devices import add_device_arguments

BUNDLED_TEXT = ROOT / "data_cache" / "text"
FILLER = 0
# generators of training, held-out and transfer sequences, never equal
TRAIN_SEED, TEST_SEED, TRANSFER_SEED = 0, 10**6, 2 * 10**6


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
                 vocab: int = 0, decay=None) -> PerformerConfig:
    """decay: the linear layers' `linear_decay` (None: additive)."""
    return PerformerConfig(
        vocab_size=vocab or args.vocab, hidden_size=args.hidden, num_hidden_layers=2, num_attention_heads=args.heads,
        intermediate_size=2 * args.hidden, hidden_act="gelu", norm_type="pre_layernorm", position_embedding_type="rotary",
        max_position_embeddings=max(args.seq_len, 4096), attention_type=attention, feature_map=feature_map,
        local_window=window, sparse_cache_size=sparse, num_random_features=features, chunk_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=True,
        linear_decay=decay if attention == "favor" else None,
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

    from modeling_performer.recipes.texts import read_texts
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


def add_task_arguments(parser):
    """The options of the task, the model and its training, where devices and results go."""
    parser.add_argument("--feature-map", default="softmax", choices=["softmax", "relu", "hedgehog"])
    parser.add_argument("--local-window", type=int, default=0)
    parser.add_argument("--sparse-cache-size", type=int, default=0)
    parser.add_argument("--linear-decay", choices=["none", "head", "data"], default="none",
                        help="decay-gated linear attention: a learned gate per key/value head, or per token from its key")
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
    add_device_arguments(parser)
