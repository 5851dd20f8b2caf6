"""Files that ship with the package: the configuration presets, the bundled 8,000-piece tokenizer,
the accelerate configs and the model-card template. They live in the repository's
`configuration/` and `model_cards/` folders; a wheel carries them inside the package
(`modeling_performer/configuration/`, `modeling_performer/model_cards/`), so they load by name
wherever the package is installed.

```python
>>> from transformers import AutoTokenizer
>>> from modeling_performer.bundled import load_preset, tokenizer_path
>>> config = load_preset("performer-small-encoder")
>>> tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
>>> config.model_type, len(tokenizer) > 0
('performer', True)

```
"""

from __future__ import annotations

import json
import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def _folder(name: str) -> pathlib.Path:
    """configuration/<...> or model_cards: inside the installed package, else beside it (a checkout)."""
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the package's {name}/ folder is missing from {_HERE} (a broken installation?)")


def presets_dir() -> pathlib.Path:
    return _folder("configuration") / "presets"


def preset_names() -> list:
    return sorted(path.stem for path in presets_dir().glob("*.json"))


def preset_path(name_or_path) -> pathlib.Path:
    """A preset's JSON file: an existing path as given, else the bundled preset of that name."""
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    bundled = presets_dir() / f"{name_or_path}.json"
    if not bundled.is_file():
        raise FileNotFoundError(f"no preset {str(name_or_path)!r}: not a file, and the bundled presets are "
                                f"{', '.join(preset_names())}")
    return bundled


def load_preset(name_or_path):
    """The config a preset describes: a PerformerConfig, or the transformers config of the file's
    other model_type (the Llama teacher of the linearizing recipe)."""
    from transformers import AutoConfig

    from .configuration_performer import PerformerConfig

    values = json.loads(preset_path(name_or_path).read_text())
    model_type = values.pop("model_type", PerformerConfig.model_type)
    if model_type == PerformerConfig.model_type:
        return PerformerConfig.from_dict(values)
    return AutoConfig.for_model(model_type, **values)


def tokenizer_path() -> pathlib.Path:
    """The bundled SentencePiece-unigram tokenizer (tokenizer.json), for AutoTokenizer.from_pretrained."""
    return _folder("configuration") / "tokenizer"


def lm_eval_tasks_path() -> pathlib.Path:
    """The lm-evaluation-harness tasks and their held-out data (`lm_eval run --include_path ...`)."""
    return _folder("configuration") / "lm_eval"


def accelerate_config(name: str) -> pathlib.Path:
    return _folder("configuration") / "accelerate" / f"{name}.yaml"


def card_template() -> pathlib.Path:
    return _folder("model_cards") / "performer.md"
