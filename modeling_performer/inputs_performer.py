"""Argument checks at the boundary of a Performer forward: each input is checked once, where it
enters the model (`PerformerStack._embed` and the heads' labels), never inside a layer.

Shape and dtype checks always run. Checks that read tensor values (token ids in the vocabulary,
0/1 masks, label ranges) run in eager mode and synchronise with the host; compiled and exported
graphs (which cannot branch on values) and decoding steps after the prefill skip them. Where they
run is set by `PERFORMER_CHECK_VALUES`: unset, on CPU tensors only (no device to wait for); `1`, on
every device too (a debug setting: each check then waits for the accelerator); `0`, nowhere.
"""

import difflib
import functools
import inspect
import os
from typing import Optional

import torch
from transformers import Cache

VALUE_CHECKS_ENV = "PERFORMER_CHECK_VALUES"


def checking_values(device: Optional[torch.device] = None) -> bool:
    """Whether to run the checks that read the values of tensors on `device` (see the module)."""
    if torch.compiler.is_compiling():
        return False
    setting = os.environ.get(VALUE_CHECKS_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    return device is None or torch.device(device).type == "cpu"


def check_token_inputs(config, input_ids, inputs_embeds) -> tuple[int, int, torch.device]:
    """Exactly one of input_ids [B, T] (integers) and inputs_embeds [B, T, hidden_size], not empty.
    -> (B, T, device)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids (torch.long), got dtype {input_ids.dtype}")
        (batch, length), device = input_ids.shape, input_ids.device
    else:
        hidden_size = config.hidden_size
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"inputs_embeds must be [batch, length, hidden_size={hidden_size}], got shape {tuple(inputs_embeds.shape)}"
            )
        batch, length, device = inputs_embeds.shape[0], inputs_embeds.shape[1], inputs_embeds.device
    if batch == 0 or length == 0:
        raise ValueError(f"Empty input: batch size {batch}, sequence length {length}; give at least one token")
    return batch, length, device


def check_embedding_inputs(config, input_ids, position_ids, token_type_ids, batch, length, check_values,
                           given_positions=True):
    """Token ids within the vocabulary, positions within learned position embeddings (and not
    negative, where the caller gave them), token types within type_vocab_size (the values only with
    check_values)."""
    if token_type_ids is not None and config.type_vocab_size > 0 and tuple(token_type_ids.shape) != (batch, length):
        raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)}; expected {(batch, length)}")
    if not check_values:
        return
    vocab = config.vocab_size
    if input_ids is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
        raise ValueError(
            f"input_ids contains {bad}, outside the vocabulary [0, {vocab}); check the tokenizer matches "
            "the model (resize_token_embeddings after adding tokens)"
        )
    if given_positions and int(position_ids.min()) < 0:
        raise ValueError(f"position_ids must be >= 0, got {int(position_ids.min())}")
    limit = config.max_position_embeddings
    if config.position_embedding_type == "learned" and int(position_ids.max()) >= limit:
        raise ValueError(
            f"Position {int(position_ids.max())} is beyond max_position_embeddings={limit} of this model's "
            "learned positions: truncate the input, or use position_embedding_type='rotary'"
        )
    if token_type_ids is None:
        return
    if config.type_vocab_size <= 0:
        if bool((token_type_ids != 0).any()):
            raise ValueError("token_type_ids were given but this model has type_vocab_size=0")
    elif int(token_type_ids.min()) < 0:
        raise ValueError(f"token_type_ids must be >= 0, got {int(token_type_ids.min())}")
    elif int(token_type_ids.max()) >= config.type_vocab_size:
        raise ValueError(
            f"token_type_ids contains {int(token_type_ids.max())}, but this model has type_vocab_size="
            f"{config.type_vocab_size}"
        )


def split_masks(attention_mask, batch, query_length, key_length, device, check_values=True):
    """Validates attention_mask and returns (padding mask [B, S] bool or None, general mask
    [B, 1, T, S] bool or None). `check_values=False` skips the 0/1 check (shapes are always checked)."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.dtype.is_complex:
        raise ValueError(f"attention_mask must be bool, integer or float 0/1, got dtype {attention_mask.dtype}")
    if check_values and attention_mask.dtype != torch.bool \
            and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        if attention_mask.dtype.is_floating_point:
            raise ValueError(
                "attention_mask must hold 1 (attend) and 0 (padding); additive float masks (-inf) are not accepted"
            )
        raise ValueError("attention_mask must hold only 0 and 1")
    attention_mask = attention_mask.to(device=device, dtype=torch.bool)
    if attention_mask.dim() == 2:
        if tuple(attention_mask.shape) != (batch, key_length):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but [batch, key length] = "
                f"{(batch, key_length)} was expected (with a cache: past + new tokens)"
            )
        return attention_mask, None
    if attention_mask.dim() == 3:
        attention_mask = attention_mask[:, None]
    if attention_mask.dim() == 4 and attention_mask.shape[-2:] == (query_length, key_length) \
            and attention_mask.shape[0] in (1, batch):
        return None, attention_mask
    raise ValueError(
        f"attention_mask of shape {tuple(attention_mask.shape)} not understood: give [B, S] padding "
        f"({(batch, key_length)}) or a boolean [B, 1, T, S] mask ({(batch, 1, query_length, key_length)})"
    )


def encoder_padding(encoder_attention_mask, encoder_hidden_states):
    """Validated [B, S] padding mask of the encoder output (or None)."""
    if encoder_attention_mask is None or encoder_hidden_states is None:
        return None
    batch, length = encoder_hidden_states.shape[:2]
    device = encoder_hidden_states.device
    padding, _ = split_masks(encoder_attention_mask, batch, 0, length, device, checking_values(device))
    return padding


def is_decoding_state(value) -> bool:
    """A transformers Cache, or a legacy cache: per layer, a tuple of tensors (keys, values, ...)."""
    if isinstance(value, Cache):
        return True
    return (isinstance(value, (tuple, list)) and len(value) > 0
            and all(isinstance(layer, (tuple, list)) and len(layer) > 0
                    and all(isinstance(t, torch.Tensor) for t in layer) for layer in value))


def refuse_misleading_kwargs(kwargs, heads: tuple):
    """Like an in-tree model, forward accepts the keywords transformers passes around (Trainer,
    generate, pipelines) and ignores those it does not use. Refused, because they would silently
    give a wrong answer: a decoding state under any name but `cache` (the name before
    transformers 5.24, or a misspelling: ignored, it would restart the sequence), a request for
    attention weights, and a near miss of an argument name of one of the `heads`' forwards
    (`atention_mask`)."""
    if not kwargs:
        return
    for name, value in kwargs.items():
        if is_decoding_state(value):
            raise TypeError(f"{name}= holds a decoding state: Performer forwards take it as `cache=` (the name since "
                            "transformers 5.24)")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions is not supported: linear attention never forms the [T, S] attention weights")
    if torch.compiler.is_compiling():
        return
    for name in kwargs:
        close = difflib.get_close_matches(name, forward_argument_names(heads), n=1, cutoff=0.85)
        if close and close[0] != name:
            raise TypeError(f"unexpected keyword argument {name!r}; did you mean {close[0]!r}?")


@functools.cache
def forward_argument_names(heads: tuple) -> tuple[str, ...]:
    """Every named argument of the forwards of `heads`."""
    names = {p.name for head in heads for p in inspect.signature(head.forward).parameters.values()
             if p.kind is p.POSITIONAL_OR_KEYWORD}
    return tuple(sorted(names - {"self"}))


def check_token_labels(labels: torch.Tensor, logits: torch.Tensor, name: str = "labels", ignore_index: int = -100):
    """Shape (always) and range (see `checking_values`) of per-token labels, before transformers' loss."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(logits.shape[:-1])} (batch, length), got {tuple(labels.shape)}")
    if checking_values(labels.device):
        real = labels[labels != ignore_index]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= logits.shape[-1]):
            raise ValueError(f"{name} must be in [0, {logits.shape[-1]}) or {ignore_index} (ignored), got "
                             f"{int(real.min())}..{int(real.max())}")


def check_sequence_labels(problem_type, num_labels: int, logits: torch.Tensor, labels: torch.Tensor):
    """Clear errors before transformers' sequence-classification loss (which picks the problem
    type the same way)."""
    problem = problem_type
    if problem is None:
        problem = ("regression" if num_labels == 1 else "single_label_classification"
                   if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    batch = logits.shape[0]
    if problem == "regression":
        if labels.numel() != batch * num_labels:
            raise ValueError(f"regression labels must have {batch * num_labels} values, got shape {tuple(labels.shape)}")
    elif problem == "single_label_classification":
        if labels.shape != (batch,):
            raise ValueError(f"single-label classification needs labels of shape ({batch},), got {tuple(labels.shape)}")
        if checking_values(labels.device) and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
            raise ValueError(f"labels must be in [0, {num_labels}), got values {int(labels.min())}..{int(labels.max())}")
    elif labels.shape != logits.shape:
        raise ValueError(f"multi-label classification needs labels of shape {tuple(logits.shape)}, got {tuple(labels.shape)}")


class NotGenerative:
    """For heads without generate(): calling it says which head can (can_generate() stays False)."""

    def generate(self, *args, **kwargs):
        raise TypeError(
            f"{type(self).__name__} cannot generate text: load the checkpoint with PerformerForCausalLM "
            "(AutoModelForCausalLM) or PerformerForConditionalGeneration (AutoModelForSeq2SeqLM); for "
            "masked-token filling use pipeline('fill-mask')"
        )
