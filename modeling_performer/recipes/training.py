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

import argparse
import json
import math
import pathlib
import shutil

from . import ROOT
from .devices import add_device_arguments

DEFAULT_DATA = {"clm": "text", "mlm": "text", "classification": "rotten_tomatoes", "seq2seq": "bible"}
BUNDLED_LABELS = ["rotten", "fresh"]  # data_cache/rotten_tomatoes: 0 and 1


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
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the --init model's, else the bundled "
                                             "8,000-piece tokenizer in configuration/tokenizer)")
    parser.add_argument("--train-tokenizer", type=int, default=0, metavar="VOCAB",
                        help="train a SentencePiece tokenizer of this many pieces on the training split first "
                             "(saved with the model; 0 = use --tokenizer)")
    data = parser.add_argument_group("data (see modeling_performer/recipes/data_sources.py)")
    data.add_argument("--data", help="a folder with train/validation/test files (.jsonl, .json, .csv, .parquet, .txt), "
                                     "one such file (split 80/10/10 with a fixed seed), or a Hub dataset name "
                                     "(default: the bundled data_cache/<dataset> of the task)")
    data.add_argument("--text-column", default="text", help="clm, mlm, classification: the text (%(default)s)")
    data.add_argument("--label-column", default="label",
                      help="classification: the label, strings or integers (floats: regression) (%(default)s)")
    data.add_argument("--source-column", help="seq2seq: the source text (default: source, or en beside es)")
    data.add_argument("--target-column", help="seq2seq: the target text (default: target, or es beside en)")
    data.add_argument("--num-labels", type=int, help="classification: number of classes (default: from the data)")
    data.add_argument("--label-names", help="classification: comma-separated class names, in id order")
    parser.add_argument("--output", required=True,
                        help="the model folder (what goes to the Hub); checkpoints go to OUTPUT.checkpoints beside it")
    parser.add_argument("--checkpoint-dir", help="where Trainer checkpoints go (default: OUTPUT.checkpoints)")
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per device and micro-batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-steps", type=int, default=100)
    parser.add_argument("--max-train-rows", type=int, default=0, help="use at most this many training rows (0 = all)")
    parser.add_argument("--max-eval-rows", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bleu-rows", type=int, default=300, help="seq2seq: test pairs translated for BLEU/chrF")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="fine-tune --init through LoRA adapters of this rank (0 = all weights train)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: 2 x rank)")
    parser.add_argument("--resume", action="store_true", help="resume from the newest complete checkpoint")
    parser.add_argument("--fsdp", action="store_true",
                        help="shard parameters, gradients and optimizer state with FSDP2 (launch with torchrun; "
                             "see modeling_performer/recipes/fsdp_training.py)")
    parser.add_argument("--global-batch-size", type=int,
                        help="--fsdp: sequences per optimizer step over all processes (sets the per-device batch)")
    add_device_arguments(parser, training=True)
    hub = parser.add_argument_group("model card and Hub")
    hub.add_argument("--hub-model-id", help="the Hub repository (user/name) the card and --push-to-hub name")
    hub.add_argument("--push-to-hub", action="store_true", help="upload the finished model folder to --hub-model-id")
    hub.add_argument("--license", help="the card's licence (default: the --init model's, apache-2.0 on the "
                                       "bundled data, else unknown)")
    hub.add_argument("--base-model", help="the Hub id of the model this one was fine-tuned or converted from "
                                          "(default: what --init records)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def load_config(args, tokenizer):
    from modeling_performer import PerformerConfig

    from modeling_performer.bundled import load_preset, preset_path

    try:
        path = preset_path(args.config)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    config = load_preset(path)
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


class TaskData:
    """The task's splits, read and checked before anything is written: raw rows, the columns each
    task reads, the label encoding (classification) and a name of the data for the model card."""

    def __init__(self, args):
        from .data_sources import label_encoding, load_splits, require_columns

        bundled = args.data is None
        if bundled:
            folder = ROOT / "data_cache" / DEFAULT_DATA[args.task]
            if not (folder / "train.jsonl").exists():
                raise SystemExit(f"missing {folder}/train.jsonl: run `python scripts/prepare_data.py` first")
            self.raw, self.name = load_splits(str(folder))
        else:
            self.raw, self.name = load_splits(args.data)
        self.bundled = bundled
        if args.task == "seq2seq":
            found = self.raw["train"].column_names
            default = ("en", "es") if {"en", "es"} <= set(found) and "source" not in found else ("source", "target")
            self.columns = {"--source-column": args.source_column or default[0],
                            "--target-column": args.target_column or default[1]}
        else:
            self.columns = {"--text-column": args.text_column}
            if args.task == "classification":
                self.columns["--label-column"] = args.label_column
        require_columns(self.raw, self.columns)
        if args.max_train_rows:
            self.raw["train"] = self.raw["train"].select(range(min(args.max_train_rows, len(self.raw["train"]))))
        if args.max_eval_rows:
            for split in ("validation", "test"):
                self.raw[split] = self.raw[split].select(range(min(args.max_eval_rows, len(self.raw[split]))))
        self.labels = None
        if args.task == "classification":
            names = args.label_names.split(",") if args.label_names else (BUNDLED_LABELS if bundled else None)
            self.labels = label_encoding(self.raw, args.label_column, args.num_labels, names)
        elif args.num_labels or args.label_names:
            raise SystemExit("--num-labels and --label-names are for --task classification")

    def texts(self):
        """The training split's text (for a tokenizer trained on it)."""
        columns = [c for option, c in self.columns.items() if option != "--label-column"]
        return [t for column in columns for t in self.raw["train"][column] if isinstance(t, str) and t]

    def encode(self, task, tokenizer, seq_len):
        raw = self.raw
        if task == "classification":
            text, label = self.columns["--text-column"], self.columns["--label-column"]
            encode_label = self.labels[2]

            def encode(batch):
                out = tokenizer(batch[text], truncation=True, max_length=seq_len)
                out["labels"] = [encode_label(v) for v in batch[label]]
                return out
            return raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
        if task == "seq2seq":
            source_column, target_column = self.columns.values()

            def encode_pairs(batch):
                source = tokenizer(batch[source_column], truncation=True, max_length=seq_len)
                target = tokenizer(batch[target_column], truncation=True, max_length=seq_len - 1)
                source["labels"] = [ids + [tokenizer.eos_token_id] for ids in target["input_ids"]]
                return source
            return raw.map(encode_pairs, batched=True, remove_columns=raw["train"].column_names)
        column = self.columns["--text-column"]

        def blocks(batch):
            ids = joined_ids(tokenizer, [t for t in batch[column] if t])
            usable = len(ids) // seq_len * seq_len
            return {"input_ids": [ids[i : i + seq_len] for i in range(0, usable, seq_len)]}

        data = raw.map(blocks, batched=True, remove_columns=raw["train"].column_names)
        for split in data:
            if len(data[split]) == 0:
                raise SystemExit(f"the {split} split holds fewer than {seq_len} tokens: no block of --seq-len {seq_len}")
        return data


def compute_classification_metrics(prediction):
    """Accuracy and F1 (of class 1 with two classes; f1_macro: the mean over classes)."""
    import numpy as np
    from sklearn.metrics import f1_score

    logits, labels = prediction
    predicted, labels = np.asarray(logits).argmax(-1), np.asarray(labels)
    metrics = {"accuracy": float((predicted == labels).mean()),
               "f1_macro": float(f1_score(labels, predicted, average="macro", zero_division=0))}
    if np.asarray(logits).shape[-1] == 2:
        metrics["f1"] = float(f1_score(labels, predicted, average="binary", zero_division=0))
    return metrics


def compute_regression_metrics(prediction):
    import numpy as np

    predictions, labels = prediction
    predictions, labels = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    return {"mse": float(((predictions - labels) ** 2).mean())}


def trivial_baseline(task_data, task):
    """The answer that ignores the text, fitted on the training split and scored on the test
    split: the majority class (accuracy) or the mean label (squared error)."""
    import numpy as np

    column = task_data.columns["--label-column"]
    encode = task_data.labels[2]
    train = np.array([encode(v) for v in task_data.raw["train"][column]])
    test = np.array([encode(v) for v in task_data.raw["test"][column]])
    if task_data.labels[3] == "regression":
        return {"test_mean_label_mse": float(((test - train.mean()) ** 2).mean())}
    values, counts = np.unique(train, return_counts=True)
    return {"test_majority_accuracy": float((test == values[counts.argmax()]).mean())}


def translate_metrics(model, tokenizer, sources, references, batch_size, max_new_tokens, precision_context):
    """Greedy translations of the sources scored against the references with sacrebleu."""
    import sacrebleu
    import torch

    model.eval()
    hypotheses = []
    for start in range(0, len(sources), batch_size):
        inputs = tokenizer(sources[start : start + batch_size], return_tensors="pt", padding=True,
                           truncation=True).to(model.device)
        with torch.no_grad(), precision_context():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        hypotheses.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    return {"test_bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "test_chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}, hypotheses


def card_facts(args, task_data, init_folder):
    """What the model card states about where the model came from: the data's name, the licence
    and the base model, from what this run really used."""
    facts = {"dataset": None if task_data.bundled else task_data.name, "license": args.license,
             "base_model": args.base_model}
    recorded = {}
    if init_folder is not None:  # a model trained here (metrics.json) or converted (provenance.json)
        metrics, provenance = pathlib.Path(init_folder, "metrics.json"), pathlib.Path(init_folder, "provenance.json")
        if metrics.exists():
            recorded = json.loads(metrics.read_text()).get("provenance") or {}
        elif provenance.exists():
            recorded = json.loads(provenance.read_text())
    facts["base_model"] = facts["base_model"] or recorded.get("base_model")
    if facts["license"] is None:
        facts["license"] = recorded.get("license") or ("apache-2.0" if task_data.bundled else "unknown")
    return facts


def push_folder(folder, repo_id, private=False):
    """Uploads the finished model folder (nothing else) to the Hub repository repo_id."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                             commit_message="modeling-performer: scripts/train.py")


HUB_FILES = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json", "*.py",
             "tokenizer*", "special_tokens_map.json", "spiece.model", "README.md", "metrics.json",
             "chat_template*")


def keep_hub_files(folder):
    """Removes from the staged folder what does not belong on the Hub (training_args.bin, ...)."""
    import fnmatch

    for path in pathlib.Path(folder).iterdir():
        if not any(fnmatch.fnmatch(path.name, pattern) for pattern in HUB_FILES):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run(args, output, checkpoints) -> dict:
    """Training with Trainer after the request was checked (`train_command.main`): the data checked
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


def check_request(args):
    """What is wrong with the options themselves, found before anything is written."""
    if args.push_to_hub and not args.hub_model_id:
        raise SystemExit("--push-to-hub needs --hub-model-id (user/name)")
    if args.gradient_accumulation_steps < 1 or args.batch_size < 1:
        raise SystemExit("--batch-size and --gradient-accumulation-steps must be at least 1")
    if args.train_tokenizer and (args.init or args.tokenizer):
        raise SystemExit("--train-tokenizer makes a new vocabulary: it goes with neither --init nor --tokenizer")
    if args.lora_rank and not args.init:
        raise SystemExit("--lora-rank fine-tunes a trained model: give it with --init")


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


def tokenizer_folder(args):
    """--tokenizer, else the --init model's own, else the bundled one."""
    if args.tokenizer:
        return args.tokenizer
    if args.init and pathlib.Path(args.init, "tokenizer_config.json").exists():
        return args.init
    from modeling_performer.bundled import tokenizer_path

    return str(tokenizer_path())


def tokenizer_for(args, task_data, checkpoints):
    """--tokenizer, or with --train-tokenizer one trained on the training split, kept beside the
    checkpoints so that a resumed run uses the same vocabulary."""
    from transformers import AutoTokenizer

    if not args.train_tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer_folder(args))
    folder = checkpoints / "tokenizer"
    if args.resume and (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(folder)
    import tempfile

    from .tokenizer_training import to_fast_tokenizer, train_sentencepiece

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = to_fast_tokenizer(train_sentencepiece(task_data.texts(), args.train_tokenizer,
                                                          str(pathlib.Path(tmp) / "spm")))
    tokenizer.save_pretrained(folder)
    print(f"trained a {len(tokenizer)}-piece tokenizer on the training split ({folder})")
    return tokenizer


def finish_folder(args, stage, model, tokenizer, metrics, facts):
    """The staged folder as it goes to the Hub: tokenizer, metrics, card facts and card; nothing
    the Trainer adds for itself (training_args.bin)."""
    tokenizer.save_pretrained(stage)
    (stage / "metrics.json").write_text(json.dumps({**metrics, "provenance": facts}, indent=2))
    if model.config.model_type == "performer":  # the card describes a Performer
        from .model_card import make_card

        name = args.hub_model_id.split("/")[-1] if args.hub_model_id else pathlib.Path(args.output).name
        make_card(stage, repo_id=args.hub_model_id, model_name=name, **facts)
    keep_hub_files(stage)
