"""The four presets of the original design load and have the documented sizes (+-10%)."""

import json
import pathlib
import subprocess
import sys

import pytest

from modeling_performer import PerformerConfig
from modeling_performer.recipes.commands import count_parameters


ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPECTED_MILLIONS = {
    "performer-small-encoder": 1.6,
    "performer-medium-encoder": 25.0,
    "performer-medium-decoder": 31.0,
    "performer-seq2seq": 57.0,
}


@pytest.mark.parametrize("name", EXPECTED_MILLIONS)
def test_preset_parameter_counts(name):
    count = count_parameters.count
    millions = count(ROOT / "configuration" / "presets" / f"{name}.json") / 1e6
    assert abs(millions - EXPECTED_MILLIONS[name]) <= 0.1 * EXPECTED_MILLIONS[name], millions
    # Every field the preset sets is one the config knows (a misspelled key would be kept as a stray
    # attribute and change nothing), and loads as written.
    path = ROOT / "configuration" / "presets" / f"{name}.json"
    written = json.loads(path.read_text())
    known = PerformerConfig().to_dict()
    assert not set(written) - set(known), set(written) - set(known)
    loaded = PerformerConfig.from_json_file(str(path))
    assert {k: getattr(loaded, k) for k in written if k != "model_type"} == \
        {k: v for k, v in written.items() if k != "model_type"}


def test_count_script_prints_every_preset():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "count_parameters.py")], capture_output=True,
                          text=True, check=True)
    for name in EXPECTED_MILLIONS:
        assert name in done.stdout


def test_llama_teacher_preset_counts_as_a_transformers_llama():
    count = count_parameters.count
    from transformers import AutoConfig, LlamaModel

    path = ROOT / "configuration" / "presets" / "llama-small-decoder.json"
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.num_key_value_heads < config.num_attention_heads
    assert count(path) == sum(p.numel() for p in LlamaModel(config).parameters())
