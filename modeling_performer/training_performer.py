"""Trainer integration: projection redraws counted in optimizer steps."""

from transformers import TrainerCallback


class PerformerRedrawCallback(TrainerCallback):
    """Redraws the FAVOR+ projections every `config.feature_redraw_interval` optimizer steps
    (Trainer's `global_step`, so gradient accumulation counts whole steps). The draw number is
    step // interval: every process, and a run resumed from a checkpoint, holds the same
    projections at the same step.

        trainer = Trainer(model, args, callbacks=[PerformerRedrawCallback()], ...)
    """

    @staticmethod
    def _performer(model):
        # The Performer model itself, also behind a wrapper that forwards attributes (peft).
        method = getattr(model, "redraw_for_step", None)
        return method.__self__ if method is not None else None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        performer = self._performer(model)
        if performer is not None:
            performer.base_model._redraw_driven = True

    def on_step_end(self, args, state, control, model=None, **kwargs):
        performer = self._performer(model)
        if performer is not None:
            performer.redraw_for_step(state.global_step)
