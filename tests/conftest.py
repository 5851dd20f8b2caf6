import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from modeling_performer import PerformerConfig  # noqa: E402

try:  # the same examples on every run (CI must not turn red or green by chance)
    from hypothesis import settings

    settings.register_profile("derandomized", derandomize=True, database=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))
except ImportError:  # pragma: no cover
    pass


def tiny_config(**overrides) -> PerformerConfig:
    """hidden 32, 2 layers, vocab 99, M 16: the size every model test uses."""
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_random_features=16,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        chunk_size=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return PerformerConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
