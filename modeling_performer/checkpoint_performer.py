"""Checkpoint integrity for Performer folders.

safetensors files carry no checksum of their tensor data, so a flipped or overwritten byte loads
silently. Every `.safetensors` file that `save_pretrained` writes gets a SHA-256 of its data
section in the file's own metadata (`performer_data_sha256`); `from_pretrained` checks it, and
the file's length, before any weight is read. Files without the key (written by other tools)
are only checked for length.

Training folders: `last_complete_checkpoint` finds the newest Trainer checkpoint that was written
to the end (removing interrupted ones), and `publish_folder` moves a finished folder into place
so that an interrupted final save never leaves a folder that loads.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import Optional

CHECKSUM_KEY = "performer_data_sha256"
_BLOCK = 1 << 22


class CorruptCheckpointError(OSError):
    """A weights file is truncated, damaged, or does not match its recorded checksum."""


def _read_header(handle, path):
    size_bytes = handle.read(8)
    if len(size_bytes) != 8:
        raise CorruptCheckpointError(f"{path} is truncated (no safetensors header): re-save or re-download it")
    size = int.from_bytes(size_bytes, "little")
    raw = handle.read(size)
    try:
        if len(raw) != size:
            raise ValueError("short header")
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except ValueError as error:
        raise CorruptCheckpointError(
            f"{path} is damaged: its safetensors header cannot be read ({error}); re-save or re-download it"
        ) from None
    return 8 + size, header


def _data_digest(handle) -> tuple[str, int]:
    digest, length = hashlib.sha256(), 0
    while block := handle.read(_BLOCK):
        digest.update(block)
        length += len(block)
    return digest.hexdigest(), length


def add_checksum(path: str) -> None:
    """Rewrites the file's header with the SHA-256 of its data section (the data bytes and
    their offsets are unchanged)."""
    with open(path, "rb") as handle:
        start, header = _read_header(handle, path)
        checksum, _ = _data_digest(handle)
    metadata = dict(header.get("__metadata__") or {})
    if metadata.get(CHECKSUM_KEY) == checksum:
        return
    metadata[CHECKSUM_KEY] = checksum
    header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data section to 8 bytes
    temporary = path + ".tmp"
    with open(path, "rb") as source, open(temporary, "wb") as target:
        source.seek(start)
        target.write(len(encoded).to_bytes(8, "little"))
        target.write(encoded)
        while block := source.read(_BLOCK):
            target.write(block)
    os.replace(temporary, path)


def verify(path: str) -> None:
    """Raises CorruptCheckpointError if the file is truncated or its data does not match the
    recorded checksum."""
    with open(path, "rb") as handle:
        start, header = _read_header(handle, path)
        expected = (header.get("__metadata__") or {}).get(CHECKSUM_KEY)
        # Files without a checksum (written elsewhere) are only checked for length: no need to read them.
        checksum, length = _data_digest(handle) if expected is not None else (None, os.path.getsize(path) - start)
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    try:
        needed = max((int(t["data_offsets"][1]) for t in tensors), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CorruptCheckpointError(f"{path} is damaged: tensor entries without valid data_offsets") from None
    if length < needed:
        raise CorruptCheckpointError(
            f"{path} is truncated: its header describes {needed} bytes of tensor data but only {length} are present; "
            "re-save or re-download it"
        )
    if expected is not None and expected != checksum:
        raise CorruptCheckpointError(
            f"{path} is corrupted: the SHA-256 of its tensor data does not match the checksum written when it was "
            "saved; re-save or re-download it"
        )


def weight_files(folder: str) -> list[str]:
    """The model's weight files in a folder (model.safetensors, its shards and variants); other
    safetensors files a user keeps there are neither rewritten nor checked."""
    return sorted(glob.glob(os.path.join(folder, "model*.safetensors")))


# --------------------------------------------------------------------------------------------
# Training folders: resume from the newest complete checkpoint, publish a final folder atomically

TRAINER_STATE = "trainer_state.json"


def checkpoint_problem(folder: str) -> Optional[str]:
    """Why a Trainer checkpoint folder cannot be resumed from, or None if it is complete. The
    Trainer writes trainer_state.json after the weights, optimizer, scheduler and RNG states, so
    a folder killed while being written lacks it (or holds a truncated one)."""
    state = os.path.join(folder, TRAINER_STATE)
    if not os.path.exists(state):
        return f"no {TRAINER_STATE} (interrupted while being written)"
    try:
        with open(state) as handle:
            json.load(handle)
    except ValueError:
        return f"{TRAINER_STATE} is truncated"
    # A LoRA run (peft) checkpoints its adapters (adapter_config.json + adapter_model.safetensors).
    adapters = os.path.exists(os.path.join(folder, "adapter_config.json"))
    for name in ("optimizer.pt", "scheduler.pt") + (() if adapters else ("config.json",)):
        if not os.path.exists(os.path.join(folder, name)):
            return f"no {name}"
    files = sorted(glob.glob(os.path.join(folder, "adapter_model*.safetensors"))) if adapters else weight_files(folder)
    if not files:
        return "no weights"
    for path in files:
        try:
            verify(path)
        except CorruptCheckpointError as error:
            return str(error)
    return None


def last_complete_checkpoint(output: str, log=print) -> Optional[str]:
    """The newest complete `checkpoint-N` folder in output (None if there is none). Incomplete
    ones are removed, each with one line through `log`, so that the Trainer's own rotation and
    a later save of the same step never mix them up with complete ones."""
    found = []
    for path in glob.glob(os.path.join(output, "checkpoint-*")):
        step = os.path.basename(path).rsplit("-", 1)[-1]
        if step.isdigit() and os.path.isdir(path):
            found.append((int(step), path))
    complete = None
    for _, path in sorted(found):
        problem = checkpoint_problem(path)
        if problem is None:
            complete = path
        else:
            log(f"removing incomplete {os.path.basename(path)}: {problem}")
            shutil.rmtree(path)
    return complete


def save_atomically(obj, path: str) -> None:
    """torch.save under a temporary name, then an atomic rename: the file is complete or absent."""
    import torch

    temporary = path + ".tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


STAGE_NAME = ".final-partial"


def fresh_stage(target: str) -> str:
    """target/.final-partial, emptied of whatever an interrupted run left there: the folder a final
    result is assembled in before `publish_folder` moves it into target."""
    stage = os.path.join(target, STAGE_NAME)
    if os.path.exists(stage):
        shutil.rmtree(stage)
    return stage


def publish_folder(stage: str, target: str, marker: str = "config.json") -> None:
    """Moves every file of `stage` into `target` so that target never holds a mix that loads:
    an earlier `marker` (config.json: no folder loads without it) is removed first and the new
    one moved last; each move is an atomic rename. Then stage is removed."""
    os.makedirs(target, exist_ok=True)
    old_marker = os.path.join(target, marker)
    if os.path.exists(old_marker):
        os.remove(old_marker)
    names = sorted(os.listdir(stage))
    for name in [n for n in names if n != marker] + [n for n in names if n == marker]:
        destination = os.path.join(target, name)
        if os.path.isdir(destination) and not os.path.islink(destination):
            shutil.rmtree(destination)
        os.replace(os.path.join(stage, name), destination)
    shutil.rmtree(stage)
