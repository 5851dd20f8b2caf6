"""Low-rank fine-tuning of a (linearized) Performer with peft, and the merge back to a plain model.

    from modeling_performer.lora import add_lora, merge_lora

    model = add_lora(PerformerForSequenceClassification.from_pretrained(folder), rank=8)
    ...  # train `model` (Trainer or a loop): only the adapters, feature maps and new head move
    merged = merge_lora(model)            # a PerformerForSequenceClassification again
    merged.save_pretrained(output)        # loads with AutoModel* and trust_remote_code, no peft

Adapters go on the attention projections (q/k/v/o) and the feed-forward projections; the learned
feature maps (`feature_map`, the Hedgehog weights) and the task head a pretrained source lacks
(the classifier's `dense` + `classifier`) train in full through peft's `modules_to_save`, so an
adapter checkpoint holds everything that moved and a resumed run restores it. Window weights and
embeddings stay frozen. peft is an optional dependency (`pip install modeling-performer[lora]`).
"""

from typing import Optional

from .modeling_performer import PerformerForSequenceClassification, PerformerPreTrainedModel

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


class LoraError(ValueError):
    pass


def _peft():
    try:
        import peft
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA fine-tuning needs peft: pip install 'modeling-performer[lora]'") from error
    return peft


def lora_config(model: PerformerPreTrainedModel, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                train_feature_maps: bool = True, mlp: bool = True):
    """peft.LoraConfig for a Performer model (see the module docstring for what trains)."""
    if not isinstance(model, PerformerPreTrainedModel):
        raise LoraError(f"add_lora takes a Performer model, not {type(model).__name__}")
    if rank < 1:
        raise LoraError(f"rank must be >= 1, got {rank}")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in (*ATTENTION_TARGETS, *(MLP_TARGETS if mlp else ())) if t in names]
    modules_to_save = []
    if train_feature_maps and "feature_map" in names:
        modules_to_save.append("feature_map")
    if isinstance(model, PerformerForSequenceClassification):
        modules_to_save += ["dense", "classifier"]
    return _peft().LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=dropout,
                              target_modules=targets, modules_to_save=modules_to_save or None)


def add_lora(model: PerformerPreTrainedModel, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
             train_feature_maps: bool = True, mlp: bool = True):
    """Wraps `model` in a peft LoRA model (no task type: the Performer's own forward, loss and
    generate are used unchanged). Everything outside the adapters and `modules_to_save` is frozen."""
    config = lora_config(model, rank, alpha, dropout, train_feature_maps, mlp)
    return _peft().get_peft_model(model, config)


def merge_lora(model) -> PerformerPreTrainedModel:
    """Folds the adapters into the weights and returns the plain Performer model (peft-free)."""
    peft = _peft()
    if not isinstance(model, peft.PeftModel):
        raise LoraError(f"merge_lora takes the model add_lora returned, not {type(model).__name__}")
    merged = model.merge_and_unload()
    if not isinstance(merged, PerformerPreTrainedModel):
        raise LoraError(f"merging gave {type(merged).__name__}, not a Performer model")
    return merged
