"""Performer (FAVOR+ linear attention) models for Hugging Face transformers.

Importing this package registers every Performer class with the transformers Auto classes.
"""

import transformers
from transformers import AutoConfig

from .attention import (
    CausalLinearKernel,
    LinearAttentionState,
    SparseWindowState,
    WindowedAttentionState,
    causal_linear_attention,
    causal_sparse_windowed_attention,
    causal_windowed_attention,
    recurrent_sparse_windowed_attention,
    recurrent_windowed_attention,
    windowed_linear_attention,
    linear_attention,
    linear_attention_from_state,
    linear_attention_state,
    recurrent_linear_attention,
    softmax_attention,
)
from .cache_performer import PerformerCache
from .configuration_performer import PerformerConfig
from .feature_maps import FEATURE_MAPS, gaussian_orthogonal_random_matrix
from .modeling_performer import (
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
    PerformerPreTrainedModel,
    TASK_HEADS,
    shift_tokens_right,
)
from . import modeling_performer as _modeling
from .storage_performer import AUTO_MAP

from .training_performer import PerformerRedrawCallback
from .pipeline_performer import TASK as TEXT2TEXT_TASK, PerformerText2TextPipeline, register as _register_pipeline

__version__ = "0.1.0"

# Auto class -> (the transformers Auto class, the head registered with it), from the saved auto_map.
AUTO_CLASSES = {
    name: (getattr(transformers, name), getattr(_modeling, target.split(".")[-1]))
    for name, target in AUTO_MAP.items() if name != "AutoConfig"
}

AutoConfig.register(PerformerConfig.model_type, PerformerConfig, exist_ok=True)
PerformerConfig.register_for_auto_class("AutoConfig")
for _name, (_auto, _model_class) in AUTO_CLASSES.items():
    _auto.register(PerformerConfig, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_name)
_register_pipeline()

__all__ = [
    "PerformerRedrawCallback",
    "PerformerConfig",
    "PerformerCache",
    "PerformerModel",
    "PerformerForMaskedLM",
    "PerformerForSequenceClassification",
    "PerformerForCausalLM",
    "PerformerForConditionalGeneration",
    "PerformerPreTrainedModel",
    "shift_tokens_right",
    "TASK_HEADS",
    "CausalLinearKernel",
    "LinearAttentionState",
    "WindowedAttentionState",
    "SparseWindowState",
    "causal_linear_attention",
    "causal_windowed_attention",
    "causal_sparse_windowed_attention",
    "recurrent_windowed_attention",
    "recurrent_sparse_windowed_attention",
    "windowed_linear_attention",
    "linear_attention",
    "linear_attention_from_state",
    "linear_attention_state",
    "recurrent_linear_attention",
    "softmax_attention",
    "FEATURE_MAPS",
    "gaussian_orthogonal_random_matrix",
    "PerformerText2TextPipeline",
    "TEXT2TEXT_TASK",
]
