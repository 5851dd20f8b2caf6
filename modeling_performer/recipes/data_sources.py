"""Training data from the user: local files, a folder of splits, or a Hub dataset.

`--data` is one of
- a folder holding `train.*` and optionally `validation.*` (or `valid`, `val`, `dev`) and `test.*`,
  each `.jsonl`, `.json`, `.csv`, `.parquet` or `.txt`; a missing validation or test split is cut
  from the training file;
- one such file, split 80/10/10: rows shuffled with a fixed seed (`.txt`: in order, lines of
  running text stay together);
- a dataset name on the Hub, where the Hub is reachable.

A `.txt` file gives one row per line in a column named `text`. Every problem (an unreadable file,
a missing column, labels that do not fit) stops the run with one message before anything is
written.
"""

from __future__ import annotations

import pathlib
import re

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
SPLIT_SEED = 0  # fixed: the test rows of a split file do not move when --seed changes
HELD_OUT = 0.1  # of the rows for each of validation and test when they are cut from one file


class DataError(SystemExit):
    """A problem with the user's data, reported before anything is written."""


def _read(files: dict, kind: str):
    from datasets import load_dataset

    try:
        return load_dataset(FORMATS[kind], data_files={k: str(v) for k, v in files.items()})
    except Exception as error:  # datasets raises many kinds; the user needs the file and the reason
        names = ", ".join(str(f) for f in files.values())
        raise DataError(f"cannot read {names} as {kind} data: {type(error).__name__}: {error}") from None


def _cut(dataset, parts: tuple, shuffle: bool):
    """Cuts `parts` (validation, test or both) off one split: HELD_OUT of the rows each."""
    from datasets import DatasetDict

    count = len(dataset)
    held = max(1, round(HELD_OUT * count))
    if count < 1 + held * len(parts):
        raise DataError(f"{count} rows are too few to cut {' and '.join(parts)} splits from them")
    if shuffle:
        dataset = dataset.shuffle(seed=SPLIT_SEED)
    out, end = {}, count
    for name in reversed(parts):  # test is the last rows, validation the ones before it
        out[name] = dataset.select(range(end - held, end))
        end -= held
    out["train"] = dataset.select(range(end))
    return DatasetDict(out)


def _split_file(folder: pathlib.Path, names: tuple):
    found = [p for n in names for p in sorted(folder.glob(f"{n}.*")) if p.suffix in FORMATS]
    if len(found) > 1:
        raise DataError(f"{folder} holds several files for one split: {', '.join(p.name for p in found)}")
    return found[0] if found else None


def load_splits(data: str):
    """(DatasetDict with train, validation and test, a short name of the data for the model card)."""
    from datasets import DatasetDict

    path = pathlib.Path(data)
    if path.is_dir():
        files = {s: _split_file(path, SPLIT_NAMES[s]) for s in SPLITS}
        if files["train"] is None:
            raise DataError(f"{path} has no train file: expected train.jsonl, .json, .csv, .parquet or .txt "
                            f"(found: {', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'})")
        kinds = {f.suffix for f in files.values() if f is not None}
        if len({FORMATS[k] for k in kinds}) > 1:
            raise DataError(f"the split files in {path} mix formats ({', '.join(sorted(kinds))}): use one")
        present = {s: f for s, f in files.items() if f is not None}
        raw = _read(present, files["train"].suffix)
        missing = tuple(s for s in SPLITS if s not in present)
        splits = dict(raw)
        if missing:
            print(f"{path}: no {' or '.join(missing)} file; cutting {HELD_OUT:.0%} of the training rows for each")
            splits.update(_cut(raw["train"], missing, shuffle=files["train"].suffix != ".txt"))
        return DatasetDict({s: splits[s] for s in SPLITS}), path.name
    if path.is_file():
        if path.suffix not in FORMATS:
            raise DataError(f"{path}: unknown format {path.suffix or '(no suffix)'}; use one of {', '.join(FORMATS)}")
        raw = _read({"train": path}, path.suffix)
        return _cut(raw["train"], ("validation", "test"), shuffle=path.suffix != ".txt"), path.name
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", data) or data.startswith(".") or path.suffix in FORMATS:
        raise DataError(f"{data} does not exist")  # a path, not a Hub dataset name
    return _load_hub_dataset(data), data


def _load_hub_dataset(name: str):
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DataError(f"{name!r} is not a local file or folder, and the Hub is offline (HF_HUB_OFFLINE=1): "
                        "give a local file or folder, or unset HF_HUB_OFFLINE to load the dataset from the Hub")
    from datasets import load_dataset

    try:
        raw = load_dataset(name)
    except Exception as error:
        raise DataError(f"cannot load the dataset {name!r} from the Hub: {type(error).__name__}: {error}") from None
    splits = dict(raw)
    if "validation" not in splits:
        for alias in SPLIT_NAMES["validation"]:
            if alias in splits:
                splits["validation"] = splits.pop(alias)
    if "train" not in splits:
        raise DataError(f"the dataset {name!r} has no train split (it has {', '.join(splits)})")
    missing = tuple(s for s in SPLITS if s not in splits)
    if missing:
        splits.update(_cut(splits["train"], missing, shuffle=True))
    from datasets import DatasetDict

    return DatasetDict({s: splits[s] for s in SPLITS})


def require_columns(splits, columns: dict) -> None:
    """columns: {option name: column}. Stops with the missing column and the columns found."""
    found = splits["train"].column_names
    for option, column in columns.items():
        if column not in found:
            raise DataError(f"the data has no column {column!r} ({option}); its columns are: {', '.join(found)}")


def label_encoding(splits, column: str, num_labels: int | None = None, names: list | None = None):
    """How a label column becomes model targets: (num_labels, id2label, encode, problem_type).

    - float values: regression (one output, problem_type "regression");
    - strings: one class per distinct value, ids in sorted order (or in the order of `names`);
    - integers: ids as given, 0 .. max (or `num_labels`), names from the data's ClassLabel
      feature, from `names`, or LABEL_i.
    Labels outside the classes stop with the offending value and where it is.
    """
    from datasets import ClassLabel, Value

    feature = splits["train"].features[column]
    values = {s: splits[s][column] for s in SPLITS}
    if any(v is None for vs in values.values() for v in vs):
        split = next(s for s, vs in values.items() if any(v is None for v in vs))
        raise DataError(f"the {split} split has rows without a label in column {column!r}")
    dtype = getattr(feature, "dtype", "")
    if isinstance(feature, Value) and dtype.startswith("float"):
        if num_labels not in (None, 1):
            raise DataError(f"column {column!r} holds real numbers (regression): --num-labels must be 1 or unset")
        return 1, {0: "LABEL_0"}, float, "regression"
    if isinstance(feature, ClassLabel):
        names = names or feature.names
    if isinstance(feature, Value) and dtype in ("string", "large_string"):
        classes = names or sorted({v for vs in values.values() for v in vs})
        index = {name: i for i, name in enumerate(classes)}
        for split, vs in values.items():
            unknown = sorted({v for v in vs if v not in index})
            if unknown:
                raise DataError(f"the {split} split has labels outside the classes {classes}: {unknown[:5]}")
        if num_labels is not None and num_labels != len(classes):
            raise DataError(f"--num-labels {num_labels} but the data has {len(classes)} classes: {classes}")
        return len(classes), dict(enumerate(classes)), index.__getitem__, "single_label_classification"
    if not (isinstance(feature, ClassLabel) or (isinstance(feature, Value) and (dtype.startswith("int") or dtype == "bool"))):
        raise DataError(f"column {column!r} is {feature}: labels must be strings, integers or real numbers")
    highest = max(int(v) for vs in values.values() for v in vs)
    count = num_labels or (len(names) if names else highest + 1)
    for split, vs in values.items():
        bad = sorted({int(v) for v in vs if not 0 <= int(v) < count})
        if bad:
            raise DataError(f"the {split} split has labels outside 0..{count - 1} (--num-labels {count}): {bad[:5]}")
    if names and len(names) != count:
        raise DataError(f"{len(names)} label names for {count} classes")
    id2label = dict(enumerate(names)) if names else {i: f"LABEL_{i}" for i in range(count)}
    return count, id2label, int, "single_label_classification"
