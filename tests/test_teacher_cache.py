"""The teacher computed once (modeling_performer.transfer.TeacherCache): a fit that stores what the
teacher gives is the uncached fit bit for bit (float32, every token), a second fit on the same rows
never runs the teacher, a hybrid reads what an all-linear fit stored, a changed teacher or batch
is never served stale results, a killed cached run resumes to the same tensors, and the top-k KL
is the full KL when k is the vocabulary and a lower bound below it."""

import pytest
import torch

from modeling_performer import PerformerForCausalLM
from modeling_performer.transfer import TeacherCache, TransferError, top_k_kl, transfer_attention

from .conftest import tiny_config

BATCHES = [torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def get_batch(step):
    mask = torch.ones_like(BATCHES[step])
    mask[1, -3:] = 0  # one padded row: the cache must keep the mask with the states
    return {"input_ids": BATCHES[step], "attention_mask": mask}


def models(attention_type="favor"):
    torch.manual_seed(0)
    teacher = PerformerForCausalLM(tiny_config(is_decoder=True, attention_type="softmax")).eval()
    student = PerformerForCausalLM(tiny_config(is_decoder=True, feature_map="hedgehog", local_window=4,
                                               attention_type=attention_type)).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    return teacher, student


def fit(teacher, student, cache=None, batches=get_batch, **kwargs):
    history = transfer_attention(teacher, student, batches, 3, 1e-2, progress=False, end_to_end_steps=3,
                                 end_to_end_loss="next_token_kl", kl_positions=8, teacher_cache=cache, **kwargs)
    return history, {k: v.clone() for k, v in student.state_dict().items()}


def refusing(teacher):
    """The teacher, made to fail if anything runs it."""
    def forward(*args, **kwargs):
        raise AssertionError("the teacher ran although its outputs were cached")
    teacher.forward = forward
    teacher.model.forward = forward
    return teacher


def test_a_float32_cache_of_every_token_is_the_uncached_fit_bit_for_bit(tmp_path):
    expected_history, expected = fit(*models())
    cache = TeacherCache(str(tmp_path), top_k=0, dtype=torch.float32)
    history, fitted = fit(*models(), cache=cache)
    assert history == expected_history
    assert all(torch.equal(fitted[k], expected[k]) for k in expected)
    assert (cache.hits, cache.misses) == (0, 6)


def test_a_second_fit_reads_every_batch_and_never_runs_the_teacher(tmp_path):
    first = TeacherCache(str(tmp_path))
    history, fitted = fit(*models(), cache=first, lora_rank=2)
    assert (first.hits, first.misses) == (0, 6)
    teacher, student = models()
    again = TeacherCache(str(tmp_path))
    history_again, fitted_again = fit(refusing(teacher), student, cache=again, lora_rank=2)
    assert (again.hits, again.misses) == (6, 0)
    assert history_again == history
    assert all(torch.equal(fitted_again[k], fitted[k]) for k in fitted)


def test_a_hybrid_reads_the_layers_an_all_linear_fit_stored(tmp_path):
    fit(*models(), cache=TeacherCache(str(tmp_path)))
    teacher, hybrid = models(["softmax", "favor"])
    cache = TeacherCache(str(tmp_path))
    fit(refusing(teacher), hybrid, cache=cache)
    assert (cache.hits, cache.misses) == (6, 0)


def test_a_changed_teacher_or_batch_is_computed_again(tmp_path):
    fit(*models(), cache=TeacherCache(str(tmp_path)))
    teacher, student = models()
    with torch.no_grad():
        teacher.model.decoder.layers[1].mlp.down_proj.weight.mul_(1.01)  # the attention inputs of layer 1 change
    cache = TeacherCache(str(tmp_path))
    fit(teacher, student, cache=cache)
    assert (cache.hits, cache.misses) == (0, 6)
    shifted = lambda step: get_batch((step + 1) % len(BATCHES))  # noqa: E731 - steps 0..4 seen before, 5 not
    cache = TeacherCache(str(tmp_path))
    fit(*models(), cache=cache, batches=shifted)
    assert cache.misses >= 1


@pytest.mark.parametrize("dies_at", [1, 4])
def test_a_killed_cached_fit_resumes_to_the_same_tensors(tmp_path, dies_at):
    _, expected = fit(*models(), cache=TeacherCache(str(tmp_path / "reference")))

    def dies(step):
        if step == dies_at:
            raise KeyboardInterrupt
        return get_batch(step)

    teacher, student = models()
    with pytest.raises(KeyboardInterrupt):
        fit(teacher, student, cache=TeacherCache(str(tmp_path / "cache")), batches=dies,
            checkpoint_dir=str(tmp_path / "run"), checkpoint_every=1)
    teacher, student = models()
    _, resumed = fit(teacher, student, cache=TeacherCache(str(tmp_path / "cache")),
                     checkpoint_dir=str(tmp_path / "run"), checkpoint_every=1)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


def test_top_k_kl_is_the_full_kl_at_the_whole_vocabulary_and_a_lower_bound_below():
    generator = torch.Generator().manual_seed(0)
    teacher = (3 * torch.randn(4, 5, 50, generator=generator)).log_softmax(-1)
    student = torch.randn(4, 5, 50, generator=generator).log_softmax(-1).requires_grad_(True)
    full = (teacher.exp() * (teacher - student)).sum(-1)
    order = teacher.argsort(-1, descending=True)
    every = top_k_kl(order, teacher.gather(-1, order), student)
    torch.testing.assert_close(every, full, rtol=1e-6, atol=1e-6)
    previous = torch.zeros_like(full)
    for k in (1, 5, 20, 49):
        values, indices = teacher.topk(k, dim=-1)
        bound = top_k_kl(indices, values, student)
        assert (bound >= -1e-6).all() and (bound <= full + 1e-5).all()
        assert (bound >= previous - 1e-5).all()  # coarser partitions lose information: never above a finer one
        previous = bound
    bound.sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    # a student that agrees with the teacher on the top tokens and the rest's mass scores zero
    values, indices = teacher.topk(5, dim=-1)
    torch.testing.assert_close(top_k_kl(indices, values, teacher), torch.zeros_like(full), atol=1e-6, rtol=0)


def test_bad_settings_are_refused():
    with pytest.raises(TransferError, match="top_k"):
        TeacherCache("unused", top_k=-1)
    with pytest.raises(TransferError, match="float16"):
        TeacherCache("unused", dtype=torch.int8)


def test_the_throughput_measure_times_each_variant_and_the_cached_one_never_runs_the_teacher(tmp_path):
    """modeling_performer.recipes.transfer_timing (scripts/bench_transfer.py), at toy size."""
    from modeling_performer.recipes import transfer_timing

    runs = {"teacher": 0}

    def load_teacher():
        teacher = models()[0]
        forward = teacher.forward

        def counted(*args, **kwargs):
            runs["teacher"] += 1
            return forward(*args, **kwargs)
        teacher.forward = counted
        return teacher

    batches = [get_batch(step) for step in range(4)]
    result = transfer_timing.measure(load_teacher, lambda: models()[1], batches, steps=2, kl_steps=2, rounds=1,
                                     fit_options={"kl_positions": 8, "lora_rank": 2})
    for stage in ("layers", "kl"):
        assert set(result[stage]) == set(transfer_timing.VARIANTS)
        assert all(v["seconds"] > 0 and v["steps_timed"] == 1 for v in result[stage].values())
        assert result["ratio"][stage] == pytest.approx(
            result[stage]["teacher"]["seconds"] / result[stage]["cached"]["seconds"], rel=1e-2)
    # the KL stage runs the teacher's head: 2 steps uncached, 2 filling, none cached
    assert runs["teacher"] == 4
    minutes = transfer_timing.projected_minutes(result, 60, 30)
    assert minutes["cached"] == pytest.approx(
        (60 * result["layers"]["cached"]["seconds"] + 30 * result["kl"]["cached"]["seconds"]) / 60, abs=0.06)
