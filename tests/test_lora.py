"""LoRA fine-tuning through peft: only the adapters, the feature maps and a new classification head
move; the merged model is a plain Performer that reloads with AutoModel* to the same outputs; a
softmax Performer converts to a linear one keeping every weight."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import modeling_performer  # noqa: F401
from modeling_performer import PerformerConfig, PerformerForCausalLM, PerformerForSequenceClassification
from modeling_performer.conversion import ConversionError, convert_to_performer

peft = pytest.importorskip("peft", reason="peft is in the dev extras")
from modeling_performer.lora import LoraError, add_lora, merge_lora  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, chunk_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LINEAR = dict(attention_type="favor", feature_map="hedgehog", local_window=4)


def train_steps(model, make_inputs, steps=4, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**make_inputs(step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def classification_inputs(step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, 60, (4, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}


def test_lora_moves_only_adapters_feature_maps_and_head_and_merges_to_a_plain_model(tmp_path):
    torch.manual_seed(0)
    model = PerformerForSequenceClassification(PerformerConfig(**TINY, **LINEAR, num_labels=2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, rank=4)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("modules_to_save" in n) for n in trainable), sorted(trainable)[:5]
    lora, losses = train_steps(lora, lambda step: classification_inputs(0))  # one batch: the loss must fall
    assert losses[-1] < losses[0]
    probe = classification_inputs(100)
    probe.pop("labels")
    with torch.no_grad():
        expected = lora(**probe).logits
    merged = merge_lora(lora)
    assert type(merged) is PerformerForSequenceClassification
    after = merged.state_dict()
    assert set(after) == set(before)  # no adapter or wrapper names left behind
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    allowed = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "up_proj.weight",
               "down_proj.weight", "feature_map.query_weight", "feature_map.key_weight", "dense.weight", "dense.bias", "classifier.weight",
               "classifier.bias")
    assert moved and all(k.endswith(allowed) for k in moved), sorted(moved - {k for k in moved if k.endswith(allowed)})
    # every kind of trainable tensor did move: adapters (merged into weights), feature maps, head
    for kind in ("q_proj.weight", "down_proj.weight", "feature_map.query_weight", "feature_map.key_weight",
                 "classifier.weight"):
        assert any(k.endswith(kind) for k in moved), kind
    # frozen: embeddings, norms, biases of adapted layers, window weights
    for key in after:
        if key.endswith(("embeddings.weight", "norm.weight", "q_proj.bias", "linear_log_weight")):
            assert torch.equal(after[key], before[key]), key
    with torch.no_grad():
        torch.testing.assert_close(merged(**probe).logits, expected, atol=1e-5, rtol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    saved = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in saved and not any("adapter" in name for name in saved)
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "peft" not in json.dumps(config) and "AutoModelForSequenceClassification" in config["auto_map"]
    assert (tmp_path / "merged" / "modeling_performer.py").exists()  # the code for trust_remote_code
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**probe).logits, expected, atol=1e-5, rtol=1e-5)


def lm_inputs(step):
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def test_lora_causal_lm_generates_the_same_before_and_after_merging():
    torch.manual_seed(0)
    model = PerformerForCausalLM(PerformerConfig(**TINY, **LINEAR, is_decoder=True)).eval()
    lora, losses = train_steps(add_lora(model, rank=4), lambda step: lm_inputs(0))
    assert losses[-1] < losses[0]
    prompt = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(7))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        from_adapters = lora.generate(input_ids=prompt, **kwargs)
        merged = merge_lora(lora)
        assert torch.equal(merged.generate(input_ids=prompt, **kwargs), from_adapters)


def test_lora_errors_name_the_problem():
    with pytest.raises(LoraError, match="Performer model"):
        add_lora(torch.nn.Linear(2, 2))
    model = PerformerForCausalLM(PerformerConfig(**TINY, **LINEAR, is_decoder=True))
    with pytest.raises(LoraError, match="rank must be >= 1"):
        add_lora(model, rank=0)
    with pytest.raises(LoraError, match="the model add_lora returned"):
        merge_lora(model)


def test_softmax_performer_converts_to_linear_keeping_every_weight(tmp_path):
    torch.manual_seed(0)
    teacher = PerformerForCausalLM(PerformerConfig(**TINY, attention_type="softmax", is_decoder=True)).eval()
    teacher.config.use_cache = False  # as Trainer leaves it
    teacher.save_pretrained(tmp_path / "teacher")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    tokenizer.save_pretrained(tmp_path / "teacher")
    ids = torch.randint(3, 60, (2, 20), generator=torch.Generator().manual_seed(1))

    same, _ = convert_to_performer(tmp_path / "teacher", "softmax")
    assert type(same) is PerformerForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(same(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4, rtol=0)

    done = subprocess.run([sys.executable, str(SCRIPTS / "convert_to_performer.py"), str(tmp_path / "teacher"),
                           str(tmp_path / "linear"), "--feature-map", "hedgehog", "--local-window", "4"],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    linear = AutoModelForCausalLM.from_pretrained(tmp_path / "linear").eval()
    assert (linear.config.attention_type, linear.config.feature_map, linear.config.local_window) == \
        ("favor", "hedgehog", 4)
    shared = teacher.state_dict()
    for key, value in linear.state_dict().items():
        if key in shared:
            assert torch.equal(value, shared[key]), key
    assert any(k.endswith("feature_map.key_weight") for k in linear.state_dict())
    assert linear.generation_config.use_cache  # decodes with its recurrent state
    with torch.no_grad():  # really a different attention now
        assert not torch.allclose(linear(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-3)

    with pytest.raises(ConversionError, match="feature_map"):
        convert_to_performer(tmp_path / "teacher", "favor", feature_map="hedgehgo")
    with pytest.raises(ConversionError, match="Unknown head"):
        convert_to_performer(tmp_path / "teacher", "favor", head="seq2seq")
