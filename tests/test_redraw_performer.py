"""Random projections redrawn during training (`redraw_performer`): a redraw counts optimizer steps,
not forwards, is the same for the same seed and draw count, and a projection missing from a saved
folder is rebuilt exactly from them (or refused when the count is missing too)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_performer import PerformerForCausalLM

from .conftest import tiny_config
from .helpers import drop_weights


def test_projection_redraw_counts_optimizer_steps_not_forwards():
    config = tiny_config(feature_redraw_interval=2)
    model = PerformerForCausalLM(config).train()
    first = model.model.decoder.layers[0].self_attn.projection.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model.redraw_on_steps(optimizer)
    ids = torch.randint(3, 99, (1, 5))
    for _ in range(3):  # three accumulated micro-batches, one step
        model(ids, labels=ids).loss.backward()
    assert torch.equal(model.model.decoder.layers[0].self_attn.projection, first)
    optimizer.step()
    assert torch.equal(model.model.decoder.layers[0].self_attn.projection, first)
    model.eval()
    model(ids)
    optimizer.step()  # second optimizer step: redraw (eval forwards never redraw by themselves)
    redrawn = model.model.decoder.layers[0].self_attn.projection.clone()
    assert not torch.equal(redrawn, first) and int(model.model.redraw_state.draws) == 1
    twin = PerformerForCausalLM(config)
    twin.redraw_projections(draw=1)
    assert torch.equal(twin.model.decoder.layers[0].self_attn.projection, redrawn)
    other_layer = model.model.decoder.layers[1].self_attn.projection
    assert not torch.equal(other_layer, redrawn)


def test_a_missing_projection_is_rebuilt_exactly_from_the_seed_and_draw_count(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    model.redraw_projections()
    model.redraw_projections()  # draw 2: the default initialisation (draw 0) would differ
    model.save_pretrained(tmp_path)
    dropped = drop_weights(tmp_path, "self_attn.projection")
    assert len(dropped) == model.config.num_hidden_layers
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_projection_and_draw_count_beside_trained_weights_are_refused(saved):
    _, folder = saved
    drop_weights(folder, "self_attn.projection", "redraw_state.draws")
    with pytest.raises(ValueError, match="neither the random projections .* nor the draw count"):
        AutoModelForCausalLM.from_pretrained(folder)
