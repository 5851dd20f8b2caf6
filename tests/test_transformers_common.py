"""transformers' own common tests (ModelTesterMixin, ConfigTester of the installed version) run
against every Performer head, as an in-tree model's `test_modeling_*.py` runs them.

The test files come from the transformers source distribution (see transformers_suite.py).
Without a package registry they cannot be fetched: the module is skipped, unless
PERFORMER_REQUIRE_COMMON_TESTS=1 (set by scripts/test.sh, so CI never skips it silently).
Skips of single tests state their reason next to the name.
"""

import os
import unittest

import pytest

from modeling_performer import (
    PerformerConfig,
    PerformerForCausalLM,
    PerformerForConditionalGeneration,
    PerformerForMaskedLM,
    PerformerForSequenceClassification,
    PerformerModel,
)

from . import transformers_suite

try:
    common = transformers_suite.load("test_modeling_common")
    config_common = transformers_suite.load("test_configuration_common")
    generation_utils = transformers_suite.load("generation.test_utils")
except (transformers_suite.SuiteUnavailable, ImportError) as error:  # pragma: no cover - offline only
    if os.environ.get("PERFORMER_REQUIRE_COMMON_TESTS") == "1":
        raise
    pytest.skip(f"transformers' common tests unavailable: {error}", allow_module_level=True)

# An in-tree model is listed in transformers' name mappings, which the common tests read to
# decide which heads get labels and which are bare stacks; ours is registered with the Auto
# classes instead. Give the test module the mappings an in-tree Performer would have.
for _name, _head in {
    "MODEL_MAPPING_NAMES": "PerformerModel",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "PerformerForMaskedLM",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES": "PerformerForSequenceClassification",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "PerformerForCausalLM",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "PerformerForConditionalGeneration",
}.items():
    setattr(common, _name, {**getattr(common, _name), "performer": _head})

ModelTesterMixin = common.ModelTesterMixin
ids_tensor = common.ids_tensor
random_attention_mask = common.random_attention_mask
ConfigTester = config_common.ConfigTester
# A stand-in (the sdist lacks tests/generation): marks the generative testers as transformers expects.
GenerationTesterMixin = generation_utils.GenerationTesterMixin


class PerformerModelTester:
    """Small configs and inputs for the common tests (the sizes of transformers' BERT tester)."""

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_labels=3, **config_overrides):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.encoder_seq_length = seq_length
        self.is_training = is_training
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.num_labels = num_labels
        self.config_overrides = config_overrides

    def get_config(self) -> PerformerConfig:
        values = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, intermediate_size=self.intermediate_size,
            num_random_features=16, max_position_embeddings=64, chunk_size=4, hidden_dropout_prob=0.1,
            num_labels=self.num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
        values.update(self.config_overrides)
        return PerformerConfig(**values)

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        inputs = {"input_ids": input_ids, "attention_mask": random_attention_mask([self.batch_size, self.seq_length])}
        if config.is_encoder_decoder:
            inputs["decoder_input_ids"] = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
            inputs["decoder_attention_mask"] = random_attention_mask([self.batch_size, self.seq_length])
        return config, inputs


class _PerformerCommonTests(ModelTesterMixin):
    config_overrides: dict = {}
    # Linear attention never forms the [T, S] attention weights (as Mamba's tester declares).
    has_attentions = False
    # Our configuration file has no copyright year: opt in to the check that every weight is initialised.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = PerformerModelTester(self, **self.config_overrides)
        # hidden_size=37 as BERT's tester; one head, because the config refuses sizes the heads do not divide, and
        # learned positions, because it refuses a rotary over an odd head dimension.
        self.config_tester = ConfigTester(self, config_class=PerformerConfig, hidden_size=37, num_attention_heads=1,
                                          position_embedding_type="learned")

    def test_config(self):
        self.config_tester.run_common_tests()


class PerformerEncoderCommonTest(_PerformerCommonTests, unittest.TestCase):
    all_model_classes = (PerformerModel, PerformerForMaskedLM, PerformerForSequenceClassification)


class PerformerCausalLMCommonTest(_PerformerCommonTests, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (PerformerForCausalLM,)
    config_overrides = {"is_decoder": True}


class PerformerSeq2SeqCommonTest(_PerformerCommonTests, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (PerformerModel, PerformerForConditionalGeneration)
    is_encoder_decoder = True
    config_overrides = {"is_encoder_decoder": True}



# For a flat encoder-decoder config, transformers' get_text_config(decoder=True) returns a copy, so the
# rope settings of this (parametrised) test never reach the model; the encoder and causal testers run it.
for _name in [n for n in dir(PerformerSeq2SeqCommonTest) if n.startswith("test_model_rope_scaling_from_config")]:
    setattr(PerformerSeq2SeqCommonTest, _name, unittest.skip("flat encoder-decoder config: get_text_config copies it")(
        getattr(PerformerSeq2SeqCommonTest, _name)))
