"""Choosing the layers a hybrid conversion keeps exact (modeling_performer.recipes.layer_choice,
`chat_lm.py rank-layers`): each layer's score is the model a hybrid conversion would build, the
ranking follows the scores, a killed run resumes to the same file, bad choices are refused."""

import json

import pytest
import torch
from .conftest import CHAT_TEMPLATE

from modeling_performer.conversion import convert_to_performer
from modeling_performer.recipes import chat_lm, layer_choice


def refit(model, mlp=True, queries=(0, 1, 2)):
    """Moves weights a fit beyond the maps would move (as LoRA does): the feed-forward weights
    (when `mlp`) and the query projections of the layers in `queries`, the same way every time."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.decoder.layers):
            delta = 0.05 * torch.randn(layer.mlp.down_proj.weight.shape, generator=generator)
            if mlp:
                layer.mlp.down_proj.weight.add_(delta)
            if i in queries:
                layer.self_attn.q_proj.weight.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama chat model (3 layers, random weights), its softmax teacher and its Hedgehog +
    window student, converted as the recipe converts them; the student's other weights moved too
    (`refit`), so that which side each weight is taken from shows in the scores."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from modeling_performer.bundled import tokenizer_path

    root = tmp_path_factory.mktemp("layer-choice")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(root / "source")
    tokenizer.save_pretrained(root / "source")
    for name, options in {"teacher": {"attention_type": "softmax"},
                          "student": {"feature_map": "hedgehog", "local_window": 8}}.items():
        model, tok = convert_to_performer(root / "source", **options)
        (refit(model) if name == "student" else model).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


@pytest.fixture
def training_data(monkeypatch):
    """Filler for the documents, and a teacher that gives the planted answer (a random model knows
    none), so that every question is scored."""
    text = "The river runs to the sea. Birds sing in the morning light.\nA man walks home. " * 60

    def corpus_ids(tokenizer, split):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"text": ids, "bible": ids[5:], "speeches": ids[9:]}

    def generate_answers(model, tokenizer, items, *args, **kwargs):
        return [f"It is {item['answers'][0]}." for item in items]

    monkeypatch.setattr(chat_lm, "corpus_ids", corpus_ids)
    monkeypatch.setattr(chat_lm, "generate_answers", generate_answers)


def rank(folders, output, direction="ablate", **kwargs):
    return layer_choice.rank_layers(folders / "teacher", folders / "student", output, direction, documents=3,
                                    document_length=80, kl_tokens=3072, progress=False, **kwargs)


@pytest.mark.parametrize("direction", ["ablate", "restore"])
def test_each_layers_score_is_the_hybrid_conversion_that_keeps_or_drops_that_layer(folders, training_data, tmp_path,
                                                                                   direction):
    result = rank(folders, tmp_path / "layers.json", direction)
    assert sorted(result["ranking"]) == [0, 1, 2] and result["answers_scored"] == 3
    assert json.loads((tmp_path / "layers.json").read_text())["ranking"] == result["ranking"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folders / "teacher")
    ids = chat_lm.corpus_ids(tokenizer, "train")
    items = chat_lm.fact_items(tokenizer, ids, "train", [80], 3)
    spans = layer_choice.answer_spans(tokenizer, items, chat_lm.generate_answers(None, tokenizer, items))
    for layer in (0, 2):
        # ablate: the teacher, but layer L's attention is the student's; restore: the student, but
        # layer L's attention is the teacher's
        kept = [l for l in range(3) if l != layer] if direction == "ablate" else [layer]
        hybrid, _ = convert_to_performer(folders / "source", feature_map="hedgehog", local_window=8,
                                         softmax_layers=kept)
        if direction == "ablate":
            refit(hybrid, mlp=False, queries=[layer])
        else:
            refit(hybrid, queries=[l for l in range(3) if l != layer])
        expected = layer_choice.answer_logprob(hybrid.eval(), spans)
        assert result["scores"][str(layer)]["answer_logprob"] == pytest.approx(expected, abs=2e-4)
    baseline = result["baseline"]["answer_logprob"]
    teacher, _ = convert_to_performer(folders / "source", attention_type="softmax")
    student, _ = convert_to_performer(folders / "source", feature_map="hedgehog", local_window=8)
    refit(student)
    unchanged = teacher if direction == "ablate" else student
    assert baseline == pytest.approx(layer_choice.answer_logprob(unchanged.eval(), spans), abs=2e-4)
    if direction == "ablate":  # the teacher against itself: no KL
        assert result["baseline"]["kl"] == pytest.approx(0.0, abs=1e-6)
    # A linear layer moves the answer: the scores differ from the unchanged model's.
    assert any(abs(s["answer_delta"]) > 1e-3 for s in result["scores"].values())


def test_a_killed_ranking_resumes_to_the_same_file(folders, training_data, tmp_path):
    whole = rank(folders, tmp_path / "whole.json")
    partial = tmp_path / "cut.json.partial.json"
    rank(folders, tmp_path / "cut.json")
    record = json.loads(partial.read_text())
    del record["scores"]["1"]  # killed before layer 1 was kept
    partial.write_text(json.dumps(record))
    (tmp_path / "cut.json").unlink()
    resumed = rank(folders, tmp_path / "cut.json")
    for key in ("ranking", "baseline"):
        assert resumed[key] == whole[key]
    for layer in "012":
        assert resumed["scores"][layer]["answer_logprob"] == whole["scores"][layer]["answer_logprob"]
    with pytest.raises(layer_choice.LayerChoiceError, match="other settings"):
        rank(folders, tmp_path / "cut.json", "restore")


def test_the_ranking_puts_the_costliest_layer_first_and_the_recipe_takes_its_top_k(tmp_path):
    scores = {"0": {"answer_logprob": -1.0, "kl": 0.1}, "1": {"answer_logprob": -6.0, "kl": 0.2},
              "2": {"answer_logprob": -1.0, "kl": 0.3}, "3": {"answer_logprob": -0.5, "kl": 0.0}}
    assert layer_choice.rank(scores, "ablate") == [1, 2, 0, 3]  # lowest answer first, then the larger KL
    assert layer_choice.rank(scores, "restore") == [3, 0, 2, 1]
    path = tmp_path / "layers.json"
    path.write_text(json.dumps({"ranking": [7, 2, 20, 5]}))
    assert layer_choice.top_layers(path, 3) == [2, 7, 20]
    with pytest.raises(layer_choice.LayerChoiceError, match="between 1 and 3"):
        layer_choice.top_layers(path, 4)
    path.write_text(json.dumps({"scores": {}}))
    with pytest.raises(layer_choice.LayerChoiceError, match="no ranking"):
        layer_choice.top_layers(path, 1)


def test_uniform_placement_spreads_the_layers_over_the_stack():
    assert layer_choice.uniform_layers(4, 30) == [3, 11, 18, 26]
    assert layer_choice.uniform_layers(1, 30) == [15]
    assert layer_choice.uniform_layers(2, 30) == [7, 22]
    with pytest.raises(layer_choice.LayerChoiceError):
        layer_choice.uniform_layers(30, 30)


def test_a_student_without_linear_layers_or_a_softmax_layer_to_rank_is_refused(folders, training_data, tmp_path):
    with pytest.raises(layer_choice.LayerChoiceError, match="no linear layer"):
        layer_choice.rank_layers(folders / "teacher", folders / "teacher", tmp_path / "x.json", progress=False)
    with pytest.raises(layer_choice.LayerChoiceError, match="not linear layers"):
        rank(folders, tmp_path / "x.json", layers=[5])
    with pytest.raises(layer_choice.LayerChoiceError, match="direction"):
        rank(folders, tmp_path / "x.json", "sideways")
