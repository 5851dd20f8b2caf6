"""The building blocks of a layer (`layers_performer`): rotary positions encode order and depend only
on offsets, their frequencies stay float32 through a cast of the model, and the decay gates start
spread and are computed from the keys."""

import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM, PerformerModel
from modeling_performer.layers_performer import decay_bias

from .conftest import tiny_config
from .helpers import decay_config


def test_rotary_positions_encode_order_and_depend_only_on_offsets():
    model = PerformerModel(tiny_config(attention_type="softmax")).eval()
    ids = torch.randint(3, 99, (1, 8))
    positions = torch.arange(8)[None]
    out = model(ids, position_ids=positions).last_hidden_state
    # Order matters: without positions an encoder would be permutation-equivariant.
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    permuted = model(ids[:, order], position_ids=positions).last_hidden_state
    assert (permuted - out[:, order]).abs().max() > 1e-3
    # Only offsets matter: every position moved by 17 gives the same outputs.
    torch.testing.assert_close(model(ids, position_ids=positions + 17).last_hidden_state, out, rtol=1e-4, atol=1e-5)


def test_rotary_frequencies_stay_float32_when_the_model_is_cast():
    """A converted model run in half precision rotates with the float32 frequencies it had: the
    cast computes them again instead of rounding them."""
    model = PerformerForCausalLM(PerformerConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=37,
                                                 position_embedding_type="rotary", norm_type="pre_rmsnorm"))
    rotary = model.model.decoder.rotary_emb
    before = rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.inv_freq, before)
    assert "model.decoder.rotary_emb.inv_freq" not in model.state_dict()


def test_gates_start_spread_and_are_computed_from_the_keys():
    config = decay_config("data", num_key_value_heads=4)
    gate = PerformerForCausalLM(config).model.decoder.layers[0].self_attn.decay
    rates = torch.nn.functional.softplus(gate.bias)
    assert torch.allclose(rates, torch.logspace(-4, -10, 4, base=2.0), rtol=1e-5)
    assert torch.equal(gate.weight, torch.zeros_like(gate.weight))
    key = torch.randn(1, 4, 5, config.head_dim)
    with torch.no_grad():
        gate.weight.normal_()
    log_decay = gate(key)
    assert log_decay.shape == (1, 4, 5) and (log_decay < 0).all()
    expected = -torch.nn.functional.softplus(torch.einsum("bhtd,hd->bht", key, gate.weight) + gate.bias[:, None])
    assert torch.allclose(log_decay, expected)
    assert torch.allclose(decay_bias(torch.tensor([1e-6, 0.5])), torch.log(torch.expm1(torch.tensor([1e-6, 0.5]))))
