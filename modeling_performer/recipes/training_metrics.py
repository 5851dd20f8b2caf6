"""What a training run measures: accuracy / F1 / MSE for classification, BLEU / chrF for
translation (evaluate and sacrebleu), and the trivial baseline every score is read against."""


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
