"""Grouped-query attention (num_key_value_heads < num_attention_heads): every kernel against the
float64 reference and against multi-head attention over repeated keys; one state per key/value
head; the model's cache, generation and saving."""

import pytest
import torch

from modeling_performer import PerformerConfig, PerformerForCausalLM
from modeling_performer.attention import (
    causal_linear_attention,
    causal_windowed_attention,
    linear_attention,
    recurrent_linear_attention,
    recurrent_windowed_attention,
    softmax_attention,
    windowed_linear_attention,
)
from modeling_performer.reference_attention import (
    naive_linear_attention,
    naive_softmax_attention,
    naive_windowed_attention,
)

from .helpers import MAPS, KernelCase, relative_error

B, H, D, M, F, T = 2, 4, 16, 32, 8, 23
KV_HEADS = [2, 1]  # grouped (2 queries per key/value head) and multi-query


def case(kv_heads):
    """The kernel inputs with `kv_heads` key/value heads; row 1 left-padded by 5 tokens."""
    return KernelCase(B, H, kv_heads, D, M, F, right_pad=0, left_pad=5)


def features(feature_map, kv_heads, seed=0):
    return case(kv_heads).features(feature_map, seed)


def repeated(projection, feature_map, kv_heads):
    """The same features for multi-head attention over keys repeated for every query head."""
    if feature_map != "hedgehog":
        return projection
    return projection[0], projection[1].repeat_interleave(H // kv_heads, dim=0)


def qkv(kv_heads, length=T, seed=0):
    return case(kv_heads).qkv(length, seed)


def padding(length=T):
    return case(1).padding(length)


def expand(x, kv_heads):
    return x.repeat_interleave(H // kv_heads, dim=1)


def recurrent(step, q, k, v, mask, *args):
    outs, state = [], None
    for t in range(q.shape[2]):
        at = slice(t, t + 1)
        out, state = step(q[:, :, at], k[:, :, at], v[:, :, at], *args[:-1], mask[:, at], state)
        outs.append(out)
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("kv_heads", KV_HEADS, ids=["gqa", "mqa"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_linear_kernels_with_grouped_heads_equal_the_reference_and_keep_one_state_per_key_value_head(
        feature_map, kv_heads):
    w = features(feature_map, kv_heads)
    q, k, v = qkv(kv_heads)
    mask = padding()
    expected = naive_linear_attention(q, k, v, w, feature_map, mask, causal=True)
    chunked, state = causal_linear_attention(q, k, v, w, feature_map, mask, chunk_size=5)
    assert relative_error(chunked, expected, mask) < 1e-4
    assert state.kvz.shape[:2] == (B, kv_heads) and state.stabiliser.shape == (B, kv_heads)
    stepped, step_state = recurrent(recurrent_linear_attention, q, k, v, mask, w, feature_map, None)
    assert relative_error(stepped, chunked, mask) < 1e-4
    assert relative_error(step_state.kvz * torch.exp(step_state.stabiliser)[..., None, None],
                          state.kvz * torch.exp(state.stabiliser)[..., None, None]) < 1e-5
    bidirectional = linear_attention(q, k, v, w, feature_map, mask)
    assert relative_error(bidirectional, naive_linear_attention(q, k, v, w, feature_map, mask), mask) < 1e-4
    # The same as multi-head attention over repeated keys, values (and key maps)
    wide = repeated(w, feature_map, kv_heads)
    mha, _ = causal_linear_attention(q, expand(k, kv_heads), expand(v, kv_heads), wide, feature_map, mask,
                                     chunk_size=5)
    assert relative_error(chunked, mha, mask) < 1e-5


@pytest.mark.parametrize("kv_heads", KV_HEADS, ids=["gqa", "mqa"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_windowed_kernels_with_grouped_heads_equal_the_reference(feature_map, kv_heads):
    w = features(feature_map, kv_heads)
    q, k, v = qkv(kv_heads)
    mask = padding()
    weight = 0.5 * torch.randn(H, generator=torch.Generator().manual_seed(3))
    window = 4
    expected = naive_windowed_attention(q, k, v, w, feature_map, window, weight, mask, causal=True)
    chunked, state = causal_windowed_attention(q, k, v, w, feature_map, window, weight, mask, chunk_size=5)
    assert relative_error(chunked, expected, mask) < 1e-4
    assert state.kvz.shape[1] == kv_heads and state.keys.shape[:3] == (B, kv_heads, window)
    stepped, _ = recurrent(recurrent_windowed_attention, q, k, v, mask, w, feature_map, window, weight, None)
    assert relative_error(stepped, expected, mask) < 1e-4
    bidirectional = windowed_linear_attention(q, k, v, w, feature_map, window, weight, mask)
    assert relative_error(bidirectional, naive_windowed_attention(q, k, v, w, feature_map, window, weight, mask),
                          mask) < 1e-4
    mha, _ = causal_windowed_attention(q, expand(k, kv_heads), expand(v, kv_heads), repeated(w, feature_map, kv_heads),
                                       feature_map, window, weight, mask, chunk_size=5)
    assert relative_error(chunked, mha, mask) < 1e-5


@pytest.mark.parametrize("kv_heads", KV_HEADS, ids=["gqa", "mqa"])
def test_softmax_with_grouped_heads_equals_multi_head_over_repeated_keys(kv_heads):
    q, k, v = qkv(kv_heads)
    mask = padding()
    out = softmax_attention(q, k, v, mask, causal=True)
    assert relative_error(out, naive_softmax_attention(q, expand(k, kv_heads), expand(v, kv_heads), mask, True),
                          mask) < 1e-5
    assert relative_error(out, naive_softmax_attention(q, k, v, mask, True), mask) < 1e-5


def test_grouped_chunked_kernel_gradients_equal_the_reference():
    w = features("softmax", 2)
    q, k, v = (x.double().requires_grad_() for x in qkv(2, length=12))
    mask = padding(12)
    out, _ = causal_linear_attention(q, k, v, w, "softmax", mask, chunk_size=5)
    ref = naive_linear_attention(q, k, v, w, "softmax", mask, causal=True)
    grads = torch.autograd.grad((out * mask[:, None, :, None]).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * mask[:, None, :, None]).sum(), (q, k, v))
    for actual, expected in zip(grads, ref_grads):
        assert relative_error(actual, expected) < 1e-4


def test_kernels_refuse_query_heads_that_are_not_a_multiple_of_key_value_heads():
    q = torch.randn(1, 3, 4, D)
    k = v = torch.randn(1, 2, 4, D)
    with pytest.raises(ValueError, match="multiple of H_kv"):
        causal_linear_attention(q, k, v, features("softmax", 2))


def tiny(kv_heads, **options):
    values = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, intermediate_size=37, num_random_features=16, hidden_dropout_prob=0.0,
                  chunk_size=4, norm_type="pre_rmsnorm", hidden_act="swiglu", attention_bias=False, mlp_bias=False)
    values.update(options)
    return PerformerConfig(**values)


ATTENTIONS = {
    "favor": {},
    "hedgehog-W3": {"feature_map": "hedgehog", "local_window": 3},
    "softmax": {"attention_type": "softmax"},
}


@pytest.mark.parametrize("attention", ATTENTIONS, ids=list(ATTENTIONS))
def test_grouped_model_decodes_as_its_full_forward_with_a_cache_smaller_by_the_group_size(attention):
    torch.manual_seed(0)
    model = PerformerForCausalLM(tiny(2, **ATTENTIONS[attention])).eval()
    ids = torch.randint(5, 99, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        prefill = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        cache, steps = prefill.cache, [prefill.logits]
        for t in range(5, 9):
            out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
    assert torch.allclose(torch.cat(steps, dim=1)[mask.bool()], full[mask.bool()], atol=1e-4)
    # The same model with one key/value head per query head: the cache is H / H_kv times larger.
    torch.manual_seed(0)
    multi_head = PerformerForCausalLM(tiny(4, **ATTENTIONS[attention])).eval()
    with torch.no_grad():
        wide = multi_head(ids, attention_mask=mask, use_cache=True).cache
    shared = _shared_bytes(wide, attention)
    assert cache.num_bytes() > shared and wide.num_bytes() - shared == 2 * (cache.num_bytes() - shared)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(generated, reference)


def _shared_bytes(cache, attention):
    """Bytes of a cache that do not scale with the key/value heads (none: every tensor is per key/value
    head, except the [B, W] padding mask of a window buffer, shared by the heads)."""
    if attention.startswith("hedgehog-W"):
        return sum(layer.self_attention.key_mask.numel() * layer.self_attention.key_mask.element_size()
                   for layer in cache.layers)
    return 0


def test_grouped_hedgehog_maps_are_per_query_head_and_per_key_value_head(tmp_path):
    model = PerformerForCausalLM(tiny(1, feature_map="hedgehog"))
    maps = model.model.decoder.layers[0].self_attn.feature_map
    assert maps.query_weight.shape == (4, 8, 8) and maps.key_weight.shape == (1, 8, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = PerformerForCausalLM.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


@pytest.mark.parametrize("cross_attention_type", ["favor", "softmax"])
def test_grouped_encoder_decoder_generates_the_same_with_and_without_its_cache(cross_attention_type):
    from modeling_performer import PerformerForConditionalGeneration

    torch.manual_seed(0)
    config = tiny(2, is_encoder_decoder=True, cross_attention_type=cross_attention_type, feature_map="hedgehog",
                  local_window=2)
    model = PerformerForConditionalGeneration(config).eval()
    ids = torch.randint(5, 99, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    greedy = dict(max_new_tokens=5, do_sample=False)
    cached = model.generate(ids, attention_mask=mask, **greedy)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **greedy))
    beams = model.generate(ids, attention_mask=mask, num_beams=3, **greedy)
    assert torch.equal(beams, model.generate(ids, attention_mask=mask, num_beams=3, use_cache=False, **greedy))


def test_attention_transfer_fits_grouped_layers_against_their_teacher():
    from modeling_performer.transfer import attention_errors, transfer_attention

    torch.manual_seed(0)
    teacher = PerformerForCausalLM(tiny(2, attention_type="softmax")).eval()
    student = PerformerForCausalLM(tiny(2, feature_map="hedgehog", local_window=2))
    student.load_state_dict(teacher.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(1)

    def batch(step):
        ids = torch.randint(5, 99, (4, 16), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    probe = batch(0)
    before = attention_errors(teacher, student, probe)
    transfer_attention(teacher, student, batch, steps=30, learning_rate=3e-2, progress=False)
    after = attention_errors(teacher, student, probe)
    for layer, errors in after.items():
        # the mean-of-V baseline reads each query head's own group of values
        assert errors["mean_of_v"] == pytest.approx(before[layer]["mean_of_v"]) and errors["mean_of_v"] > 0
        assert errors["student"] < before[layer]["student"], (layer, before[layer], errors)
