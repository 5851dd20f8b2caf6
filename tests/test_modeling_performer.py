"""Core stack and heads: every option combination, save/load, Auto classes, errors."""


import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
)

from modeling_performer import (
    TASK_HEADS,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
    shift_tokens_right,
)
from modeling_performer.reference_attention import naive_softmax_attention

from .conftest import tiny_config
from .helpers import inputs_for

HEADS = TASK_HEADS


def _main_output(out, head):
    return out.last_hidden_state if head == "base" else out.logits


def run_and_check(model, head, **kwargs):
    """Runs a head and checks what must hold for every option: padding changes nothing for the
    real tokens, a causal LM never looks ahead, and one gradient step lowers the loss."""
    inputs = inputs_for(head, **kwargs)
    model.eval()
    out = model(**inputs)
    tensor = _main_output(out, head)
    assert torch.isfinite(tensor).all()
    # Row 1 is right-padded by two tokens: alone and unpadded it gives the same outputs.
    alone = {k: v[1:, :-2] if v.dim() == 2 and k != "labels" else v[1:] for k, v in inputs.items()}
    if head == "seq2seq":
        alone["labels"] = inputs["labels"][1:]
    alone.pop("attention_mask")
    trimmed = _main_output(model(**{k: v for k, v in alone.items() if k != "labels" or head == "seq2seq"}), head)
    reference = tensor[1:] if head in ("classification", "seq2seq") else tensor[1:, :-2]
    torch.testing.assert_close(trimmed, reference, rtol=1e-4, atol=1e-4)
    if head == "clm":  # changing the last token leaves every earlier position as it was
        changed = dict(inputs, input_ids=inputs["input_ids"].clone())
        changed["input_ids"][:, -1] = 3 + (changed["input_ids"][:, -1] - 2) % 96
        torch.testing.assert_close(_main_output(model(**changed), head)[:, :-1], tensor[:, :-1], rtol=1e-5, atol=1e-5)
    if head != "base":
        model.train()
        loss = model(**inputs).loss
        assert torch.isfinite(loss)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
            assert model(**inputs).loss < loss
    return out


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("attention_type", ["favor", "softmax", "hybrid"])
@pytest.mark.parametrize("norm_type", ["pre_layernorm", "post_layernorm", "rezero", "pre_scalenorm"])
def test_heads_attention_norms(head, attention_type, norm_type):
    attention = ["favor", "softmax"] if attention_type == "hybrid" else attention_type
    model = HEADS[head](tiny_config(attention_type=attention, norm_type=norm_type))
    run_and_check(model, head)


@pytest.mark.parametrize("head", ["mlm", "clm", "seq2seq"])
@pytest.mark.parametrize("hidden_act", ["gelu", "relu", "silu", "swiglu", "geglu", "reglu"])
@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_activations_and_positions(head, hidden_act, position):
    config = tiny_config(hidden_act=hidden_act, position_embedding_type=position)
    run_and_check(HEADS[head](config), head)


@pytest.mark.parametrize("options", [
    {"feature_map": "relu"},
    {"cross_attention_type": "favor"},
    {"projection_type": "iid"},
    {"type_vocab_size": 2},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_other_options(options):
    for head in ("clm", "seq2seq", "mlm"):
        run_and_check(HEADS[head](tiny_config(**options)), head)


def test_sequence_classification_problem_types_and_pooling():
    ids = torch.randint(3, 99, (3, 6))
    for pooling in ("cls", "mean"):
        model = PerformerForSequenceClassification(tiny_config(num_labels=1, classifier_pooling=pooling))
        assert model(ids, labels=torch.randn(3)).loss.item() > 0
        model = PerformerForSequenceClassification(tiny_config(num_labels=4, classifier_pooling=pooling))
        assert model(ids, labels=torch.tensor([0, 3, 1])).loss.item() > 0
        model = PerformerForSequenceClassification(tiny_config(num_labels=4, problem_type="multi_label_classification"))
        assert model(ids, labels=torch.randint(0, 2, (3, 4)).float()).loss.item() > 0


def test_mean_pooling_ignores_padding():
    model = PerformerForSequenceClassification(tiny_config(classifier_pooling="mean")).eval()
    ids = torch.randint(3, 99, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    assert torch.allclose(model(ids).logits, model(padded, attention_mask=mask).logits, atol=1e-5)


@pytest.mark.parametrize("head", HEADS)
def test_tuple_outputs_and_hidden_states(head):
    model = HEADS[head](tiny_config()).eval()
    kwargs = inputs_for(head)
    out = model(**kwargs, output_hidden_states=True)
    hidden = out.hidden_states if head not in ("seq2seq",) else out.decoder_hidden_states
    if head == "base":
        hidden = out.hidden_states
    assert hidden is not None and len(hidden) == 3
    as_tuple = model(**kwargs, return_dict=False)
    first = out.to_tuple()[0]
    assert torch.equal(as_tuple[0], first)


# ------------------------------------------------------------------------------------------
# save / load


# ------------------------------------------------------------------------------------------
# exact softmax path against a hand-written reference


def reference_stack(model: PerformerModel, input_ids, causal):
    """Post-LN, learned positions, GELU: a plain re-implementation with naive softmax."""
    emb = model.embeddings
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))
    for layer in (model.decoder if causal else model.encoder).layers:
        att = layer.self_attn
        b, t, c = x.shape

        def heads(y):
            return y.view(b, t, att.num_heads, att.head_dim).transpose(1, 2)

        a = naive_softmax_attention(heads(att.q_proj(x)), heads(att.k_proj(x)), heads(att.v_proj(x)), causal=causal)
        x = layer.self_attn_residual.norm(x + att.o_proj(a.transpose(1, 2).reshape(b, t, c)))
        x = layer.mlp_residual.norm(x + layer.mlp.down_proj(torch.nn.functional.gelu(layer.mlp.up_proj(x))))
    return x


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_softmax_stack_matches_reference(is_decoder):
    config = tiny_config(attention_type="softmax", norm_type="post_layernorm", position_embedding_type="learned",
                         is_decoder=is_decoder)
    model = PerformerModel(config).eval()
    ids = torch.randint(3, 99, (2, 9))
    expected = reference_stack(model, ids, causal=is_decoder)
    torch.testing.assert_close(model(ids).last_hidden_state, expected, rtol=1e-5, atol=1e-5)


def test_softmax_seq2seq_matches_reference():
    config = tiny_config(attention_type="softmax", norm_type="post_layernorm", position_embedding_type="learned",
                         is_encoder_decoder=True)
    model = PerformerModel(config).eval()
    src, tgt = torch.randint(3, 99, (2, 8)), torch.randint(3, 99, (2, 5))
    encoded = model.encode(src).last_hidden_state
    # Encoder: the same reference as the encoder-only model.
    shim = type("Shim", (), {"embeddings": model.embeddings, "encoder": model.encoder})
    torch.testing.assert_close(encoded, reference_stack(shim, src, False), rtol=1e-5, atol=1e-5)
    # Decoder: self-attention (causal), cross-attention, MLP, each post-LN.
    emb = model.embeddings
    x = emb.LayerNorm(emb.word_embeddings(tgt) + emb.position_embeddings(torch.arange(5).unsqueeze(0)))
    for layer in model.decoder.layers:
        b, t, c = x.shape

        def heads(y, n):
            return y.view(b, n, 4, c // 4).transpose(1, 2)

        sa, ca = layer.self_attn, layer.cross_attn
        a = naive_softmax_attention(heads(sa.q_proj(x), t), heads(sa.k_proj(x), t), heads(sa.v_proj(x), t), causal=True)
        x = layer.self_attn_residual.norm(x + sa.o_proj(a.transpose(1, 2).reshape(b, t, c)))
        a = naive_softmax_attention(heads(ca.q_proj(x), t), heads(ca.k_proj(encoded), 8), heads(ca.v_proj(encoded), 8))
        x = layer.cross_attn_residual.norm(x + ca.o_proj(a.transpose(1, 2).reshape(b, t, c)))
        x = layer.mlp_residual.norm(x + layer.mlp.down_proj(torch.nn.functional.gelu(layer.mlp.up_proj(x))))
    out = model(src, decoder_input_ids=tgt, use_cache=False).last_hidden_state
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# transformers conventions


def test_tied_embeddings_and_resize():
    model = PerformerForCausalLM(tiny_config())
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()
    model.resize_token_embeddings(120)
    assert model.lm_head.weight.shape[0] == 120 and model.config.vocab_size == 120
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.word_embeddings.weight.data_ptr()
    assert model(torch.tensor([[110, 5, 7]])).logits.shape == (1, 3, 120)
    mlm = PerformerForMaskedLM(tiny_config())
    assert mlm.lm_head.decoder.weight.data_ptr() == mlm.model.embeddings.word_embeddings.weight.data_ptr()


def test_gradient_checkpointing_gives_same_gradients():
    config = tiny_config()
    model = PerformerForCausalLM(config)
    kwargs = inputs_for("clm")
    model(**kwargs).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    model.config.hidden_dropout_prob = 0.0
    model(**kwargs).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_dtype_loading(tmp_path):
    PerformerForCausalLM(tiny_config()).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    logits = model(torch.randint(3, 99, (2, 6))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_loss_honours_num_items_in_batch():
    model = PerformerForCausalLM(tiny_config()).eval()
    kwargs = inputs_for("clm")
    tokens = (kwargs["labels"][:, 1:] != -100).sum()
    mean = model(**kwargs).loss
    summed = model(**kwargs, num_items_in_batch=tokens * 4).loss
    torch.testing.assert_close(summed * 4, mean)


def test_seq2seq_labels_are_not_shifted_twice():
    model = PerformerForConditionalGeneration(tiny_config()).eval()
    src, labels = torch.randint(3, 99, (2, 6)), torch.randint(3, 99, (2, 5))
    out = model(src, labels=labels)
    decoder_inputs = shift_tokens_right(labels, 0, model.config.decoder_start_token_id)
    assert decoder_inputs[0, 0] == model.config.decoder_start_token_id
    assert torch.equal(decoder_inputs[:, 1:], labels[:, :-1])
    logits = model(src, decoder_input_ids=decoder_inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 99), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)


# ------------------------------------------------------------------------------------------
# errors


# ------------------------------------------------------------------------------------------
# positions and decoders with cross-attention


@pytest.mark.parametrize("cross_attention_type", ["softmax", "favor"])
def test_decoder_with_cross_attention_reads_the_encoder_states_and_caches(cross_attention_type):
    config = tiny_config(add_cross_attention=True, cross_attention_type=cross_attention_type)
    model = PerformerForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(2, 6, config.hidden_size, generator=g)
    memory_mask = torch.ones(2, 6, dtype=torch.long)
    memory_mask[1, -2:] = 0
    ids = torch.randint(3, 99, (2, 5), generator=g)
    full = model(ids, encoder_hidden_states=memory, encoder_attention_mask=memory_mask, use_cache=False).logits
    # The encoder states are read ...
    other = model(ids, encoder_hidden_states=memory + 1.0, encoder_attention_mask=memory_mask, use_cache=False).logits
    assert (other - full).abs().max() > 1e-3
    # ... except where masked,
    hidden = memory.clone()
    hidden[1, -2:] = 100.0
    masked = model(ids, encoder_hidden_states=hidden, encoder_attention_mask=memory_mask, use_cache=False).logits
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)
    # ... and a prefill plus token-by-token steps with the cache give the full forward.
    out = model(ids[:, :2], encoder_hidden_states=memory, encoder_attention_mask=memory_mask, use_cache=True)
    steps = [out.logits]
    for t in range(2, 5):
        out = model(ids[:, t:t + 1], cache=out.cache, encoder_attention_mask=memory_mask, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_stacks_are_named_by_what_they_hold_and_the_encoder_is_a_real_submodule():
    causal = PerformerForCausalLM(tiny_config())
    assert causal.model.encoder is None and len(causal.model.decoder.layers) == 2
    mlm = PerformerForMaskedLM(tiny_config())
    assert mlm.model.decoder is None and len(mlm.model.encoder.layers) == 2
    seq2seq = PerformerForConditionalGeneration(tiny_config()).eval()
    encoder = seq2seq.get_encoder()
    assert encoder is seq2seq.model.encoder and dict(seq2seq.named_modules())["model.encoder"] is encoder
    src = torch.randint(3, 99, (2, 6))
    torch.testing.assert_close(encoder(input_ids=src).last_hidden_state,
                               seq2seq.model.encode(src).last_hidden_state, rtol=0, atol=0)
