"""`train.py --fsdp`: language-model training with parameters, gradients and optimizer state
sharded over the processes by torch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each
Performer layer is one shard group, the root (embeddings, final norm, head) another.

    torchrun --nproc-per-node 8 scripts/train.py --task clm --fsdp --config performer-medium-decoder \\
        --data my_corpus.txt --global-batch-size 256 --output outputs/clm-fsdp

GPUs use NCCL, one GPU per process; CPUs use gloo (how the tests run it). accelerate does not
shard on CPU processes, so this loop drives FSDP2 itself; it keeps the Trainer's recipe (AdamW,
weight decay 0.01 on matrices, cosine schedule with warm-up, gradient clipping at 1.0, seeded
projection redraws per optimizer step). The loss of a step is the summed token loss of the
global batch over its token count, so any number of processes gives the losses and weights of one
process with the same global batch (up to the order of floating-point sums).

Sharded checkpoints (torch.distributed.checkpoint) go to OUTPUT.checkpoints/checkpoint-N every
--eval-steps; `--resume` continues from the newest complete one. At the end the full weights are
gathered into an ordinary safetensors folder that `from_pretrained` loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import time

STATE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete


def step_seed(*parts) -> int:
    """A seed for torch's generator from (seed, step, rank, ...): dropout and masking of a step are
    the same in a resumed run."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")


def sharded_bytes(model, optimizer) -> dict:
    """Bytes of parameters and optimizer state this process holds, and what one process holding
    everything would (buffers such as the projections are replicated and left out of both)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    full_params = sum(p.numel() * p.element_size() for p in model.parameters())
    states = 0
    full_states = 0
    for p in model.parameters():
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.dim() > 0:
                states += local(value).numel() * value.element_size()
                full_states += value.numel() * value.element_size()
    return {"parameter_bytes": params, "optimizer_bytes": states,
            "one_process_parameter_bytes": full_params, "one_process_optimizer_bytes": full_states}


def complete_checkpoints(folder: pathlib.Path) -> list:
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.rsplit("-", 1)[-1]
        if step.isdigit() and (path / STATE).exists():
            found.append((int(step), path))
    return [p for _, p in sorted(found)]


def main(args):
    import torch
    import torch.distributed as dist

    from . import devices, training_data

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--fsdp runs one process per device under torchrun: "
                         "torchrun --nproc-per-node N scripts/train.py --fsdp ...")
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if args.task not in ("clm", "mlm"):
        raise SystemExit(f"--fsdp trains language models (--task clm or mlm), not {args.task}")
    for option in ("lora_rank", "push_to_hub", "train_tokenizer"):
        if getattr(args, option):
            raise SystemExit(f"--{option.replace('_', '-')} is not available with --fsdp")
    micro = args.batch_size
    if args.global_batch_size:
        per_step = world * args.gradient_accumulation_steps
        if args.global_batch_size % per_step:
            raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes x "
                             f"{args.gradient_accumulation_steps} accumulation steps")
        micro = args.global_batch_size // per_step
    global_batch = micro * world * args.gradient_accumulation_steps
    device = devices.resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    precision = devices.resolve_precision(args.precision, device)
    task_data = training_data.TaskData(args)  # every problem with the data is reported before anything is written

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _train(args, world, rank, device, precision, micro, global_batch, task_data)
    finally:
        dist.destroy_process_group()


def _train(args, world, rank, device, precision, micro, global_batch, task_data):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )
    from torch.distributed.fsdp import fully_shard
    from transformers import DataCollatorForLanguageModeling, get_cosine_schedule_with_warmup

    from . import devices
    import modeling_performer
    from modeling_performer.checkpoint_performer import fresh_stage, publish_folder
    from modeling_performer.modeling_performer import PerformerLayer

    from . import hub_publishing, training as train

    output = pathlib.Path(args.output)
    checkpoints = pathlib.Path(args.checkpoint_dir or f"{output}.checkpoints")
    head = modeling_performer.TASK_HEADS[args.task]
    model, tokenizer = train.build_model(args, task_data, checkpoints)  # seeded: the same weights on every process
    if model.config.model_type != "performer":
        raise SystemExit("--fsdp shards Performer layers: use a Performer preset")
    data = task_data.encode(args.task, tokenizer, args.seq_len)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=args.task == "mlm", mlm_probability=0.15)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.to(device)
    for module in model.modules():
        if isinstance(module, PerformerLayer):
            fully_shard(module)
    fully_shard(model)
    model.base_model._redraw_driven = True  # redraws below, per optimizer step

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # biases and norm weights
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(50, args.max_steps // 10), args.max_steps)

    start, history = 0, []
    found = complete_checkpoints(checkpoints) if args.resume else []
    if found:
        latest = found[-1]
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(latest))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        saved = json.loads((latest / STATE).read_text())
        scheduler.load_state_dict(saved["scheduler"])
        start, history = saved["step"], saved["history"]
        if rank == 0:
            print(f"resuming from {latest} (step {start})", flush=True)
    elif args.resume and rank == 0:
        print(f"--resume: no complete checkpoint in {checkpoints} yet, starting from the beginning", flush=True)

    rows = len(data["train"])
    if rows < global_batch:
        raise SystemExit(f"{rows} training blocks are fewer than one global batch of {global_batch}")
    per_epoch = rows // global_batch

    def rows_for(step):
        """The global batch of optimizer step `step`: epoch e's order is a permutation seeded with seed + e."""
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(args.seed + epoch))
        return order[index * global_batch:(index + 1) * global_batch].tolist()

    def batch_of(indices):
        return {k: v.to(device) for k, v in collator([data["train"][i] for i in indices]).items()}

    model.train()
    began = time.time()
    for step in range(start, args.max_steps):
        torch.manual_seed(step_seed(args.seed, step, rank))  # dropout and masking
        chosen = rows_for(step)
        micro_batches = []
        for m in range(args.gradient_accumulation_steps):
            first = (m * world + rank) * micro
            micro_batches.append(batch_of(chosen[first:first + micro]))
        labels = [b["labels"][:, 1:] if args.task == "clm" else b["labels"] for b in micro_batches]
        tokens = torch.tensor(float(sum(int((l != -100).sum()) for l in labels)), device=device)
        dist.all_reduce(tokens)  # the global batch's token count: every process divides by it
        total = torch.zeros((), device=device)
        for batch in micro_batches:
            with devices.autocast(device, precision):
                loss = model(**batch, num_items_in_batch=tokens).loss
            # FSDP averages gradients over the processes; the loss is already a global mean
            (loss * world).backward()
            total += loss.detach().float()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        model.redraw_for_step(step + 1)
        dist.all_reduce(total)
        history.append([step + 1, total.item(), norm.item()])
        if rank == 0 and not args.quiet:
            print(f"step {step + 1}/{args.max_steps} loss {total.item():.4f} grad norm {norm.item():.3f}", flush=True)
        if (step + 1) % args.eval_steps == 0 or step + 1 == args.max_steps:
            save_checkpoint(model, optimizer, scheduler, step + 1, history, checkpoints, rank)

    memory = sharded_bytes(model, optimizer)
    gathered = [None] * world
    dist.all_gather_object(gathered, memory)
    projections = train.projections_across_ranks(model)
    prompt = torch.tensor([tokenizer("ROMEO. I will", add_special_tokens=False)["input_ids"]], device=device)
    model.eval()
    with torch.no_grad():  # every process runs the same decoding (FSDP gathers each layer in step)
        tokens_at_end = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id).tolist()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        plain = head(model.config)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        if unexpected or [k for k in missing if k not in plain._tied_weights_keys]:
            raise RuntimeError(f"gathered weights do not fit the model: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        plain.eval()
        per_rank = max(m["parameter_bytes"] + m["optimizer_bytes"] for m in gathered)
        one = memory["one_process_parameter_bytes"] + memory["one_process_optimizer_bytes"]
        metrics = {"task": args.task, "attention_type": plain.config.attention_type, "model_type": "performer",
                   "steps": args.max_steps, "data": task_data.name, "precision": precision, "device": device.type,
                   "fsdp": True, "global_batch_size": global_batch,
                   "parameters": sum(p.numel() for p in plain.parameters()), **projections,
                   "memory_per_rank": gathered, "max_rank_bytes": per_rank, "one_process_bytes": one,
                   "max_rank_over_one_process": per_rank / one, "greedy_tokens_at_end": tokens_at_end,
                   "train_loss_history": history, "seconds_this_run": round(time.time() - began, 1)}
        print(f"parameters + optimizer state: {per_rank / 2**20:.2f} MiB on the largest rank against "
              f"{one / 2**20:.2f} MiB in one process ({per_rank / one:.2f}x)", flush=True)
        plain.to(device)
        for split in ("validation", "test"):
            loss = evaluate(plain, data[split], collator, micro, device, precision, args.task == "clm")
            metrics[f"{split}_loss"] = loss
            metrics[f"{split}_perplexity"] = math.exp(min(loss, 50))
        stage = pathlib.Path(fresh_stage(str(output)))
        plain.save_pretrained(stage)
        hub_publishing.finish_folder(args, stage, plain, tokenizer, metrics,
                                     hub_publishing.card_facts(args, task_data, args.init))
        publish_folder(str(stage), str(output))
        print(json.dumps({k: v for k, v in metrics.items() if k != "train_loss_history"}, indent=2))
    dist.barrier()
    return json.loads((output / "metrics.json").read_text())


def evaluate(model, dataset, collator, batch_size, device, precision, shift):
    """Mean token loss over a split: the summed token loss over the token count (shift: causal LM
    labels are the next tokens). Masked-LM masks are seeded, the same in every run."""
    import torch

    from . import devices

    total, count = 0.0, 0
    with torch.no_grad():
        for first in range(0, len(dataset), batch_size):
            torch.manual_seed(step_seed("evaluation", first))
            rows = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            n = int((batch["labels"][:, 1:] if shift else batch["labels"]).ne(-100).sum())
            with devices.autocast(device, precision):
                loss = model(**batch, num_items_in_batch=torch.tensor(float(n), device=device)).loss
            total += float(loss) * n
            count += n
    return total / max(count, 1)


def save_checkpoint(model, optimizer, scheduler, step, history, checkpoints, rank):
    """Sharded state (each process writes its own shards) into a partial folder, trainer_state.json
    last, then an atomic rename to checkpoint-N; the oldest beyond two are removed."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = checkpoints / f"checkpoint-{step}"
    partial = checkpoints / f".checkpoint-{step}.partial"
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(partial))
    dist.barrier()
    if rank == 0:
        state = partial / STATE
        state.with_suffix(".tmp").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict(),
                                                          "history": history}))
        os.replace(state.with_suffix(".tmp"), state)
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        for old in complete_checkpoints(checkpoints)[:-2]:
            shutil.rmtree(old)
    dist.barrier()
