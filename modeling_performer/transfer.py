"""Attention transfer: fit a Performer's linear attention to a softmax teacher, layer by layer.

Every attention layer of the student is run on its teacher's own layer input (captured with
forward hooks), and its output before `o_proj` (the heads' attention outputs, side by side) is
pulled towards the teacher's by a mean squared error relative to the teacher output's energy.
All layers train in one pass; only the feature maps (Hedgehog weights, or the random projection
of FAVOR+/ReLU layers, which then becomes a learned matrix), the per-head window weights and the decay gates
move; everything else stays frozen. With the same q/k/v/o weights in both models (a softmax
conversion and its linear copy) this is the attention-transfer step of LoLCATs (Zhang et al.,
2024) and Hedgehog (Zhang et al., 2024).

Layer-by-layer fitting cannot see how the small errors of each layer compound through the stack.
An optional second stage (`end_to_end_steps`) runs the whole student on the same unlabelled text
and pulls every layer's output hidden state towards the teacher's, still moving only the same
feature-map and window tensors: no labels, no other weight changes.

The end-to-end stage can also give the linear layers capacity beyond their maps: `lora_rank` > 0
adds a low-rank update to each linear layer's q/k/v/o projections (LoRA, Hu et al., 2021; attention
transfer followed by LoRA is LoLCATs' recipe), trained jointly with the maps in that stage and
merged into the weights when the fit ends, so the fitted model is a plain Performer again. The
layers that keep softmax attention in a hybrid stack stay the teacher's, weight for weight.

`transfer_attention` takes `get_batch(step)` rather than an iterator, so that a run resumed from
its checkpoint sees exactly the batches an uninterrupted one would.
"""

import contextlib
import hashlib
import os
from typing import Callable, Optional

import torch

from .checkpoint_performer import save_atomically
from .modeling_performer import PerformerAttention, PerformerPreTrainedModel

CHECKPOINT_NAME = "transfer_state.pt"
# The one set of transfer settings behind the README's linearizing results: the defaults of
# scripts/transfer_attention.py and what scripts/convert_recipe.sh runs. The window is chosen when
# converting (scripts/convert_to_performer.py --local-window); the recipe converts with this one.
RECIPE_SETTINGS = {"local_window": 64, "steps": 300, "seq_len": 512, "batch_size": 4, "learning_rate": 3e-2,
                   "end_to_end_steps": 60, "end_to_end_learning_rate": 3e-3,
                   # encoders, chosen when converting: [CLS] exact for every query, Hedgehog keys with learned scales
                   "sink_tokens": 1, "hedgehog_key_scale": True}


class TransferError(ValueError):
    pass


def attention_pairs(teacher: PerformerPreTrainedModel, student: PerformerPreTrainedModel):
    """[(name, teacher module, student module)] for every student attention layer that is linear
    (the ones transfer can fit). Raises TransferError when the two models differ in shape."""
    # Compared within the bare stacks, so a base teacher pairs with any head of the student.
    teacher_modules = {n: m for n, m in teacher.base_model.named_modules() if isinstance(m, PerformerAttention)}
    student_modules = {n: m for n, m in student.base_model.named_modules() if isinstance(m, PerformerAttention)}
    if set(teacher_modules) != set(student_modules):
        only_t = sorted(set(teacher_modules) - set(student_modules))[:3]
        only_s = sorted(set(student_modules) - set(teacher_modules))[:3]
        raise TransferError(
            f"teacher and student have different attention layers (only in the teacher: {only_t}, only in the "
            f"student: {only_s}); transfer needs a teacher of the student's shape and head"
        )
    pairs = []
    for name, student_module in student_modules.items():
        teacher_module = teacher_modules[name]
        for attr in ("num_heads", "head_dim"):
            if getattr(teacher_module, attr) != getattr(student_module, attr):
                raise TransferError(f"{name}: teacher {attr}={getattr(teacher_module, attr)} but student "
                                    f"{attr}={getattr(student_module, attr)}")
        if student_module.attention_type != "favor":
            continue
        if teacher_module.attention_type != "softmax":
            raise TransferError(f"{name}: the teacher's layer is {teacher_module.attention_type!r}; the teacher must use "
                                "exact softmax attention (convert it with --attention-type softmax)")
        pairs.append((name, teacher_module, student_module))
    if not pairs:
        raise TransferError("the student has no linear attention layer to fit")
    return pairs


def trainable_tensors(student_module: PerformerAttention) -> dict:
    """The tensors transfer fits in one attention layer: feature map, window weights and decay gate."""
    if student_module.feature_map is not None:
        tensors = {"query_features": student_module.feature_map.query_weight,
                   "key_features": student_module.feature_map.key_weight}
    else:
        tensors = {"features": student_module.projection}
    if student_module.linear_log_weight is not None:
        tensors["linear_log_weight"] = student_module.linear_log_weight
    if student_module.decay is not None:
        tensors["decay_bias"] = student_module.decay.bias
        if student_module.decay.weight is not None:
            tensors["decay_weight"] = student_module.decay.weight
    return tensors


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class LowRankUpdate(torch.nn.Module):
    """A parametrization of a Linear's weight: W + (B @ A) * alpha / rank, B starting at zero so that
    the model is unchanged until it trains (torch.nn.utils.parametrize; merged by removing it)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, seed: int):
        super().__init__()
        out_features, in_features = weight.shape
        generator = torch.Generator().manual_seed(seed)
        a = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
        self.lora_A = torch.nn.Parameter(a.to(weight.device, weight.dtype))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_features, rank, device=weight.device, dtype=weight.dtype))
        self.scale = alpha / rank

    def forward(self, weight):
        return weight + (self.lora_B @ self.lora_A) * self.scale


def add_low_rank_updates(pairs, rank: int, alpha: Optional[float] = None, targets=LORA_TARGETS) -> dict:
    """Adds a LowRankUpdate to the `targets` projections of every fitted (linear) layer ->
    {"<layer>.<projection>.lora_A" / ".lora_B": tensor}; the seeds follow the layer order."""
    from torch.nn.utils import parametrize

    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise TransferError(f"LoRA targets must be among {LORA_TARGETS}, not {list(targets)}")
    if rank < 1:
        raise TransferError(f"lora_rank must be at least 1 to add updates, not {rank}")
    tensors = {}
    for index, (name, _, module) in enumerate(pairs):
        for offset, target in enumerate(targets):
            linear = getattr(module, target)
            update = LowRankUpdate(linear.weight, rank, 2.0 * rank if alpha is None else alpha,
                                   seed=index * len(LORA_TARGETS) + offset)
            parametrize.register_parametrization(linear, "weight", update)
            tensors[f"{name}.{target}.lora_A"] = update.lora_A
            tensors[f"{name}.{target}.lora_B"] = update.lora_B
    return tensors


def merge_low_rank_updates(pairs) -> None:
    """Folds every LowRankUpdate into its weight and removes it (a plain nn.Linear again)."""
    from torch.nn.utils import parametrize

    for _, _, module in pairs:
        for target in LORA_TARGETS:
            linear = getattr(module, target)
            if parametrize.is_parametrized(linear, "weight"):
                parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)


def _effective_weights(pairs) -> dict:
    """The updated projections' weights as they stand (for snapshots of a run with LoRA)."""
    from torch.nn.utils import parametrize

    return {f"{name}.{target}.weight": getattr(module, target).weight.detach().clone()
            for name, _, module in pairs for target in LORA_TARGETS
            if parametrize.is_parametrized(getattr(module, target), "weight")}


class _Capture:
    """Forward hooks that record one attention module's call and the input of its o_proj."""

    def __init__(self, module: PerformerAttention, record_call: bool):
        self.call, self.core = None, None
        self.handles = [module.o_proj.register_forward_pre_hook(self._core)]
        if record_call:
            self.handles.append(module.register_forward_pre_hook(self._call, with_kwargs=True))

    def _call(self, module, args, kwargs):
        self.call = (args, dict(kwargs))

    def _core(self, module, args):
        self.core = args[0]

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _teacher_pass(teacher, pairs, batch, cache=None):
    """Runs the teacher once (or reads what it gave from `cache`, a TeacherCache); -> [(call args,
    call kwargs, attention output before o_proj)] per pair."""
    if cache is not None:
        return cache.layer_records(teacher, pairs, batch)
    captures = [_Capture(t, True) for _, t, _ in pairs]
    try:
        with torch.no_grad():
            teacher.base_model(**batch, use_cache=False)
    finally:
        for capture in captures:
            capture.remove()
    records = []
    for (name, _, _), capture in zip(pairs, captures):
        if capture.call is None:
            raise TransferError(f"the teacher's {name} was not called for this batch")
        args, kwargs = capture.call
        kwargs["layer_cache"] = None
        records.append((args, kwargs, capture.core))
    return records


def _student_core(student_module, args, kwargs):
    capture = _Capture(student_module, False)
    try:
        student_module(*args, **kwargs)
    finally:
        capture.remove()
    return capture.core


def _token_weights(batch, reference):
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape != reference.shape[:2]:
        return None
    return mask.to(reference.dtype)[..., None]


def _relative_error(actual, expected, weights):
    """|actual - expected|^2 / |expected|^2 over real tokens (a float tensor)."""
    diff = (actual.float() - expected.float()).pow(2)
    energy = expected.float().pow(2)
    if weights is not None:
        diff, energy = diff * weights, energy * weights
    return diff.sum() / energy.sum().clamp_min(1e-30)


def _hidden_states(model, batch):
    """Every layer's output hidden states of the bare stack (the embeddings' output left out); for an
    encoder-decoder, the encoder's and the decoder's."""
    output = model.base_model(**batch, use_cache=False, output_hidden_states=True)
    states = [state for key in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states")
              for state in (getattr(output, key, None) or ())[1:]]
    if not states:
        raise TransferError(f"{type(model).__name__} returns no hidden states to compare")
    return states


def _hidden_state_error(teacher, student, batch):
    """Mean over layers of the student's relative squared error on its output hidden states,
    each layer run on the student's own inputs (so errors compound as they do in use)."""
    with torch.no_grad():
        expected = _hidden_states(teacher, batch)
    actual = _hidden_states(student, batch)
    if len(actual) != len(expected):
        raise TransferError(f"the teacher has {len(expected)} layers and the student {len(actual)}")
    weights = _token_weights(batch, expected[0])
    return sum(_relative_error(a, e, weights) for a, e in zip(actual, expected)) / len(expected)


@torch.no_grad()
def hidden_state_error(teacher, student, batch) -> float:
    """Relative L2 error of the student's hidden states against the teacher's, averaged over
    layers, real tokens only (what the end-to-end stage of `transfer_attention` lowers)."""
    return _hidden_state_error(teacher, student, batch).sqrt().item()


@torch.no_grad()
def attention_errors(teacher, student, batch) -> dict:
    """Per linear layer: relative L2 error of the student's attention output against the
    teacher's (before o_proj, real tokens only), beside the trivial estimate that ignores q and k
    and returns the mean of V over the keys a query may see (the prefix mean for causal layers).
    -> {layer name: {"student": e, "mean_of_v": e}}."""
    pairs = attention_pairs(teacher, student)
    errors = {}
    for (name, teacher_module, student_module), (args, kwargs, expected) in zip(pairs, _teacher_pass(teacher, pairs, batch)):
        actual = _student_core(student_module, args, kwargs)
        weights = _token_weights(batch, expected)
        hidden = args[0] if args else kwargs["hidden_states"]
        values = teacher_module.v_proj(hidden)  # [B, T, H_kv * D]
        # each key/value head's values for every query head of its group: [B, T, H * D], the layout of `expected`
        groups = teacher_module.num_heads // teacher_module.num_key_value_heads
        values = values.unflatten(-1, (-1, teacher_module.head_dim)).repeat_interleave(groups, dim=2).flatten(-2)
        keys_mask = weights if weights is not None else torch.ones_like(values[..., :1])
        if teacher_module.is_causal:
            mean_v = (values * keys_mask).cumsum(1) / keys_mask.cumsum(1).clamp_min(1.0)
        else:
            mean_v = ((values * keys_mask).sum(1, keepdim=True) / keys_mask.sum(1, keepdim=True).clamp_min(1.0)).expand_as(values)
        errors[name] = {"student": _relative_error(actual, expected, weights).sqrt().item(),
                        "mean_of_v": _relative_error(mean_v, expected, weights).sqrt().item()}
    return errors


END_TO_END_LOSSES = ("hidden_states", "next_token_kl")


def next_token_kl(teacher, student, batch, positions: Optional[torch.Tensor] = None, cache=None):
    """Mean over real tokens of KL(teacher || student) between the two models' next-token
    distributions (causal-LM heads), at every position or at the sequence positions given (a 1-d
    tensor of indices: the LM head then runs on those only, which is most of the cost at a large
    vocabulary). With `cache` (a TeacherCache), the teacher's side is its `top_k` most likely tokens
    plus the rest as one outcome (`top_k_kl`), computed once per batch and read back after."""
    keep = 0 if positions is None else positions
    if cache is not None:
        indices, expected = cache.top_k_targets(teacher, batch, positions)
    else:
        with torch.no_grad():
            expected = teacher(**batch, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
    actual = student(**batch, use_cache=False, logits_to_keep=keep).logits.float().log_softmax(-1)
    if cache is not None:
        per_token = top_k_kl(indices, expected, actual)
    else:
        per_token = (expected.exp() * (expected - actual)).sum(-1)
    mask = batch.get("attention_mask")
    if mask is None:
        return per_token.mean()
    weights = (mask if positions is None else mask[:, positions]).to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _kl_positions(batch, count: int, step: int):
    """`count` sequence positions drawn without replacement, seeded by the step (so a resumed run
    draws the same), sorted; None (every position) when the sequences are no longer than count."""
    length = batch["input_ids"].shape[1]
    if not count or count >= length:
        return None
    drawn = torch.randperm(length, generator=torch.Generator().manual_seed(step))[:count]
    return drawn.sort().values.to(batch["input_ids"].device)


def _step_loss(teacher, student, pairs, batch, layer_by_layer, end_to_end_loss="hidden_states", positions=None,
               cache=None):
    """The transfer objective on one batch: the mean over layers of the attention outputs' relative
    error (layer by layer); end to end, the hidden states' or the next-token KL to the teacher."""
    if not layer_by_layer:
        if end_to_end_loss == "next_token_kl":
            return next_token_kl(teacher, student, batch, positions, cache)
        return _hidden_state_error(teacher, student, batch)
    loss = 0.0
    for (_, _, module), (args, kwargs, expected) in zip(pairs, _teacher_pass(teacher, pairs, batch, cache)):
        actual = _student_core(module, args, kwargs)
        loss = loss + _relative_error(actual, expected, _token_weights(batch, expected))
    return loss / len(pairs)


def _micro_batches(batch, count):
    if count == 1:
        return [batch]
    rows = next(iter(batch.values())).shape[0]
    if rows % count:
        raise TransferError(f"a batch of {rows} rows does not split into {count} micro-batches")
    return [{k: v[i * rows // count:(i + 1) * rows // count] for k, v in batch.items()} for i in range(count)]


def _save_checkpoint(path, step, tensors, optimizer, history):
    save_atomically({"step": step, "tensors": {k: t.detach().clone() for k, t in tensors.items()},
                     "optimizer": optimizer.state_dict(), "history": history}, path)


def transfer_attention(
    teacher: PerformerPreTrainedModel,
    student: PerformerPreTrainedModel,
    get_batch: Callable[[int], dict],
    steps: int,
    learning_rate: float = 1e-2,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 25,
    progress: bool = True,
    end_to_end_steps: int = 0,
    end_to_end_learning_rate: Optional[float] = None,
    accumulation_steps: int = 1,
    autocast: Optional[Callable] = None,
    end_to_end_loss: str = "hidden_states",
    kl_positions: int = 0,
    snapshot_steps: tuple = (),
    lora_rank: int = 0,
    lora_alpha: Optional[float] = None,
    lora_learning_rate: Optional[float] = None,
    lora_targets: tuple = LORA_TARGETS,
    teacher_cache: Optional["TeacherCache"] = None,
) -> dict:
    """Fits the student's linear attention to the teacher's softmax attention (see the module
    docstring): `steps` steps layer by layer, then `end_to_end_steps` steps on the whole stack's
    hidden states (learning rate `end_to_end_learning_rate`, default learning_rate / 10, a fresh
    Adam). get_batch(step) -> model inputs (input_ids, attention_mask, ...), step counting on
    through both stages. With checkpoint_dir, the fitted tensors and the optimizer are saved every
    `checkpoint_every` steps and a later call with the same arguments resumes from there to the
    same result. Returns {"loss": [mean relative squared error per layer-by-layer step],
    "end_to_end_loss": [the same on hidden states, per end-to-end step], "steps": steps,
    "end_to_end_steps": end_to_end_steps, "end_to_end_learning_rate": the rate used}.
    accumulation_steps splits each batch into that many micro-batches whose gradients add up (the
    loss is their mean); autocast, a context factory (e.g. bf16 autocast on a GPU), wraps the
    forward passes.

    end_to_end_loss "next_token_kl" makes the second stage distil the teacher's next-token
    distribution (causal LMs; `kl_positions` > 0 scores that many positions per sequence, drawn
    afresh each step) instead of matching hidden states. With checkpoint_dir, the fitted tensors
    after each step in `snapshot_steps` are also kept, as snapshot-STEP.pt (`load_snapshot`), so the
    quality of the fit can be read against the steps it took.

    lora_rank > 0 trains low-rank updates of the linear layers' `lora_targets` projections in the
    end-to-end stage beside the maps (learning rate `lora_learning_rate`, default the end-to-end
    one; scale lora_alpha / rank, alpha 2 * rank by default) and merges them into the weights at
    the end; checkpoints hold them, and snapshots hold the updated weights themselves.

    teacher_cache (a TeacherCache) keeps what the teacher gives for each batch on disk and reads it
    back when the same batch comes again (another run on the same rows, a resumed one): every
    layer's input and attention output for the layer-by-layer stage, the top-k next-token
    distribution for the next-token KL."""
    if end_to_end_loss not in END_TO_END_LOSSES:
        raise TransferError(f"end_to_end_loss must be one of {END_TO_END_LOSSES}, not {end_to_end_loss!r}")
    if steps < 0 or end_to_end_steps < 0:
        raise TransferError(f"steps ({steps}) and end_to_end_steps ({end_to_end_steps}) cannot be negative")
    if end_to_end_learning_rate is None:
        end_to_end_learning_rate = learning_rate / 10
    if accumulation_steps < 1:
        raise TransferError(f"accumulation_steps must be at least 1, not {accumulation_steps}")
    autocast = autocast or contextlib.nullcontext
    pairs = attention_pairs(teacher, student)
    teacher.eval()
    student.eval()  # no dropout: the objective is deterministic given the batch
    named = {f"{name}.{key}": tensor for name, _, module in pairs for key, tensor in trainable_tensors(module).items()}
    flags = {p: p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for tensor in named.values():
        tensor.requires_grad_(True)
    tensors = list(named.values())
    low_rank = {}
    if lora_rank:
        if not end_to_end_steps:
            raise TransferError("lora_rank trains in the end-to-end stage: give end_to_end_steps too")
        low_rank = add_low_rank_updates(pairs, lora_rank, lora_alpha, tuple(lora_targets))
        named.update(low_rank)

    def stage_optimizer(second: bool):
        """Adam over the maps (and, in the end-to-end stage, the low-rank updates at their own rate)."""
        if not second:
            return torch.optim.Adam(tensors, lr=learning_rate)
        groups = [{"params": tensors, "lr": end_to_end_learning_rate}]
        if low_rank:
            groups.append({"params": list(low_rank.values()),
                           "lr": lora_learning_rate if lora_learning_rate is not None else end_to_end_learning_rate})
        return torch.optim.Adam(groups)

    optimizer = stage_optimizer(False)
    total = steps + end_to_end_steps
    history, start = [], 0
    path = os.path.join(checkpoint_dir, CHECKPOINT_NAME) if checkpoint_dir else None
    if path and os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if set(saved["tensors"]) != set(named):
            raise TransferError(f"{path} was written for other layers; remove it to start again")
        with torch.no_grad():
            for key, tensor in named.items():
                tensor.copy_(saved["tensors"][key])
        start, history = saved["step"], list(saved["history"])
        optimizer = stage_optimizer(start > steps)
        optimizer.load_state_dict(saved["optimizer"])  # either stage's: its learning rate comes with it

    from tqdm.auto import tqdm

    bar = tqdm(range(start, total), initial=start, total=total, disable=not progress,
               desc="attention transfer" + (", end to end" if start > steps else ""))
    for tensor in low_rank.values():  # the updates train in the end-to-end stage only
        tensor.requires_grad_(start >= steps)
    try:
        for step in bar:
            batch = get_batch(step)
            if step == steps:  # the second stage starts with a fresh optimizer of its own
                optimizer = stage_optimizer(True)
                for tensor in low_rank.values():
                    tensor.requires_grad_(True)
                bar.set_description("attention transfer, end to end")
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            positions = _kl_positions(batch, kl_positions, step) if step >= steps else None
            for part in _micro_batches(batch, accumulation_steps):
                with autocast():
                    loss = _step_loss(teacher, student, pairs, part, layer_by_layer=step < steps,
                                      end_to_end_loss=end_to_end_loss, positions=positions, cache=teacher_cache)
                (loss / accumulation_steps).backward()
                step_loss += loss.item() / accumulation_steps
            optimizer.step()
            history.append(step_loss)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if path and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
                os.makedirs(checkpoint_dir, exist_ok=True)
                _save_checkpoint(path, step + 1, named, optimizer, history)
            if checkpoint_dir and step + 1 in snapshot_steps:
                os.makedirs(checkpoint_dir, exist_ok=True)
                kept = {k: t.detach().clone() for k, t in named.items() if k not in low_rank}
                save_atomically({**kept, **_effective_weights(pairs)},
                                os.path.join(checkpoint_dir, f"snapshot-{step + 1}.pt"))
    finally:
        for tensor in named.values():
            tensor.requires_grad_(False)
        for p, flag in flags.items():
            p.requires_grad_(flag)
        # projections are buffers: keep them frozen as they were
        for _, _, module in pairs:
            if module.projection is not None:
                module.projection.requires_grad_(False)
        merge_low_rank_updates(pairs)  # a plain model again, whether the fit finished or stopped
    return {"loss": history[:steps], "end_to_end_loss": history[steps:], "steps": steps,
            "end_to_end_steps": end_to_end_steps, "end_to_end_learning_rate": end_to_end_learning_rate}



def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2; x is held below -1e-6 (the mass a
    float32 sum of probabilities can round away)."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def top_k_kl(indices: torch.Tensor, log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """Per token, KL(teacher || student) over the teacher's top-k tokens plus one outcome for all the
    others: indices, log_probs [..., k] the teacher's k most likely tokens and their log-probabilities,
    student_log_probs [..., V] the student's log-softmax. A lower bound of the full KL that loses only
    what the two say about the tail's shape; equal to it when k is the whole vocabulary. -> [...]."""
    student_top = student_log_probs.gather(-1, indices)
    kl = (log_probs.exp() * (log_probs - student_top)).sum(-1)
    if indices.shape[-1] < student_log_probs.shape[-1]:
        teacher_rest, student_rest = _log1mexp(log_probs.logsumexp(-1)), _log1mexp(student_top.logsumexp(-1))
        kl = kl + teacher_rest.exp() * (teacher_rest - student_rest)
    return kl


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes (any dtype, any device), for a digest."""
    return tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()


class TeacherCache:
    """What the teacher gives for a batch, computed once and kept on disk under `directory`; a later
    call with the same teacher and the same batch (another fit on the same rows, a resumed run)
    reads it back instead of running the teacher. Files are named by a digest of the teacher's
    weights and of the batch's tensors, so a changed teacher or batch can never be served stale
    results, and written atomically, so a killed run leaves only whole files.

    - `layer_records`: for the layer-by-layer stage, every attention layer's input and output before
      o_proj (all the teacher's layers, so a fit that keeps other layers exact reuses the same file),
      stored in `dtype` (float16 by default: half the bytes of the teacher's float32 states; float32
      makes a cached fit equal to an uncached one bit for bit);
    - `top_k_targets`: for the next-token KL, the teacher's `top_k` most likely next tokens and their
      log-probabilities at the scored positions (`top_k_kl`; the whole vocabulary when top_k is 0).

    `hits` and `misses` count the batches read back and the ones the teacher ran for."""

    def __init__(self, directory: str, top_k: int = 64, dtype: torch.dtype = torch.float16):
        if top_k < 0:
            raise TransferError(f"the teacher cache's top_k must be 0 (every token) or more, not {top_k}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TransferError(f"the teacher cache stores float16, bfloat16 or float32, not {dtype}")
        self.directory, self.top_k, self.dtype = directory, top_k, dtype
        self.hits = self.misses = 0
        self._fingerprints = {}

    def _fingerprint(self, teacher) -> str:
        if id(teacher) not in self._fingerprints:
            digest = hashlib.sha1(type(teacher).__name__.encode())
            for name, tensor in teacher.state_dict().items():
                digest.update(name.encode())
                digest.update(_tensor_bytes(tensor))
            self._fingerprints[id(teacher)] = digest.hexdigest()
        return self._fingerprints[id(teacher)]

    def _path(self, kind: str, teacher, batch: dict, positions=None, setting="") -> str:
        """kind/xx/<digest of the teacher, the batch's tensors, the positions and the setting>.pt"""
        digest = hashlib.sha1(f"{kind} {self._fingerprint(teacher)} {setting}".encode())
        tensors = dict(batch) if positions is None else {**batch, "positions": positions}
        for key in sorted(tensors):
            value = tensors[key]
            if isinstance(value, torch.Tensor):
                digest.update(f"{key} {value.dtype} {tuple(value.shape)}".encode())
                digest.update(_tensor_bytes(value))
            else:
                digest.update(f"{key} {value!r}".encode())
        name = digest.hexdigest()
        return os.path.join(self.directory, kind, name[:2], name + ".pt")

    def _read(self, path):
        return torch.load(path, map_location="cpu", weights_only=True) if os.path.exists(path) else None

    def _write(self, path, value):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomically(value, path)
        return value  # what a later read gives

    def layer_records(self, teacher, pairs, batch):
        """`_teacher_pass`'s records for these pairs: [(call args, call kwargs, output before o_proj)]."""
        path = self._path("layers", teacher, batch, setting=str(self.dtype))
        saved = self._read(path)
        if saved is not None and all(name in saved for name, _, _ in pairs):
            self.hits += 1
        else:
            self.misses += 1
            modules = [(name, module, None) for name, module in teacher.base_model.named_modules()
                       if isinstance(module, PerformerAttention)]
            records = _teacher_pass(teacher, modules, batch)
            saved = self._write(path, {
                name: {"input": args[0].to(self.dtype), "core": core.to(self.dtype), "dtype": str(args[0].dtype),
                       "kwargs": {k: v for k, v in kwargs.items() if k != "layer_cache"}}
                for (name, _, _), (args, kwargs, core) in zip(modules, records)})
        device = batch["input_ids"].device
        moved = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
        records = []
        for name, _, _ in pairs:
            entry = saved[name]
            dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
            kwargs = {k: tuple(moved(x) for x in v) if isinstance(v, tuple) else moved(v)
                      for k, v in entry["kwargs"].items()}
            records.append(((entry["input"].to(device, dtype),), {**kwargs, "layer_cache": None},
                            entry["core"].to(device, dtype)))
        return records

    def top_k_targets(self, teacher, batch, positions=None):
        """The teacher's top_k next tokens at `positions` (None: every position) -> (indices [B, P, k]
        int64, log-probabilities [B, P, k] float32), on the batch's device."""
        path = self._path("top-k", teacher, batch, positions, setting=self.top_k)
        saved = self._read(path)
        if saved is not None:
            self.hits += 1
        else:
            self.misses += 1
            with torch.no_grad():
                logits = teacher(**batch, use_cache=False, logits_to_keep=0 if positions is None else positions).logits
                log_probs = logits.float().log_softmax(-1)
            if self.top_k and self.top_k < log_probs.shape[-1]:
                values, indices = log_probs.topk(self.top_k, dim=-1)
            else:
                values, indices = log_probs, torch.arange(log_probs.shape[-1], device=log_probs.device).expand_as(
                    log_probs)
            saved = self._write(path, {"indices": indices.to(torch.int32).cpu(), "log_probs": values.cpu()})
        device = batch["input_ids"].device
        return saved["indices"].to(device, torch.long), saved["log_probs"].to(device)


def load_snapshot(student: PerformerPreTrainedModel, path: str) -> None:
    """Puts the tensors of a `transfer_attention` snapshot (snapshot-STEP.pt) into the student (a
    model of the fitted one's layout, e.g. the finished folder), in place: the maps, window weights
    and gates, and the projections' weights where the run trained low-rank updates."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    modules = dict(student.base_model.named_modules())
    with torch.no_grad():
        for key, value in saved.items():
            name, tensor_name = key.rsplit(".", 1)
            if name not in modules:
                raise TransferError(f"{path} holds {key}, which the student does not have")
            if isinstance(modules[name], torch.nn.Linear) and tensor_name == "weight":
                modules[name].weight.copy_(value)
            else:
                trainable_tensors(modules[name])[tensor_name].copy_(value)
