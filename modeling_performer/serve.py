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

Checked before the server starts, when the model is named on the command line: the folder holds a
causal LM (`PerformerForCausalLM`); an encoder, a classifier or a seq2seq model is refused with the
reason.

`--continuous-batching` batches concurrent requests. transformers' own continuous batching keeps a
paged key/value cache for full and sliding-window attention only, with no place for a recurrent
state, so a Performer model brings its own manager (`PerformerForCausalLM.init_continuous_batching`,
see `batching`): the server's continuous-batching path calls it as it calls transformers' manager,
and every request keeps its own constant-size state in the running batch. One addition to the
server, for a Performer's manager only: transformers' batching path drops a request's `stop`
strings, and here they reach the manager (as a stopping criterion on the request's tokens), so
`stop` works as it does without the flag. Without the flag, requests are served one `generate()`
at a time.

A folder of any other model (the softmax teacher, a GGUF as `<folder>:<file>.gguf`) is served
exactly as `transformers serve` serves it, so both can be measured the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
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


def pass_stop_strings() -> None:
    """Lets a request's `stop` strings reach a manager that takes a stopping criterion (a Performer's,
    `accepts_stop_criteria`): transformers' continuous-batching runner passes max_new_tokens, the
    end tokens and the sampling settings only. Other managers get exactly what they got before."""
    from transformers.cli.serving.utils import CBGenerateRunner

    build = CBGenerateRunner._build_continuous_batching_kwargs
    if getattr(build, "passes_stop_strings", False):
        return

    def build_with_stop_strings(self, generation_kwargs: dict) -> dict:
        kwargs = build(self, generation_kwargs)
        stop = generation_kwargs.get("stop_strings")
        if stop and getattr(self.manager, "accepts_stop_criteria", False):
            from transformers.generation.stopping_criteria import StopStringCriteria

            kwargs["stop_criteria"] = StopStringCriteria(self.processor, [stop] if isinstance(stop, str) else stop)
        return kwargs

    build_with_stop_strings.passes_stop_strings = True
    CBGenerateRunner._build_continuous_batching_kwargs = build_with_stop_strings


def split_gguf(model: str) -> tuple[str, Optional[str]]:
    """The server's model argument as (folder or Hub id, GGUF file name or None): `folder:file.gguf`
    names a GGUF file in a folder, as transformers serve reads it; an existing path is a folder."""
    repo, colon, name = model.rpartition(":")
    if colon and name.endswith(".gguf") and not os.path.exists(model):
        return repo, name
    return model, None


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


def check_serving(model: Optional[str]) -> None:
    """Refuses, with the reason, what the server would fail at later: a Performer folder that is not
    a causal LM. `model` is the server's model argument. (Continuous batching is served for
    Performer causal LMs by their own manager: nothing to refuse.)"""
    if model is None:
        return
    if split_gguf(model)[1] is not None:
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


def _serve_command():
    """transformers' `serve` command (a click command: its own parser, options and defaults)."""
    from transformers.cli.transformers import app

    return app.get_command(None, "serve")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _serve_command()
    if not {"--help", "-h"} & set(argv):
        params = command.make_context("serve", list(argv), resilient_parsing=True).params
        try:
            check_serving(params.get("force_model"))
        except ServeArgumentError as error:
            print(f"{PROG}: error: {error}", file=sys.stderr)
            return 2
    command.main(args=argv, prog_name=PROG)
    return 0


def start(model: str, *flags: str, port: Optional[int] = None, timeout: float = 600,
          **popen_kwargs) -> tuple[subprocess.Popen, str]:
    """Starts this entry point for `model` in a process group of its own, on loopback (`port`, or a
    free one), and waits until it answers /health. `flags` go to the server, `popen_kwargs` to
    subprocess.Popen (stdout, env, ...). -> (process, base url). Raises RuntimeError if the server
    stops or does not answer within `timeout` seconds (it is then stopped)."""
    if port is None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "modeling_performer.serve", model, "--host", "127.0.0.1", "--port", str(port),
                                *flags], start_new_session=True, **popen_kwargs)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    code = process.poll()
    stop(process)
    raise RuntimeError(f"the server for {model} " + (f"stopped (exit code {code})" if code is not None
                                                     else f"did not answer /health in {timeout:g} s"))


def stop(process: subprocess.Popen, timeout: float = 60) -> None:
    """Stops a server that `start` started, with the model process it spawned (SIGTERM to its process
    group, SIGKILL after `timeout` seconds)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


expose_classes()
with contextlib.suppress(ImportError):  # the serve extra (fastapi, ...) is not installed: nothing to serve
    pass_stop_strings()

if __name__ == "__main__":
    sys.exit(main())
