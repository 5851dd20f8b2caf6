"""When FAVOR+ random projections are redrawn: from a seeded generator, at optimizer steps, so
that every process and every resumed run holds the same projections at the same step.

`PerformerRedrawMixin` gives the pretrained base class its redraw methods; the counters it reads
live in `PerformerRedrawState`, a module of the base model (saved with the weights). Trainer users
add `training_performer.PerformerRedrawCallback`; loops of their own call `redraw_on_steps`.
"""

from typing import Optional

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)


class PerformerRedrawState(nn.Module):
    """Persistent counters (a module of their own, so device maps can place them): resumed
    training continues the same sequence of seeded projection draws. `draws`: the draw the
    projections hold; `training_forwards`: optimizer steps counted by `redraw_on_steps` (the name
    is the one earlier checkpoints saved)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("draws", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long), persistent=True)


def is_favor_module(module: nn.Module) -> bool:
    """An attention module holding a random projection (FAVOR+), which it redraws with `draw_projection`."""
    return isinstance(getattr(module, "projection", None), torch.Tensor) and hasattr(module, "draw_projection")


class PerformerRedrawMixin:
    """Redraw methods of `PerformerPreTrainedModel` (a `PreTrainedModel` whose base model has a
    `redraw_state`)."""

    def favor_modules(self):
        return [m for m in self.modules() if is_favor_module(m)]

    @torch.no_grad()
    def redraw_projections(self, draw: Optional[int] = None):
        """Redraws every FAVOR+ projection. `draw` picks the seeded draw (default: the next one);
        the same draw gives the same projections on every process."""
        model = self.base_model
        draw = int(model.redraw_state.draws) + 1 if draw is None else int(draw)
        for module in self.favor_modules():
            module.projection.copy_(module.draw_projection(draw).to(module.projection))
        model.redraw_state.draws.fill_(draw)

    def redraw_for_step(self, step: int) -> bool:
        """Called after optimizer step `step` (1-based): every `feature_redraw_interval` steps the
        projections take draw step // interval, so any process and any resumed run that reaches the
        same step holds the same projections. Returns whether it redrew."""
        interval = self.config.feature_redraw_interval
        if interval <= 0 or step <= 0 or step % interval or not self.favor_modules():
            return False
        self.redraw_projections(draw=step // interval)
        return True

    def redraw_on_steps(self, optimizer: torch.optim.Optimizer):
        """For training loops of your own: counts the steps of `optimizer` (a hook after each
        `optimizer.step()`, so gradient accumulation and skipped steps count right) and redraws
        every `feature_redraw_interval` of them. Trainer users add `PerformerRedrawCallback`."""
        state = self.base_model.redraw_state

        def after_step(*_):
            state.training_forwards += 1
            self.redraw_for_step(int(state.training_forwards))

        self.base_model._redraw_driven = True
        return optimizer.register_step_post_hook(after_step)

    def train(self, mode: bool = True):
        if mode and self.config.feature_redraw_interval > 0 and not getattr(self.base_model, "_redraw_driven", False) \
                and self.favor_modules():
            logger.warning_once(
                f"feature_redraw_interval={self.config.feature_redraw_interval} counts optimizer steps, but nothing "
                "reports them yet: add PerformerRedrawCallback() to the Trainer's callbacks, or call "
                "model.redraw_on_steps(optimizer) in a loop of your own. Until then the projections stay fixed."
            )
        return super().train(mode)

    @torch.no_grad()
    def _rebuild_missing_projections(self, missing: set, base: str, source):
        """After loading: projections absent from the checkpoint are rebuilt from the seed and the
        saved draw count (refused when the draw count is missing beside trained weights)."""
        names = {module: name for name, module in self.named_modules()}
        lost = [m for m in self.favor_modules() if f"{names[m]}.projection" in missing]
        if not lost:
            return
        state = self.base_model.redraw_state
        if f"{base}redraw_state.draws" in missing:
            loaded = [k for k, _ in self.named_parameters() if k.startswith(base) and k not in missing]
            if loaded:
                raise ValueError(
                    f"{source} has trained weights but neither the random projections ({len(lost)} missing, e.g. "
                    f"{names[lost[0]]}.projection) nor the draw count (redraw_state.draws) they were drawn with: "
                    "its attention cannot be rebuilt as it was trained. Save the model with save_pretrained, which "
                    "keeps both."
                )
        draw = int(state.draws)
        for module in lost:
            module.projection.copy_(module.draw_projection(draw).to(module.projection))
        logger.info(f"Rebuilt {len(lost)} missing random projection(s) of {source} from the seed and draw {draw}")
