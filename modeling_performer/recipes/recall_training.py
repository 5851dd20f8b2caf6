"""How a recall model is built and trained: its config from the experiment's options, the loss and
accuracy on the answer positions only, the curriculum over lengths and the steps that feed it, and
the training loop."""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from modeling_performer import PerformerConfig

from .recall_data import ANSWERS, TEST_SEED, TRAIN_SEED, mqar_batch, passkey_batch


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
