"""LoRA fine-tuning through peft: only the adapters, the feature maps and a new classification head
move; the merged model is a plain Performer that reloads with AutoModel* to the same outputs; a
softmax Performer converts to a linear one keeping every weight; the recipe's evaluation scripts."""

import json
import math
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


def test_evaluate_lm_perplexity_and_cache(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    try:
        import evaluate_lm
    finally:
        sys.path.pop(0)
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
    sys.path.insert(0, str(SCRIPTS))
    try:
        import recipe_report
    finally:
        sys.path.pop(0)
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
