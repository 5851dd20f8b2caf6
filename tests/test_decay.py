"""Decay-gated linear attention (`linear_decay`): the chunked, loop-free and recurrent kernels against
the float64 reference, with and without a window, grouped heads and padding; split and resume;
gradients; the fast path's mapping onto fla's simple GLA; the model's cache, generation, beam
search, saving and remote code; the config's refusals; conversion starting at the teacher and
attention transfer fitting the gate."""

import pathlib

import pytest
import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.attention import (
    CausalLinearKernel,
    causal_linear_attention,
    causal_windowed_attention,
    recurrent_linear_attention,
    recurrent_windowed_attention,
)
from modeling_performer.layers_performer import PerformerDecayGate
from modeling_performer.reference_attention import naive_linear_attention, naive_windowed_attention

from .conftest import kernel_features, max_error, perturbed
from .helpers import MAPS, decay_config, run_remote

B, H, H_KV, D, M, F = 2, 4, 2, 8, 16, 6


def features(feature_map, seed=0):
    return kernel_features(feature_map, H, H_KV, D, M, F, seed)


def inputs(length, seed=0):
    """q [B, H, T, D], k, v [B, H_kv, T, D], log gates [B, H_kv, T] spread over (-1, 0), and a mask
    with row 0 right-padded and row 1 left-padded."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, length, D, generator=g)
    k, v = (torch.randn(B, H_KV, length, D, generator=g) for _ in range(2))
    log_decay = -torch.rand(B, H_KV, length, generator=g)
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[0, length - 3:] = False
    mask[1, :5] = False
    return q, k, v, log_decay, mask


def chunked(q, k, v, w, feature_map, window, mask, log_decay, state=None, chunk_size=5, kernel=None):
    if window:
        return causal_windowed_attention(q, k, v, w, feature_map, window, None, mask, state, chunk_size, kernel,
                                         log_decay=log_decay)
    return causal_linear_attention(q, k, v, w, feature_map, mask, state, chunk_size, kernel, log_decay=log_decay)


def steps(q, k, v, w, feature_map, window, mask, log_decay, state=None):
    outs = []
    for t in range(q.shape[2]):
        step = slice(t, t + 1)
        if window:
            out, state = recurrent_windowed_attention(q[:, :, step], k[:, :, step], v[:, :, step], w, feature_map,
                                                      window, None, mask[:, step], state, log_decay=log_decay[..., step])
        else:
            out, state = recurrent_linear_attention(q[:, :, step], k[:, :, step], v[:, :, step], w, feature_map,
                                                    mask[:, step], state, log_decay=log_decay[..., step])
        outs.append(out)
    return torch.cat(outs, dim=2), state


def reference(q, k, v, w, feature_map, window, mask, log_decay):
    if window:
        return naive_windowed_attention(q, k, v, w, feature_map, window, None, mask, causal=True, log_decay=log_decay)
    return naive_linear_attention(q, k, v, w, feature_map, mask, causal=True, log_decay=log_decay)


@pytest.mark.parametrize("window", [0, 4], ids=["plain", "window4"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_chunked_and_recurrent_equal_the_float64_reference(feature_map, window):
    q, k, v, log_decay, mask = inputs(23)
    w = features(feature_map)
    expected = reference(q, k, v, w, feature_map, window, mask, log_decay)
    out, state = chunked(q, k, v, w, feature_map, window, mask, log_decay)
    stepped, stepped_state = steps(q, k, v, w, feature_map, window, mask, log_decay)
    assert max_error(out, expected, mask) < 1e-5
    assert max_error(stepped, expected, mask) < 1e-5
    for a, b in zip(state, stepped_state):
        assert max_error(a.float(), b.float()) < 1e-5
    # The decay is real: the additive kernel gives another answer.
    additive, _ = chunked(q, k, v, w, feature_map, window, mask, None)
    assert max_error(additive, expected, mask) > 1e-2


@pytest.mark.parametrize("window", [0, 3], ids=["plain", "window3"])
@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_loop_free_carry_of_compiled_graphs_equals_the_loop(monkeypatch, feature_map, window):
    """Compiled and exported graphs carry the state across chunks in one product (and pad the tail
    to whole chunks): the same results, forced here in eager mode."""
    q, k, v, log_decay, mask = inputs(22, seed=1)
    w = features(feature_map)
    _, incoming = chunked(q[:, :, :6], k[:, :, :6], v[:, :, :6], w, feature_map, window, mask[:, :6],
                          log_decay[..., :6])
    rest = [x[:, :, 6:] for x in (q, k, v)] + [w, feature_map, window, mask[:, 6:], log_decay[..., 6:], incoming]
    expected, expected_state = chunked(*rest, chunk_size=4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out, state = chunked(*rest, chunk_size=4)
    assert max_error(out, expected, mask[:, 6:]) < 1e-5
    assert max_error(state.kvz, expected_state.kvz) < 1e-5


@pytest.mark.parametrize("window", [0, 4], ids=["plain", "window4"])
@pytest.mark.parametrize("splits", [(1,), (7, 8), (12, 19)], ids=lambda s: "split" + "-".join(map(str, s)))
def test_split_and_resume_alternating_chunked_and_recurrent(splits, window):
    q, k, v, log_decay, mask = inputs(27, seed=2)
    w = features("hedgehog")
    whole, whole_state = chunked(q, k, v, w, "hedgehog", window, mask, log_decay)
    pieces, state = [], None
    bounds = [0, *splits, q.shape[2]]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [x[..., start:end, :] for x in (q, k, v)] + [w, "hedgehog", window, mask[:, start:end],
                                                            log_decay[..., start:end], state]
        out, state = (steps if i % 2 else chunked)(*part)
        pieces.append(out)
    assert max_error(torch.cat(pieces, dim=2), whole, mask) < 1e-5
    assert max_error(state.kvz, whole_state.kvz) < 1e-5


@pytest.mark.parametrize("window", [0, 3], ids=["plain", "window3"])
@pytest.mark.filterwarnings("ignore:Input #0 requires gradient")
def test_gradients_equal_the_float64_reference_and_pass_gradcheck(window):
    q, k, v, log_decay, mask = inputs(17, seed=3)
    w = features("hedgehog")
    probe = torch.randn(B, H, 17, D, generator=torch.Generator().manual_seed(5)) * mask[:, None, :, None]
    grads = {}
    for name, fn in (("chunked", chunked), ("steps", steps), ("reference", reference)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, log_decay)]
        out = fn(*leaves[:3], w, "hedgehog", window, mask, leaves[3])
        ((out[0] if isinstance(out, tuple) else out) * probe).sum().backward()
        grads[name] = [x.grad for x in leaves]
    for name in ("chunked", "steps"):
        for got, expected in zip(grads[name], grads["reference"]):
            assert max_error(got, expected) < 1e-4
    assert grads["chunked"][3].abs().max() > 0  # the gates receive a gradient

    # gradcheck (finite differences) on the gates themselves, through the fp32 kernel, on a small case
    small = [x[:1, :, :6] for x in (q, k, v)]
    gates = log_decay[:1, :, :6].clone().requires_grad_()

    def through_gates(gates):
        return chunked(*small, w, "hedgehog", window, None, gates, chunk_size=4)[0]

    assert torch.autograd.gradcheck(through_gates, (gates,), eps=1e-2, atol=2e-3, rtol=2e-2, fast_mode=True)


@pytest.mark.parametrize("path", [chunked, steps], ids=["chunked", "recurrent"])
def test_padded_steps_decay_nothing(path):
    """Padding inside a row is not a step: the row equals the same row with the padding taken out,
    whatever gates the padded positions carry. (Left padding comes before any key, where a decay
    has nothing to act on.)"""
    q, k, v, log_decay, _ = inputs(20, seed=4)
    w = features("hedgehog")
    mask = torch.ones(B, 20, dtype=torch.bool)
    mask[1, 8:12] = False
    noisy = log_decay.clone()
    noisy[1, :, 8:12] = -30.0
    out, _ = path(q, k, v, w, "hedgehog", 0, mask, noisy)
    real = mask[1]
    alone, _ = path(*(x[1:, :, real] for x in (q, k, v)), w, "hedgehog", 0, mask[1:, real], log_decay[1:][..., real])
    assert max_error(out[1:, :, real], alone) < 1e-6


def test_the_sparse_cache_takes_no_decay():
    q, k, v, log_decay, mask = inputs(9)
    with pytest.raises(ValueError, match="sparse cache"):
        CausalLinearKernel("hedgehog", window=4, cache_size=2, chunk_size=8)(
            q=q, k=k, v=v, feature_weights=features("hedgehog"), key_padding_mask=mask, log_decay=log_decay)


# --------------------------------------------------------------------------------------------
# The fast path (fla's simple GLA), on fla's own references where there is no GPU

def fla_chunked(q, k, v, g, scale, initial_state, output_final_state):
    """fla's chunked reference in the fast kernel's signature."""
    naive_gla = pytest.importorskip("fla.ops.simple_gla.naive", reason="fla-core is installed by the dev extra")
    if g is None:
        g = q.new_zeros(q.shape[:3])
    return naive_gla.naive_chunk_simple_gla(q, k, v, g, initial_state=initial_state, output_final_state=True,
                                            chunk_size=8, scale=scale)


@pytest.mark.parametrize("window", [0, 3], ids=["plain", "window3"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_decay_on_the_gla_recurrence_equals_pytorch(feature_map, window):
    q, k, v, log_decay, mask = inputs(29, seed=6)
    w = features(feature_map)
    pytorch, pytorch_state = chunked(q, k, v, w, feature_map, window, mask, log_decay)
    fast, fast_state = chunked(q, k, v, w, feature_map, window, mask, log_decay, kernel=fla_chunked)
    assert max_error(fast, pytorch, mask) < 1e-5
    assert max_error(fast_state.kvz, pytorch_state.kvz) < 1e-5
    assert torch.equal(fast_state.stabiliser, pytorch_state.stabiliser)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's Triton kernels need a CUDA device")
def test_decay_on_the_cuda_kernel_equals_pytorch():
    from modeling_performer.fast_attention import load_fla_kernel

    kernel = load_fla_kernel()
    if kernel is None:
        pytest.skip("fla-core is not installed")
    q, k, v, log_decay, mask = (x.cuda() for x in inputs(130, seed=7))
    w = tuple(x.cuda() for x in features("hedgehog"))
    pytorch, _ = chunked(q, k, v, w, "hedgehog", 16, mask, log_decay, chunk_size=64)
    fast, _ = chunked(q, k, v, w, "hedgehog", 16, mask, log_decay, chunk_size=64, kernel=kernel)
    assert max_error(fast, pytorch, mask) < 1e-4


# --------------------------------------------------------------------------------------------
# Models


MODEL_CASES = {
    "head-hedgehog": dict(decay="head"),
    "data-hedgehog-window": dict(decay="data", local_window=3),
    "data-favor": dict(decay="data", feature_map="softmax"),
    "head-hybrid": dict(decay="head", local_window=3, attention_type=["favor", "softmax"]),
}


@pytest.mark.parametrize("case", MODEL_CASES)
def test_cached_decoding_equals_the_full_forward_and_generation(case):
    values = dict(MODEL_CASES[case])
    model = perturbed(PerformerForCausalLM(decay_config(values.pop("decay"), **values)))
    ids = torch.randint(3, 99, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(6, 14):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
        alone = model(ids[1:, 4:]).logits
    real = mask.bool()
    assert max_error(torch.cat(logits, 1)[real], full[real]) < 1e-5
    assert max_error(alone[0], full[1, 4:]) < 1e-5
    for beams in (1, 3):
        cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=beams, do_sample=False)
        uncached = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=beams, do_sample=False,
                                  use_cache=False)
        assert torch.equal(cached, uncached)


def test_an_open_gate_is_the_additive_model():
    """Gates forced to 1 (rates of 0) give the ungated model's logits: the decay is the only change."""
    additive = perturbed(PerformerForCausalLM(decay_config(None, local_window=3)))
    gated = PerformerForCausalLM(decay_config("data", local_window=3)).eval()
    missing = gated.load_state_dict(additive.state_dict(), strict=False).missing_keys
    assert missing and all(".decay." in key for key in missing)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for module in gated.modules():
            if isinstance(module, PerformerDecayGate):
                module.bias.fill_(-200.0)  # softplus(-200) = 0 in fp32: exp(-0) = 1
        assert max_error(gated(ids).logits, additive(ids).logits) < 1e-6
        for module in gated.modules():
            if isinstance(module, PerformerDecayGate):
                module.bias.fill_(0.0)  # a gate of exp(-log 2) = 1/2 per step
        assert max_error(gated(ids).logits, additive(ids).logits) > 1e-3


def test_save_load_and_remote_code(tmp_path):
    model = perturbed(PerformerForCausalLM(decay_config("data", local_window=3)))
    model.save_pretrained(tmp_path / "model")
    loaded = PerformerForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, 99, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(loaded(ids).logits, logits)
    torch.save({"ids": ids, "logits": logits, "generated": model.generate(ids, max_new_tokens=5, do_sample=False)},
               tmp_path / "reference.pt")
    run_remote(tmp_path / "model", tmp_path / "reference.pt", "AutoModelForCausalLM", tmp_path)


# --------------------------------------------------------------------------------------------
# Conversion and attention transfer


TOKENIZER = pathlib.Path(__file__).resolve().parent.parent / "configuration" / "tokenizer"


def tiny_llama(folder):
    import transformers

    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    source = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    source.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    tokenizer.save_pretrained(folder)


@pytest.mark.parametrize("decay", ["head", "data"])
def test_conversion_starts_at_the_ungated_model(decay, tmp_path):
    from modeling_performer.conversion import CONVERSION_DECAY_RATE, convert_to_performer

    tiny_llama(tmp_path / "source")
    ungated, _ = convert_to_performer(tmp_path / "source", feature_map="hedgehog", local_window=4)
    gated, _ = convert_to_performer(tmp_path / "source", feature_map="hedgehog", local_window=4, linear_decay=decay)
    gates = [m for m in gated.modules() if isinstance(m, PerformerDecayGate)]
    assert len(gates) == 2
    for gate in gates:
        assert torch.allclose(torch.nn.functional.softplus(gate.bias.double()),
                              torch.full((2,), CONVERSION_DECAY_RATE, dtype=torch.float64), rtol=1e-4)
        assert gate.weight is None or not gate.weight.any()
    ids = torch.randint(3, 99, (2, 120), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, actual = ungated(ids).logits, gated(ids).logits
    # over 120 steps the oldest key keeps exp(-120 * 2^-20) of its weight: the same model to ~1e-4
    assert max_error(actual, expected) < 1e-4
    # what was loaded is kept: every other weight equals the ungated conversion's
    reference = ungated.state_dict()
    for key, value in gated.state_dict().items():
        if ".decay." not in key:
            assert torch.equal(value, reference[key]), key


def test_attention_transfer_fits_the_gate_beside_the_maps():
    from modeling_performer.transfer import transfer_attention

    base = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                hidden_dropout_prob=0.0, is_decoder=True)
    teacher = PerformerForCausalLM(PerformerConfig(attention_type="softmax", **base)).eval()
    student = PerformerForCausalLM(PerformerConfig(feature_map="hedgehog", local_window=4, linear_decay="data",
                                                   **base))
    student.load_state_dict(teacher.state_dict(), strict=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    def get_batch(step):
        ids = torch.randint(3, 99, (4, 24), generator=torch.Generator().manual_seed(step))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    transfer_attention(teacher, student, get_batch, steps=8, progress=False)
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert {k for k in moved if ".decay." in k} == {f"model.decoder.layers.{i}.self_attn.decay.{p}"
                                                    for i in range(2) for p in ("bias", "weight")}
    assert all(".decay." in k or "feature_map" in k or "linear_log_weight" in k for k in moved), moved
