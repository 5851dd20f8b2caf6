"""Trainer integration: gradient accumulation gives the same update as one big batch, for every
head; projection redraws follow optimizer steps."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_performer import (
    TASK_HEADS,
    PerformerForCausalLM,
    PerformerForSequenceClassification,
    PerformerRedrawCallback,
)

from .conftest import tiny_config

HEADS = [head for task, head in TASK_HEADS.items() if task != "base"]


class Rows(torch.utils.data.Dataset):
    """Four rows; token heads get unequal numbers of labelled tokens, so that only a loss scaled by
    num_items_in_batch makes two half batches add up to the full one."""

    def __init__(self, head, rows=4):
        g = torch.Generator().manual_seed(3)
        self.rows = []
        for n in (9, 3, 6, 2)[:rows] if rows <= 4 else [9, 3, 6, 2] * (rows // 4):
            ids = torch.randint(3, 99, (9,), generator=g)
            if head is PerformerForSequenceClassification:
                self.rows.append({"input_ids": ids, "labels": torch.tensor(n % 3)})
                continue
            labels = ids.clone()
            labels[n:] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train(tmp_path, head, batch, accumulation, steps=1, rows=4, callbacks=None, **config):
    torch.manual_seed(0)
    model = head(tiny_config(num_labels=3, **config))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / f"{head.__name__}-{batch}x{accumulation}"),
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             max_steps=steps, learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                             report_to=[], save_strategy="no", use_cpu=True, dataloader_drop_last=False,
                             logging_steps=1, disable_tqdm=True, max_grad_norm=0.0)  # clipping would hide a scale error
    Trainer(model=model, args=args, train_dataset=Rows(head, rows), callbacks=callbacks).train()
    return model, start


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_gradient_accumulation_matches_full_batch(tmp_path, head):
    full, start = train(tmp_path, head, 4, 1)
    accumulated, _ = train(tmp_path, head, 2, 2)
    full, accumulated = dict(full.named_parameters()), dict(accumulated.named_parameters())
    moved = max((full[n] - start[n]).abs().max().item() for n in full)
    assert moved > 1e-3  # the step did something (measured from the same initial weights)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_redraw_callback_counts_optimizer_steps_with_accumulation(tmp_path):
    # 4 optimizer steps of 2 accumulated micro-batches, redraw every 2 steps: draws 1 and 2, not 4.
    model, _ = train(tmp_path, PerformerForCausalLM, 1, 2, steps=4, rows=8, callbacks=[PerformerRedrawCallback()],
                     feature_redraw_interval=2)
    assert int(model.model.redraw_state.draws) == 2
    twin = PerformerForCausalLM(tiny_config(feature_redraw_interval=2))
    twin.redraw_projections(draw=2)
    for ours, theirs in zip(model.favor_modules(), twin.favor_modules()):
        assert torch.equal(ours.projection, theirs.projection)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_trainer_sees_labels_as_the_only_label_argument(head):
    # Trainer computes an evaluation loss only when every argument it takes for a label is given.
    from transformers.utils import find_labels

    assert find_labels(head) == ["labels"]
