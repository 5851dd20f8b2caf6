"""Core stack and heads: every option combination, save/load, Auto classes, errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from modeling_performer import (
    PerformerConfig,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
    TASK_HEADS,
    shift_tokens_right,
)
from modeling_performer.reference_attention import naive_softmax_attention

from .conftest import tiny_config
from .helpers import run_remote

HEADS = TASK_HEADS
AUTO = {
    "base": AutoModel,
    "mlm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
    "clm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
}


def inputs_for(head, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0  # right padding in the second row
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if head in ("mlm", "clm", "seq2seq"):
        kwargs["labels"] = ids.masked_fill(mask == 0, -100)
    if head == "classification":
        kwargs["labels"] = torch.tensor([0, 1])
    return kwargs


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


@pytest.mark.parametrize("head", HEADS)
def test_save_load_through_auto_classes(head, tmp_path):
    model = HEADS[head](tiny_config(attention_type=["favor", "softmax"])).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", *[a.__name__ for a in AUTO.values()]}
    assert (tmp_path / "model.safetensors").exists()
    loaded = AUTO[head].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    kwargs = {k: v for k, v in inputs_for(head).items() if k != "labels"}
    if head == "seq2seq":
        kwargs["decoder_input_ids"] = kwargs["input_ids"]
    a, b = model(**kwargs), loaded(**kwargs)
    key = "last_hidden_state" if head == "base" else "logits"
    assert torch.equal(a[key], b[key])
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PerformerConfig)


@pytest.mark.parametrize("head", ["mlm", "classification", "clm"])
def test_base_checkpoint_loads_into_heads(head, tmp_path):
    base = PerformerModel(tiny_config())
    base.save_pretrained(tmp_path)
    model, info = HEADS[head].from_pretrained(tmp_path, output_loading_info=True)
    missing = set(info["missing_keys"])
    expected_prefix = {"mlm": "lm_head.", "classification": ("dense.", "classifier."), "clm": "lm_head."}[head]
    assert all(k.startswith(expected_prefix) for k in missing), missing
    assert not info["unexpected_keys"]
    loaded = model.model.state_dict()
    for name, tensor in base.state_dict().items():
        if head == "clm":  # the bidirectional stack's weights start the causal one
            name = name.replace("encoder.", "decoder.")
        assert torch.equal(loaded[name], tensor), name


def test_seq2seq_base_checkpoint_loads_into_head(tmp_path):
    base = PerformerModel(tiny_config(is_encoder_decoder=True))
    base.save_pretrained(tmp_path)
    model, info = PerformerForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["unexpected_keys"]
    assert all(k.startswith("lm_head.") for k in info["missing_keys"]), info["missing_keys"]


def test_remote_code_round_trip_without_the_package(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    for name in ("modeling_performer.py", "configuration_performer.py", "attention.py", "feature_maps.py",
                 "cache_performer.py"):
        assert (folder / name).exists(), name
    ids = torch.randint(3, 99, (2, 6))
    reference = tmp_path / "reference.pt"
    torch.save({"ids": ids, "logits": model(ids).logits,
                "generated": model.generate(ids, max_new_tokens=5, do_sample=False)}, reference)
    run_remote(folder, reference, "AutoModelForCausalLM", tmp_path)


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


# ------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("bad,match", [
    ({"hidden_size": 30}, "divisible"),
    ({"attention_type": "sparse"}, "valid values"),
    ({"norm_type": "batchnorm"}, "valid values"),
    ({"hidden_act": "tanh"}, "valid values"),
    ({"feature_map": "cosine"}, "valid values"),
    ({"attention_tpye": "favor"}, "Unknown PerformerConfig key"),
    ({"attention_type": ["favor"]}, "one entry per layer"),
    ({"num_random_features": 0}, "positive"),
])
def test_invalid_configs(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**bad)


def test_invalid_config_file(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["hidden_sise"] = 64
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'hidden_sise'.*did you mean 'hidden_size'"):
        AutoConfig.from_pretrained(tmp_path)
    # An attribute someone set on the config before saving is kept, never dropped.
    data = {k: v for k, v in data.items() if k != "hidden_sise"} | {"experiment_note": "run 3"}
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert AutoConfig.from_pretrained(tmp_path).experiment_note == "run 3"
    with pytest.raises(ValueError, match="experiment_note"):
        PerformerConfig(experiment_note="run 3")  # typed into the constructor: refused


def test_aliases():
    config = PerformerConfig(d_model=64, num_layers=3, num_heads=8, activation="relu", nb_features=32,
                             attention_type="causal_linear")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.hidden_act,
            config.num_random_features, config.attention_type) == (64, 3, 8, "relu", 32, "favor")


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


# ------------------------------------------------------------------------------------------
# positions and decoders with cross-attention


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


def test_checkpoints_of_the_causal_stack_under_its_earlier_name_still_load(tmp_path):
    model = PerformerForCausalLM(tiny_config()).eval()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(k.startswith("model.decoder.layers.") for k in weights)
    earlier = {k.replace("model.decoder.", "model.encoder."): v for k, v in weights.items()}
    save_file(earlier, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded, info = PerformerForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
