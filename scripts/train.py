#!/usr/bin/env python
"""Trains a Performer with transformers' Trainer on prepared local data (scripts/prepare_data.py).

Tasks:  clm             causal LM on data_cache/text            (metric: perplexity)
        mlm             masked LM on data_cache/text            (metric: perplexity of masked tokens)
        classification  encoder classifier on data_cache/rotten_tomatoes (metrics: accuracy, F1)
        seq2seq         en->es translation on data_cache/bible  (metrics: BLEU, chrF with sacrebleu;
                        train a joint tokenizer first, see scripts/train_tokenizer.py --fields en es)

The output folder is ready for the Hub: weights (safetensors), config with auto_map, modeling
files (trust_remote_code), tokenizer, generation config, metrics.json and a model card (README.md,
from model_cards/performer.md, filled with the measured metrics). Training resumes from
the last checkpoint in the output folder with --resume.

    python scripts/train.py --task clm --max-steps 300 --output outputs/clm
    python scripts/train.py --task classification --init outputs/mlm --output outputs/cls
"""

import argparse
import json
import math
import pathlib
import shutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DATA = {"clm": "text", "mlm": "text", "classification": "rotten_tomatoes", "seq2seq": "bible"}
FINAL_STAGE = ".final-partial"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["clm", "mlm", "classification", "seq2seq"])
    parser.add_argument("--config", default="performer-small-encoder",
                        help="a preset name from configuration/presets or a config JSON path; a config of another "
                             "model_type (llama-small-decoder: a LlamaForCausalLM) trains that transformers model "
                             "(--task clm), a softmax teacher to convert and linearize")
    parser.add_argument("--init", help="start from this saved model folder instead of random weights")
    parser.add_argument("--attention-type", choices=["favor", "softmax"], help="override the config's attention type")
    parser.add_argument("--feature-map", choices=["softmax", "relu", "hedgehog"],
                        help="override the config's linear-attention features (hedgehog: learned maps)")
    parser.add_argument("--local-window", type=int, help="override the config's exact local window (0 = off)")
    parser.add_argument("--tokenizer", default=str(ROOT / "configuration" / "tokenizer"))
    parser.add_argument("--data", help="folder with train/validation/test.jsonl (default: data_cache/<dataset>)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--max-train-rows", type=int, default=0, help="use at most this many training rows (0 = all)")
    parser.add_argument("--max-eval-rows", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bleu-rows", type=int, default=300, help="seq2seq: test verses translated for BLEU/chrF")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="fine-tune --init through LoRA adapters of this rank (0 = all weights train)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --output")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def preset_config(path):
    """The config a preset file describes: a PerformerConfig, or the transformers config of the
    file's other model_type (the Llama teacher of the linearizing recipe)."""
    from transformers import AutoConfig

    from modeling_performer import PerformerConfig

    values = json.loads(pathlib.Path(path).read_text())
    model_type = values.pop("model_type", PerformerConfig.model_type)
    if model_type == PerformerConfig.model_type:
        return PerformerConfig.from_dict(values)
    return AutoConfig.for_model(model_type, **values)


def load_config(args, tokenizer):
    from modeling_performer import PerformerConfig

    path = pathlib.Path(args.config)
    if not path.exists():
        path = ROOT / "configuration" / "presets" / f"{args.config}.json"
    config = preset_config(path)
    if not isinstance(config, PerformerConfig):
        performer_options = [f"--{o.replace('_', '-')}" for o in ("attention_type", "feature_map", "local_window")
                             if getattr(args, o) is not None]
        if args.task != "clm" or performer_options:
            raise SystemExit(f"{path.name} is a {config.model_type!r} config: it trains as a transformers causal LM "
                             f"(--task clm) without Performer options ({', '.join(performer_options) or args.task})")
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    config.decoder_start_token_id = tokenizer.bos_token_id
    config.max_position_embeddings = max(config.max_position_embeddings, args.seq_len)
    if args.attention_type:
        config.attention_type = args.attention_type
    if args.feature_map:
        config.feature_map = args.feature_map
    if args.local_window is not None:
        config.local_window = args.local_window
    if isinstance(config, PerformerConfig):
        config._normalise_and_validate()
    return config


def joined_ids(tokenizer, texts) -> list:
    """BOS + text + EOS for every text, joined: the token stream causal-LM blocks are cut from."""
    ids = []
    for text in texts:
        ids.extend([tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"],
                    tokenizer.eos_token_id])
    return ids


def build_datasets(args, tokenizer):
    from datasets import load_dataset

    folder = pathlib.Path(args.data or ROOT / "data_cache" / DEFAULT_DATA[args.task])
    files = {s: str(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}
    missing = [f for f in files.values() if not pathlib.Path(f).exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `python scripts/prepare_data.py` first")
    raw = load_dataset("json", data_files=files)
    if args.max_train_rows:
        raw["train"] = raw["train"].select(range(min(args.max_train_rows, len(raw["train"]))))
    if args.max_eval_rows:
        for split in ("validation", "test"):
            raw[split] = raw[split].select(range(min(args.max_eval_rows, len(raw[split]))))

    if args.task == "classification":
        def encode(batch):
            return tokenizer(batch["text"], truncation=True, max_length=args.seq_len)
        return raw.map(encode, batched=True, remove_columns=["text"])

    if args.task == "seq2seq":
        def encode_pairs(batch):
            source = tokenizer(batch["en"], truncation=True, max_length=args.seq_len)
            target = tokenizer(batch["es"], truncation=True, max_length=args.seq_len - 1)
            source["labels"] = [ids + [tokenizer.eos_token_id] for ids in target["input_ids"]]
            return source
        return raw.map(encode_pairs, batched=True, remove_columns=["en", "es"])

    block = args.seq_len

    def blocks(batch):
        ids = joined_ids(tokenizer, batch["text"])
        usable = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, usable, block)]}

    return raw.map(blocks, batched=True, remove_columns=raw["train"].column_names)


def compute_classification_metrics(prediction):
    import numpy as np

    logits, labels = prediction
    predicted = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    accuracy = float((predicted == labels).mean())
    tp = float(((predicted == 1) & (labels == 1)).sum())
    precision = tp / max(float((predicted == 1).sum()), 1.0)
    recall = tp / max(float((labels == 1).sum()), 1.0)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"accuracy": accuracy, "f1": f1}


def translate_metrics(model, tokenizer, rows, batch_size, max_new_tokens):
    """Greedy translations of rows[i]["en"] scored against rows[i]["es"] with sacrebleu."""
    import sacrebleu
    import torch

    model.eval()
    hypotheses = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        inputs = tokenizer([r["en"] for r in batch], return_tensors="pt", padding=True, truncation=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        hypotheses.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    references = [[r["es"] for r in rows]]
    return {"test_bleu": sacrebleu.corpus_bleu(hypotheses, references).score,
            "test_chrf": sacrebleu.corpus_chrf(hypotheses, references).score}, hypotheses


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainerState,
        TrainingArguments,
        set_seed,
    )

    import modeling_performer
    from modeling_performer import (
        PerformerForCausalLM,
        PerformerForConditionalGeneration,
        PerformerForMaskedLM,
        PerformerForSequenceClassification,
        PerformerRedrawCallback,
    )
    from modeling_performer.checkpoint_performer import last_complete_checkpoint, publish_folder

    output = pathlib.Path(args.output)
    if args.resume and (output / "config.json").exists() and (output / "metrics.json").exists():
        print(f"{args.output} is complete (config.json and metrics.json): nothing to resume; remove them to train again")
        return json.loads((output / "metrics.json").read_text())
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    heads = {"clm": PerformerForCausalLM, "mlm": PerformerForMaskedLM,
             "classification": PerformerForSequenceClassification, "seq2seq": PerformerForConditionalGeneration}
    head = heads[args.task]
    if args.init:
        extra = {"num_labels": 2} if args.task == "classification" else {}
        model = head.from_pretrained(args.init, **extra)
        for option in ("attention_type", "feature_map", "local_window"):
            value = getattr(args, option)
            if value is not None and value != getattr(model.config, option):
                raise SystemExit(f"--{option.replace('_', '-')} cannot change a model loaded with --init")
    else:
        config = load_config(args, tokenizer)
        if args.task == "classification":
            config.num_labels = 2
            config.id2label, config.label2id = {0: "rotten", 1: "fresh"}, {"rotten": 0, "fresh": 1}
        model = head(config) if config.model_type == "performer" else AutoModelForCausalLM.from_config(config)
    if args.lora_rank:
        if not args.init:
            raise SystemExit("--lora-rank fine-tunes a trained model: give it with --init")
        from modeling_performer.lora import add_lora

        model = add_lora(model, rank=args.lora_rank, alpha=args.lora_alpha)
    data = build_datasets(args, tokenizer)
    if args.task == "clm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    elif args.task == "mlm":
        collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
    elif args.task == "seq2seq":
        collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100)
    else:
        collator = DataCollatorWithPadding(tokenizer)

    training_args = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.learning_rate, warmup_steps=min(50, args.max_steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, eval_strategy="steps", eval_steps=args.eval_steps,
        save_strategy="steps", save_steps=args.eval_steps, save_total_limit=2, logging_steps=max(1, args.eval_steps // 4),
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=args.quiet, dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=collator, processing_class=tokenizer,
        compute_metrics=compute_classification_metrics if args.task == "classification" else None,
        callbacks=[PerformerRedrawCallback()],
    )
    checkpoint = None
    if args.resume:
        checkpoint = last_complete_checkpoint(args.output)
        print(f"resuming from {checkpoint}" if checkpoint else
              f"--resume: no complete checkpoint in {args.output} yet, starting from the beginning", flush=True)
    finished = checkpoint and TrainerState.load_from_json(str(pathlib.Path(checkpoint, "trainer_state.json")))
    if finished and finished.global_step >= args.max_steps:
        # Killed after the last checkpoint (evaluation, final save): Trainer would run one step more
        # when resumed at max_steps, so take the checkpoint's weights and state as they are.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = finished
    else:
        trainer.train(resume_from_checkpoint=checkpoint)

    metrics = {"task": args.task, "attention_type": getattr(model.config, "attention_type", "softmax"),
               "model_type": model.config.model_type, "steps": args.max_steps,
               "parameters": sum(p.numel() for p in model.parameters()),
               "train_loss_history": [[e["step"], e["loss"], e.get("grad_norm")]
                                      for e in trainer.state.log_history if "loss" in e]}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank must hold the same random projections (seeded redraws): compare them.
        performer = model.get_base_model() if args.lora_rank else model  # the Performer behind peft's wrapper
        favor = [m.projection for m in performer.favor_modules()]
        local = torch.cat([p.flatten().float() for p in favor]) if favor else torch.zeros(1)
        gathered = [torch.zeros_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, local)
        metrics["world_size"] = torch.distributed.get_world_size()
        metrics["projections_identical_across_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
        metrics["projection_draws"] = int(performer.base_model.redraw_state.draws)
    if args.lora_rank:
        metrics["lora_rank"] = args.lora_rank
        metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for split in ("validation", "test"):
        result = trainer.evaluate(data[split], metric_key_prefix=split)
        metrics.update({k: v for k, v in result.items() if isinstance(v, (int, float)) and "preparation_time" not in k})
        if args.task in ("clm", "mlm"):
            metrics[f"{split}_perplexity"] = math.exp(min(result[f"{split}_loss"], 50))
    if args.task == "seq2seq":
        rows = [json.loads(line) for line in open(pathlib.Path(args.data or ROOT / "data_cache" / "bible") / "test.jsonl")]
        scores, hypotheses = translate_metrics(model, tokenizer, rows[: args.bleu_rows], args.batch_size, args.seq_len)
        metrics.update(scores)
        print("sample translations:", *[f"  {r['en']}\n  -> {h}" for r, h in zip(rows[:3], hypotheses[:3])], sep="\n")
    # The final folder is assembled aside and moved into place with config.json last: a run killed
    # while saving leaves nothing that loads, and --resume finishes the job.
    stage = pathlib.Path(args.output, FINAL_STAGE)
    if trainer.is_world_process_zero() and stage.exists():
        shutil.rmtree(stage)
    if args.lora_rank:
        from modeling_performer.lora import merge_lora

        model = merge_lora(model)  # the saved model loads without peft
        if trainer.is_world_process_zero():
            model.save_pretrained(stage)
    else:
        trainer.save_model(str(stage))
    if trainer.is_world_process_zero():  # one writer when several processes train
        tokenizer.save_pretrained(stage)
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if model.config.model_type == "performer":  # the card describes a Performer
            from make_model_card import make_card

            make_card(stage)
        publish_folder(str(stage), args.output)
        print(json.dumps(metrics, indent=2))
    assert modeling_performer  # registered with the Auto classes
    return metrics


if __name__ == "__main__":
    main()
