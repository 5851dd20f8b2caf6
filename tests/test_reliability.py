"""Reliability: bad input fails loudly, random small configs keep their invariants, large norms and
half precision stay finite and close, damaged checkpoints are refused, and results are
reproducible across runs and processes."""

import pathlib
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling_performer import (
    PerformerForCausalLM,
    PerformerForMaskedLM,
)
from modeling_performer.attention import causal_linear_attention, linear_attention
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix
from modeling_performer.reference_attention import naive_softmax_attention

from .conftest import tiny_config
from .helpers import seeded_training_losses

ROOT = pathlib.Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------
# Bad input: each error names the problem and the fix


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


# ------------------------------------------------------------------------------------------
# Determinism

DETERMINISM_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.helpers import seeded_training_losses
from transformers import AutoModelForCausalLM
import modeling_performer
model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()
torch.save({{"logits": model(torch.tensor([[5, 6, 7, 8, 9]])).logits, "losses": seeded_training_losses()}}, {out!r})
"""


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
