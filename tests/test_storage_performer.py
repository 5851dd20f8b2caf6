"""Saving and loading (`storage_performer`): every head through the Auto classes, one-stack
checkpoints into other heads, remote code without the package, earlier weight names, missing
weights reported or refused, another model type refused, saving twice gives the same bytes, and
bf16 stays bf16."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_performer import (
    TASK_HEADS,
    PerformerConfig,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerModel,
)

from .conftest import tiny_config
from .helpers import AUTO, drop_weights, inputs_for, run_remote

HEADS = TASK_HEADS


@pytest.mark.parametrize("head", HEADS)
def test_save_load_through_auto_classes(head, tmp_path):
    model = HEADS[head](tiny_config(attention_type=["favor", "softmax"])).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", *[a.__name__ for a in AUTO.values()]}
    assert (tmp_path / "model.safetensors").exists()
    loaded = AUTO[head].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    kwargs = {k: v for k, v in inputs_for(head).items() if k != "labels"}
    if head == "seq2seq":
        kwargs["decoder_input_ids"] = kwargs["input_ids"]
    a, b = model(**kwargs), loaded(**kwargs)
    key = "last_hidden_state" if head == "base" else "logits"
    assert torch.equal(a[key], b[key])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PerformerConfig)


@pytest.mark.parametrize("head", ["mlm", "classification", "clm"])
def test_base_checkpoint_loads_into_heads(head, tmp_path):
    base = PerformerModel(tiny_config())
    base.save_pretrained(tmp_path)
    model, info = HEADS[head].from_pretrained(tmp_path, output_loading_info=True)
    missing = set(info["missing_keys"])
    expected_prefix = {"mlm": "lm_head.", "classification": ("dense.", "classifier."), "clm": "lm_head."}[head]
    assert all(k.startswith(expected_prefix) for k in missing), missing
    assert not info["unexpected_keys"]
    loaded = model.model.state_dict()
    for name, tensor in base.state_dict().items():
        if head == "clm":  # the bidirectional stack's weights start the causal one
            name = name.replace("encoder.", "decoder.")
        assert torch.equal(loaded[name], tensor), name


def test_seq2seq_base_checkpoint_loads_into_head(tmp_path):
    base = PerformerModel(tiny_config(is_encoder_decoder=True))
    base.save_pretrained(tmp_path)
    model, info = PerformerForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    assert all(k.startswith("lm_head.") for k in info["missing_keys"]), info["missing_keys"]


def test_remote_code_round_trip_without_the_package(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    for name in ("modeling_performer.py", "configuration_performer.py", "attention.py", "feature_maps.py",
                 "cache_performer.py"):
        assert (folder / name).exists(), name
    ids = torch.randint(3, 99, (2, 6))
    reference = tmp_path / "reference.pt"
    torch.save({"ids": ids, "logits": model(ids).logits,
                "generated": model.generate(ids, max_new_tokens=5, do_sample=False)}, reference)
    run_remote(folder, reference, "AutoModelForCausalLM", tmp_path)


def test_checkpoints_of_the_causal_stack_under_its_earlier_name_still_load(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.decoder.layers.") for k in weights)
    earlier = {k.replace("model.decoder.", "model.encoder."): v for k, v in weights.items()}
    save_file(earlier, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = PerformerForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_config_of_another_model_type_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="describes a 'bert' model, not a Performer"):
        PerformerForCausalLM.from_pretrained(folder)


def test_missing_weights_load_and_are_reported_or_refused_on_request(saved):
    model, folder = saved
    (dropped,) = drop_weights(folder, "layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=f"no weights for 1 tensor.*{dropped}"):
        AutoModelForCausalLM.from_pretrained(folder, allow_missing_weights=False)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert set(info["missing_keys"]) == {dropped}
    kept = [k for k in model.state_dict() if k != dropped]
    for key in kept:
        torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize("head", [PerformerForCausalLM, PerformerForConditionalGeneration])
def test_saving_twice_gives_identical_files(tmp_path, head):
    model = head(tiny_config())
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    reloaded = type(model).from_pretrained(tmp_path / "a")
    reloaded.save_pretrained(tmp_path / "c")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir()) and "model.safetensors" in names
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert data == (tmp_path / "b" / name).read_bytes(), name
        assert data == (tmp_path / "c" / name).read_bytes(), name  # save -> load -> save is a fixed point


def test_bf16_load_then_save_keeps_bf16(saved, tmp_path):
    model, folder = saved
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if "redraw_state" not in k}
    assert dtypes == {"BF16"}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert again.dtype == torch.bfloat16
    for name, tensor in half.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # the original fp32 folder is untouched
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.float32
