"""torch.compile(fullgraph=True) and ONNX export (dynamo, dynamic batch and length) of the heads:
no graph breaks, same outputs as eager."""

import numpy as np
import pytest
import torch

from modeling_performer import (
    TASK_HEADS,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForSequenceClassification,
)
from modeling_performer.attention import causal_linear_attention
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix

from .conftest import tiny_config

HEADS = list(TASK_HEADS.values())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(head, batch=2, length=9):
    ids = torch.randint(3, 99, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0  # left padding in the first row
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if head is PerformerForConditionalGeneration:
        kwargs["decoder_input_ids"] = ids[:, :6]
    if head in (PerformerForCausalLM, PerformerForConditionalGeneration):
        kwargs["use_cache"] = False
    return kwargs


@pytest.mark.parametrize("head", HEADS, ids=lambda h: h.__name__)
def test_compiled_forward_has_no_graph_break_and_matches_eager(head):
    model = head(tiny_config(num_labels=3)).eval()  # chunk_size 4: 9 tokens are 3 chunks
    kwargs = inputs(head)
    with torch.no_grad():
        eager = model(**kwargs)[0]
        compiled = torch.compile(model, fullgraph=True)(**kwargs)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decay", [None, "data"], ids=["additive", "decay"])
def test_compiled_causal_hedgehog_with_window_matches_eager(decay):
    model = PerformerForCausalLM(tiny_config(feature_map="hedgehog", local_window=3, linear_decay=decay)).eval()
    kwargs = inputs(PerformerForCausalLM, length=11)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(**kwargs).logits, model(**kwargs).logits,
                                   rtol=1e-5, atol=1e-5)


def test_compiled_chunk_carry_equals_the_eager_loop_from_a_nonempty_state():
    # Compiled graphs carry the state across chunks in one product instead of a loop over chunks.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) * 2 for _ in range(3))
    projection = gaussian_orthogonal_random_matrix(16, 8, g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :3] = False
    _, state = causal_linear_attention(q, k * 3, v, projection, "softmax", mask, None, 4)  # larger maxima first
    args = (q, k, v, projection, "softmax", mask, state, 3)
    eager_out, eager_state = causal_linear_attention(*args)
    out, new_state = torch.compile(causal_linear_attention, fullgraph=True)(*args)
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(new_state, eager_state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        extra = {"use_cache": False} if isinstance(self.model, PerformerForCausalLM) else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


@pytest.mark.parametrize("window", [0, 3], ids=["favor", "hedgehog-window"])
@pytest.mark.parametrize("head", [PerformerForSequenceClassification, PerformerForCausalLM], ids=lambda h: h.__name__)
def test_onnx_export_with_dynamic_batch_and_length_runs_in_onnxruntime(tmp_path, head, window):
    onnxruntime = pytest.importorskip("onnxruntime")
    options = {}
    if window:  # traced on 3 tokens, all inside the window: the graph must still serve the longer inputs
        options = {"feature_map": "hedgehog", "local_window": window, "hedgehog_key_scale": True}
        if head is PerformerForSequenceClassification:
            options["sink_tokens"] = 1
    wrapper = _Logits(head(tiny_config(num_labels=3, **options)).eval())
    dynamic = torch.export.Dim.DYNAMIC
    kwargs = inputs(head, length=3 if window else 9)
    path = tmp_path / "model.onnx"
    torch.onnx.export(wrapper, (kwargs["input_ids"], kwargs["attention_mask"]), str(path), dynamo=True,
                      dynamic_shapes=({0: dynamic, 1: dynamic}, {0: dynamic, 1: dynamic}))
    session = onnxruntime.InferenceSession(str(path))
    for batch, length in ((3, 13), (1, 4), (2, 7)):  # other shapes than the traced one
        other = inputs(head, batch, length)
        got = session.run(None, {"input_ids": other["input_ids"].numpy(),
                                 "attention_mask": other["attention_mask"].numpy()})[0]
        expected = wrapper(other["input_ids"], other["attention_mask"]).detach().numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [{}, {"feature_map": "hedgehog", "local_window": 3},
                                     {"feature_map": "hedgehog", "local_window": 3, "linear_decay": "data"}],
                         ids=["favor", "hedgehog-window", "hedgehog-window-decay"])
def test_generate_with_a_compiled_decoding_step_gives_the_eager_tokens(options):
    from transformers import CompileConfig

    model = PerformerForCausalLM(tiny_config(**options)).eval()
    ids = torch.randint(3, 99, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    eager = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    compile_config = CompileConfig(fullgraph=True, mode="default")
    compile_config._compile_all_devices = True  # transformers compiles on CPU only when asked to
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                              compile_config=compile_config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the step really was compiled
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("options", [{"feature_map": "hedgehog", "local_window": 3, "num_key_value_heads": 1},
                                     {"num_key_value_heads": 1}], ids=["hedgehog-window-grouped", "favor-grouped"])
def test_compiled_decoding_step_compiles_once_for_every_later_step_and_equals_eager(options):
    """The decoding state keeps one layout from the prefill on (no strided views of the prefill's
    tensors), so a step compiled with symbolic shapes serves every later position without recompiling."""
    model = PerformerForCausalLM(tiny_config(**options)).eval()
    ids = torch.randint(3, 99, (2, 11))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        eager_cache = model(input_ids=ids, use_cache=True).cache
        compiled_cache = model(input_ids=ids, use_cache=True).cache
        token = torch.randint(3, 99, (2, 1))
        torch._dynamo.utils.counters.clear()
        for _ in range(5):
            expected = model(input_ids=token, cache=eager_cache, use_cache=True).logits
            got = compiled(input_ids=token, cache=compiled_cache, use_cache=True).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
