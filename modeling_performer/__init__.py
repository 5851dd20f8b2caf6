"""Performer (FAVOR+ linear attention) models for Hugging Face transformers."""

from .attention import (
    LinearAttentionState,
    causal_linear_attention,
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
    recurrent_linear_attention,
    softmax_attention,
)
from .feature_maps import FEATURE_MAPS, gaussian_orthogonal_random_matrix

__version__ = "0.1.0"
