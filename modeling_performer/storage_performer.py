"""How Performer models are saved and loaded, on top of transformers' own save_pretrained and
from_pretrained:

- a saved folder carries the modeling files and an `auto_map` naming every head, so it loads with
  `trust_remote_code=True` where this package is not installed;
- weight files carry a checksum (`checkpoint_performer`): a damaged file is refused before loading;
- one-stack checkpoints load into the other kind of one-stack head (renaming `encoder`/`decoder`);
- weights missing from a checkpoint are reported, or refused on request, and a missing random
  projection is rebuilt exactly from the seed and the saved draw count (`redraw_performer`).
"""

import os
import re
from typing import Optional

from safetensors import safe_open

from .checkpoint_performer import add_checksum, verify, weight_files
from .configuration_performer import PerformerConfig

AUTO_MAP = {
    "AutoConfig": "configuration_performer.PerformerConfig",
    "AutoModel": "modeling_performer.PerformerModel",
    "AutoModelForMaskedLM": "modeling_performer.PerformerForMaskedLM",
    "AutoModelForSequenceClassification": "modeling_performer.PerformerForSequenceClassification",
    "AutoModelForCausalLM": "modeling_performer.PerformerForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_performer.PerformerForConditionalGeneration",
}


def local_folder(name_or_path, kwargs) -> Optional[str]:
    """The folder holding the weight files (local path or the Hub cache), or None."""
    if name_or_path is None:  # weights given as state_dict=
        return None
    subfolder = kwargs.get("subfolder") or ""
    path = os.path.join(os.fspath(name_or_path), subfolder)
    if os.path.isdir(path):
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "model.safetensors.index.json"):
            cached = try_to_load_from_cache(str(name_or_path), os.path.join(subfolder, filename) if subfolder else filename,
                                            revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"))
            if isinstance(cached, str):
                return os.path.dirname(cached)
    except ValueError:  # not a Hub id (HFValidationError): transformers reports the real problem
        return None
    return None


def stack_renaming(folder: str, target: Optional[str], config=None) -> Optional[dict]:
    """A checkpoint's one-stack layers load into the other kind of one-stack model (a
    bidirectional base checkpoint into a causal LM and back), and checkpoints saved when the
    causal stack was called `encoder` still load. target: the stack the loading head holds
    ("encoder" or "decoder"; None: read from the config). -> key_mapping for from_pretrained, or None."""
    if target is None:
        try:
            config = config if isinstance(config, PerformerConfig) else PerformerConfig.from_pretrained(folder)
        except (OSError, ValueError):
            return None
        if config.is_encoder_decoder:
            return None
        target = "decoder" if config.is_decoder else "encoder"
    other = "encoder" if target == "decoder" else "decoder"
    keys = set()
    for path in weight_files(folder):
        if path.endswith(".safetensors"):
            with safe_open(path, "pt") as f:
                keys.update(f.keys())
    has = {name: any(re.match(rf"^(model\.)?{name}\.layers\.", k) for k in keys) for name in (target, other)}
    if has[other] and not has[target]:
        # transformers' renamings substitute one group (\1): one renaming per part of the stack.
        return {rf"(^|model\.){other}\.{part}\.": rf"\1{target}.{part}." for part in ("layers", "norm")}
    return None


class PerformerStorageMixin:
    """save_pretrained and from_pretrained of `PerformerPreTrainedModel`. `_single_stack`: the
    stack a head always holds ("encoder", "decoder"), or None where the config decides."""

    _single_stack: Optional[str] = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes the modeling files and an `auto_map` naming every head, so the folder loads
        with `trust_remote_code=True` where this package is not installed."""
        for name, class_name in AUTO_MAP.items():
            if name != "AutoConfig" and class_name.endswith("." + type(self).__name__) and type(self)._auto_class is None:
                type(self).register_for_auto_class(name)
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        self.config.auto_map = dict(AUTO_MAP)
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for path in weight_files(str(save_directory)):
                add_checksum(path)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, allow_missing_weights: bool = True, **kwargs):
        """transformers' from_pretrained, with three guarantees:
        - damaged weight files (truncated, or data that no longer matches the checksum that
          save_pretrained wrote) are refused before loading;
        - weights missing from the checkpoint are initialised, reported in the loading info and
          logged, as transformers does; `allow_missing_weights=False` refuses a checkpoint that lacks
          weights of the Performer stack instead (head weights missing from a base checkpoint are
          always initialised);
        - a missing random projection never comes back different: it is rebuilt exactly from the
          seed and the saved draw count. If the draw count is missing too while other weights of
          the stack were loaded, the projections the model was trained with are unknown: refused."""
        folder = local_folder(pretrained_model_name_or_path, kwargs)
        if folder is not None:
            for path in weight_files(folder):
                verify(path)
            if kwargs.get("key_mapping") is None:
                kwargs["key_mapping"] = stack_renaming(folder, cls._single_stack, kwargs.get("config"))
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        base = "" if model.base_model is model else model.base_model_prefix + "."
        missing = set(info.get("missing_keys", ()))
        stack_missing = sorted(k for k in missing if k.startswith(base) and "redraw_state" not in k)
        if stack_missing and not allow_missing_weights:
            raise ValueError(
                f"{pretrained_model_name_or_path} has no weights for {len(stack_missing)} tensor(s) of the Performer "
                f"stack, e.g. {stack_missing[:4]}; the checkpoint is incomplete or was saved with another config "
                "(layers, attention_type). Leave allow_missing_weights at True to initialise them fresh."
            )
        model._rebuild_missing_projections(missing, base, pretrained_model_name_or_path)
        return (model, info) if want_info else model
