"""Reliability: bad input fails loudly, random small configs keep their invariants, large norms and
half precision stay finite and close, damaged checkpoints are refused, and results are
reproducible across runs and processes."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_performer import (
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
)
from modeling_performer.attention import causal_linear_attention, linear_attention
from modeling_performer.reference_attention import naive_softmax_attention
from modeling_performer.checkpoint_performer import CorruptCheckpointError
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix

from .conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
IDS = torch.tensor([[5, 6, 7]])

# ------------------------------------------------------------------------------------------
# Bad input: each error names the problem and the fix


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(torch.tensor([[5.0, 6.0]])), ValueError, "integer token ids"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 3, 31)), ValueError, "hidden_size=32"),
    (lambda m: m(IDS, attention_mask=torch.tensor([[1, 0.5, 1]])), ValueError, "1 \\(attend\\) and 0"),
    (lambda m: m(IDS, attention_mask=torch.ones(1, 3, dtype=torch.complex64)), ValueError, "dtype"),
    (lambda m: m(IDS, attention_mask=torch.ones(3)), ValueError, "not understood"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, 1]])), ValueError, "position_ids has shape"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, -1, 2]])), ValueError, "position_ids must be >= 0"),
    (lambda m: m(torch.zeros(0, 3, dtype=torch.long)), ValueError, "Empty input"),
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), ValueError, "Empty input"),
    (lambda m: m(IDS, labels=torch.tensor([[5, 6, 300]])), ValueError, "labels must be in \\[0, 99\\)"),
    (lambda m: m(IDS, cache="not a cache"), TypeError, "PerformerCache"),
])
def test_bad_inputs_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call(PerformerForCausalLM(tiny_config()).eval())


def test_bad_inputs_of_the_other_heads():
    mlm = PerformerForMaskedLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="labels must have shape"):
        mlm(IDS, labels=torch.tensor([[1, 2]]))
    classifier = PerformerForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match="labels of shape \\(1,\\)"):
        classifier(IDS, labels=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="labels must be in \\[0, 3\\)"):
        classifier(IDS, labels=torch.tensor([5]))
    typed = PerformerModel(tiny_config(type_vocab_size=2))
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        typed(IDS, token_type_ids=torch.tensor([[0, 1, 2]]))
    untyped = PerformerModel(tiny_config())
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        untyped(IDS, token_type_ids=torch.tensor([[0, 1, 1]]))
    seq2seq = PerformerForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="decoder_input_ids \\(or labels"):
        seq2seq(IDS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        seq2seq(IDS, attention_mask=torch.ones(1, 4), decoder_input_ids=IDS)


def test_value_checks_run_where_they_cost_no_device_sync_unless_asked(monkeypatch):
    """Checks that read values run on CPU tensors by default, on accelerators only under the debug
    setting, and nowhere when it is switched off (shape checks always run)."""
    from modeling_performer.inputs_performer import VALUE_CHECKS_ENV, checking_values

    monkeypatch.delenv(VALUE_CHECKS_ENV, raising=False)
    assert checking_values(torch.device("cpu")) and not checking_values(torch.device("cuda"))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "1")
    assert checking_values(torch.device("cuda")) and checking_values(torch.device("cpu"))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "0")
    assert not checking_values(torch.device("cpu"))
    model = PerformerForCausalLM(tiny_config()).eval()
    half_mask = torch.tensor([[1, 0.5, 1]])
    model(IDS, attention_mask=half_mask)  # not read: treated as a boolean mask
    with pytest.raises(ValueError, match="not understood"):
        model(IDS, attention_mask=torch.ones(3))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "1")
    with pytest.raises(ValueError, match="1 \\(attend\\) and 0"):
        model(IDS, attention_mask=half_mask)


@pytest.mark.parametrize("head", [PerformerModel, PerformerForMaskedLM, PerformerForSequenceClassification])
def test_generate_on_a_head_that_cannot_generate(head):
    model = head(tiny_config())
    assert not model.can_generate()
    with pytest.raises(TypeError, match="cannot generate text: load the checkpoint with PerformerForCausalLM"):
        model.generate(IDS)


@pytest.mark.parametrize("bad,match", [
    ({"layer_norm_eps": 0.0}, "layer_norm_eps must be > 0"),
    ({"pad_token_id": 99}, "pad_token_id=99 is outside the vocabulary"),
    ({"eos_token_id": -1}, "eos_token_id=-1 is outside"),
    ({"type_vocab_size": -1}, "type_vocab_size"),
    ({"chunk_size": 0}, "chunk_size must be a positive integer"),
    ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob must be in"),
    ({"feature_redraw_interval": -2}, "feature_redraw_interval"),
    ({"position_embedding_type": "alibi"}, "valid values"),
])
def test_invalid_config_values(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_invalid_config_files_on_disk(tmp_path):
    PerformerForCausalLM(tiny_config()).save_pretrained(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    for change, match in (({"norm_type": "layernorm"}, "valid values"), ({"hidden_sise": 32}, "hidden_sise"),
                          ({"num_random_features": 0}, "positive")):
        (tmp_path / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(ValueError, match=match):
            AutoConfig.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match=match):
            PerformerForCausalLM.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------
# Properties over random small configs (hypothesis)

configs = st.fixed_dictionaries({
    "num_attention_heads": st.sampled_from([1, 2, 4]),
    "head_dim": st.sampled_from([2, 4, 8]),
    "num_hidden_layers": st.integers(1, 2),
    "num_random_features": st.integers(2, 12),
    "chunk_size": st.integers(1, 7),
    "attention_type": st.sampled_from(["favor", "softmax"]),
    "feature_map": st.sampled_from(["softmax", "relu"]),
    "norm_type": st.sampled_from(["pre_layernorm", "post_layernorm", "rezero", "pre_scalenorm"]),
    "hidden_act": st.sampled_from(["gelu", "swiglu", "reglu"]),
    "position_embedding_type": st.sampled_from(["rotary", "learned"]),
    "seed": st.integers(0, 2**16),
})
PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model(head, values, **extra):
    values = dict(values)
    seed = values.pop("seed")
    head_dim = values.pop("head_dim")
    config = tiny_config(hidden_size=head_dim * values["num_attention_heads"], intermediate_size=16, **values, **extra)
    torch.manual_seed(seed)
    model = head(config).eval()
    if config.norm_type == "rezero":  # zero gates would hide every layer: give them weight
        for name, parameter in model.named_parameters():
            if name.endswith("alpha"):
                parameter.data.fill_(0.7)
    return model, seed


@PROPERTY_SETTINGS
@given(values=configs, length=st.integers(1, 12), batch=st.integers(1, 3), position=st.integers(0, 11))
def test_property_causality_and_shapes(values, length, batch, position):
    model, seed = _model(PerformerForCausalLM, values)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=generator)
    logits = model(ids).logits
    assert logits.shape == (batch, length, 99) and torch.isfinite(logits).all()
    position = position % length
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 1 - 3) % 96 + 3
    after = model(changed).logits
    torch.testing.assert_close(after[:, :position], logits[:, :position], rtol=1e-5, atol=1e-5)


@PROPERTY_SETTINGS
@given(values=configs, lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3), causal=st.booleans())
def test_property_padding_invariance(values, lengths, causal):
    """Each sequence alone == the same sequence in a padded batch (right padding for encoders,
    left padding for decoders, as generate uses)."""
    head = PerformerForCausalLM if causal else PerformerForMaskedLM
    model, seed = _model(head, values)
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 99, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if causal else slice(0, len(row))
        ids[i, place], mask[i, place] = row, 1
    batched = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        place = slice(width - len(row), width) if causal else slice(0, len(row))
        alone = model(row[None]).logits
        torch.testing.assert_close(batched[i : i + 1, place], alone, rtol=1e-4, atol=1e-4)


@PROPERTY_SETTINGS
@given(values=configs, length=st.integers(2, 12), prefill=st.integers(1, 11))
def test_property_recurrent_equals_chunked(values, length, prefill):
    model, seed = _model(PerformerForCausalLM, values)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (2, length), generator=generator)
    full = model(ids, use_cache=False).logits
    prefill = prefill % (length - 1) + 1
    out = model(ids[:, :prefill], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(prefill, length):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------
# Numerical stress: |q| = |k| = 50, fp32 / bf16 / fp16 autocast

# FAVOR+ error of half-precision inputs, as a fraction of max|V| (D=64, M=128, T=256). The exact
# softmax itself moves by 0.063 (bf16) and 0.0069 (fp16) when its inputs are rounded at this norm,
# so the tolerance is stated relative to that: FAVOR+ may lose at most twice what exact attention
# loses, plus a floor.
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision", HALF)
@pytest.mark.parametrize("norm", [None, 50.0])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_favor_stays_close_to_fp32(precision, norm, causal):
    dtype = HALF[precision]
    generator = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 256, 64, generator=generator).unbind(0)
    if norm:
        q, k = [t / t.norm(dim=-1, keepdim=True) * norm for t in (q, k)]
    w = gaussian_orthogonal_random_matrix(128, 64, generator=torch.Generator().manual_seed(0))

    def favor(q, k, v):
        return causal_linear_attention(q, k, v, w, chunk_size=32)[0] if causal else linear_attention(q, k, v, w)

    reference = favor(q, k, v)
    half = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    with torch.autocast("cpu", dtype=dtype):
        out = favor(*half)
    out.float().square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in half)
    scale = v.abs().max()
    error = ((out.float() - reference).abs().max() / scale).item()
    exact_shift = ((naive_softmax_attention(*[t.detach().float() for t in half], causal=causal)
                    - naive_softmax_attention(q, k, v, causal=causal)).abs().max() / scale).item()
    assert error <= 2 * exact_shift + 0.01, f"{precision}: FAVOR+ error {error:.3g}, exact softmax shift {exact_shift:.3g}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("attention_type", ["favor", "softmax"])
def test_model_with_query_key_norms_of_50_stays_finite(precision, attention_type):
    model = PerformerForCausalLM(tiny_config(attention_type=attention_type, num_random_features=32))
    head_dim = model.config.head_dim
    # Scale the q/k projections so that every head's query and key have norm ~50.
    hooks = []
    for layer in model.model.decoder.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            def rescale(module, args, output, heads=model.config.num_attention_heads):
                shaped = output.unflatten(-1, (heads, head_dim))
                return (shaped / shaped.norm(dim=-1, keepdim=True) * 50).flatten(-2)
            hooks.append(projection.register_forward_hook(rescale))
    ids = torch.randint(3, 99, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=HALF.get(precision, torch.bfloat16), enabled=precision != "fp32"):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    for hook in hooks:
        hook.remove()


def test_long_generation_stays_finite_with_a_bounded_state():
    model = PerformerForCausalLM(tiny_config(chunk_size=64)).eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(prompt, max_new_tokens=5000, min_new_tokens=5000, do_sample=True, top_k=20,
                         use_cache=True, return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (1, 5004)
    logits = torch.stack(out.logits)
    assert torch.isfinite(logits).all()
    cache = out.cache
    small = model(prompt, use_cache=True).cache
    assert cache.get_seq_length() == 5003 and cache.num_bytes() == small.num_bytes()  # constant size
    for layer in cache.layers:
        state = layer.self_attention
        kv, normaliser, stabiliser = state.kv, state.normaliser, state.stabiliser
        # The state is rescaled by the running maximum: every key weighs at most 1, so the
        # normaliser is at most the number of tokens seen and the state at most that times max|v|.
        assert torch.isfinite(kv).all() and torch.isfinite(normaliser).all() and torch.isfinite(stabiliser).all()
        assert normaliser.max() <= 5003 and kv.abs().max() <= 5003 * 10


# ------------------------------------------------------------------------------------------
# Checkpoints


@pytest.fixture
def saved(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path / "saved")
    return model, tmp_path / "saved"


def test_truncated_checkpoint_is_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("where", ["header", "data"])
def test_corrupted_checkpoint_is_refused(saved, where):
    _, folder = saved
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if where == "header":
        raw[10:20] = b"\x00" * 10
    else:
        raw[-40] ^= 0x01  # one flipped bit in the last tensor: still finite, still loadable
    weights.write_bytes(bytes(raw))
    match = "header cannot be read" if where == "header" else "does not match the checksum"
    with pytest.raises(CorruptCheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)


def test_config_of_another_model_type_is_refused(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="describes a 'bert' model, not a Performer"):
        PerformerForCausalLM.from_pretrained(folder)


def _drop_weights(folder, *suffixes):
    weights = load_file(folder / "model.safetensors")
    dropped = [k for k in weights if k.endswith(suffixes)]
    for key in dropped:
        del weights[key]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return dropped


def test_missing_weights_load_and_are_reported_or_refused_on_request(saved):
    model, folder = saved
    (dropped,) = _drop_weights(folder, "layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=f"no weights for 1 tensor.*{dropped}"):
        AutoModelForCausalLM.from_pretrained(folder, allow_missing_weights=False)
    loaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert set(info["missing_keys"]) == {dropped}
    kept = [k for k in model.state_dict() if k != dropped]
    for key in kept:
        torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key], rtol=0, atol=0)


def test_a_missing_projection_is_rebuilt_exactly_from_the_seed_and_draw_count(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    model.redraw_projections()
    model.redraw_projections()  # draw 2: the default initialisation (draw 0) would differ
    model.save_pretrained(tmp_path)
    dropped = _drop_weights(tmp_path, "self_attn.projection")
    assert len(dropped) == model.config.num_hidden_layers
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_projection_and_draw_count_beside_trained_weights_are_refused(saved):
    _, folder = saved
    _drop_weights(folder, "self_attn.projection", "redraw_state.draws")
    with pytest.raises(ValueError, match="neither the random projections .* nor the draw count"):
        AutoModelForCausalLM.from_pretrained(folder)


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


# ------------------------------------------------------------------------------------------
# Determinism

DETERMINISM_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_reliability import seeded_training_losses
from transformers import AutoModelForCausalLM
import modeling_performer
model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
torch.save({{"logits": model(torch.tensor([[5, 6, 7, 8, 9]])).logits, "losses": seeded_training_losses()}}, {out!r})
"""


def seeded_training_losses(steps=8):
    """A short training run with dropout and a projection redraw every 2 steps."""
    torch.manual_seed(1234)
    model = PerformerForCausalLM(tiny_config(hidden_dropout_prob=0.1, feature_redraw_interval=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.redraw_on_steps(optimizer)
    data = torch.randint(3, 99, (steps, 4, 16), generator=torch.Generator().manual_seed(7))
    losses = []
    for batch in data:
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert int(model.model.redraw_state.draws) == steps // 2
    return losses


def test_eval_and_training_are_reproducible_across_runs_and_processes(saved, tmp_path):
    model, folder = saved
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    first, second = model(ids).logits, model(ids).logits
    assert torch.equal(first, second)
    losses = seeded_training_losses()
    assert losses == seeded_training_losses()
    assert len(set(losses)) > 1
    out = tmp_path / "other_process.pt"
    subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT.format(root=str(ROOT), folder=str(folder), out=str(out))],
                   check=True, timeout=300)
    other = torch.load(out)
    assert torch.equal(other["logits"], first)
    assert other["losses"] == losses
