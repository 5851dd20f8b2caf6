"""The finished folder of a training run as it goes to the Hub: the model card's facts, the files
that belong there (and nothing the Trainer adds for itself), the upload."""

import json
import pathlib
import shutil


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
