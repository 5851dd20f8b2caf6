"""Trains a Performer with transformers' Trainer on the bundled corpora or on your data.

Tasks:  clm             causal LM                 (metric: perplexity)
        mlm             masked LM                 (metric: perplexity of masked tokens)
        classification  encoder classifier        (metrics: accuracy, F1, macro F1; regression: MSE)
        seq2seq         encoder-decoder           (metrics: BLEU, chrF with sacrebleu)

Data: --data FOLDER|FILE|HUB_NAME (modeling_performer.recipes.data_sources) with --text-column, --label-column,
--source-column/--target-column; without --data, the bundled data_cache/<dataset> prepared by
scripts/prepare_data.py (text, rotten_tomatoes, bible). --train-tokenizer N trains a tokenizer on
the training split first.

OUTPUT is ready for the Hub and holds nothing else: weights (safetensors), config with auto_map,
modeling files (trust_remote_code), tokenizer, generation config, metrics.json and a model card
(README.md from model_cards/performer.md: the measured metrics, the data, licence and base model
really used). Checkpoints go to OUTPUT.checkpoints; --resume continues from the newest complete
one. --device / --bf16 / --gradient-accumulation-steps / --gradient-checkpointing for GPUs;
--fsdp shards over processes under torchrun (modeling_performer/recipes/fsdp_training.py).

    python scripts/train.py --task clm --max-steps 300 --output outputs/clm
    python scripts/train.py --task classification --data tickets.csv --text-column message \
        --label-column team --init outputs/mlm --output outputs/cls
"""

import json
import math
import pathlib

from .hub_publishing import card_facts, finish_folder, push_folder
from .training_data import TaskData, tokenizer_folder, tokenizer_for
from .training_metrics import (compute_classification_metrics, compute_regression_metrics, translate_metrics,
                               trivial_baseline)
from .training_options import load_config


def run(args, output, checkpoints) -> dict:
    """Training with Trainer after the request was checked (`commands.train.main`): the data checked
    (nothing written yet), the model, training (or resuming), the measured and published folder."""
    from . import devices

    device, precision = devices.setup(args)
    task_data = TaskData(args)
    model, tokenizer = build_model(args, task_data, checkpoints)
    data = task_data.encode(args.task, tokenizer, args.seq_len)
    trainer = make_trainer(args, model, tokenizer, data, task_data, device, precision, checkpoints)
    train_or_resume(args, trainer, output, checkpoints)
    metrics = measure(args, trainer, model, tokenizer, data, task_data, device, precision)
    publish(args, trainer, model, tokenizer, metrics, task_data)
    return metrics


def build_model(args, task_data, checkpoints):
    """(model, tokenizer): --init's model or a new one from the preset, the task's head and labels,
    LoRA adapters with --lora-rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    import modeling_performer

    set_seed(args.seed)
    head = modeling_performer.TASK_HEADS[args.task]
    labels = {}
    if args.task == "classification":
        count, id2label, _, problem = task_data.labels
        labels = {"num_labels": count, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()},
                  "problem_type": problem}
    if args.init:
        model = head.from_pretrained(args.init, **labels)
        for option in ("attention_type", "feature_map", "local_window"):
            value = getattr(args, option)
            if value is not None and value != getattr(model.config, option):
                raise SystemExit(f"--{option.replace('_', '-')} cannot change a model loaded with --init")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(args))
    else:
        tokenizer = tokenizer_for(args, task_data, checkpoints)
        config = load_config(args, tokenizer)
        for key, value in labels.items():
            setattr(config, key, value)
        model = head(config) if config.model_type == "performer" else AutoModelForCausalLM.from_config(config)
    if args.lora_rank:
        from modeling_performer.lora import add_lora

        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    return model, tokenizer


def make_trainer(args, model, tokenizer, data, task_data, device, precision, checkpoints):
    from transformers import (
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from modeling_performer import PerformerRedrawCallback

    if args.task in ("clm", "mlm"):
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=args.task == "mlm", mlm_probability=0.15)
    elif args.task == "seq2seq":
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    else:
        collator = DataCollatorWithPadding(tokenizer)
    training_args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing, bf16=precision == "bf16", fp16=precision == "fp16",
        learning_rate=args.learning_rate, warmup_steps=min(50, args.max_steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, eval_strategy="steps", eval_steps=args.eval_steps,
        save_strategy="steps", save_steps=args.eval_steps, save_total_limit=2, logging_steps=max(1, args.eval_steps // 4),
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=device.type == "cpu",
        disable_tqdm=args.quiet, dataloader_num_workers=0,
    )
    compute_metrics = None
    if args.task == "classification":
        regression = task_data.labels[3] == "regression"
        compute_metrics = compute_regression_metrics if regression else compute_classification_metrics
    return Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                   data_collator=collator, processing_class=tokenizer, compute_metrics=compute_metrics,
                   callbacks=[PerformerRedrawCallback()])


def train_or_resume(args, trainer, output, checkpoints):
    from transformers import TrainerState

    from modeling_performer.checkpoint_performer import last_complete_checkpoint

    checkpoint = None
    if args.resume:
        # Earlier releases kept checkpoints inside the output folder: look there too.
        checkpoint = last_complete_checkpoint(str(checkpoints)) or (
            last_complete_checkpoint(str(output)) if output.is_dir() else None)
        print(f"resuming from {checkpoint}" if checkpoint else
              f"--resume: no complete checkpoint in {checkpoints} yet, starting from the beginning", flush=True)
    finished = checkpoint and TrainerState.load_from_json(str(pathlib.Path(checkpoint, "trainer_state.json")))
    if finished and finished.global_step >= args.max_steps:
        # Killed after the last checkpoint (evaluation, final save): Trainer would run one step more
        # when resumed at max_steps, so take the checkpoint's weights and state as they are.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = finished
    else:
        trainer.train(resume_from_checkpoint=checkpoint)


def measure(args, trainer, model, tokenizer, data, task_data, device, precision) -> dict:
    """metrics.json: the run's settings, loss curve, the task's metrics on validation and test,
    the trivial baseline, and (several processes) whether every rank holds the same projections."""
    import torch

    from . import devices

    metrics = {"task": args.task, "attention_type": getattr(model.config, "attention_type", "softmax"),
               "model_type": model.config.model_type, "steps": args.max_steps, "data": task_data.name,
               "precision": precision, "device": device.type,
               "global_batch_size": args.batch_size * args.gradient_accumulation_steps * trainer.args.world_size,
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_loss_history": [[e["step"], e["loss"], e.get("grad_norm")]
                                      for e in trainer.state.log_history if "loss" in e]}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        metrics.update(projections_across_ranks(model.get_base_model() if args.lora_rank else model))
    if args.lora_rank:
        metrics["lora_rank"] = args.lora_rank
        metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.task == "classification":
        metrics["num_labels"] = task_data.labels[0]
        metrics.update(trivial_baseline(task_data, args.task))
    for split in ("validation", "test"):
        result = trainer.evaluate(data[split], metric_key_prefix=split)
        metrics.update({k: v for k, v in result.items() if isinstance(v, (int, float)) and "preparation_time" not in k})
        if args.task in ("clm", "mlm"):
            metrics[f"{split}_perplexity"] = math.exp(min(result[f"{split}_loss"], 50))
    if args.task == "seq2seq":
        source_column, target_column = task_data.columns.values()
        test = task_data.raw["test"].select(range(min(args.bleu_rows, len(task_data.raw["test"]))))
        scores, hypotheses = translate_metrics(model, tokenizer, test[source_column], test[target_column],
                                               args.batch_size, args.seq_len,
                                               lambda: devices.autocast(device, precision))
        metrics.update(scores)
        print("sample translations:", *[f"  {s}\n  -> {h}" for s, h in zip(test[source_column][:3], hypotheses[:3])],
              sep="\n")
    return metrics


def projections_across_ranks(performer) -> dict:
    """Every rank must hold the same random projections (seeded redraws): gathers them from all
    processes (a collective: every rank calls it) and compares. `performer`: the Performer model
    itself (behind peft's wrapper, its base model)."""
    import torch
    import torch.distributed as dist

    favor = [m.projection.flatten().float().cpu() for m in performer.favor_modules()]
    local = torch.cat(favor) if favor else torch.zeros(1)
    if dist.get_backend() == "nccl":
        local = local.cuda()
    copies = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, local)
    return {"world_size": dist.get_world_size(),
            "projections_identical_across_ranks": all(torch.equal(c, copies[0]) for c in copies),
            "projection_draws": int(performer.base_model.redraw_state.draws)}


def publish(args, trainer, model, tokenizer, metrics, task_data):
    """The final folder, assembled aside and moved into place with config.json last: a run killed
    while saving leaves nothing that loads, and --resume finishes the job. LoRA adapters are merged
    (the saved model loads without peft); --push-to-hub uploads the finished folder."""
    from modeling_performer.checkpoint_performer import STAGE_NAME, fresh_stage, publish_folder

    stage = pathlib.Path(args.output, STAGE_NAME)
    if trainer.is_world_process_zero():
        fresh_stage(args.output)
    if args.lora_rank:
        from modeling_performer.lora import merge_lora

        model = merge_lora(model)
        if trainer.is_world_process_zero():
            model.save_pretrained(stage)
    else:
        trainer.save_model(str(stage))
    if trainer.is_world_process_zero():  # one writer when several processes train
        finish_folder(args, stage, model, tokenizer, metrics, card_facts(args, task_data, args.init))
        publish_folder(str(stage), args.output)
        if args.push_to_hub:
            print(f"uploaded to {push_folder(args.output, args.hub_model_id)}")
        print(json.dumps(metrics, indent=2))
