"""The references every kernel is held to (`reference_attention`), held in turn to what they
write out: softmax attention equals PyTorch's own scaled dot-product attention, a window that
covers every key is softmax attention, a sparse cache that holds every key is softmax attention,
the linear reference averages the values with weights that sum to one and never look ahead, and a
gate that keeps everything is no gate."""

import pytest
import torch

from modeling_performer.reference_attention import (
    naive_linear_attention,
    naive_softmax_attention,
    naive_sparse_windowed_attention,
    naive_windowed_attention,
)

from .helpers import MAPS, KernelCase

CASE = KernelCase(B=2, H=4, H_KV=2, D=8, M=16, F=6, right_pad=0, left_pad=3)
LENGTH = 9


def inputs(seed=0):
    return [t.double() for t in CASE.qkv(LENGTH, seed=seed)]


@pytest.mark.parametrize("causal", [False, True])
def test_softmax_reference_equals_pytorch_sdpa(causal):
    q, k, v = inputs()
    mask = CASE.padding(LENGTH)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1),
        attn_mask=mask[:, None, None, :] & (torch.ones(LENGTH, LENGTH).tril().bool() if causal else True))
    out = naive_softmax_attention(q, k, v, key_padding_mask=mask, causal=causal)
    real = mask[:, None, :, None]
    if causal:  # SDPA gives NaN where a query sees no key (left padding); the reference gives zeros
        sees = mask.cumsum(-1).bool()[:, None, :, None]
        assert torch.equal(out.masked_select(~sees), torch.zeros_like(out.masked_select(~sees)))
        real = sees & real
    torch.testing.assert_close(out.masked_select(real), expected.masked_select(real), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_window_over_every_key_is_softmax_attention(feature_map, causal):
    q, k, v = inputs(1)
    mask = CASE.padding(LENGTH)
    out = naive_windowed_attention(q, k, v, CASE.features(feature_map), feature_map, window=LENGTH,
                                   linear_log_weight=torch.zeros(CASE.H), key_padding_mask=mask, causal=causal)
    expected = naive_softmax_attention(q, k, v, key_padding_mask=mask, causal=causal)
    real = mask[:, None, :, None]
    torch.testing.assert_close(out.masked_select(real), expected.masked_select(real), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("feature_map", MAPS)
def test_a_sparse_cache_that_holds_every_key_is_softmax_attention(feature_map):
    q, k, v = inputs(2)
    out = naive_sparse_windowed_attention(q, k, v, CASE.features(feature_map), feature_map, window=2,
                                          cache_size=LENGTH, linear_log_weight=torch.zeros(CASE.H))
    torch.testing.assert_close(out, naive_softmax_attention(q, k, v, causal=True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("feature_map", MAPS)
def test_the_linear_reference_averages_the_values_and_never_looks_ahead(feature_map):
    q, k, v = inputs(3)
    w = CASE.features(feature_map)
    ones = naive_linear_attention(q, k, torch.ones_like(v), w, feature_map, causal=True)
    torch.testing.assert_close(ones, torch.ones_like(ones), rtol=1e-12, atol=1e-12)  # weights sum to one
    out = naive_linear_attention(q, k, v, w, feature_map, causal=True)
    changed_k, changed_v = k.clone(), v.clone()
    changed_k[:, :, -1] += 3.0
    changed_v[:, :, -1] -= 5.0
    later = naive_linear_attention(q, changed_k, changed_v, w, feature_map, causal=True)
    torch.testing.assert_close(later[:, :, :-1], out[:, :, :-1], rtol=1e-12, atol=1e-12)
    assert (later[:, :, -1] - out[:, :, -1]).abs().max() > 1e-3


def test_a_gate_that_keeps_everything_is_no_gate():
    q, k, v = inputs(4)
    w = CASE.features("hedgehog")
    keep = torch.zeros(CASE.B, CASE.H_KV, LENGTH, dtype=torch.float64)
    torch.testing.assert_close(naive_linear_attention(q, k, v, w, "hedgehog", causal=True, log_decay=keep),
                               naive_linear_attention(q, k, v, w, "hedgehog", causal=True), rtol=1e-12, atol=1e-12)
    forget = torch.full_like(keep, -30.0)  # each step forgets all but e^-30: the last key alone is left
    last = naive_linear_attention(q, k, v, w, "hedgehog", causal=True, log_decay=forget)
    torch.testing.assert_close(last, v.repeat_interleave(2, dim=1), rtol=1e-9, atol=1e-9)
