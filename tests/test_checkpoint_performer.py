"""Checkpoint integrity (`checkpoint_performer`): a truncated or corrupted weight file is refused
before any weight is read."""

import pytest
from transformers import AutoModelForCausalLM

from modeling_performer.checkpoint_performer import CorruptCheckpointError


def test_truncated_checkpoint_is_refused(saved):
    _, folder = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("where", ["header", "data"])
def test_corrupted_checkpoint_is_refused(saved, where):
    _, folder = saved
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    if where == "header":
        raw[10:20] = b"\x00" * 10
    else:
        raw[-40] ^= 0x01  # one flipped bit in the last tensor: still finite, still loadable
    weights.write_bytes(bytes(raw))
    match = "header cannot be read" if where == "header" else "does not match the checksum"
    with pytest.raises(CorruptCheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)
