"""Exact softmax attention (`attention_softmax`) against the float64 reference: plain, causal, padded
and causal with past keys; a query that sees no key gets zeros, not NaN."""

import pytest
import torch

from modeling_performer.attention import softmax_attention
from modeling_performer.reference_attention import naive_softmax_attention

from .helpers import KernelCase

B, H, D, M = 2, 3, 16, 32
CASE = KernelCase(B, H, H, D, M, F=8, stacked=True)


@pytest.mark.parametrize("mode", ["plain", "causal", "padded", "causal-with-past"])
def test_softmax_attention_matches_naive(mode):
    q, k, v = CASE.qkv(9, seed=7)
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
    q, k, v = CASE.qkv(5, seed=8)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[0, :3] = False  # left padding: the first two queries of row 0 see nothing causally
    out = softmax_attention(q, k, v, key_padding_mask=mask, causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, :3], torch.zeros_like(out[0, :, :3]))


@pytest.mark.parametrize("mode", ["causal", "padded", "decoding"])
def test_grouped_heads_without_gradients_are_read_in_place_with_the_same_outputs(mode, monkeypatch):
    """Inference hands SDPA the grouped key/value heads as they are (no copy of the cache per query
    group); the outputs are those of the repeated heads bit for bit, and training still repeats them."""
    from modeling_performer import attention_softmax

    if not attention_softmax._SDPA_GROUPS:
        pytest.skip("SDPA takes grouped heads from torch 2.5")
    torch.manual_seed(0)
    length = 1 if mode == "decoding" else 40
    q, k, v = torch.randn(2, 6, length, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    padding = torch.ones(2, 40, dtype=torch.bool)
    padding[0, :5] = False
    args = (padding if mode != "causal" else None, mode != "decoding")
    repeated = softmax_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), *args)
    calls = []
    monkeypatch.setattr(attention_softmax, "repeat_key_heads", lambda x, heads: calls.append(heads) or
                        x.repeat_interleave(heads // x.shape[1], 1))
    with torch.no_grad():
        assert torch.equal(softmax_attention(q, k, v, *args), repeated)
    assert calls == []
    q.requires_grad_(True)
    assert torch.equal(softmax_attention(q, k, v, *args), repeated) and calls == [6, 6]
