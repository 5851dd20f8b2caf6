"""The decoding cache (`cache_performer`): a linear layer's state keeps one size however long the
text, a softmax layer's keys and values grow, and the cache reorders for beam search, resets,
refuses to crop what it cannot, and counts the tokens it has seen."""

import pytest
import torch

from modeling_performer import PerformerCache

from .helpers import causal_lm


def test_favor_cache_size_is_constant():
    model = causal_lm("favor", max_position_embeddings=4096)
    ids = torch.randint(3, 99, (1, 4))
    sizes = {}
    cache = None
    out = model(ids, use_cache=True)
    cache = out.cache
    token = out.logits[:, -1:].argmax(-1)
    for step in range(1, 1025):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        if step in (16, 1024):
            sizes[step] = cache.num_bytes()
    assert sizes[16] == sizes[1024] > 0
    assert cache.get_seq_length() == 1028
    assert torch.isfinite(out.logits).all()


def test_softmax_cache_grows():
    model = causal_lm("softmax")
    out = model(torch.randint(3, 99, (1, 4)), use_cache=True)
    before = out.cache.num_bytes()
    out = model(torch.tensor([[5]]), cache=out.cache, use_cache=True)
    assert out.cache.num_bytes() > before


def test_cache_reorder_reset_and_crop():
    model = causal_lm("hybrid")
    out = model(torch.randint(3, 99, (3, 4)), use_cache=True)
    cache: PerformerCache = out.cache
    state = cache.layers[0].self_attention.kv.clone()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert torch.equal(cache.layers[0].self_attention.kv[0], state[2])
    assert torch.equal(cache.layers[0].self_attention.kv[2], state[0])
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.num_bytes() == 0
