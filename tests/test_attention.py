"""Kernel tests: every fast path against the naive O(T^2) reference, forward and backward."""

import pytest
import torch

from modeling_performer.attention import (
    causal_linear_attention,
    linear_attention,
    recurrent_linear_attention,
    softmax_attention,
)
from modeling_performer.reference_attention import naive_linear_attention, naive_softmax_attention
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

B, H, D, M = 2, 3, 16, 32
FEATURE_MAPS = ["softmax", "relu"]


def projection(num_features=M, head_dim=D, seed=0, orthogonal=True):
    return gaussian_orthogonal_random_matrix(num_features, head_dim, torch.Generator().manual_seed(seed), orthogonal)


def hedgehog_weights(width=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return hedgehog_init(H, D, width) + 0.3 * torch.randn(2, H, D, width, generator=g)


def qkv(length, seed=0, scale=1.0, batch=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, H, length, D, generator=g) * scale for _ in range(3)]


def relative_error(actual, expected):
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def run_recurrent(q, k, v, w, feature_map, mask=None, state=None):
    outs = []
    for t in range(q.shape[2]):
        step_mask = None if mask is None else mask[:, t : t + 1]
        out, state = recurrent_linear_attention(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], w, feature_map, step_mask, state
        )
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("length,chunk_size", [(1, 8), (37, 8), (64, 16), (50, 128), (33, 1)], ids=lambda x: str(x))
def test_causal_chunked_equals_naive_and_recurrent(feature_map, length, chunk_size):
    w = projection()
    q, k, v = qkv(length)
    expected = naive_linear_attention(q, k, v, w, feature_map, causal=True)
    chunked, chunked_state = causal_linear_attention(q, k, v, w, feature_map, chunk_size=chunk_size)
    recurrent, recurrent_state = run_recurrent(q, k, v, w, feature_map)
    assert relative_error(chunked, expected) < 1e-5
    assert relative_error(recurrent, expected) < 1e-5
    for a, b in zip(chunked_state, recurrent_state):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients_match_naive(feature_map, causal):
    w = projection()
    length = 29
    inputs = [t.requires_grad_() for t in qkv(length, seed=1)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    weights = torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(5))
    if causal:
        out, _ = causal_linear_attention(*inputs, w, feature_map, chunk_size=8)
        recurrent_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        (run_recurrent(*recurrent_inputs, w, feature_map)[0] * weights).sum().backward()
    else:
        out = linear_attention(*inputs, w, feature_map)
    (out * weights).sum().backward()
    (naive_linear_attention(*reference_inputs, w, feature_map, causal=causal) * weights).sum().backward()
    for fast, ref in zip(inputs, reference_inputs):
        assert relative_error(fast.grad, ref.grad) < 1e-5
    if causal:
        for rec, ref in zip(recurrent_inputs, reference_inputs):
            assert relative_error(rec.grad, ref.grad) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("splits", [(1,), (5, 20), (13, 14, 30), (40,)], ids=lambda s: "split" + "-".join(map(str, s)))
def test_split_and_resume(feature_map, splits):
    w = projection()
    length = 41
    q, k, v = qkv(length, seed=2)
    whole, whole_state = causal_linear_attention(q, k, v, w, feature_map, chunk_size=8)
    pieces, state = [], None
    bounds = [0, *splits, length]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = slice(start, end)
        if i % 2:  # alternate between the chunked and the token-by-token path
            out, state = run_recurrent(q[:, :, piece], k[:, :, piece], v[:, :, piece], w, feature_map, state=state)
        else:
            out, state = causal_linear_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece], w, feature_map, state=state, chunk_size=6)
        pieces.append(out)
    assert relative_error(torch.cat(pieces, dim=2), whole) < 1e-5
    for a, b in zip(state, whole_state):
        assert relative_error(a, b) < 1e-5


def test_growing_key_logits_need_the_running_stabiliser():
    """Keys move towards a projection row so r grows by ~100 over the sequence: a key constant
    frozen at the first chunk overflows, a per-chunk constant without rescaling is wrong."""
    w = projection() * 4.0
    length = 48
    q, _, v = qkv(length, seed=3)
    direction = w[0] / w[0].norm()
    target = w[0].norm() * D**0.25  # |k'| = |w0| maximises r along w0
    growth = torch.linspace(0.05, 1.0, length).view(1, 1, length, 1)
    k = growth * target * direction + 0.1 * torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(9))
    r_max = (k * D**-0.25) @ w.T - (k * D**-0.25).pow(2).sum(-1, keepdim=True) / 2
    assert r_max.amax(-1)[..., -1].min() - r_max.amax(-1)[..., 0].max() > 80
    expected = naive_linear_attention(q, k, v, w, "softmax", causal=True)
    chunked, _ = causal_linear_attention(q, k, v, w, "softmax", chunk_size=8)
    recurrent, _ = run_recurrent(q, k, v, w, "softmax")
    assert torch.isfinite(chunked).all() and torch.isfinite(recurrent).all()
    assert relative_error(chunked, expected) < 1e-5
    assert relative_error(recurrent, expected) < 1e-5


def favor_error(num_features, seed, orthogonal, length=128, head_dim=16, heads=4, scale=1.0):
    """Returns (|approx - exact| / |exact|, |approx - exact| / |v|) over the whole output."""
    g = torch.Generator().manual_seed(1000 + seed)
    q, k, v = [torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3)]
    q, k = q * scale, k * scale
    w = gaussian_orthogonal_random_matrix(num_features, head_dim, torch.Generator().manual_seed(seed), orthogonal)
    exact = naive_softmax_attention(q.double(), k.double(), v.double())
    error = (linear_attention(q, k, v, w, "softmax").double() - exact).norm()
    return (error / exact.norm()).item(), (error / v.double().norm()).item()


def mean_favor_error(num_features, seeds=range(6), orthogonal=True, **kwargs):
    return sum(favor_error(num_features, s, orthogonal, **kwargs)[0] for s in seeds) / len(seeds)


@pytest.mark.parametrize("scale", [0.5, 1.0], ids=["std0.5", "std1"])
def test_favor_error_falls_with_more_features(scale):
    errors = {m: mean_favor_error(m, scale=scale) for m in (16, 64, 256)}
    assert errors[16] > errors[64] > errors[256], errors
    if scale < 1:
        assert errors[256] < 0.5 * errors[16], errors


def test_orthogonal_features_beat_iid():
    seeds = range(12)
    orthogonal = mean_favor_error(64, seeds, True, scale=0.5)
    iid = mean_favor_error(64, seeds, False, scale=0.5)
    assert orthogonal < iid, (orthogonal, iid)


def test_favor_estimate_at_reference_size_converges_to_softmax_and_is_judged_against_mean_of_v():
    """D=64, M=256, T=1024, unit-variance inputs (the README's reference size). One draw is a noisy
    estimate, worse than the trivial answer (the mean of V, which ignores q and k) on such inputs;
    but it estimates softmax attention itself: averaging independent draws shrinks the error as
    1/sqrt(draws), which nothing that ignores q and k can do. At small logits (std 0.25) and
    D=16 one draw beats the mean of V."""
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 1024, 64, generator=g) for _ in range(3)]
    exact = naive_softmax_attention(q.double(), k.double(), v.double())
    mean_of_v = (v.double().mean(2, keepdim=True) - exact).norm()
    draws = [linear_attention(q, k, v, gaussian_orthogonal_random_matrix(256, 64, torch.Generator().manual_seed(s)),
                              "softmax").double() for s in range(16)]
    one = (draws[0] - exact).norm()
    averaged = (sum(draws) / len(draws) - exact).norm()
    assert averaged < 0.35 * one, (averaged, one)
    assert averaged < 1.6 * mean_of_v, (averaged, mean_of_v)
    small, _ = favor_error(256, seed=0, orthogonal=True, scale=0.5)
    g = torch.Generator().manual_seed(1000)  # favor_error's inputs for seed 0
    q, k, v = [torch.randn(1, 4, 128, 16, generator=g) for _ in range(3)]
    exact = naive_softmax_attention(q.double() * 0.5, k.double() * 0.5, v.double())
    baseline = ((v.double().mean(2, keepdim=True) - exact).norm() / exact.norm()).item()
    assert small < 0.8 * baseline, (small, baseline)


def test_projection_rows_are_orthogonal_in_blocks_and_seeded():
    w = projection(num_features=40, head_dim=16)
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    assert torch.equal(w, projection(num_features=40, head_dim=16))
    assert not torch.equal(w, projection(num_features=40, head_dim=16, seed=1))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("mode", ["noncausal", "causal-right", "causal-left"])
def test_padded_keys_have_no_influence(feature_map, mode):
    w = projection()
    lengths = [11, 6]
    total = max(lengths)
    q, k, v = qkv(total, seed=4)
    mask = torch.zeros(B, total, dtype=torch.bool)
    positions = []
    for b, n in enumerate(lengths):
        real = slice(total - n, total) if mode == "causal-left" else slice(0, n)
        mask[b, real] = True
        positions.append(real)
    # Garbage in padded positions must not leak anywhere.
    # (keys aligned with a projection row give logits far above every real key's)
    k = torch.where(mask[:, None, :, None], k, (w[0] / w[0].norm() * 8.0).expand_as(k))
    v = torch.where(mask[:, None, :, None], v, torch.full_like(v, 1e4))
    if mode == "noncausal":
        batched = linear_attention(q, k, v, w, feature_map, key_padding_mask=mask)
    else:
        batched, _ = causal_linear_attention(q, k, v, w, feature_map, key_padding_mask=mask, chunk_size=4)
        recurrent, _ = run_recurrent(q, k, v, w, feature_map, mask=mask)
        assert relative_error(recurrent, batched) < 1e-5
    for b, real in enumerate(positions):
        one = [t[b : b + 1, :, real] for t in (q, k, v)]
        if mode == "noncausal":
            alone = linear_attention(*one, w, feature_map)
        else:
            alone, _ = causal_linear_attention(*one, w, feature_map, chunk_size=4)
        assert relative_error(batched[b : b + 1, :, real], alone) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16-autocast"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_large_norms_stay_finite(feature_map, dtype, causal):
    w = projection()
    q, k, v = qkv(300, seed=6)
    q, k = [(t / t.norm(dim=-1, keepdim=True) * 50).requires_grad_() for t in (q, k)]
    v.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != "fp32"):
        if causal:
            out, state = causal_linear_attention(q, k, v, w, feature_map, chunk_size=8)
            assert all(torch.isfinite(t).all() for t in state)
        else:
            out = linear_attention(q, k, v, w, feature_map)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out.float() * weights).sum().backward()
    assert torch.isfinite(out).all()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("mode", ["plain", "causal", "padded", "causal-with-past"])
def test_softmax_attention_matches_naive(mode):
    q, k, v = qkv(9, seed=7)
    mask = None
    if mode == "padded":
        mask = torch.ones(B, 9, dtype=torch.bool)
        mask[1, :4] = False
    if mode == "causal-with-past":
        q = q[:, :, -3:]
    causal = mode.startswith("causal")
    out = softmax_attention(q, k, v, key_padding_mask=mask, causal=causal)
    expected = naive_softmax_attention(q, k, v, key_padding_mask=mask, causal=causal)
    assert torch.allclose(out, expected, atol=1e-6)


def test_softmax_attention_query_seeing_no_key_is_zero_not_nan():
    q, k, v = qkv(5, seed=8)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, :3] = False  # left padding: the first two queries of row 0 see nothing causally
    out = softmax_attention(q, k, v, key_padding_mask=mask, causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))


def test_bad_shapes_and_general_masks_are_rejected():
    w = projection()
    q, k, v = qkv(6)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        linear_attention(q, k, v, w, key_padding_mask=torch.ones(B, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="B, H, T, D"):
        causal_linear_attention(q[0], k, v, w)
    with pytest.raises(ValueError, match="one token"):
        recurrent_linear_attention(q, k, v, w)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, w, feature_map="cosine")


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
    w = projection() if feature_map == "softmax" else hedgehog_weights()
    q, k, v = qkv(40, seed=3)
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
