"""The sparse cache (window + the worst-reproduced pairs kept exactly + linear state): every path
against the float64 reference, split and resume, padding, gradients; the model's cache,
generation, beam search and saving."""

import pytest
import torch

from modeling_performer import PerformerForCausalLM
from modeling_performer.attention import (
    SparseWindowState,
    causal_sparse_windowed_attention,
    causal_windowed_attention,
    recurrent_sparse_windowed_attention,
)
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix
from modeling_performer.reference_attention import naive_softmax_attention, naive_sparse_windowed_attention

from .conftest import max_error, perturbed
from .helpers import (
    MAPS,
    KernelCase,
    assert_cached_generation_equals_uncached,
    decode_greedily,
    decode_in_steps,
    left_padded_batch,
)
from .helpers import sparse_tiny_config as tiny_config

B, H, H_KV, D, M, F = 2, 4, 2, 8, 16, 6
CASE = KernelCase(B, H, H_KV, D, M, F, right_pad=3)
features, qkv, log_weight, padding = CASE.features, CASE.qkv, CASE.log_weight, CASE.padding


def run_steps(q, k, v, w, feature_map, window, size, weight, mask, state):
    outs = []
    for t in range(q.shape[2]):
        step = slice(t, t + 1)
        out, state = recurrent_sparse_windowed_attention(q[:, :, step], k[:, :, step], v[:, :, step], w, feature_map,
                                                         window, size, weight, mask[:, step], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("window,size", [(1, 1), (3, 2), (4, 5), (8, 3)], ids=lambda x: str(x))
def test_one_pass_and_token_by_token_equal_reference(feature_map, window, size):
    q, k, v = qkv(29)
    w, weight, mask = features(feature_map), log_weight(), padding(29)
    reference = naive_sparse_windowed_attention(q, k, v, w, feature_map, window, size, weight, mask)
    one_pass, state = causal_sparse_windowed_attention(q, k, v, w, feature_map, window, size, weight, mask)
    stepped, stepped_state = run_steps(q, k, v, w, feature_map, window, size, weight, mask, None)
    assert max_error(one_pass, reference, mask) < 1e-5
    assert max_error(stepped, reference, mask) < 1e-5
    # Both paths end in the same cache: the same pairs in the same slots.
    assert torch.equal(state.cache_mask, stepped_state.cache_mask)
    assert torch.allclose(state.cache_keys, stepped_state.cache_keys)
    assert torch.allclose(state.key_scores, stepped_state.key_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("splits", [(1,), (6, 7), (3, 11, 19)], ids=lambda s: "split" + "-".join(map(str, s)))
def test_split_prefill_and_decoding_resume_exactly(feature_map, splits):
    """Prefill in pieces that do not line up with the window's blocks, then decode."""
    q, k, v = qkv(31, seed=4)
    w, weight, mask = features(feature_map, 1), log_weight(), padding(31)
    whole, _ = causal_sparse_windowed_attention(q, k, v, w, feature_map, 4, 3, weight, mask)
    outs, state, start = [], None, 0
    for end in splits:
        part = slice(start, end)
        out, state = causal_sparse_windowed_attention(q[:, :, part], k[:, :, part], v[:, :, part], w, feature_map, 4,
                                                      3, weight, mask[:, part], state)
        outs.append(out)
        start = end
    rest = slice(start, None)
    out, _ = run_steps(q[:, :, rest], k[:, :, rest], v[:, :, rest], w, feature_map, 4, 3, weight, mask[:, rest], state)
    outs.append(out)
    assert max_error(torch.cat(outs, dim=2), whole, mask) < 1e-5


def test_left_padded_row_equals_the_row_alone():
    q, k, v = qkv(23, seed=5)
    w, weight, mask = features("softmax"), log_weight(), padding(23)
    batch, _ = causal_sparse_windowed_attention(q, k, v, w, "softmax", 3, 2, weight, mask)
    alone, _ = causal_sparse_windowed_attention(q[1:, :, 5:], k[1:, :, 5:], v[1:, :, 5:], w, "softmax", 3, 2, weight)
    assert max_error(batch[1:, :, 5:], alone) < 1e-5


def test_cache_keeps_the_worst_reproduced_pairs():
    """After the prefill the cache holds, per head, the `size` highest-scored pairs of those that left the
    window, and the pairs that left matter: dropping the cache changes the output."""
    q, k, v = qkv(40, seed=6)
    w = features("softmax")
    window, size = 4, 5
    _, state = causal_sparse_windowed_attention(q, k, v, w, "softmax", window, size)
    scores, stepped = [], None  # every key's score, as each step records it
    for t in range(40):
        step = slice(t, t + 1)
        _, stepped = recurrent_sparse_windowed_attention(q[:, :, step], k[:, :, step], v[:, :, step], w, "softmax",
                                                         window, size, state=stepped)
        scores.append(stepped.key_scores[..., -1])
    left = torch.stack(scores, dim=-1)[..., :40 - window]
    expected = left.topk(size, dim=-1).values.sort(-1).values
    assert state.cache_mask.all()
    assert torch.allclose(state.cache_scores.sort(-1).values, expected, rtol=1e-5)
    with_cache, _ = causal_sparse_windowed_attention(q, k, v, w, "softmax", window, size)
    without, _ = causal_windowed_attention(q, k, v, w, "softmax", window)
    assert max_error(with_cache[:, :, :window], without[:, :, :window]) < 1e-5  # nothing has left the window yet
    assert max_error(with_cache, without) > 1e-3


def test_cache_larger_than_the_sequence_is_exact_softmax():
    q, k, v = qkv(17, seed=7)
    for feature_map in MAPS:
        out, _ = causal_sparse_windowed_attention(q, k, v, features(feature_map), feature_map, 3, 17, log_weight())
        assert max_error(out, naive_softmax_attention(q.double(), k.double(), v.double(), causal=True)) < 1e-5


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_gradients_equal_reference(feature_map):
    q, k, v = (x.double().requires_grad_() for x in qkv(19, seed=8))
    w, weight, mask = features(feature_map), log_weight().double().requires_grad_(), padding(19)
    out, _ = causal_sparse_windowed_attention(q, k, v, w, feature_map, 3, 2, weight, mask)
    reference = naive_sparse_windowed_attention(q, k, v, w, feature_map, 3, 2, weight, mask)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * mask[:, None, :,
                                                                                                          None]
    grads = torch.autograd.grad((out * probe).sum(), (q, k, v, weight))
    expected = torch.autograd.grad((reference * probe).sum(), (q, k, v, weight))
    for got, want in zip(grads, expected):
        assert max_error(got, want) < 1e-5


def test_bad_arguments_and_mismatched_states_are_refused():
    q, k, v = qkv(9)
    w = features("softmax")
    with pytest.raises(ValueError, match="sparse cache size"):
        causal_sparse_windowed_attention(q, k, v, w, "softmax", 3, 0)
    _, window_state = causal_windowed_attention(q, k, v, w, "softmax", 3)
    with pytest.raises(ValueError, match="holds no sparse cache"):
        causal_sparse_windowed_attention(q, k, v, w, "softmax", 3, 2, state=window_state)
    _, state = causal_sparse_windowed_attention(q, k, v, w, "softmax", 3, 2)
    with pytest.raises(ValueError, match="holds 2 pairs, not 4"):
        causal_sparse_windowed_attention(q, k, v, w, "softmax", 3, 4, state=state)
    with pytest.raises(ValueError, match="local window is 5"):
        recurrent_sparse_windowed_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], w, "softmax", 5, 2, state=state)


# --------------------------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("feature_map", MAPS)
def test_prefill_and_decoding_equal_full_forward(feature_map):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map)))
    ids, mask = left_padded_batch(14)
    full, stepped, cache = decode_in_steps(model, ids, mask)
    assert isinstance(cache.layers[0].self_attention, SparseWindowState)
    assert max_error(stepped[mask.bool()], full[mask.bool()]) < 1e-5


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_cached_generation_equals_uncached_greedy_and_beam(feature_map):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map=feature_map)))
    ids, mask = left_padded_batch(14)
    assert_cached_generation_equals_uncached(model, ids, mask, max_new_tokens=10)


def test_sparse_cache_changes_generation_and_memory_is_constant():
    config = tiny_config(feature_map="hedgehog", max_position_embeddings=2048, local_window=4, sparse_cache_size=3)
    model = perturbed(PerformerForCausalLM(config))
    ids = torch.randint(3, 99, (1, 20), generator=torch.Generator().manual_seed(1))
    out, cache, size = decode_greedily(model, ids, 600)
    assert cache.get_seq_length() == 620 and cache.num_bytes() == size
    assert torch.isfinite(out.logits).all()
    # W + L pairs and their scores plus the linear state, per key/value head and layer.
    state = cache.layers[0].self_attention
    kv_heads, head_dim = config.num_key_value_heads, config.head_dim
    assert state.keys.shape == state.values.shape == (1, kv_heads, 4, head_dim)
    assert state.cache_keys.shape == state.cache_values.shape == (1, kv_heads, 3, head_dim)
    assert state.key_scores.shape == (1, kv_heads, 4) and state.cache_scores.shape == (1, kv_heads, 3)
    assert state.kvz.shape == (1, kv_heads, 2 * config.hedgehog_dim, head_dim + 1)
    plain = PerformerForCausalLM(tiny_config(feature_map="hedgehog", local_window=4, sparse_cache_size=0))
    plain.load_state_dict(model.state_dict())
    ids, mask = left_padded_batch(24)
    with torch.no_grad():
        assert not torch.allclose(plain.eval()(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_sparse_cache_size_saves_and_loads(tmp_path):
    model = perturbed(PerformerForCausalLM(tiny_config(feature_map="hedgehog")))
    ids, mask = left_padded_batch(14)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    loaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.sparse_cache_size == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, before)
    # The setting is a switch at inference: the same weights load with another cache size.
    other = PerformerForCausalLM.from_pretrained(tmp_path, sparse_cache_size=0).eval()
    assert other.config.sparse_cache_size == 0


def test_needle_beyond_the_window_is_recalled_only_with_the_cache():
    """One pair far behind the window whose value the state reproduces badly (it is unlike every other
    value); a query that matches its key. The cache keeps it and returns its value; the window + linear
    state alone blur it into the average of everything else."""
    g = torch.Generator().manual_seed(11)
    length, needle, dim = 160, 30, 16
    k = torch.randn(1, 1, length, dim, generator=g) * 0.3
    v = torch.randn(1, 1, length, dim, generator=g) * 0.1
    direction = torch.randn(dim, generator=g)
    direction = direction / direction.norm()
    k[0, 0, needle] = 5.0 * direction
    v[0, 0, needle] = 0.0
    v[0, 0, needle, 0] = 2.0
    q = torch.randn(1, 1, length, dim, generator=g) * 0.3
    q[0, 0, -1] = 5.0 * direction
    w = gaussian_orthogonal_random_matrix(64, dim, torch.Generator().manual_seed(0))
    with_cache, state = causal_sparse_windowed_attention(q, k, v, w, "softmax", 8, 4)
    without, _ = causal_windowed_attention(q, k, v, w, "softmax", 8)
    exact = naive_softmax_attention(q.double(), k.double(), v.double(), causal=True)[0, 0, -1]
    assert (state.cache_keys[0, 0] == k[0, 0, needle]).all(-1).any()  # kept, among 150 pairs that left
    assert exact[0] > 1.0  # softmax itself recalls it (weight ~ 3/4)
    assert with_cache[0, 0, -1, 0] > 0.75 * exact[0]
    assert without[0, 0, -1, 0] < 0.25 * exact[0]
