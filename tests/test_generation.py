"""generate() with the recurrent cache: cached == uncached, prefill + decode == full forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_performer import PerformerForCausalLM, PerformerForConditionalGeneration

from .conftest import tiny_config
from .helpers import ATTENTION, causal_lm


def seq2seq(attention, **overrides):
    return PerformerForConditionalGeneration(tiny_config(attention_type=ATTENTION[attention], **overrides)).eval()


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_prefill_then_decode_equals_full_forward_causal_lm(attention, position):
    model = causal_lm(attention, position_embedding_type=position)
    ids = torch.randint(3, 99, (2, 13))
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :6], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(6, 13):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 13


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("cross", ["softmax", "favor"])
def test_prefill_then_decode_equals_full_forward_seq2seq(attention, cross):
    model = seq2seq(attention, cross_attention_type=cross)
    src, mask = torch.randint(3, 99, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    mask[1, -3:] = 0
    tgt = torch.randint(3, 99, (2, 8))
    full = model(src, attention_mask=mask, decoder_input_ids=tgt, use_cache=False).logits
    encoder_outputs = model.get_encoder()(src, attention_mask=mask)
    out = model(attention_mask=mask, encoder_outputs=encoder_outputs, decoder_input_ids=tgt[:, :3], use_cache=True)
    pieces, cache = [out.logits], out.cache
    for t in range(3, 8):
        out = model(attention_mask=mask, encoder_outputs=encoder_outputs, decoder_input_ids=tgt[:, t : t + 1],
                    cache=cache, use_cache=True)
        pieces.append(out.logits)
        cache = out.cache
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def _linear_sums(cache):
    return [layer.self_attention.kvz for layer in cache.layers]


@pytest.mark.parametrize("window", [0, 4], ids=["favor", "hedgehog-window"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "prefill_inference_then_no_grad"])
def test_decoding_updates_the_cache_in_place_only_where_safe_and_equals_the_copying_step(window, context):
    extra = {"feature_map": "hedgehog", "local_window": window} if window else {}
    model = causal_lm("favor", **extra)
    ids, mask = torch.randint(3, 99, (2, 14)), torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0  # left padding

    def decode(prefill_mode, step_mode):
        with prefill_mode():
            out = model(ids[:, :8], attention_mask=mask[:, :8], use_cache=True)
        cache, pieces, same_tensors = out.cache, [], []
        for t in range(8, 14):
            before = _linear_sums(cache)
            with step_mode():
                out = model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, use_cache=True)
            pieces.append(out.logits)
            same_tensors.append(all(a is b for a, b in zip(before, _linear_sums(out.cache))))
        return torch.cat(pieces, 1), same_tensors

    copying, copied = decode(torch.enable_grad, torch.enable_grad)  # autograd on: every step makes a new state
    assert not any(copied)
    modes = {"no_grad": (torch.no_grad, torch.no_grad), "inference_mode": (torch.inference_mode, torch.inference_mode),
             "prefill_inference_then_no_grad": (torch.inference_mode, torch.no_grad)}[context]
    logits, in_place = decode(*modes)
    torch.testing.assert_close(logits, copying.detach(), rtol=1e-5, atol=1e-5)
    # Inference tensors cannot be written outside inference mode: the first step after an inference-mode
    # prefill copies (into a plain tensor, which the next steps then write in place).
    assert in_place == [context != "prefill_inference_then_no_grad"] + [True] * 5


GENERATE_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=20),
    "beam": dict(do_sample=False, num_beams=3),
}


def generate(model, mode, use_cache, **kwargs):
    torch.manual_seed(1234)
    return model.generate(**kwargs, max_new_tokens=8, use_cache=use_cache, pad_token_id=0, **GENERATE_MODES[mode])


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_cached_equals_uncached_generation_causal_lm(attention, mode):
    model = causal_lm(attention, eos_token_id=None)
    ids = torch.randint(3, 99, (2, 5))
    cached = generate(model, mode, True, input_ids=ids)
    uncached = generate(model, mode, False, input_ids=ids)
    assert cached.shape == (2, 13)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_cached_equals_uncached_generation_seq2seq(attention, mode):
    model = seq2seq(attention, eos_token_id=None)
    src = torch.randint(3, 99, (2, 7))
    cached = generate(model, mode, True, input_ids=src)
    uncached = generate(model, mode, False, input_ids=src)
    assert cached.shape[1] == 9
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("attention", ATTENTION)
def test_left_padded_batch_generates_like_each_prompt_alone(attention):
    model = causal_lm(attention, eos_token_id=None)
    prompts = [torch.randint(3, 99, (n,)) for n in (7, 4, 2)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for i, p in enumerate(prompts):
        alone = model.generate(input_ids=p[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(batched[i, width:], alone[0, len(p):]), i


def test_left_padded_logits_match_unpadded_full_forward():
    model = causal_lm("favor")
    prompt = torch.randint(3, 99, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(model(padded, attention_mask=mask).logits[:, 3:], model(prompt).logits,
                               rtol=1e-5, atol=1e-5)


def test_generate_after_from_pretrained(tmp_path):
    model = causal_lm("favor")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, 99, (2, 5))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       loaded.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("options", [{}, {"feature_map": "hedgehog", "local_window": 3}], ids=["favor", "hedgehog-window"])
def test_chunked_prefill_generates_the_same_tokens(options):
    # generate(prefill_chunk_size=...) feeds a long prompt through the cache a piece at a time
    # (bounded prefill memory): the constant-size state makes that exact.
    model = PerformerForCausalLM(tiny_config(**options)).eval()
    ids = torch.randint(3, 99, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :4] = 0
    calls = []
    model.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    whole = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    forwards_whole = len(calls)
    chunked = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, prefill_chunk_size=5)
    assert len(calls) - forwards_whole == forwards_whole + 2  # the prompt went in as 3 pieces, not 1
    assert torch.equal(chunked, whole)
