"""Paired decoding speed (modeling_performer.recipes.decode_timing, scripts/decode_speed.py): every
model decodes the same context in one process, each step's greedy token is its own, and the
script writes each student's times into its frontier row file without losing what the file held."""

import json

import pytest
import torch

from modeling_performer import PerformerForCausalLM
from modeling_performer.recipes import decode_timing
from modeling_performer.recipes.commands import decode_speed

from .conftest import tiny_config


@pytest.fixture
def folders(tmp_path):
    torch.manual_seed(0)
    teacher = PerformerForCausalLM(tiny_config(is_decoder=True, attention_type="softmax"))
    teacher.save_pretrained(tmp_path / "teacher")
    student = PerformerForCausalLM(tiny_config(is_decoder=True, feature_map="hedgehog", local_window=4,
                                               attention_type=["softmax", "favor"]))
    student.save_pretrained(tmp_path / "student")
    return tmp_path / "teacher", tmp_path / "student"


def test_paired_decoding_follows_each_models_own_greedy_tokens(folders):
    models = {str(f): decode_timing.load(str(f)) for f in folders}
    seen = {name: [] for name in models}
    for name, model in models.items():
        forward = model.forward

        def recording(*args, _forward=forward, _name=name, **kwargs):
            out = _forward(*args, **kwargs)
            if kwargs["input_ids"].shape[1] == 1:
                seen[_name].append(int(kwargs["input_ids"][0, 0]))
            return out
        model.forward = recording
    ms = decode_timing.paired_decode(models, context=12, steps=3, warmup=1)
    assert set(ms) == set(models) and all(value > 0 for value in ms.values())
    for name, model in models.items():  # the tokens each decoded are its own greedy continuation
        model.forward = type(model).forward.__get__(model)
        ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        expected = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)[0, 12:]
        assert seen[name] == expected.tolist()


def test_the_script_adds_decode_times_to_each_row_file_and_keeps_the_rest(folders, tmp_path):
    teacher, student = folders
    row = tmp_path / "frontier_row.json"
    row.write_text(json.dumps({"budget": 0.5, "evaluation": "screening"}))
    decode_speed.main([str(teacher), str(student), "--context", "10", "--steps", "2", "--warmup", "1",
                                      "--into", str(row)])
    written = json.loads(row.read_text())
    assert written["budget"] == 0.5 and written["decode"]["context"] == 10
    assert written["decode"]["teacher_ms"] > 0 and written["decode"]["student_ms"] > 0
    with pytest.raises(SystemExit, match="config.json"):
        decode_speed.main([str(teacher), str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="--into"):
        decode_speed.main([str(teacher), str(student), "--into"])
