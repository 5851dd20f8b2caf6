"""The CUDA fast path (modeling_performer/fast_attention.py) without a GPU: the mapping of our causal
sums onto fla's simple-GLA recurrence, run on fla's own reference implementations (its Triton kernels
need a GPU), against the PyTorch kernels and the float64 references; the fallback and its log line;
the config switch; a prefill on the fast path continued by the PyTorch decoding step."""

import logging

import pytest
import torch

from modeling_performer import PerformerForCausalLM, fast_attention
from modeling_performer.attention import causal_linear_attention, causal_windowed_attention
from modeling_performer.reference_attention import naive_linear_attention, naive_windowed_attention

from .conftest import max_error, perturbed
from .helpers import MAPS, KernelCase, sparse_tiny_config

B, H, D = 2, 4, 8
CASE = KernelCase(B, H, 2, D, 16, 6, right_pad=3)  # the sparse cache tests' kernel inputs
features, qkv, padding = CASE.features, CASE.qkv, CASE.padding

naive = pytest.importorskip("fla.ops.simple_gla.naive", reason="fla-core is installed by the dev extra")


def chunked_reference(q, k, v, g, scale, initial_state, output_final_state, chunk_size=8):
    """fla's chunked reference in the fast kernel's signature (it wants a decay tensor: zeros for none)."""
    if g is None:
        g = q.new_zeros(q.shape[:3])
    return naive.naive_chunk_simple_gla(q, k, v, g, initial_state=initial_state, output_final_state=True,
                                        chunk_size=chunk_size, scale=scale)


def recurrent_reference(q, k, v, g, scale, initial_state, output_final_state):
    if g is None:
        g = q.new_zeros(q.shape[:3])
    out, state = naive.naive_recurrent_simple_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                                  output_final_state=True)
    return out.float(), state


KERNELS = {"fla-chunked": chunked_reference, "fla-recurrent": recurrent_reference}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("feature_map", MAPS)
def test_causal_sums_on_the_gla_recurrence_equal_pytorch_and_reference(kernel, feature_map):
    q, k, v = qkv(29)
    w, mask = features(feature_map), padding(29)
    pytorch, pytorch_state = causal_linear_attention(q, k, v, w, feature_map, mask, chunk_size=5)
    fast, fast_state = causal_linear_attention(q, k, v, w, feature_map, mask, chunk_size=5, kernel=KERNELS[kernel])
    reference = naive_linear_attention(q, k, v, w, feature_map, mask, causal=True)
    assert max_error(fast, reference, mask) < 1e-5
    assert max_error(fast, pytorch, mask) < 1e-5
    # The same state, at the same scale: either path can continue it.
    assert torch.equal(fast_state.stabiliser, pytorch_state.stabiliser)
    assert max_error(fast_state.kvz, pytorch_state.kvz) < 1e-5


@pytest.mark.parametrize("feature_map", MAPS)
def test_incoming_state_and_window_on_the_fast_path(feature_map):
    q, k, v = qkv(33, seed=2)
    w, mask = features(feature_map, 1), padding(33)
    kernel = KERNELS["fla-chunked"]
    # A state from the PyTorch path continued on the fast one.
    _, state = causal_linear_attention(q[:, :, :12], k[:, :, :12], v[:, :, :12], w, feature_map, mask[:, :12])
    fast, _ = causal_linear_attention(q[:, :, 12:], k[:, :, 12:], v[:, :, 12:], w, feature_map, mask[:, 12:],
                                      state=state, kernel=kernel)
    whole, _ = causal_linear_attention(q, k, v, w, feature_map, mask)
    assert max_error(fast, whole[:, :, 12:], mask[:, 12:]) < 1e-5
    weight = 0.5 * torch.randn(H, generator=torch.Generator().manual_seed(3))
    windowed, _ = causal_windowed_attention(q, k, v, w, feature_map, 4, weight, mask, kernel=kernel)
    reference = naive_windowed_attention(q, k, v, w, feature_map, 4, weight, mask, causal=True)
    assert max_error(windowed, reference, mask) < 1e-5


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_gradients_through_the_fast_path_equal_pytorch(feature_map):
    q, k, v = (x.requires_grad_() for x in qkv(21, seed=4))
    w, mask = features(feature_map), padding(21)
    probe = torch.randn(B, H, 21, D, generator=torch.Generator().manual_seed(5)) * mask[:, None, :, None]
    grads = {}
    for name, kernel in (("pytorch", None), ("fast", KERNELS["fla-chunked"])):
        out, _ = causal_windowed_attention(q, k, v, w, feature_map, 3, None, mask, kernel=kernel)
        grads[name] = torch.autograd.grad((out * probe).sum(), (q, k, v))
    for fast, pytorch in zip(grads["fast"], grads["pytorch"]):
        assert max_error(fast, pytorch) < 1e-4


def test_bf16_inputs_run_the_kernel_in_bf16_with_fp32_states():
    q, k, v = (x.bfloat16() for x in qkv(17, seed=6))
    w = features("softmax")
    seen = {}

    def spy(q, k, v, g, scale, initial_state, output_final_state):
        seen["dtype"], seen["state"] = q.dtype, initial_state.dtype
        return chunked_reference(q.float(), k.float(), v.float(), g, scale, initial_state, output_final_state)

    out, state = causal_linear_attention(q, k, v, w, "softmax", kernel=spy)
    exact, _ = causal_linear_attention(q.float(), k.float(), v.float(), w, "softmax")
    assert seen == {"dtype": torch.bfloat16, "state": torch.float32} and state.kvz.dtype == torch.float32
    assert out.dtype == torch.bfloat16 and max_error(out, exact) < 3e-2


def tiny_config(**overrides):
    """test_attention_sparse's model without window or cache unless asked for."""
    return sparse_tiny_config(**{"local_window": 0, "sparse_cache_size": 0, **overrides})


@pytest.mark.parametrize("feature_map,window", [("softmax", 0), ("hedgehog", 3)])
def test_prefill_on_the_fast_path_then_pytorch_decoding_gives_the_same_tokens(monkeypatch, feature_map, window):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map, local_window=window)))
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    pytorch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["q"].device.type)
        return KERNELS["fla-chunked"](*args, **kwargs)

    model.set_chunk_kernel(counted, devices=("cpu",))  # the public switch, here on the CPU
    with torch.no_grad():
        logits_fast = model(ids, attention_mask=mask).logits
    fast = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert calls, "the fast path never ran"
    assert torch.equal(fast, pytorch)
    # The switch back: the PyTorch kernels, and the fast ones are never asked.
    calls.clear()
    model.set_chunk_kernel(None)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert calls == []
    assert max_error(logits_fast[mask.bool()], logits[mask.bool()]) < 1e-5
    # Sums meant for CUDA never run on CPU tensors.
    model.set_chunk_kernel(counted)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert calls == []


def test_the_kernel_is_chosen_once_when_the_layer_is_built(monkeypatch):
    """The config and the device decide at construction; a forward asks nothing again."""
    monkeypatch.setattr(fast_attention, "load_fla_kernel", lambda: chunked_reference)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(fast_attention, "_announced", set())
    model = PerformerForCausalLM(tiny_config(feature_map="hedgehog", local_window=3))
    kernels = [layer.self_attn.kernel for layer in model.model.decoder.layers]
    assert all(k.sums is chunked_reference and k.variant == "window" and k.window == 3 for k in kernels)
    off = PerformerForCausalLM(tiny_config(feature_map="hedgehog", use_fast_kernels=False))
    assert all(layer.self_attn.kernel.sums is None for layer in off.model.decoder.layers)
    monkeypatch.setattr(fast_attention, "load_fla_kernel", lambda: pytest.fail("asked again in a forward"))
    monkeypatch.setattr(fast_attention, "kernel_for", lambda device: pytest.fail("asked again in a forward"))
    with torch.no_grad():
        model(torch.randint(3, 99, (1, 8)))
    softmax = PerformerForCausalLM(tiny_config(attention_type="softmax"))
    assert all(layer.self_attn.kernel is None for layer in softmax.model.decoder.layers)


def test_fallback_without_fla_logs_once_how_to_install(monkeypatch, caplog):
    monkeypatch.setattr(fast_attention, "_announced", set())
    monkeypatch.setattr(fast_attention, "load_fla_kernel", lambda: None)
    with caplog.at_level(logging.INFO, logger="modeling_performer.fast_attention"):
        assert fast_attention.kernel_for(torch.device("cuda")) is None
        assert fast_attention.kernel_for(torch.device("cuda")) is None
        assert fast_attention.kernel_for(torch.device("cpu")) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "modeling-performer[cuda]" in warnings[0].getMessage()
    assert any("PyTorch kernels on cpu" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(fast_attention, "load_fla_kernel", lambda: chunked_reference)
    assert fast_attention.kernel_for(torch.device("cuda")) is chunked_reference


def test_gpu_benchmark_script_runs_end_to_end_in_its_cpu_smoke_mode(tmp_path):
    """scripts/bench_gpu.py is meant for one call on a GPU; --smoke runs every section at tiny sizes on
    the CPU with fla's reference kernel, so the script itself is known to work before that call."""
    import json
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(root / "scripts" / "bench_gpu.py"), "--smoke", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] == "cpu (smoke run)" and record["versions"]["fla"]
    assert all(row["ok"] for row in record["correctness"]) and len(record["correctness"]) == 14
    assert sum(row["linear_decay"] for row in record["correctness"]) == 6  # the decay gate, 3 variants x 2 dtypes
    for key in ("causal_fwd_bwd_vs_sdpa_4k", "causal_fwd_bwd_vs_sdpa_16k", "noncausal_fwd_bwd_vs_sdpa_16k",
                "causal_fwd_bwd_vs_sdpa_4k_hedgehog_decay",
                "train_step_vs_softmax_4k", "train_step_vs_softmax_16k"):
        assert record["ratios"][key] > 0, key
    assert {(r["kind"], r["batch"]) for r in record["decoding"]} == {(k, b) for k in ("performer", "gpt2 static")
                                                                     for b in (1, 4)}
