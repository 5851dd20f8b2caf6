"""--device and precision for every script that computes: the GPU when there is one, bf16 there
by default, clear errors for devices this machine lacks."""

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
from modeling_performer.recipes import devices
from modeling_performer.recipes.commands import generate


def test_auto_is_the_cpu_here_and_fp32_on_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    device = devices.resolve_device("auto")
    assert device.type in ("cpu", "mps")
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert devices.resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_a_gpu_that_supports_bf16_gets_it_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    assert devices.resolve_precision("auto", torch.device("cuda")) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert devices.resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert devices.resolve_precision("fp16", torch.device("cuda")) == "fp16"


def test_missing_devices_and_impossible_precisions_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        devices.resolve_device("cuda")
    with pytest.raises(SystemExit, match="not a device name"):
        devices.resolve_device("gpu-please")
    with pytest.raises(SystemExit, match="--fp16 needs a GPU"):
        devices.resolve_precision("fp16", torch.device("cpu"))


def test_autocast_contexts():
    with devices.autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with devices.autocast(torch.device("cpu"), "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_generate_script_on_a_chosen_device(tmp_path, capsys):
    from transformers import AutoTokenizer
    from modeling_performer import PerformerConfig, PerformerForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    torch.manual_seed(0)
    config = PerformerConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, is_decoder=True, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    PerformerForCausalLM(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    generate.main([str(tmp_path / "lm"), "--prompt", "ROMEO.", "--max-new-tokens", "4", "--device", "cpu", "--bf16"])
    printed = capsys.readouterr().out
    assert "computing on cpu in bf16 autocast" in printed and "--- 'ROMEO.'" in printed
