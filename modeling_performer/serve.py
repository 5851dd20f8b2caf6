"""Serve Performer causal LMs with transformers' own server, `transformers serve`.

    python -m modeling_performer.serve FOLDER [any flag of `transformers serve`]
    performer-serve FOLDER --port 8000                      # the same, as a console script

The server is transformers' own (OpenAI-compatible `/v1/chat/completions`, `/v1/completions`,
`/v1/responses`, streaming by SSE), started unchanged. Why an entry point is needed at all:
`transformers serve` loads a model as `getattr(transformers, config.architectures[0])`, i.e. it
looks the class up among the classes that ship inside transformers, and never reads a folder's
`auto_map`; a Performer folder therefore fails to load there ("module transformers has no attribute
PerformerForCausalLM"), with or without `--trust-remote-code`. This module places the Performer
classes on the `transformers` module under their own names (it replaces no name transformers
defines) and then runs the `serve` command. The model runs in a process that the server spawns;
that process imports this module again (multiprocessing re-imports the main module), so the names
are there too. No behaviour of transformers is changed.

Checked before the server starts, when the model is named on the command line:
- the folder holds a causal LM (`PerformerForCausalLM`); an encoder, a classifier or a seq2seq
  model is refused with the reason;
- `--continuous-batching` is refused for a Performer: transformers' continuous batching keeps a
  paged key/value cache for full and sliding-window attention layers only, and has no place for a
  recurrent state. Requests are then served one `generate()` at a time, as without the flag.

A folder of any other model (the softmax teacher, a GGUF as `<folder>:<file>.gguf`) is served
exactly as `transformers serve` serves it, so both can be measured the same way.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

import transformers

from . import AUTO_CLASSES
from .modeling_performer import PerformerForCausalLM

PROG = "python -m modeling_performer.serve"


class ServeArgumentError(ValueError):
    """The command line names a model or a setting that the server cannot serve."""


def expose_classes() -> None:
    """Makes `getattr(transformers, "PerformerForCausalLM")` (and the other heads) resolve to the
    classes of this package, the lookup `transformers serve` does with `config.architectures[0]`."""
    for _, model_class in AUTO_CLASSES.values():
        name = model_class.__name__
        present = transformers.__dict__.get(name)
        if present is None:
            setattr(transformers, name, model_class)
        elif present is not model_class:
            raise RuntimeError(f"transformers already defines {name}; refusing to shadow it")


def _performer_config(model: str) -> Optional[dict]:
    """The config.json of a local Performer folder, else None (a hub id, a GGUF file, another model)."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise ServeArgumentError(f"{path} is not valid JSON ({error})") from None
    return values if values.get("model_type") == "performer" else None


def check_serving(model: Optional[str], continuous_batching: bool = False) -> None:
    """Refuses, with the reason, what the server would fail at later: a Performer folder that is not
    a causal LM, and continuous batching of a Performer. `model` is the server's model argument."""
    if model is None:
        if continuous_batching:
            raise ServeArgumentError(
                "--continuous-batching needs the model on the command line here, so that it can be checked: "
                "Performer models keep a recurrent state that continuous batching's paged key/value cache has no "
                "place for (it holds full and sliding-window attention layers only)")
        return
    if not os.path.exists(model) and model.rpartition(":")[2].endswith(".gguf"):
        return
    values = _performer_config(model)
    if values is None:
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
            raise ServeArgumentError(f"{model} has no config.json: not a saved model folder")
        return
    architecture = (values.get("architectures") or [None])[0]
    if architecture != PerformerForCausalLM.__name__:
        kind = ("an encoder-decoder (seq2seq) model" if values.get("is_encoder_decoder")
                else f"a {architecture}" if architecture else "a model with no saved head")
        raise ServeArgumentError(
            f"{model} holds {kind}; the server answers chat and completion requests with a causal LM "
            f"({PerformerForCausalLM.__name__}): convert or train one (scripts/convert_to_performer.py, "
            "scripts/train.py --task causal-lm)")
    if continuous_batching:
        raise ServeArgumentError(
            "--continuous-batching cannot serve a Performer: its paged key/value cache holds full and sliding-window "
            "attention layers only, and Performer layers keep a recurrent state (constant in the context length). "
            "Leave the flag out: requests are then served one generate() at a time")


def _parse(argv: Sequence[str]) -> dict:
    """transformers serve's own parse of the command line (its option names and defaults)."""
    from transformers.cli.transformers import app

    command = app.get_command(None, "serve")
    context = command.make_context("serve", list(argv), resilient_parsing=True)
    return context.params


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"--help", "-h"} & set(argv):
        params = _parse(argv)
        try:
            check_serving(params.get("force_model"), bool(params.get("continuous_batching")))
        except ServeArgumentError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
    from transformers.cli.transformers import app

    app.get_command(None, "serve").main(args=argv, prog_name=PROG)
    return 0


expose_classes()

if __name__ == "__main__":
    sys.exit(main())
