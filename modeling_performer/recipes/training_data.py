"""The data a training run reads: the bundled corpora or the user's (`TaskData`, through
modeling_performer.recipes.data_sources), encoded for each task, and the tokenizer it is encoded with."""

import pathlib

from . import ROOT

DEFAULT_DATA = {"clm": "text", "mlm": "text", "classification": "rotten_tomatoes", "seq2seq": "bible"}
BUNDLED_LABELS = ["rotten", "fresh"]  # data_cache/rotten_tomatoes: 0 and 1


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
