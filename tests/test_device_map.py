"""device_map="auto" with a memory limit: weights split between memory and an offload folder
must give the same logits and the same generated tokens as the model loaded whole."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForMaskedLM

from modeling_performer import PerformerForCausalLM, PerformerForConditionalGeneration, PerformerForMaskedLM

from .conftest import tiny_config


def _budget(model, fraction):
    """A cpu memory budget of `fraction` of the model's weights (so the rest goes to disk)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"cpu": int(total * fraction)}


def _load_offloaded(auto_class, folder, tmp_path, budget):
    model = auto_class.from_pretrained(
        folder, device_map="auto", max_memory=budget, offload_folder=str(tmp_path / "offload")
    )
    placement = set(model.hf_device_map.values())
    assert "disk" in placement, f"nothing was offloaded: {model.hf_device_map}"
    return model


@pytest.mark.parametrize("attention_type", ["favor", "softmax", ["favor", "softmax", "favor", "softmax"]])
@pytest.mark.parametrize("norm_type", ["pre_layernorm", "rezero"])
def test_causal_lm_offloaded_generates_the_same_text(tmp_path, attention_type, norm_type):
    config = tiny_config(num_hidden_layers=4, attention_type=attention_type, norm_type=norm_type)
    model = PerformerForCausalLM(config).eval()
    if norm_type == "rezero":  # zero-initialised gates would make every layer an identity
        for name, p in model.named_parameters():
            if name.endswith("alpha"):
                p.data.fill_(0.5)
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 11, 12, 13]])
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    expected_logits = model(ids, attention_mask=mask).logits

    offloaded = _load_offloaded(AutoModelForCausalLM, tmp_path / "saved", tmp_path, _budget(model, 0.8))
    layers_in_memory = [k for k, v in offloaded.hf_device_map.items() if "layers" in k and v == "cpu"]
    layers_on_disk = [k for k, v in offloaded.hf_device_map.items() if "layers" in k and v == "disk"]
    assert layers_in_memory and layers_on_disk, offloaded.hf_device_map  # the stack itself is split
    torch.testing.assert_close(offloaded(ids, attention_mask=mask).logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(offloaded.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False), expected)
    beams = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(offloaded.generate(ids, attention_mask=mask, **beams), model.generate(ids, attention_mask=mask, **beams))


def test_seq2seq_offloaded_generates_the_same_text(tmp_path):
    config = tiny_config(is_encoder_decoder=True, num_hidden_layers=3, decoder_start_token_id=1)
    model = PerformerForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 2, 0, 0]])
    mask = (ids != 0).long()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    offloaded = _load_offloaded(AutoModelForSeq2SeqLM, tmp_path / "saved", tmp_path, _budget(model, 0.4))
    assert torch.equal(offloaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False), expected)


def test_masked_lm_offloaded_gives_the_same_logits(tmp_path):
    model = PerformerForMaskedLM(tiny_config(num_hidden_layers=4)).eval()
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[5, 4, 7, 8, 9]])
    offloaded = _load_offloaded(AutoModelForMaskedLM, tmp_path / "saved", tmp_path, _budget(model, 0.5))
    torch.testing.assert_close(offloaded(ids).logits, model(ids).logits, rtol=0, atol=0)
