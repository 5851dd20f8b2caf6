"""The linearizing recipe's evaluation scripts: evaluate_lm.py (perplexity, by position, cache
size) and recipe_report.py (the tables from every stage's results)."""

import json
import math
import pathlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.recipes.commands import evaluate_lm, recipe_report


ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
TINY = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, chunk_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LINEAR = dict(attention_type="favor", feature_map="hedgehog", local_window=4)


def test_evaluate_lm_perplexity_and_cache(tmp_path):
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    config = dict(TINY, vocab_size=len(tokenizer), is_decoder=True, max_position_embeddings=4096)
    for name, options in (("softmax", {"attention_type": "softmax"}), ("linear", LINEAR)):
        PerformerForCausalLM(PerformerConfig(**config, **options)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    from transformers import LlamaConfig, LlamaForCausalLM  # a transformers teacher: its own KV cache is measured

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "llama")
    data = tmp_path / "validation.jsonl"
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 12
    data.write_text(json.dumps({"text": text}) + "\n")
    folders = [str(tmp_path / "softmax"), str(tmp_path / "linear"), str(tmp_path / "llama")]
    results = evaluate_lm.main([*folders, "--seq-len", "16", "32", "--cache-tokens", "64", "256", "--data", str(data),
                                "--position-edges", "8", "--output", str(tmp_path / "eval.json")])

    # perplexity = exp(mean next-token cross-entropy) over the whole blocks, computed here directly
    model = AutoModelForCausalLM.from_pretrained(folders[0]).eval()
    ids = evaluate_lm.validation_ids(tokenizer, data)
    blocks = torch.tensor(ids[: len(ids) // 16 * 16]).view(-1, 16)
    with torch.no_grad():
        loss = model(input_ids=blocks, labels=blocks).loss
    assert results[folders[0]]["blocks_16"] == len(blocks)
    assert results[folders[0]]["perplexity_16"] == pytest.approx(loss.exp().item(), rel=1e-4)
    assert results[folders[0]]["perplexity_32"] != results[folders[0]]["perplexity_16"]
    # by position: predictions at 0..7 and at 8..30 of each 32-token block, which make up the whole
    row = results[folders[0]]
    spans = row["perplexity_32_positions_0-8"], row["perplexity_32_positions_8-31"]
    assert spans[0] != spans[1]
    assert math.exp((8 * math.log(spans[0]) + 23 * math.log(spans[1])) / 31) == pytest.approx(row["perplexity_32"])
    llama = results[folders[2]]
    # keys and values of every prompt token: 2 layers x (k, v) x 2 key/value heads x 8 dims x 4 bytes
    assert [llama[f"cache_mib_{n}"] for n in (64, 256)] == [round(n * 2 * 2 * 2 * 8 * 4 / 2**20, 3) for n in (64, 256)]
    # the softmax cache grows with the prompt, the linear state does not
    softmax, linear = results[folders[0]], results[folders[1]]
    assert softmax["cache_mib_256"] > 3 * softmax["cache_mib_64"]
    assert linear["cache_mib_256"] == linear["cache_mib_64"] < softmax["cache_mib_256"]
    again = evaluate_lm.main([*folders, "--data", str(data), "--output", str(tmp_path / "eval.json")])
    assert again == results  # already evaluated folders are kept, not recomputed
    # bf16 autocast (what a GPU picks by itself), on the CPU here: close to fp32, not the same numbers
    bf16 = evaluate_lm.main([folders[0], "--seq-len", "16", "--data", str(data), "--device", "cpu", "--bf16"])
    assert bf16[folders[0]]["perplexity_16"] == pytest.approx(results[folders[0]]["perplexity_16"], rel=0.03)
    assert bf16[folders[0]]["perplexity_16"] != results[folders[0]]["perplexity_16"]


def test_recipe_report_reads_every_stage(tmp_path):
    folder = tmp_path / "recipe"
    folder.mkdir()
    for tokens, value in ((256, 0.9612), (512, 0.9873)):
        (folder / f"embeddings-{tokens}.json").write_text(json.dumps({
            str(folder / "minilm-hedgehog-w64-transferred"): {"mean_cosine": value, "p5_cosine": value - 0.01}}))
    (folder / "clm-eval.json").write_text(json.dumps({
        str(folder / "clm-teacher"): {"perplexity_512": 123.45, "perplexity_2048": 150.0, "perplexity_8192": 170.25,
                                      "cache_mib_2048": 8.0, "cache_mib_8192": 32.0},
        str(folder / "clm-hedgehog-w64-lora"): {"perplexity_512": 124.0, "cache_mib_2048": 0.5, "cache_mib_8192": 0.5}}))
    (folder / "rt-softmax-full").mkdir()
    (folder / "rt-softmax-full" / "metrics.json").write_text(json.dumps({"test_accuracy": 0.8244}))
    (folder / "minutes.tsv").write_text("clm-teacher\t5.5\ntransfer-minilm-hedgehog-w64-transferred\t4.0 (resumed)\n"
                                        "transfer-minilm-hedgehog-w64-transferred\t1.0\n")
    table = recipe_report.main([str(folder), "--window", "64"]) or (folder / "results.md").read_text()
    assert "0.9873 / 0.9773" in table and "0.9612 / 0.9512" in table
    assert "123.5" in table and "170.2" in table and "8.00 / 32.00" in table and "0.8244" in table
    assert "| 0.50 / 0.50 | 1/64 |" in table  # the linear cache against the teacher's at 8,192 tokens
    assert "| 5.5 |" in table and "| 5.0 |" in table  # minutes per row, a resumed step's parts added
    assert "10.5 minutes" in table
    numbers = json.loads((folder / "results.json").read_text())  # what the tables are made of
    assert numbers["causal_lm"]["clm-teacher"]["perplexity_8192"] == 170.25
    assert numbers["minutes"]["clm-teacher"] == 5.5 and numbers["rotten_tomatoes"]["softmax-full"]["test_accuracy"]
