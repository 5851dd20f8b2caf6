"""Checkpoint integrity for Performer folders.

safetensors files carry no checksum of their tensor data, so a flipped or overwritten byte loads
silently. Every `.safetensors` file that `save_pretrained` writes gets a SHA-256 of its data
section in the file's own metadata (`performer_data_sha256`); `from_pretrained` checks it, and
the file's length, before any weight is read. Files without the key (written by other tools)
are only checked for length.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

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
