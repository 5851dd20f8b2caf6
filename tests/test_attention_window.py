"""Learned (Hedgehog) feature maps and the exact local window: every path against the float64
reference, forward and backward; split and resume; the model's cache, generation and saving."""

import pytest
import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM, PerformerForMaskedLM, PerformerModel
from modeling_performer.attention import (
    causal_windowed_attention,
    windowed_linear_attention,
)
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init
from modeling_performer.reference_attention import naive_softmax_attention, naive_windowed_attention

from .conftest import max_error, perturbed
from .helpers import (
    MAPS,
    KernelCase,
    assert_cached_generation_equals_uncached,
    decode_greedily,
    decode_in_steps,
    left_padded_batch,
)
from .helpers import run_recurrent_window as run_recurrent

B, H, D, M, F = 2, 3, 16, 32, 8
CASE = KernelCase(B, H, H, D, M, F, right_pad=4, stacked=True)
features, qkv, log_weight, padding = CASE.features, CASE.qkv, CASE.log_weight, CASE.padding
WINDOWS = [1, 2, 5, 8]


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"W{w}")
def test_noncausal_window_equals_reference(feature_map, window):
    w, weight, mask = features(feature_map), log_weight(), padding(37)
    q, k, v = qkv(37)
    out = windowed_linear_attention(q, k, v, w, feature_map, window, weight, mask)
    expected = naive_windowed_attention(q, k, v, w, feature_map, window, weight, mask, causal=False)
    assert max_error(out, expected) < 1e-5


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("window", [8, 13, 37, 50], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("sinks", [0, 2], ids=lambda s: f"S{s}")
def test_noncausal_regimes_equal_reference_with_gradients(feature_map, window, sinks):
    """The non-causal kernel computes T = 37 three ways: bands of three blocks (W = 8), one dense
    block (W < T < 3W: 13) and, with every key inside every window (T <= W: 37, 50), exact softmax
    directly. Each against the float64 reference: padding on both sides, one key/value head shared by
    all query heads, gradients to q, k, v, the maps and the window weights."""
    length = 37
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, length, D, generator=g)
    k, v = (torch.randn(B, 1, length, D, generator=g) for _ in range(2))
    if feature_map == "hedgehog":  # query maps per query head, key maps per key/value head
        w = (hedgehog_init(H, D, F)[0] + 0.3 * torch.randn(H, D, F, generator=g),
             hedgehog_init(1, D, F)[1] + 0.3 * torch.randn(1, D, F, generator=g))
    else:
        w = (features(feature_map),)
    mask, weight = padding(length), log_weight()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *w, weight)]
    twins = [t.clone().requires_grad_() for t in (q, k, v, *w, weight)]
    probe = torch.randn(B, H, length, D, generator=g) * mask[:, None, :, None]

    def maps(tensors):
        return tuple(tensors[3:-1]) if feature_map == "hedgehog" else tensors[3]

    out = windowed_linear_attention(*leaves[:3], maps(leaves), feature_map, window, leaves[-1], mask, sinks)
    expected = naive_windowed_attention(*twins[:3], maps(twins), feature_map, window, twins[-1], mask,
                                        sink_tokens=sinks)
    assert max_error(out, expected, mask) < 1e-5
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    for fast, ref in zip(leaves, twins):
        if fast.grad is None:  # maps and window weights take no part once every key is in the window
            assert window >= length and ref.grad.abs().max() < 1e-9
            continue
        assert max_error(fast.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"W{w}")
@pytest.mark.parametrize("chunk_size", [3, 8, 128], ids=lambda c: f"C{c}")
def test_causal_chunked_and_recurrent_equal_reference(feature_map, window, chunk_size):
    w, weight, mask = features(feature_map), log_weight(), padding(37)
    q, k, v = qkv(37, seed=1)
    expected = naive_windowed_attention(q, k, v, w, feature_map, window, weight, mask, causal=True)
    chunked, chunked_state = causal_windowed_attention(q, k, v, w, feature_map, window, weight, mask, chunk_size=chunk_size)
    recurrent, recurrent_state = run_recurrent(q, k, v, w, feature_map, window, weight, mask)
    assert max_error(chunked, expected, mask) < 1e-5
    assert max_error(recurrent, expected, mask) < 1e-5
    for a, b in zip(chunked_state, recurrent_state):
        assert torch.equal(a, b) if a.dtype == torch.bool else max_error(a, b) < 1e-5


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("splits", [(1,), (3, 20), (13, 14, 30)], ids=lambda s: "split" + "-".join(map(str, s)))
def test_split_and_resume(feature_map, splits):
    w, weight, window, length = features(feature_map), log_weight(), 6, 41
    q, k, v = qkv(length, seed=2)
    mask = padding(length)
    whole, whole_state = causal_windowed_attention(q, k, v, w, feature_map, window, weight, mask, chunk_size=8)
    pieces, state = [], None
    bounds = [0, *splits, length]
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = slice(start, end)
        args = (q[:, :, part], k[:, :, part], v[:, :, part], w, feature_map, window, weight, mask[:, part])
        if i % 2:
            out, state = run_recurrent(*args, state=state)
        else:
            out, state = causal_windowed_attention(*args, state=state, chunk_size=5)
        pieces.append(out)
    assert max_error(torch.cat(pieces, dim=2), whole, mask) < 1e-5
    for a, b in zip(state, whole_state):
        assert torch.equal(a, b) if a.dtype == torch.bool else max_error(a, b) < 1e-5


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradients_equal_reference(feature_map, causal):
    """Gradients reach q, k, v, the feature parameters (learned maps) and the mixing weights."""
    window, length = 5, 23
    inputs = [t.requires_grad_() for t in qkv(length, seed=4)]
    w, weight = features(feature_map).requires_grad_(), log_weight().requires_grad_()
    twins = [t.detach().clone().requires_grad_() for t in (*inputs, w, weight)]
    probe = torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(5))
    if causal:
        out, _ = causal_windowed_attention(*inputs, w, feature_map, window, weight, chunk_size=4)
    else:
        out = windowed_linear_attention(*inputs, w, feature_map, window, weight)
    (out * probe).sum().backward()
    q, k, v, w2, weight2 = twins
    (naive_windowed_attention(q, k, v, w2, feature_map, window, weight2, causal=causal) * probe).sum().backward()
    for fast, ref in zip((*inputs, w, weight), twins):
        if fast is w and feature_map != "hedgehog":
            continue  # random projections are buffers, not trained through the kernel by default
        assert max_error(fast.grad, ref.grad) < 1e-4


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_window_covering_everything_is_exact_softmax(causal):
    """With W >= T every key is in the window: the output is softmax attention, whatever the map."""
    q, k, v = qkv(19, seed=6)
    w = features("hedgehog")
    exact = naive_softmax_attention(q.double(), k.double(), v.double(), causal=causal)
    if causal:
        out, _ = causal_windowed_attention(q, k, v, w, "hedgehog", 19, log_weight(), chunk_size=4)
    else:
        out = windowed_linear_attention(q, k, v, w, "hedgehog", 19, log_weight())
    assert max_error(out, exact) < 1e-5


def test_favor_window_estimates_softmax_better_than_either_part():
    """FAVOR+ is calibrated: its linear part enters at softmax's own scale, so window + FAVOR+
    beats both the window alone and FAVOR+ alone on inputs where FAVOR+ is accurate."""
    g = torch.Generator().manual_seed(7)
    q, k, v = [torch.randn(1, 4, 256, 32, generator=g) * s for s in (0.5, 0.5, 1.0)]
    w = gaussian_orthogonal_random_matrix(256, 32, torch.Generator().manual_seed(8))
    exact = naive_softmax_attention(q.double(), k.double(), v.double())

    def error(out):
        return ((out.double() - exact).norm() / exact.norm()).item()

    combined = error(windowed_linear_attention(q, k, v, w, "softmax", 32))
    window_only = error(windowed_linear_attention(q, k, v, w, "softmax", 32, torch.full((4,), -80.0)))
    from modeling_performer.attention import linear_attention
    favor_only = error(linear_attention(q, k, v, w, "softmax"))
    assert combined < 0.95 * favor_only and combined < 0.5 * window_only, (combined, favor_only, window_only)


def test_bad_window_arguments_are_rejected():
    q, k, v = qkv(6)
    w = features("softmax")
    with pytest.raises(ValueError, match="positive integer"):
        windowed_linear_attention(q, k, v, w, "softmax", 0)
    with pytest.raises(ValueError, match="as many queries as keys"):
        causal_windowed_attention(q[:, :, :3], k, v, w, "softmax", 2)
    _, state = causal_windowed_attention(q, k, v, w, "softmax", 3)
    with pytest.raises(ValueError, match="local window is 4"):
        causal_windowed_attention(q, k, v, w, "softmax", 4, state=state)


# --------------------------------------------------------------------------------------------
# Models


def tiny_config(**overrides):
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                  num_random_features=16, hedgehog_dim=8, chunk_size=4, hidden_dropout_prob=0.0)
    values.update(overrides)
    return PerformerConfig(**values)


CASES = [("softmax", 0), ("softmax", 3), ("relu", 3), ("hedgehog", 0), ("hedgehog", 3), ("hedgehog", 1)]
CASE_IDS = [f"{m}-W{w}" for m, w in CASES]


@pytest.mark.parametrize("feature_map,window", CASES, ids=CASE_IDS)
def test_prefill_and_decoding_equal_full_forward(feature_map, window):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map, local_window=window)))
    ids, mask = left_padded_batch(11)
    full, stepped, cache = decode_in_steps(model, ids, mask)
    assert max_error(stepped[mask.bool()], full[mask.bool()]) < 1e-5


@pytest.mark.parametrize("feature_map,window", CASES, ids=CASE_IDS)
def test_cached_generation_equals_uncached(feature_map, window):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map, local_window=window)))
    ids, mask = left_padded_batch(11)
    assert_cached_generation_equals_uncached(model, ids, mask, max_new_tokens=8)


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_no_future_leak(feature_map):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map, local_window=3, chunk_size=4)))
    ids, _ = left_padded_batch(13)
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % 99
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_window_cache_is_constant_over_a_thousand_tokens():
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map="hedgehog", local_window=8,
                                                       max_position_embeddings=2048)))
    ids = torch.randint(3, 99, (1, 20), generator=torch.Generator().manual_seed(1))
    out, cache, size = decode_greedily(model, ids, 1000)
    assert cache.get_seq_length() == 1020
    assert cache.num_bytes() == size
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("head", [PerformerForMaskedLM, PerformerForCausalLM], ids=["mlm", "clm"])
def test_learned_maps_and_mixing_weights_save_and_load_exactly(head, tmp_path):
    config = tiny_config(feature_map="hedgehog", local_window=3)
    model = perturbed(head(config))
    stack = model.model.decoder if head is PerformerForCausalLM else model.model.encoder
    attention = stack.layers[0].self_attn
    assert not torch.equal(attention.feature_map.query_weight, hedgehog_init(2, 16, 8)[0])
    assert attention.linear_log_weight.abs().sum() > 0
    ids, mask = left_padded_batch(11)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = head.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, before)


def test_encoder_window_changes_outputs_and_hedgehog_has_no_projection():
    plain = PerformerModel(tiny_config(feature_map="hedgehog"))
    windowed = PerformerModel(tiny_config(feature_map="hedgehog", local_window=4))
    attention = windowed.encoder.layers[0].self_attn
    assert attention.projection is None and "projection" not in dict(windowed.named_buffers())
    assert windowed.favor_modules() == []
    windowed.load_state_dict(plain.state_dict(), strict=False)
    ids, mask = left_padded_batch(11)
    with torch.no_grad():
        a = plain(ids, attention_mask=mask).last_hidden_state
        b = windowed(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(b).all() and not torch.allclose(a, b)
