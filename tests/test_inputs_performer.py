"""What a model is given, checked before anything runs (`inputs_performer`): token ids, masks, positions,
embeddings, labels and the cache argument, each refused with a message that names the problem and
the fix; value checks run where they cost no device sync; a head that cannot generate says which can."""

import pytest
import torch

from modeling_performer import (
    PerformerCache,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
)

from .conftest import tiny_config
from .helpers import causal_lm

IDS = torch.tensor([[5, 6, 7]])


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m(torch.tensor([[5.0, 6.0]])), ValueError, "integer token ids"),
    (lambda m: m(inputs_embeds=torch.zeros(1, 3, 31)), ValueError, "hidden_size=32"),
    (lambda m: m(IDS, attention_mask=torch.tensor([[1, 0.5, 1]])), ValueError, "1 \\(attend\\) and 0"),
    (lambda m: m(IDS, attention_mask=torch.ones(1, 3, dtype=torch.complex64)), ValueError, "dtype"),
    (lambda m: m(IDS, attention_mask=torch.ones(3)), ValueError, "not understood"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, 1]])), ValueError, "position_ids has shape"),
    (lambda m: m(IDS, position_ids=torch.tensor([[0, -1, 2]])), ValueError, "position_ids must be >= 0"),
    (lambda m: m(torch.zeros(0, 3, dtype=torch.long)), ValueError, "Empty input"),
    (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), ValueError, "Empty input"),
    (lambda m: m(IDS, labels=torch.tensor([[5, 6, 300]])), ValueError, "labels must be in \\[0, 99\\)"),
    (lambda m: m(IDS, cache="not a cache"), TypeError, "PerformerCache"),
])
def test_bad_inputs_name_the_problem(call, error, match):
    with pytest.raises(error, match=match):
        call(PerformerForCausalLM(tiny_config()).eval())


def test_bad_inputs_of_the_other_heads():
    mlm = PerformerForMaskedLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="labels must have shape"):
        mlm(IDS, labels=torch.tensor([[1, 2]]))
    classifier = PerformerForSequenceClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(ValueError, match="labels of shape \\(1,\\)"):
        classifier(IDS, labels=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="labels must be in \\[0, 3\\)"):
        classifier(IDS, labels=torch.tensor([5]))
    typed = PerformerModel(tiny_config(type_vocab_size=2))
    with pytest.raises(ValueError, match="type_vocab_size=2"):
        typed(IDS, token_type_ids=torch.tensor([[0, 1, 2]]))
    untyped = PerformerModel(tiny_config())
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        untyped(IDS, token_type_ids=torch.tensor([[0, 1, 1]]))
    seq2seq = PerformerForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="decoder_input_ids \\(or labels"):
        seq2seq(IDS)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        seq2seq(IDS, attention_mask=torch.ones(1, 4), decoder_input_ids=IDS)


def test_value_checks_run_where_they_cost_no_device_sync_unless_asked(monkeypatch):
    """Checks that read values run on CPU tensors by default, on accelerators only under the debug
    setting, and nowhere when it is switched off (shape checks always run)."""
    from modeling_performer.inputs_performer import VALUE_CHECKS_ENV, checking_values

    monkeypatch.delenv(VALUE_CHECKS_ENV, raising=False)
    assert checking_values(torch.device("cpu")) and not checking_values(torch.device("cuda"))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "1")
    assert checking_values(torch.device("cuda")) and checking_values(torch.device("cpu"))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "0")
    assert not checking_values(torch.device("cpu"))
    model = PerformerForCausalLM(tiny_config()).eval()
    half_mask = torch.tensor([[1, 0.5, 1]])
    model(IDS, attention_mask=half_mask)  # not read: treated as a boolean mask
    with pytest.raises(ValueError, match="not understood"):
        model(IDS, attention_mask=torch.ones(3))
    monkeypatch.setenv(VALUE_CHECKS_ENV, "1")
    with pytest.raises(ValueError, match="1 \\(attend\\) and 0"):
        model(IDS, attention_mask=half_mask)


@pytest.mark.parametrize("head", [PerformerModel, PerformerForMaskedLM, PerformerForSequenceClassification])
def test_generate_on_a_head_that_cannot_generate(head):
    model = head(tiny_config())
    assert not model.can_generate()
    with pytest.raises(TypeError, match="cannot generate text: load the checkpoint with PerformerForCausalLM"):
        model.generate(IDS)


def test_bad_inputs():
    model = PerformerForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, 99]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.tensor([[5, -1]]))
    with pytest.raises(ValueError, match="FAVOR"):
        model(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="Empty input"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6]]))
    learned = PerformerForCausalLM(tiny_config(position_embedding_type="learned", max_position_embeddings=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        learned(torch.randint(3, 99, (1, 9)))
    seq2seq = PerformerForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="decoder_input_ids"):
        seq2seq(torch.randint(3, 99, (1, 4)))
    mlm = PerformerForMaskedLM(tiny_config())
    with pytest.raises(TypeError, match="atention_mask"):
        mlm(torch.tensor([[5, 6, 7]]), atention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="output_attentions"):
        mlm(torch.tensor([[5, 6, 7]]), output_attentions=True)


def test_general_mask_allowed_for_softmax_layers():
    model = PerformerModel(tiny_config(attention_type="softmax")).eval()
    ids = torch.randint(3, 99, (1, 4))
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None]
    decoder = PerformerModel(tiny_config(attention_type="softmax", is_decoder=True)).eval()
    decoder.load_state_dict({k.replace("encoder.", "decoder."): v for k, v in model.state_dict().items()})
    torch.testing.assert_close(model(ids, attention_mask=causal).last_hidden_state, decoder(ids).last_hidden_state)


def test_past_key_values_name_is_refused():
    model = causal_lm("favor")
    with pytest.raises(TypeError, match="cache="):
        model(torch.tensor([[4, 5]]), past_key_values=PerformerCache())
    state = model(torch.tensor([[4, 5]]), use_cache=True).cache
    with pytest.raises(TypeError, match="past_key_value= holds a decoding state.*cache="):  # any other name too
        model(torch.tensor([[6]]), past_key_value=state)
    legacy = tuple((torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8)) for _ in range(2))  # a pre-Cache tuple
    with pytest.raises(TypeError, match="cache="):
        model(torch.tensor([[6]]), past_key_values=legacy)
