"""Hedgehog key maps with a learned per-key scale (`hedgehog_key_scale`): every kernel path against
the float64 reference, prefill + decoding against the full forward, a zero scale column against the
plain map, the model's saving and generation, and the configurations that are refused."""

import torch

from modeling_performer import PerformerForCausalLM, PerformerForMaskedLM
from modeling_performer.attention import (
    causal_linear_attention,
    causal_sparse_windowed_attention,
    causal_windowed_attention,
    linear_attention,
    windowed_linear_attention,
)
from modeling_performer.feature_maps import hedgehog_init, hedgehog_key_init
from modeling_performer.reference_attention import (
    naive_linear_attention,
    naive_sparse_windowed_attention,
    naive_windowed_attention,
)

from .conftest import assert_equivalent, max_error, perturbed
from .helpers import KernelCase, run_recurrent_window as run_recurrent
from .helpers import sink_tiny_config as sink_config

CASE = KernelCase(2, 3, 3, 16, 32, 8, right_pad=4, stacked=True)  # the window tests' kernel inputs
log_weight, padding = CASE.log_weight, CASE.padding

B, H, H_KV, D, F, T = 2, 4, 2, 16, 8, 37


def scaled_maps(seed=0, scale=1.0):
    """Query maps [H, D, F] and key maps with a scale column [H_kv, D, F + 1], off their init."""
    g = torch.Generator().manual_seed(seed)
    query = hedgehog_init(H, D, F)[0] + 0.3 * torch.randn(H, D, F, generator=g)
    key = hedgehog_key_init(H_KV, D, F, key_scale=True) + 0.3 * torch.randn(H_KV, D, F + 1, generator=g)
    key[..., -1] *= scale
    return query, key


def grouped_qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g), torch.randn(B, H_KV, T, D, generator=g),
            torch.randn(B, H_KV, T, D, generator=g))


def test_every_path_equals_reference():
    q, k, v = grouped_qkv()
    maps, mask, weight = scaled_maps(), padding(T), log_weight(seed=3).repeat(2)[:H]
    real = mask[:, None, :, None]
    checks = {
        "linear": (linear_attention(q, k, v, maps, "hedgehog", mask),
                   naive_linear_attention(q, k, v, maps, "hedgehog", mask)),
        "causal linear": (causal_linear_attention(q, k, v, maps, "hedgehog", mask, chunk_size=4)[0],
                          naive_linear_attention(q, k, v, maps, "hedgehog", mask, causal=True)),
        "window": (windowed_linear_attention(q, k, v, maps, "hedgehog", 5, weight, mask),
                   naive_windowed_attention(q, k, v, maps, "hedgehog", 5, weight, mask)),
        "window + sinks": (windowed_linear_attention(q, k, v, maps, "hedgehog", 5, weight, mask, sink_tokens=2),
                           naive_windowed_attention(q, k, v, maps, "hedgehog", 5, weight, mask, sink_tokens=2)),
        "causal window": (causal_windowed_attention(q, k, v, maps, "hedgehog", 5, weight, mask, chunk_size=4)[0],
                          naive_windowed_attention(q, k, v, maps, "hedgehog", 5, weight, mask, causal=True)),
        "recurrent window": (run_recurrent(q, k, v, maps, "hedgehog", 5, weight, mask)[0],
                             naive_windowed_attention(q, k, v, maps, "hedgehog", 5, weight, mask, causal=True)),
        "sparse cache": (causal_sparse_windowed_attention(q, k, v, maps, "hedgehog", 5, 3, weight, mask)[0],
                         naive_sparse_windowed_attention(q, k, v, maps, "hedgehog", 5, 3, weight, mask)),
    }
    for name, (out, expected) in checks.items():
        assert max_error(out * real, expected * real) < 1e-5, name


def test_zero_scale_column_is_the_plain_map_and_a_scale_changes_it():
    q, k, v = grouped_qkv(seed=1)
    query, key = scaled_maps(seed=1)
    mask, weight = padding(T), torch.zeros(H)
    plain = windowed_linear_attention(q, k, v, (query, key[..., :F]), "hedgehog", 5, weight, mask)
    zero = torch.cat([key[..., :F], torch.zeros(H_KV, D, 1)], dim=-1)
    # A zero column is a different matmul shape: equal up to rounding, not bitwise.
    assert_equivalent(windowed_linear_attention(q, k, v, (query, zero), "hedgehog", 5, weight, mask), plain)
    scaled = windowed_linear_attention(q, k, v, (query, key), "hedgehog", 5, weight, mask)
    assert max_error(scaled * mask[:, None, :, None], plain * mask[:, None, :, None]) > 1e-2


def test_large_scales_stay_finite():
    """The scale is bounded (exp(16 tanh(s / 16))): keys with huge k.u cannot overflow the state."""
    q, k, v = grouped_qkv(seed=2)
    maps = scaled_maps(seed=2, scale=1e4)
    out, _ = causal_windowed_attention(q, k, v, maps, "hedgehog", 5, torch.zeros(H), chunk_size=4)
    assert torch.isfinite(out).all()
    assert max_error(out, naive_windowed_attention(q, k, v, maps, "hedgehog", 5, torch.zeros(H), causal=True)) < 1e-4


def tiny_config(**overrides):
    """test_sinks' model with key scales and no sink (a causal LM refuses sinks)."""
    return sink_config(**{"hedgehog_key_scale": True, "sink_tokens": 0, "chunk_size": 4, **overrides})


def test_fresh_model_starts_as_the_plain_map():
    scaled = PerformerForMaskedLM(tiny_config()).eval()
    key = scaled.model.encoder.layers[0].self_attn.feature_map.key_weight
    assert key.shape == (2, 8, 9) and torch.equal(key[..., -1], torch.zeros(2, 8))
    plain = PerformerForMaskedLM(tiny_config(hedgehog_key_scale=False)).eval()
    state = {name: (t[..., :-1] if name.endswith("key_weight") else t) for name, t in scaled.state_dict().items()}
    plain.load_state_dict(state)
    ids = torch.randint(3, 99, (2, 15), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_equivalent(scaled(ids).logits, plain(ids).logits)


def test_causal_lm_generates_the_same_with_its_cache_and_saves_exactly(tmp_path):
    model = perturbed(PerformerForCausalLM(tiny_config())).eval()
    assert model.model.decoder.layers[0].self_attn.feature_map.key_weight[..., -1].abs().sum() > 0
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, **settings)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    model.save_pretrained(tmp_path)
    loaded = PerformerForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.hedgehog_key_scale is True
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
