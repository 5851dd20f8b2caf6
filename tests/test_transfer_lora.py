"""Capacity in the fit: low-rank updates of the linear layers' q/k/v/o trained beside the maps in
the end-to-end stage of attention transfer (modeling_performer.transfer, lora_rank=), merged into
plain weights at the end; kept layers of a hybrid stay the teacher's; a killed run resumes to the
same weights; a snapshot is the run stopped there."""

import pytest
import torch
from torch.nn.utils import parametrize

from modeling_performer import PerformerForCausalLM
from modeling_performer.transfer import TransferError, load_snapshot, trainable_tensors, transfer_attention

from .conftest import tiny_config


def pair(attention_type="favor", seed=0):
    """A tiny softmax causal LM and its Hedgehog + window copy (weight for weight), or a hybrid copy."""
    torch.manual_seed(seed)
    teacher = PerformerForCausalLM(tiny_config(is_decoder=True, attention_type="softmax")).eval()
    student = PerformerForCausalLM(tiny_config(is_decoder=True, feature_map="hedgehog", local_window=4,
                                               attention_type=attention_type)).eval()
    student.load_state_dict(teacher.state_dict(), strict=False)
    return teacher, student


BATCHES = [torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(8)]


def get_batch(step):
    return {"input_ids": BATCHES[step], "attention_mask": torch.ones_like(BATCHES[step])}


def fit(teacher, student, end_to_end_steps=4, **kwargs):
    return transfer_attention(teacher, student, get_batch, 2, 1e-2, progress=False, end_to_end_steps=end_to_end_steps,
                              end_to_end_loss="next_token_kl", kl_positions=8, lora_rank=2, lora_learning_rate=1e-2,
                              **kwargs)


def test_lora_moves_the_linear_layers_projections_and_maps_only_and_leaves_a_plain_model():
    teacher, student = pair(["softmax", "favor"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    history = fit(teacher, student)
    after = student.state_dict()
    assert set(after) == set(before)  # merged: no parametrization left behind
    assert not any(parametrize.is_parametrized(m) for m in student.modules())
    moved = {k for k, v in after.items() if not torch.equal(v, before[k])}
    fitted = {id(t) for layer in student.model.decoder.layers for t in trainable_tensors(layer.self_attn).values()
              if layer.self_attn.attention_type == "favor"}
    maps = {n for n, t in student.named_parameters() if id(t) in fitted}
    projections = {f"model.decoder.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert projections <= moved, projections - moved  # the updates were trained and merged
    assert moved <= maps | projections, moved - maps - projections  # the kept softmax layer 0 is the teacher's
    assert len(history["end_to_end_loss"]) == 4


def test_lora_lowers_the_distillation_loss_more_than_the_maps_alone():
    teacher, student = pair()
    with torch.no_grad():  # a teacher the copy cannot match with its maps alone
        for layer in teacher.model.decoder.layers:
            layer.self_attn.v_proj.weight.mul_(-1.0)
    _, maps_only = pair()
    maps_only.load_state_dict(student.state_dict())
    batches = {"input_ids": torch.cat(BATCHES[:4])}
    from modeling_performer.transfer import next_token_kl

    cycling = lambda step: get_batch(step % len(BATCHES))  # noqa: E731
    transfer_attention(teacher, maps_only, cycling, 2, 1e-2, progress=False, end_to_end_steps=20,
                       end_to_end_loss="next_token_kl")
    transfer_attention(teacher, student, cycling, 2, 1e-2, progress=False, end_to_end_steps=20,
                       end_to_end_loss="next_token_kl", lora_rank=4, lora_learning_rate=3e-3)
    with torch.no_grad():  # measured: 0.0012 against 0.0025
        assert next_token_kl(teacher, student, batches) < 0.75 * next_token_kl(teacher, maps_only, batches)


@pytest.mark.parametrize("dies_at", [1, 4])  # in the layer-by-layer stage, in the end-to-end stage
def test_a_killed_lora_fit_resumes_to_the_same_weights(tmp_path, dies_at):
    teacher, whole = pair()
    fit(teacher, whole, snapshot_steps=(4,), checkpoint_dir=str(tmp_path / "whole"))
    _, cut = pair()

    def dying(step):
        if step == dies_at:
            raise KeyboardInterrupt
        return get_batch(step)

    with pytest.raises(KeyboardInterrupt):
        transfer_attention(teacher, cut, dying, 2, 1e-2, progress=False, end_to_end_steps=4, checkpoint_every=1,
                           end_to_end_loss="next_token_kl", kl_positions=8, lora_rank=2, lora_learning_rate=1e-2,
                           checkpoint_dir=str(tmp_path / "cut"))
    _, resumed = pair()  # a new process: the converted copy again, and the same command
    fit(teacher, resumed, checkpoint_dir=str(tmp_path / "cut"))
    for key, value in whole.state_dict().items():
        assert torch.allclose(resumed.state_dict()[key], value, atol=1e-6), key
    # the snapshot after step 4, put into the finished model, is the run stopped at step 4
    _, short = pair()
    fit(teacher, short, end_to_end_steps=2)
    load_snapshot(whole, str(tmp_path / "whole" / "snapshot-4.pt"))
    for key, value in short.state_dict().items():
        assert torch.allclose(whole.state_dict()[key], value, atol=1e-6), key


def test_lora_without_an_end_to_end_stage_or_with_unknown_targets_is_refused():
    teacher, student = pair()
    with pytest.raises(TransferError, match="end_to_end_steps"):
        transfer_attention(teacher, student, get_batch, 1, lora_rank=2, progress=False)
    with pytest.raises(TransferError, match="LoRA targets"):
        transfer_attention(teacher, student, get_batch, 1, end_to_end_steps=1, lora_rank=2,
                           lora_targets=("gate_proj",), progress=False)
    assert not any(parametrize.is_parametrized(m) for m in student.modules())
