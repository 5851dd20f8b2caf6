"""Kernel tests: every fast path against the naive O(T^2) reference, forward and backward."""

import pytest
import torch

from modeling_performer.attention import causal_linear_attention, linear_attention, recurrent_linear_attention
from modeling_performer.reference_attention import naive_linear_attention

from .helpers import KernelCase, relative_error, run_recurrent_linear

B, H, D, M = 2, 3, 16, 32
FEATURE_MAPS = ["softmax", "relu"]


CASE = KernelCase(B, H, H, D, M, F=8, stacked=True)  # CASE.features("hedgehog"): [2, H, D, 8]


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("length,chunk_size", [(1, 8), (37, 8), (64, 16), (50, 128), (33, 1)], ids=lambda x: str(x))
def test_causal_chunked_equals_naive_and_recurrent(feature_map, length, chunk_size):
    w = CASE.features("softmax")
    q, k, v = CASE.qkv(length)
    expected = naive_linear_attention(q, k, v, w, feature_map, causal=True)
    chunked, chunked_state = causal_linear_attention(q, k, v, w, feature_map, chunk_size=chunk_size)
    recurrent, recurrent_state = run_recurrent_linear(q, k, v, w, feature_map)
    assert relative_error(chunked, expected) < 1e-5
    assert relative_error(recurrent, expected) < 1e-5
    for a, b in zip(chunked_state, recurrent_state):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients_match_naive(feature_map, causal):
    w = CASE.features("softmax")
    length = 29
    inputs = [t.requires_grad_() for t in CASE.qkv(length, seed=1)]
    reference_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    weights = torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(5))
    if causal:
        out, _ = causal_linear_attention(*inputs, w, feature_map, chunk_size=8)
        recurrent_inputs = [t.detach().clone().requires_grad_() for t in inputs]
        (run_recurrent_linear(*recurrent_inputs, w, feature_map)[0] * weights).sum().backward()
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
    w = CASE.features("softmax")
    length = 41
    q, k, v = CASE.qkv(length, seed=2)
    whole, whole_state = causal_linear_attention(q, k, v, w, feature_map, chunk_size=8)
    pieces, state = [], None
    bounds = [0, *splits, length]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        piece = slice(start, end)
        if i % 2:  # alternate between the chunked and the token-by-token path
            out, state = run_recurrent_linear(q[:, :, piece], k[:, :, piece], v[:, :, piece], w, feature_map, state=state)
        else:
            out, state = causal_linear_attention(q[:, :, piece], k[:, :, piece], v[:, :, piece], w, feature_map, state=state, chunk_size=6)
        pieces.append(out)
    assert relative_error(torch.cat(pieces, dim=2), whole) < 1e-5
    for a, b in zip(state, whole_state):
        assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
@pytest.mark.parametrize("mode", ["noncausal", "causal-right", "causal-left"])
def test_padded_keys_have_no_influence(feature_map, mode):
    w = CASE.features("softmax")
    lengths = [11, 6]
    total = max(lengths)
    q, k, v = CASE.qkv(total, seed=4)
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
        recurrent, _ = run_recurrent_linear(q, k, v, w, feature_map, mask=mask)
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
    w = CASE.features("softmax")
    q, k, v = CASE.qkv(300, seed=6)
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


def test_bad_shapes_and_general_masks_are_rejected():
    w = CASE.features("softmax")
    q, k, v = CASE.qkv(6)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        linear_attention(q, k, v, w, key_padding_mask=torch.ones(B, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="B, H, T, D"):
        causal_linear_attention(q[0], k, v, w)
    with pytest.raises(ValueError, match="one token"):
        recurrent_linear_attention(q, k, v, w)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, k, v, w, feature_map="cosine")
