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
import hashlib
import json
import pathlib

import torch

from .bench_common import RESULTS, provenance, results_path
from .devices import add_device_arguments
from .recall_data import ANSWERS, DIGITS, TEST_SEED, bundled_tokens, mqar_batch, passkey_batch
from .recall_training import PasskeySteps, accuracy, model_config, train


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
