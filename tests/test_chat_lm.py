"""The chat-lm recipe (scripts/convert_recipe.sh chat-lm, scripts/chat_lm.py): its tasks, the
distillation objective and snapshots it adds to attention transfer, and the whole stage on a tiny
Llama fixture (the real run is SmolLM2-135M-Instruct's, docs/figures/smollm2/results.json)."""

import json
import os
import pathlib
import subprocess

import pytest
import torch
from .conftest import CHAT_TEMPLATE, ROOT, tiny_config

from modeling_performer import PerformerForCausalLM
from modeling_performer.recipes import chat_lm
from modeling_performer.transfer import TransferError, load_snapshot, next_token_kl, trainable_tensors, transfer_attention


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from modeling_performer.bundled import tokenizer_path

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def fake_corpora(tokenizer, n=4000):
    text = "The river runs to the sea. Birds sing in the morning light.\nA man walks home. " * (n // 20)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"text": ids, "bible": ids[5:], "speeches": ids[9:]}


def test_facts_sit_at_their_depths_in_documents_of_their_length(tokenizer):
    ids = fake_corpora(tokenizer)
    items = chat_lm.fact_items(tokenizer, ids, "test", [100, 400], 5)
    assert [i["length"] for i in items] == [100] * 5 + [400] * 5
    assert [i["depth"] for i in items[:5]] == [0.1, 0.3, 0.5, 0.7, 0.9]
    for item in items:
        document = item["content"].rsplit("\n\nAnswer from the text above.", 1)[0]
        tokens = len(tokenizer(document, add_special_tokens=False)["input_ids"])
        assert abs(tokens - item["length"]) <= 12, (tokens, item["length"])
        (answer,) = item["answers"]
        where = document.index(f"is {answer}.") / len(document)
        assert abs(where - item["depth"]) < 0.2, (where, item["depth"])
        assert any(name in item["content"].rsplit("\n\n", 1)[1] for name in chat_lm.NAMES["test"])
    keys = chat_lm.passkey_items(tokenizer, ids, "test", [300], 3)
    assert all(k["content"].count(k["answers"][0]) == 2 for k in keys)


def test_what_is_fitted_and_what_is_scored_never_share_a_fact():
    for table in (chat_lm.NAMES, chat_lm.CITIES):
        assert not set(table["train"]) & set(table["test"])
    prompts = {p["content"] for p in chat_lm.chat_prompts()}
    questions = {q["content"] for q in chat_lm.chat_questions()}
    assert len(questions) >= 40 and not prompts & questions


@pytest.mark.parametrize("reply,answers,right", [
    ("The capital of France is Paris.", ["paris"], True), ("Comparison", ["paris"], False),
    ("It is  4817, I think", ["4817"], True), ("48170", ["4817"], False), ("H2O", ["h2o"], True)])
def test_an_answer_counts_as_a_word_of_the_reply(reply, answers, right):
    assert chat_lm.is_correct(reply, answers) is right


def test_rows_are_packed_whole_and_within_the_length(tokenizer):
    texts = [f"text number {i} " * (3 + 7 * (i % 4)) for i in range(30)]
    rows = chat_lm.pack_rows(tokenizer, texts, 120)
    assert "".join(rows) == "".join(texts)
    for row in rows:
        assert len(tokenizer(row, add_special_tokens=False)["input_ids"]) <= 120 or row in texts


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = PerformerForCausalLM(tiny_config(is_decoder=True, attention_type="softmax")).eval()
    student = PerformerForCausalLM(tiny_config(is_decoder=True, feature_map="hedgehog", local_window=4)).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    return teacher, student


def test_next_token_kl_is_zero_for_the_teacher_itself_and_scores_only_real_positions():
    teacher, student = _pair()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 24))
    mask = torch.ones_like(ids)
    assert next_token_kl(teacher, teacher, {"input_ids": ids, "attention_mask": mask}).abs() < 1e-6
    full = next_token_kl(teacher, student, {"input_ids": ids, "attention_mask": mask})
    assert full > 0
    positions = torch.tensor([3, 10, 20])
    picked = next_token_kl(teacher, student, {"input_ids": ids, "attention_mask": mask}, positions)
    with torch.no_grad():
        t = teacher(input_ids=ids).logits.log_softmax(-1)[:, positions]
        s = student(input_ids=ids).logits.log_softmax(-1)[:, positions]
    assert torch.allclose(picked, (t.exp() * (t - s)).sum(-1).mean(), atol=1e-5)
    # right padding: the padded positions weigh nothing
    padded = mask.clone()
    padded[1, 12:] = 0
    expected = (t.exp() * (t - s)).sum(-1)
    weights = padded[:, positions].float()
    assert torch.allclose(next_token_kl(teacher, student, {"input_ids": ids, "attention_mask": padded}, positions),
                          (expected * weights).sum() / weights.sum(), atol=1e-5)


def test_distillation_moves_only_the_maps_and_a_snapshot_is_the_run_stopped_there(tmp_path):
    teacher, student = _pair()
    batches = [torch.randint(0, teacher.config.vocab_size, (2, 32)) for _ in range(6)]

    def get_batch(step):
        return {"input_ids": batches[step], "attention_mask": torch.ones_like(batches[step])}

    before = {k: v.clone() for k, v in student.state_dict().items()}
    history = transfer_attention(teacher, student, get_batch, 2, 1e-2, checkpoint_dir=str(tmp_path), progress=False,
                                 end_to_end_steps=4, end_to_end_loss="next_token_kl", kl_positions=8,
                                 snapshot_steps=(3,))
    assert len(history["end_to_end_loss"]) == 4 and min(history["end_to_end_loss"]) > 0
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    fitted = {id(t) for module in student.modules() if type(module).__name__ == "PerformerAttention"
              for t in trainable_tensors(module).values()}
    allowed = {name for name, tensor in student.named_parameters() if id(tensor) in fitted}
    assert moved and moved <= allowed, moved - allowed
    # a run of 3 steps ends where the snapshot of the 6-step run was taken
    _, short = _pair()
    transfer_attention(teacher, short, get_batch, 2, 1e-2, progress=False, end_to_end_steps=1,
                       end_to_end_loss="next_token_kl", kl_positions=8)
    _, restored = _pair()
    load_snapshot(restored, str(tmp_path / "snapshot-3.pt"))
    for key, value in short.state_dict().items():
        assert torch.allclose(restored.state_dict()[key], value, atol=1e-6), key
    with pytest.raises(TransferError, match="end_to_end_loss"):
        transfer_attention(teacher, student, get_batch, 1, end_to_end_loss="logits")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    """A tiny LlamaForCausalLM (random weights) with the bundled tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chat-lm") / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_stage(tiny_llama, out, **extra):
    # The recipe's defaults keep three measured layers of 30 softmax; the tiny teacher has two, so each
    # test names its row (the maps and window alone unless it says otherwise).
    env = {**os.environ, "CHAT_SOFTMAX_LAYERS": "none", "CHAT_LORA_RANK": "0", **extra,
           "CHAT_SOURCE": str(tiny_llama), "OUT": str(out), "STEPS_SCALE": "0.03",
           "CHAT_SEQ_LEN": "512", "CHAT_WINDOW": "8", "CHAT_SPARSE_CACHE": "8",
           "CHAT_EVALUATE_OPTIONS": "--ppl-lengths 64 256 --ppl-tokens 256 --document-lengths 100 300 "
                                    "--passkey-lengths 200 --passkey-per-length 2 --curve-lengths 100 "
                                    "--curve-tokens 256 --per-length 2 --answer-tokens 3 --chat-tokens 3",
           "CHAT_RESULTS": str(out / "results.json")}
    return subprocess.run(["bash", "scripts/convert_recipe.sh", "chat-lm"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)


def test_the_chat_lm_stage_runs_end_to_end_resumes_and_names_a_folder_that_loads(tiny_llama, tmp_path):
    done = run_stage(tiny_llama, tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").exists()
    assert set(results["perplexity"]) == {"64", "256"} and set(results["agreement"]) == {"64", "256"}
    assert set(results["documents"]) == {"100", "300"}
    assert set(results["documents"]["100"]) >= {"teacher", "student", "student_without_sparse_cache", "asked"}
    assert results["chat"]["questions"] == len(chat_lm.chat_questions())
    assert [p["fraction"] for p in results["curve"]][-1] == 1.0 and results["curve"][0]["step"] == 0
    assert set(results["targets"]) == set(chat_lm.TARGETS)
    assert set(results["minutes"]["fitting"]) == {"convert-teacher", "convert-converted", "chat-data",
                                                  "chat-transfer", "chat-finish"}
    student = pathlib.Path(results["student_dir"])
    student = student if student.is_absolute() else ROOT / student
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.sparse_cache_size == 8 and model.config.local_window == 8
    # The student is the converted copy with only its maps and window weights moved.
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "chat" / "teacher")
    t, s = teacher.state_dict(), model.state_dict()
    assert all(torch.equal(t[k], s[k]) for k in t if k in s)
    # The same command again: every step is done, and the report is rebuilt with the same numbers.
    (tmp_path / "results.json").unlink()
    again = run_stage(tiny_llama, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(": done (") >= 6
    rebuilt = json.loads((tmp_path / "results.json").read_text())
    for key in ("perplexity", "agreement", "documents", "passkey", "chat", "curve", "cache_bytes"):
        assert rebuilt[key] == results[key], key
    # Killed in the middle: the rows rebuilt from the teacher's kept replies are the same rows, and an
    # evaluation that lost a part computes that part alone and gets the same numbers.
    chat = tmp_path / "chat"
    rows = (chat / "rows.jsonl").read_text()
    (chat / "rows.jsonl").unlink()
    partial = json.loads((chat / "results.json.partial.json").read_text())
    del partial["chat-student"]
    (chat / "results.json.partial.json").write_text(json.dumps(partial))
    (chat / "results.json.partial.done").unlink()
    resumed = run_stage(tiny_llama, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (chat / "rows.jsonl").read_text() == rows
    assert "== chat-student\n" in resumed.stdout and "== chat-teacher: kept from" in resumed.stdout
    assert json.loads((tmp_path / "results.json").read_text())["chat"] == results["chat"]


def test_a_hybrid_with_measured_layers_and_lora_comes_out_of_the_same_command(tiny_llama, tmp_path):
    done = run_stage(tiny_llama, tmp_path, CHAT_SOFTMAX_LAYERS="top:1", CHAT_LORA_RANK="2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranking = json.loads((tmp_path / "chat" / "layers.json").read_text())
    assert sorted(ranking["ranking"]) == [0, 1]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"convert-linear", "chat-rank-layers"} <= set(results["minutes"]["fitting"])
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "chat" / "student")
    kept = ranking["ranking"][0]
    assert student.config.attention_type == ["softmax" if i == kept else "favor" for i in range(2)]
    assert student.config.sparse_cache_size == 8
    metrics = json.loads((tmp_path / "chat" / "fitted" / "transfer_metrics.json").read_text())
    assert metrics["lora_rank"] == 2
    # The kept layer is the teacher's weight for weight; the linear layer's projections moved (merged updates).
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "chat" / "teacher").state_dict()
    weights = student.state_dict()
    for name, value in weights.items():
        if f"layers.{kept}." in name and name in teacher:
            assert torch.equal(value, teacher[name]), name
    linear = 1 - kept
    assert not torch.equal(weights[f"model.decoder.layers.{linear}.self_attn.q_proj.weight"],
                           teacher[f"model.decoder.layers.{linear}.self_attn.q_proj.weight"])


def test_the_token_budget_extends_the_curves_last_fall_as_a_power_law():
    teacher = {"ppl_2048": 10.0, "documents": {"300": 0.8, "1000": 0.0}}
    # excess 0.4 at 1,000 tokens and 0.2 at 4,000: halving per x4, so 0.05 needs 4,000 x 4 x 4 tokens;
    # the document shortfall 1 - 0.4 / 0.8 = 0.5, then 0.8: it rose, so no budget
    curve = [{"tokens": 0, "ppl_2048": 30.0, "documents": {"300": 0.0, "1000": 0.0}},
             {"tokens": 1000, "ppl_2048": 14.0, "documents": {"300": 0.4, "1000": 0.0}},
             {"tokens": 4000, "ppl_2048": 12.0, "documents": {"300": 0.16, "1000": 0.0}}]
    needed = chat_lm.tokens_needed(curve, teacher, tokens_per_minute=1000.0)
    assert needed["perplexity_2048"] == 64000 and needed["perplexity_2048_minutes"] == 64.0
    assert needed["documents_300"] is None and "did not fall" in needed["notes"]["documents_300"]
    assert "documents_1000" not in needed  # the teacher answers none there: no fraction to reach
    # the shortfall 0.5 at 1,000 tokens and 0.25 at 4,000 (halving per x4): 0.1 needs about 4,000 x 4^1.32
    curve[2]["documents"]["300"] = 0.6
    assert chat_lm.tokens_needed(curve, teacher)["documents_300"] == round(4000 * (0.1 / 0.25) ** (1 / -0.5))
    assert chat_lm.tokens_needed(curve[:2] + [{"tokens": 4000, "ppl_2048": 10.4}], teacher)["perplexity_2048"] is None
    rising = curve[:2] + [{"tokens": 4000, "ppl_2048": 15.0}]
    assert chat_lm.tokens_needed(rising, teacher)["perplexity_2048"] is None
