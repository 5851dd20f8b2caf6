"""Which layers of a linearized decoder should keep exact softmax attention, measured
(`python scripts/chat_lm.py rank-layers`).

A hybrid conversion (`convert_to_performer.py --softmax-layers I,J,...`) keeps a few layers exact
and makes the rest linear. Which few matters: retrieval in a small chat model rests on very few
layers, and evenly spaced ones miss them. The layers are ranked on the training split by what one
layer's attention costs the model, one layer at a time, in one of two directions:

- ``ablate`` (the default, and the one that needs no fitted student): the teacher with only layer
  L given the student's attention (its feature maps, window and gate as the student folder holds
  them). The cost of L is what the teacher loses.
- ``restore``: the (fitted) student with only layer L given exact softmax attention back. The value
  of L is what the student gains. In an unfitted student no single layer gains anything (the other
  layers do not yet pass on what the kept one expects), so this direction is for fitted students.

Two measures are taken for every layer, each against the unchanged model of that direction:

- the mean log-probability of planted answers: a fact hidden in a training-split document, asked
  for through the chat template, scored on the answer's tokens inside the teacher's own (correct)
  reply, teacher-forced;
- the mean next-token KL to the teacher on plain training text (the distillation loss).

The ranking orders the layers by the answer measure (what the linearized model is missing), the
KL breaking ties. Each layer's scores are kept as they are measured (OUTPUT.partial.json), so a
killed run resumes where it stopped with the same command.
"""

from __future__ import annotations

import json
import pathlib
import time

DIRECTIONS = ("ablate", "restore")


class LayerChoiceError(ValueError):
    pass


def uniform_layers(count: int, num_layers: int) -> list:
    """`count` layers spread evenly over the stack, each at the middle of its share (4 of 30:
    3, 11, 18, 26), the placement the measured choice is compared with."""
    if not 0 < count < num_layers:
        raise LayerChoiceError(f"choose between 1 and {num_layers - 1} of {num_layers} layers, not {count}")
    return [int((i + 0.5) * num_layers / count) for i in range(count)]


def top_layers(ranking_file, count: int) -> list:
    """The first `count` layers of a ranking file's order, sorted (what `--softmax-layers` takes)."""
    record = json.loads(pathlib.Path(ranking_file).read_text())
    order = record.get("ranking")
    if not order:
        raise LayerChoiceError(f"{ranking_file} holds no ranking (an unfinished run?): run rank-layers again")
    if not 0 < count < len(order):
        raise LayerChoiceError(f"choose between 1 and {len(order) - 1} of {len(order)} layers, not {count}")
    return sorted(order[:count])


def attention_types(student_types: list, layer: int, direction: str) -> list:
    """The per-layer attention types of the model that scores `layer`: the teacher (softmax
    everywhere) with the student's type at `layer` (ablate), or the student's types with softmax
    at `layer` (restore)."""
    if direction == "ablate":
        return [student_types[i] if i == layer else "softmax" for i in range(len(student_types))]
    return ["softmax" if i == layer else kind for i, kind in enumerate(student_types)]


def answer_spans(tokenizer, items: list, replies: list) -> list:
    """For each correctly answered item: (prompt ids, reply ids cut after the answer, the answer's
    token positions within the reply). Items the teacher got wrong are left out."""
    from .chat_lm import is_correct, prompt_text

    spans = []
    for item, reply in zip(items, replies):
        if not is_correct(reply, item["answers"]):
            continue
        answer = item["answers"][0]
        at = reply.lower().find(answer.lower())
        if at < 0:
            continue
        encoded = tokenizer(reply, add_special_tokens=False, return_offsets_mapping=True)
        positions = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < at + len(answer) and b > at]
        if not positions:
            continue
        prompt = tokenizer(prompt_text(tokenizer, item["content"]), add_special_tokens=False)["input_ids"]
        spans.append((prompt, encoded["input_ids"][:positions[-1] + 1], positions))
    return spans


def answer_logprob(model, spans: list) -> float:
    """Mean over the spans of the summed log-probability of the answer's tokens, teacher-forced."""
    import torch

    device = next(model.parameters()).device
    total = 0.0
    for prompt, reply, positions in spans:
        ids = torch.tensor([prompt + reply], device=device)
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=len(reply) + 1).logits[0, :-1]
        logp = logits.float().log_softmax(-1)
        target = torch.tensor(reply, device=device)
        total += logp[positions, target[positions]].sum().item()
    return total / max(len(spans), 1)


def plain_kl(teacher, model, windows: list) -> float:
    """Mean next-token KL(teacher || model) over the windows' tokens."""
    import torch

    from ..transfer import next_token_kl

    device = next(model.parameters()).device
    with torch.no_grad():
        values = [next_token_kl(teacher, model, {"input_ids": torch.tensor([w], device=device)}).item()
                  for w in windows]
    return sum(values) / len(values)


def _attention_prefix(model, layer: int) -> str:
    """The state-dict prefix of a decoder's layer `layer` self-attention ('model.decoder.layers.3.self_attn.')."""
    target = model.base_model.decoder.layers[layer].self_attn
    return next(name for name, module in model.named_modules() if module is target) + "."


def rank(scores: dict, direction: str) -> list:
    """Layers ordered most important first: by the answer log-probability the layer's attention
    loses (ablate: lowest first) or wins back (restore: highest first), then by KL."""
    sign = 1 if direction == "ablate" else -1
    return sorted((int(k) for k in scores),
                  key=lambda l: (sign * scores[str(l)]["answer_logprob"], -sign * scores[str(l)]["kl"], l))


def rank_layers(teacher_dir, student_dir, output, direction: str = "ablate", documents: int = 16,
                document_length: int = 1000, kl_tokens: int = 3072, answer_tokens: int = 40, device="cpu",
                layers=None, progress: bool = True) -> dict:
    """Scores every layer (or those in `layers`) as the module docstring says and writes
    {"scores": {layer: {...}}, "ranking": [...], "baseline": {...}, "uniform": {k: [...]}, ...} to
    `output`. Resumes from OUTPUT.partial.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import chat_lm

    if direction not in DIRECTIONS:
        raise LayerChoiceError(f"direction must be one of {DIRECTIONS}, not {direction!r}")
    output = pathlib.Path(output)
    student_config = json.loads((pathlib.Path(student_dir) / "config.json").read_text())
    num_layers = student_config["num_hidden_layers"]
    kinds = student_config["attention_type"]
    kinds = list(kinds) if isinstance(kinds, list) else [kinds] * num_layers
    if all(kind == "softmax" for kind in kinds):
        raise LayerChoiceError(f"{student_dir} has no linear layer: rank the layers of a linear (or hybrid) student")
    candidates = [l for l in range(num_layers) if kinds[l] != "softmax"] if layers is None else list(layers)
    bad = [l for l in candidates if not 0 <= l < num_layers or kinds[l] == "softmax"]
    if bad:
        raise LayerChoiceError(f"layers {bad} are not linear layers of {student_dir} (0 to {num_layers - 1})")
    partial_path = output.with_name(output.name + ".partial.json")
    record = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    settings = {"teacher": str(teacher_dir), "student": str(student_dir), "direction": direction,
                "documents": documents, "document_length": document_length, "kl_tokens": kl_tokens}
    if record and record.get("settings") != settings:
        raise LayerChoiceError(f"{partial_path} was measured with other settings ({record.get('settings')}); "
                               "remove it or repeat them")
    record.update(settings=settings)
    record.setdefault("scores", {})

    def keep():
        chat_lm.write_json(partial_path, record)

    # Every forward below runs without gradients (answer_logprob, plain_kl, generate_answers).
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).to(device).eval()
    ids = chat_lm.corpus_ids(tokenizer, "train")
    items = chat_lm.fact_items(tokenizer, ids, "train", [document_length], documents)
    if "replies" not in record:
        record["replies"] = chat_lm.generate_answers(teacher, tokenizer, items, answer_tokens, 4, progress,
                                                     desc="teacher replies")
        keep()
    spans = answer_spans(tokenizer, items, record["replies"])
    if not spans:  # nothing to score the answers by: every layer's answer score is 0 and the KL ranks alone
        print(f"the teacher answered none of the {len(items)} training questions: the layers are ranked by KL alone")
    teacher_state = teacher.state_dict()
    windows, per = [], max(kl_tokens // (1024 * len(chat_lm.CORPORA)), 1)
    for corpus in chat_lm.CORPORA:  # the start of each corpus's training split, 1,024 tokens at a time
        windows += [ids[corpus][i * 1024:(i + 1) * 1024] for i in range(per)]

    def scores_of(model):
        return {"answer_logprob": round(answer_logprob(model, spans), 4), "kl": round(plain_kl(teacher, model, windows), 5)}

    if "baseline" not in record:  # the unchanged model of the direction: the teacher (ablate) or the student
        base = teacher if direction == "ablate" else AutoModelForCausalLM.from_pretrained(student_dir).to(device).eval()
        record["baseline"] = scores_of(base)
        del base
        keep()
    from tqdm.auto import tqdm

    for layer in tqdm(candidates, disable=not progress, desc=f"layers ({direction})"):
        if str(layer) in record["scores"]:
            continue
        start = time.time()
        model = AutoModelForCausalLM.from_pretrained(student_dir, attention_type=attention_types(kinds, layer, direction))
        # The unchanged side keeps its own weights: ablate takes all but layer L's attention from the teacher,
        # restore takes layer L's attention from it (what a hybrid conversion keeps). For a student whose
        # other weights were fitted too (LoRA), that matters.
        prefix = _attention_prefix(model, layer)
        taken = {k: v for k, v in teacher_state.items() if k.startswith(prefix) == (direction == "restore")}
        unexpected = model.load_state_dict(taken, strict=False).unexpected_keys
        if unexpected:
            raise LayerChoiceError(f"the teacher and {student_dir} differ in shape ({unexpected[:3]})")
        scores = scores_of(model.to(device).eval())
        scores["seconds"] = round(time.time() - start, 1)
        record["scores"][str(layer)] = scores
        keep()
        del model
    answers = (f"{len(spans)} correctly answered training-split questions in {document_length}-token documents"
               if spans else "no training question the teacher answered (the KL ranks alone)")
    result = {**settings, "measured_on": f"{answers}; next-token KL on {len(windows)} training windows of 1,024 tokens",
              "answers_scored": len(spans), "baseline": record["baseline"], "scores": record["scores"],
              "ranking": rank(record["scores"], direction),
              "uniform": {str(k): uniform_layers(k, num_layers) for k in range(1, min(num_layers, 9))},
              "minutes": round(sum(s["seconds"] for s in record["scores"].values()) / 60, 2)}
    from .bench_common import provenance

    result.update(provenance(), threads=torch.get_num_threads())
    for score in result["scores"].values():  # each layer's change against the unchanged model
        score["answer_delta"] = round(score["answer_logprob"] - record["baseline"]["answer_logprob"], 4)
        score["kl_delta"] = round(score["kl"] - record["baseline"]["kl"], 5)
    chat_lm.write_json(output, result)
    return result


def format_ranking(result: dict, count: int = 8) -> str:
    lines = [f"direction {result['direction']}: answer log-prob of the unchanged model "
             f"{result['baseline']['answer_logprob']:.3f}, KL {result['baseline']['kl']:.4f}"]
    for layer in result["ranking"][:count]:
        s = result["scores"][str(layer)]
        lines.append(f"  layer {layer:>2}: answer {s['answer_delta']:+.3f} nats, KL {s['kl_delta']:+.4f}")
    return "\n".join(lines)

