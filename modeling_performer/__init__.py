"""Performer (FAVOR+ linear attention) models for Hugging Face transformers.

Importing this package registers every Performer class with the transformers Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from .attention import (
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
    shift_tokens_right,
)

from .training_performer import PerformerRedrawCallback
from .pipeline_performer import TASK as TEXT2TEXT_TASK, PerformerText2TextPipeline, register as _register_pipeline

__version__ = "0.1.0"

AUTO_CLASSES = {
    "AutoModel": (AutoModel, PerformerModel),
    "AutoModelForMaskedLM": (AutoModelForMaskedLM, PerformerForMaskedLM),
    "AutoModelForSequenceClassification": (AutoModelForSequenceClassification, PerformerForSequenceClassification),
    "AutoModelForCausalLM": (AutoModelForCausalLM, PerformerForCausalLM),
    "AutoModelForSeq2SeqLM": (AutoModelForSeq2SeqLM, PerformerForConditionalGeneration),
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
