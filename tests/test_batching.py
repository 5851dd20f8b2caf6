"""Continuous batching of Performer decoders (`modeling_performer.batching`): every request of a
running batch gets what `generate()` gives it alone, whatever joins, leaves or fails beside it."""

import time

import pytest
import torch
from transformers import GenerationConfig

from modeling_performer import PerformerForCausalLM, PerformerForConditionalGeneration
from modeling_performer.batching import PerformerBatchManager

from .conftest import tiny_config

VARIANTS = {
    "favor": {},
    "hedgehog-window": dict(feature_map="hedgehog", local_window=4),
    "sparse-cache": dict(feature_map="hedgehog", local_window=4, sparse_cache_size=3),
    "hybrid": dict(attention_type=["softmax", "favor"], feature_map="hedgehog", local_window=4),
    "decay": dict(feature_map="hedgehog", local_window=4, linear_decay="data"),
    # absolute positions: a row fed at the wrong position gives other tokens at once
    "learned-positions": dict(feature_map="hedgehog", local_window=4, position_embedding_type="learned"),
}
GREEDY = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=5)


def model_of(**overrides):
    torch.manual_seed(0)
    return PerformerForCausalLM(tiny_config(max_position_embeddings=128, num_key_value_heads=2, **overrides)).eval()


def workload(count=12, seed=1):
    """Prompts of 1-39 tokens and answers of 1-19: -> [(prompt ids, new tokens)]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (count,), generator=g).tolist()
    news = torch.randint(1, 20, (count,), generator=g).tolist()
    return [(torch.randint(3, 99, (n,), generator=g).tolist(), m) for n, m in zip(lengths, news)]


def alone(model, prompt, new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def collect(manager, request_ids, timeout=60):
    """Every finished output of these requests, and the streamed ones before: -> ({id: final}, {id: [streamed]})."""
    finals, streamed = {}, {}
    deadline = time.monotonic() + timeout
    while len(finals) < len(request_ids):
        assert time.monotonic() < deadline, f"no result for {set(request_ids) - set(finals)}"
        output = manager.get_result(timeout=1)
        if output is None:
            continue
        if output.is_finished():
            finals[output.request_id] = output
        else:
            streamed.setdefault(output.request_id, []).append(output)
    return finals, streamed


@pytest.fixture
def started():
    managers = []

    def start(model, **kwargs):
        manager = PerformerBatchManager(model, kwargs.pop("generation_config", GREEDY), **kwargs)
        manager.start()
        managers.append(manager)
        return manager

    yield start
    for manager in managers:
        manager.stop()
        assert not manager.is_running()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_request_of_a_batch_gets_what_generate_gives_it_alone(variant, started):
    model = model_of(**VARIANTS[variant])
    jobs = workload()
    expected = [alone(model, prompt, new) for prompt, new in jobs]
    assert len({tuple(e) for e in expected}) == len(jobs)
    # 5 rows at most (the rest wait), prompts absorbed 8 tokens at a time between decoding steps
    manager = started(model, max_batch_size=5, prefill_chunk=8)
    ids = []
    for index, (prompt, new) in enumerate(jobs):
        ids.append(manager.add_request(prompt, max_new_tokens=new, streaming=index % 2 == 0))
        time.sleep(0.003 * index)  # arrivals while the batch runs
    finals, streamed = collect(manager, ids)
    assert [finals[i].generated_tokens for i in ids] == expected
    assert all(finals[i].error is None for i in ids)
    for index, request_id in enumerate(ids):  # a streaming request sees its tokens one by one
        steps = [len(o.generated_tokens) for o in streamed.get(request_id, [])]
        assert steps == (list(range(1, len(expected[index]))) if index % 2 == 0 else [])
    assert manager._cache is None and not manager._running  # nothing kept once all have left


def test_generate_batch_runs_on_the_performer_manager():
    model = model_of(feature_map="hedgehog", local_window=4)
    jobs = workload(count=6, seed=3)
    prompts = [prompt for prompt, _ in jobs]
    outputs = model.generate_batch(prompts, generation_config=GREEDY, max_new_tokens=7)
    assert [o.generated_tokens for o in outputs.values()] == [alone(model, p, 7) for p in prompts]


def test_a_cancelled_request_leaves_the_batch_at_once_and_the_others_are_unchanged(started):
    model = model_of(feature_map="hedgehog", local_window=4)
    jobs = workload(count=4, seed=5)
    manager = started(model, prefill_chunk=8)
    long_one = manager.add_request(list(range(3, 20)), max_new_tokens=100_000, streaming=True)
    while True:  # it is decoding
        output = manager.get_result(timeout=10)
        if output is not None and output.request_id == long_one and len(output.generated_tokens) >= 2:
            break
    ids = [manager.add_request(prompt, max_new_tokens=new) for prompt, new in jobs]
    manager.cancel_request(long_one)
    finals, _ = collect(manager, ids)
    assert [finals[i].generated_tokens for i in ids] == [alone(model, p, n) for p, n in jobs]
    assert long_one not in finals and long_one not in manager._running  # it never finished: it left
    time.sleep(0.1)
    assert not manager._running and manager._cache is None


def test_a_bad_request_fails_alone_and_the_batch_goes_on(started):
    model = model_of(feature_map="hedgehog", local_window=4, position_embedding_type="learned")
    jobs = workload(count=4, seed=7)
    manager = started(model, prefill_chunk=8)
    good = [manager.add_request(prompt, max_new_tokens=new) for prompt, new in jobs[:2]]
    bad = {manager.add_request([], max_new_tokens=3): "empty",
           manager.add_request([5, 999], max_new_tokens=3): "outside the vocabulary",
           manager.add_request([5] * 200, max_new_tokens=3): "positions"}
    good += [manager.add_request(prompt, max_new_tokens=new) for prompt, new in jobs[2:]]
    finals, _ = collect(manager, good + list(bad))
    for request_id, reason in bad.items():
        assert finals[request_id].error is not None and reason in finals[request_id].error
    assert [finals[i].generated_tokens for i in good] == [alone(model, p, n) for p, n in jobs]
    with pytest.raises(ValueError, match="repetition_penalty"):
        manager.add_request([5, 6], max_new_tokens=3, repetition_penalty=1.2)


def test_seeded_sampling_draws_the_same_whatever_else_is_in_the_batch(started):
    model = model_of(feature_map="hedgehog", local_window=4)
    manager = started(model, prefill_chunk=8)
    prompt = [5, 17, 42, 8]

    def sampled(seed, company):
        others = [manager.add_request(p, max_new_tokens=n) for p, n in workload(count=company, seed=9)]
        torch.manual_seed(seed)  # as the server does before handing a request with a seed over
        request_id = manager.add_request(prompt, max_new_tokens=12, temperature=1.5, top_p=0.95)
        return collect(manager, others + [request_id])[0][request_id].generated_tokens

    first = sampled(7, company=0)
    assert sampled(7, company=5) == first
    assert len({tuple(sampled(seed, company=2)) for seed in range(4)}) >= 2  # it does sample
    assert first != alone(model, prompt, 12)


def test_end_tokens_and_stopping_criteria_end_a_request_where_generate_ends_it(started):
    model = model_of(feature_map="hedgehog", local_window=4)
    prompt, _ = workload(count=1, seed=11)[0]
    full = alone(model, prompt, 15)
    end = full[6]
    manager = started(model)
    with_end = manager.add_request(prompt, max_new_tokens=15, eos_token_id=[end])

    def stop_after_seven(ids, scores):
        return torch.tensor([ids.shape[1] >= len(prompt) + 7])

    with_criteria = manager.add_request(prompt, max_new_tokens=15, stop_criteria=stop_after_seven)
    finals, _ = collect(manager, [with_end, with_criteria])
    assert finals[with_end].generated_tokens == full[:full.index(end) + 1]
    assert finals[with_criteria].generated_tokens == full[:7]


def test_softmax_keys_of_a_hybrid_batch_are_padded_to_the_longest_row_and_shrink_when_it_leaves():
    model = model_of(attention_type=["softmax", "favor"], feature_map="hedgehog", local_window=4)
    manager = PerformerBatchManager(model, GREEDY)
    short = manager.add_request([5, 6, 7], max_new_tokens=30)
    long_one = manager.add_request(list(range(3, 43)), max_new_tokens=2)
    with torch.inference_mode():  # the loop's steps, run here one by one
        manager._take_queued()
        while len(manager._running) < 2:
            if manager._prefilling is None:
                manager._prefilling = manager._waiting.popleft()
            manager._prefill_chunk(manager._prefilling)
        keys = manager._cache.layers[0].self_attention[0]
        assert keys.shape[0] == 2 and keys.shape[2] == 40 == manager._key_mask.shape[1]
        assert manager._key_mask.sum(1).tolist() == [3, 40]
        manager._decode_step()  # the long row's second token: it leaves
        assert list(manager._running) == [short]
        keys = manager._cache.layers[0].self_attention[0]
        assert keys.shape[2] == manager._key_mask.shape[1] == 3 + 1  # its prompt and the one token it fed back
    assert long_one not in manager._running


def test_the_manager_refuses_what_it_cannot_batch():
    with pytest.raises(ValueError, match="decoder-only"):
        PerformerBatchManager(_seq2seq(), GREEDY)
    with pytest.raises(ValueError, match="max_batch_size"):
        PerformerBatchManager(model_of(), GREEDY, max_batch_size=0)


def _seq2seq():
    return PerformerForConditionalGeneration(tiny_config(is_encoder_decoder=True, decoder_start_token_id=1))
