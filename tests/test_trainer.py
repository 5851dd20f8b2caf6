"""Trainer integration: gradient accumulation gives the same update as one big batch."""

import torch
from transformers import Trainer, TrainingArguments

from modeling_performer import PerformerForCausalLM

from .conftest import tiny_config


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.rows = []
        for n in (9, 3, 6, 2):  # unequal token counts: only num_items_in_batch makes the scales agree
            ids = torch.randint(3, 99, (9,), generator=g)
            labels = ids.clone()
            labels[n:] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def train_once(tmp_path, batch, accumulation):
    torch.manual_seed(0)
    model = PerformerForCausalLM(tiny_config())
    args = TrainingArguments(output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_drop_last=False, logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = train_once(tmp_path, 4, 1)
    accumulated = train_once(tmp_path, 2, 2)
    start = {n: p.detach() for n, p in PerformerForCausalLM(tiny_config()).named_parameters()}
    moved = max((full[n] - start[n]).abs().max().item() for n in full if n in start)
    assert moved > 1e-4
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)
