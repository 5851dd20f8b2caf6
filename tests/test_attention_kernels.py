"""The causal kernel a layer runs, chosen once (modeling_performer.attention_kernels): its modes
are the variant's pure functions, the model-wide switches (`set_chunk_kernel`,
`set_sparse_cache_size`) give what a model built with those options gives, and bad options are
refused by name."""

import pytest
import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.attention import (
    CausalLinearKernel,
    causal_sparse_windowed_attention,
    causal_windowed_attention,
    recurrent_windowed_attention,
)

from .conftest import kernel_features

B, H, H_KV, T, D = 2, 4, 2, 11, 8


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k, v = (torch.randn(B, H_KV, T, D, generator=g) for _ in range(2))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    return q, k, v, mask


def test_the_modes_are_the_variants_functions():
    q, k, v, mask = inputs()
    w = kernel_features("hedgehog", H, H_KV, D, 2 * D, D, 0)
    weight = torch.full((H,), -0.3)
    kernel = CausalLinearKernel("hedgehog", window=3, chunk_size=4)
    out, state = kernel.chunked(q=q[:, :, :-1], k=k[:, :, :-1], v=v[:, :, :-1], feature_weights=w, linear_log_weight=weight,
                                key_padding_mask=mask[:, :-1])
    expected, expected_state = causal_windowed_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], w, "hedgehog", 3,
                                                         weight, mask[:, :-1], None, 4, None)
    assert torch.equal(out, expected)
    stepped, _ = kernel(q=q[:, :, -1:], k=k[:, :, -1:], v=v[:, :, -1:], feature_weights=w, linear_log_weight=weight,
                        key_padding_mask=mask[:, -1:], state=state)
    reference, _ = recurrent_windowed_attention(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], w, "hedgehog", 3, weight,
                                                mask[:, -1:], expected_state, False)
    assert torch.equal(stepped, reference)
    sparse = CausalLinearKernel("hedgehog", window=3, cache_size=2)
    assert sparse.variant == "sparse" and sparse.prefill == sparse.chunked
    out, _ = sparse(q=q, k=k, v=v, feature_weights=w, linear_log_weight=weight, key_padding_mask=mask)
    assert torch.equal(out, causal_sparse_windowed_attention(q, k, v, w, "hedgehog", 3, 2, weight, mask, None)[0])


def test_switching_the_sparse_cache_at_inference_is_building_with_it():
    options = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=37, feature_map="hedgehog", local_window=3, is_decoder=True)
    torch.manual_seed(0)
    built = PerformerForCausalLM(PerformerConfig(**options, sparse_cache_size=2)).eval()
    torch.manual_seed(0)
    switched = PerformerForCausalLM(PerformerConfig(**options)).eval()
    ids = torch.randint(3, 99, (2, 14), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        without = switched(ids).logits
        switched.set_sparse_cache_size(2)
        assert switched.config.sparse_cache_size == 2
        assert torch.equal(switched(ids).logits, built(ids).logits)
        assert not torch.equal(switched(ids).logits, without)  # the switch took effect
        assert torch.equal(switched.generate(ids, max_new_tokens=5, do_sample=False),
                           built.generate(ids, max_new_tokens=5, do_sample=False))
        switched.set_sparse_cache_size(0)
        assert torch.equal(switched(ids).logits, without)
    with pytest.raises(ValueError, match="negative"):
        switched.set_sparse_cache_size(-1)
    plain = PerformerForCausalLM(PerformerConfig(**{**options, "local_window": 0}))
    with pytest.raises(ValueError, match="local window"):
        plain.set_sparse_cache_size(4)


def test_a_sparse_cache_without_a_window_is_refused():
    with pytest.raises(ValueError, match="window"):
        CausalLinearKernel("hedgehog", window=0, cache_size=4)
