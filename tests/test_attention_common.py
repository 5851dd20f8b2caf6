"""The building blocks every linear variant shares (`attention_common`): the running key stabiliser that
keeps growing key logits finite and exact, and the in-place state update of a decoding step, equal
to the copying one and free of host reads."""

import pytest
import torch

from modeling_performer.attention import causal_linear_attention, recurrent_linear_attention
from modeling_performer.reference_attention import naive_linear_attention

from .helpers import KernelCase, relative_error, run_recurrent_linear

B, H, D, M = 2, 3, 16, 32
CASE = KernelCase(B, H, H, D, M, F=8, stacked=True)


def test_growing_key_logits_need_the_running_stabiliser():
    """Keys move towards a projection row so r grows by ~100 over the sequence: a key constant
    frozen at the first chunk overflows, a per-chunk constant without rescaling is wrong."""
    w = CASE.features("softmax") * 4.0
    length = 48
    q, _, v = CASE.qkv(length, seed=3)
    direction = w[0] / w[0].norm()
    target = w[0].norm() * D**0.25  # |k'| = |w0| maximises r along w0
    growth = torch.linspace(0.05, 1.0, length).view(1, 1, length, 1)
    k = growth * target * direction + 0.1 * torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(9))
    r_max = (k * D**-0.25) @ w.T - (k * D**-0.25).pow(2).sum(-1, keepdim=True) / 2
    assert r_max.amax(-1)[..., -1].min() - r_max.amax(-1)[..., 0].max() > 80
    expected = naive_linear_attention(q, k, v, w, "softmax", causal=True)
    chunked, _ = causal_linear_attention(q, k, v, w, "softmax", chunk_size=8)
    recurrent, _ = run_recurrent_linear(q, k, v, w, "softmax")
    assert torch.isfinite(chunked).all() and torch.isfinite(recurrent).all()
    assert relative_error(chunked, expected) < 1e-5
    assert relative_error(recurrent, expected) < 1e-5


# Ops that read a tensor's value on the host: each one waits for an accelerator to finish.
HOST_SYNCS = ("aten::is_nonzero", "aten::item", "aten::_local_scalar_dense")


def _ops_run(step) -> set:
    """Runs step() under the profiler -> the names of the aten ops it ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("grows", ["no_head", "one_head"])
@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_in_place_step_equals_the_copying_step_without_reading_values_on_the_host(grows, feature_map):
    w = CASE.features("softmax") if feature_map == "softmax" else CASE.features("hedgehog")
    q, k, v = CASE.qkv(40, seed=3)
    _, state = causal_linear_attention(q[:, :, :39], k[:, :, :39], v[:, :, :39], w, feature_map)
    new_key = torch.zeros_like(k[:, :, 39:])  # FAVOR+: r = W k' - |k'|^2 / 2 = 0 everywhere, below the 39-key maximum
    if grows == "one_head":
        new_key[1, 2] = 2.0 * (w[0] if feature_map == "softmax" else 1.0)  # FAVOR+: a new maximum in head (1, 2) only
    copy_out, copy_state = recurrent_linear_attention(q[:, :, 39:], new_key, v[:, :, 39:], w, feature_map, state=state)
    grew = copy_state.stabiliser != state.stabiliser
    assert grew.sum().item() == (0 if grows == "no_head" or feature_map == "hedgehog" else 1)

    working = state._replace(kvz=state.kvz.clone())
    results = []
    with torch.no_grad():
        ops = _ops_run(lambda: results.append(recurrent_linear_attention(
            q[:, :, 39:], new_key, v[:, :, 39:], w, feature_map, state=working, in_place=True)))
    out, new_state = results[0]
    assert new_state.kvz is working.kvz  # written in place
    assert not ops & set(HOST_SYNCS)  # no value read on the host: a GPU step would wait for it at every layer
    # Equal to the copying step up to rounding (addcmul_ rounds once where the copy rounds twice).
    torch.testing.assert_close(out, copy_out)
    torch.testing.assert_close(new_state.kvz, copy_state.kvz)
    assert torch.equal(new_state.stabiliser, copy_state.stabiliser)
