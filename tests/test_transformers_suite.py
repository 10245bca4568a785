"""transformers' own model test suite (``ModelTesterMixin``, ``ConfigTester``) run against every XArch head.

The mixins come from the sdist of the installed transformers (``tests/transformers_suite/fetch.py`` downloads it once
into the git-ignored ``tests/.cache/``; later runs, offline ones included, read that copy). Each test class runs the
whole suite on its heads (``modeling_xarch.HEADS``: the bare model and every head but the one its kind cannot have):

- every registered attention family (``ATTENTION_FAMILIES``, read at collection, so a new family is covered the day it
  is registered) in an encoder and a decoder variant, as its capability flags allow: ``XArch<Family>EncoderModelTest``
  in BERT's layout (post-norm, LayerNorm, plain MLP, learned positions, token types) and
  ``XArch<Family>DecoderModelTest`` in Llama's (pre-norm, RMSNorm, SwiGLU, RoPE, GQA, untied output); ``full`` runs by
  default, the other families are marked slow;
- slow: an ALBERT-like encoder (factorized embeddings, sinusoidal positions, MQA, mean pooling) and a GPT-2-like
  decoder with tied, factorized embeddings (learned positions), for the embedding / tying paths.

Tests that need hardware we do not have (accelerators, flash-attn, bitsandbytes, deepspeed, multi-GPU) skip through
transformers' own ``require_*`` decorators. Every other skip is in ``SKIPS`` below with its reason.
"""

from __future__ import annotations

import functools
import re
import unittest
import warnings
from typing import ClassVar
from unittest import mock

import pytest
import torch
import transformers

from hf_xarch import (
    XArchConfig,
    XArchForCausalLM,
    XArchForMaskedLM,
    XArchForQuestionAnswering,
    XArchForSequenceClassification,
    XArchForTokenClassification,
    XArchModel,
)
from hf_xarch.model.modeling_xarch import HEADS
from hf_xarch.model.registry import ATTENTION_FAMILIES, POSITION_SCHEMES, AttentionFamily
from hf_xarch.testing import allowed

from .helpers import FAMILY_OVERRIDES
from .transformers_suite.fetch import PyPIUnreachable, import_transformers_tests

try:
    import_transformers_tests()
except PyPIUnreachable as err:  # the only reason to skip: in CI PyPI is reachable and this suite must run
    pytest.skip(f"transformers' test suite unavailable: {err}", allow_module_level=True)

from transformers_tests.generation.test_utils import GenerationTesterMixin
from transformers_tests.test_configuration_common import ConfigTester

with warnings.catch_warnings():
    # its decorators use marks (flash_attn_test, torch_compile_test...) that transformers' own conftest registers
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    from transformers_tests.test_modeling_common import (
        ModelTesterMixin,
        ids_tensor,
        random_attention_mask,
    )

# The mixins decide which labels a head takes by looking its class name up in transformers' *_MAPPING_NAMES tables
# (model type -> class name), the very dicts behind each Auto class's mapping. Ours (modeling_xarch.HEADS) are added
# there only while our test classes run (setUpClass/tearDownClass), not for the whole process.
MAPPING_NAMES = [(getattr(transformers, head.auto_class)._model_mapping._model_mapping, head.model_class.__name__)
                 for head in HEADS]

# Every skip we add, with its reason: SKIPS for every configuration, WITHOUT_ROPE_SKIPS for those without RoPE.
# `apply_skips` fails if a name here is not a test of the class (a stale entry). Hardware skips are not here: they
# come from transformers' own decorators (require_torch_accelerator, require_flash_attn, require_bitsandbytes,
# require_deepspeed, require_kernels, require_torch_mps, require_torch_multi_accelerator; @slow ones need an
# accelerator too).
#
# Besides those, the mixin skips some tests ITSELF after looking at the model; for us these fire, and why:
# - test_attn_implementation_composite_models, test_sdpa_can_dispatch_composite_models,
#   test_can_set_attention_dynamically_composite_model, test_internal_model_config_and_subconfig_are_same:
#   XArch is not a composite (multi-config) model;
# - test_bc_cache_name_forward: for encoders and the classification / QA heads, which take no cache;
# - test_reverse_loading_mapping, test_can_load_from_already_mapped_keys: XArch has no legacy checkpoint layout
#   to convert (no entry in transformers' conversion mapping);
# - test_keep_in_fp32_modules*, test_eager_matches_batched_and_grouped_inference (MoE grouped_mm),
#   test_moe_models_record_router_logits, test_output_router_logits_from_config, test_sliding_window_mask,
#   test_vision_axial_rope, test_tp_plan_matches_params, test_model_rope_with_partial_rotation (RoPE config without a
#   partial_rotary_factor), test_resize_position_vector_embeddings (test_resize_position_embeddings is False, as
#   for most transformers models): the feature is absent from XArch;
# - test_model_rope_scaling_frequencies (overridden below to find our rotary module): in configurations without RoPE
#   there is no rotary module to find;
# - test_causal_lm_loss_honors_shift_labels / test_encoder_decoder_loss_no_double_shift: no causal / seq2seq head in
#   that configuration.
SKIPS: dict[str, str] = {}
_ROPE_ONLY = (
    "this configuration has no RoPE (position_embedding_type is not 'rope'): `rope_parameters` is an XArchConfig "
    "field that only the 'rope' scheme reads (None otherwise), and the mixin takes its mere presence for RoPE "
    "support; XArchFullDecoderModelTest (RoPE) runs it"
)
WITHOUT_ROPE_SKIPS: dict[str, str] = {
    "test_model_rope_scaling_from_config": _ROPE_ONLY,
    "test_model_rope_with_partial_rotation": _ROPE_ONLY,
}
# A family's own departures from the mixin's assumptions, by family name: each with the property that replaces it.
_NO_WEIGHTS = (
    "performer layers have no attention weights to return: FAVOR+ never forms the attention matrix, and "
    "output_attentions=True warns and returns none, as transformers' sdpa does (README, mixed precision)"
)
_LINEAR_NO_WEIGHTS = (
    "linear attention layers have no attention weights to return: φ(Q)(φ(K)ᵀV) never forms the attention matrix, and "
    "output_attentions=True warns and returns none, as transformers' sdpa does"
)
FAMILY_SKIPS: dict[str, dict[str, str]] = {
    "performer": {
        "test_attention_outputs": _NO_WEIGHTS,
        "test_retain_grad_hidden_states_attentions": _NO_WEIGHTS,
        "test_init_weights_can_init_buffers": (
            "the mixin assumes buffers are not random; performer's `feature_seed` (and the `projection` drawn from it) "
            "is drawn at random per model like a weight, and saved, so two constructions differ; tests/test_families.py's "
            "meta_init and save_reload invariants check a meta-device build and that reload is identical"
        ),
    },
    "linear": {
        "test_attention_outputs": _LINEAR_NO_WEIGHTS,
        "test_retain_grad_hidden_states_attentions": _LINEAR_NO_WEIGHTS,
    },
}
FAMILY_SKIPS["linear_sliding"] = FAMILY_SKIPS["linear"]
_LINFORMER_WEIGHTS = (
    "linformer layers weigh k projected rows, not the sequence's keys: their (seq x linformer_k) weights are not the "
    "(seq x seq) attention the mixin checks, so none are returned (tests/test_linformer.py checks the projected "
    "attention against its dense reference)"
)
_LSH_WEIGHTS = (
    "lsh layers weigh the keys of a sorted chunk and the one before it, per hash round: there is no (seq x seq) "
    "attention to return (tests/test_lsh.py checks the chunked attention against its dense reference and "
    "transformers' LSHSelfAttention)"
)
FAMILY_SKIPS["linformer"] = {
    "test_attention_outputs": _LINFORMER_WEIGHTS,
    "test_retain_grad_hidden_states_attentions": _LINFORMER_WEIGHTS,
}
FAMILY_SKIPS["lsh"] = {
    "test_attention_outputs": _LSH_WEIGHTS,
    "test_retain_grad_hidden_states_attentions": _LSH_WEIGHTS,
    "test_init_weights_can_init_buffers": (
        "with hash_seed=None each lsh layer draws its rotations at random, like a weight, and saves them, so two "
        "constructions differ (with a hash_seed they are the same); tests/test_families.py's meta_init and "
        "save_reload invariants check a meta-device build and an identical reload"
    ),
}


# Mixin tests marked slow in every class (they still run in CI): half-precision eager == sdpa on CPU is about half of
# the suite's time (measured: ~285 of ~550 test-seconds for the two default classes); the fp32 parametrizations run
# by default. Keys are regular expressions over test names.
SLOW_TESTS: dict[str, str] = {
    r"test_eager_matches_sdpa_inference_\d+_(fp16|bf16)_": "half precision on CPU is emulated and slow",
}


def mark_slow(test_class: type, patterns: dict[str, str]) -> type:
    for pattern in patterns:
        names = [name for name in dir(test_class) if re.fullmatch(f"{pattern}.*", name)]
        if not names:
            raise AttributeError(f"SLOW_TESTS pattern {pattern!r} matches no test of {test_class.__name__}")
        for name in names:
            test = getattr(test_class, name)
            # a fresh wrapper per class: the mark must not land on a function another class shares
            setattr(test_class, name, pytest.mark.slow(functools.wraps(test)(lambda self, _t=test: _t(self))))
    return test_class


def apply_skips(test_class: type, skips: dict[str, str]) -> type:
    """Skip each named test; a parameterized test (``test_x`` expanded to ``test_x_0_linear``...) is named by its
    base name and every expansion is skipped."""
    for name, reason in skips.items():
        targets = [attr for attr in dir(test_class) if attr == name or attr.startswith(f"{name}_")]
        targets = [attr for attr in targets if attr == name or attr[len(name) + 1 :][:1].isdigit()]
        if not targets:
            raise AttributeError(f"SKIPS names {name!r}, which is not a test of {test_class.__name__}")
        for target in targets:
            setattr(test_class, target, unittest.skip(reason)(getattr(test_class, target)))
    return test_class


class XArchModelTester:
    """transformers' tiny-model tester habit (hidden 32, 2 layers, vocab 99, batch 13, sequence 7)."""

    def __init__(
        self,
        parent,
        is_decoder: bool = False,
        batch_size: int = 13,
        seq_length: int = 7,
        is_training: bool = True,
        use_input_mask: bool = True,
        use_labels: bool = True,
        vocab_size: int = 99,
        hidden_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 37,
        hidden_act: str = "gelu",
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 0,
        num_labels: int = 3,
        config_overrides: dict | None = None,
    ):
        self.parent = parent
        self.is_decoder = is_decoder
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.num_labels = num_labels
        self.config_overrides = dict(config_overrides or {})
        self.pad_token_id = 0

    def get_config(self) -> XArchConfig:
        return XArchConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            is_decoder=self.is_decoder,
            num_labels=self.num_labels,
            pad_token_id=self.pad_token_id,
            **self.config_overrides,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_type_ids = (
            ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size) if self.type_vocab_size else None
        )
        sequence_labels = token_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.num_labels)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
        return self.get_config(), input_ids, token_type_ids, input_mask, sequence_labels, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask, _, _ = self.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids}
        if input_mask is not None:
            inputs["attention_mask"] = input_mask
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return config, inputs

    # ---- shape checks of each head, as transformers' model testers have them ---------------------------------------
    def check_model(self, config, input_ids, token_type_ids, input_mask, *_):
        model = XArchModel(config).eval()
        with torch.no_grad():
            for kwargs in ({"attention_mask": input_mask, "token_type_ids": token_type_ids}, {}):
                result = model(input_ids, **{k: v for k, v in kwargs.items() if v is not None})
                expected = (self.batch_size, self.seq_length, self.hidden_size)
                self.parent.assertEqual(result.last_hidden_state.shape, expected)

    def check_for_causal_lm(self, config, input_ids, token_type_ids, input_mask, sequence_labels, token_labels):
        model = XArchForCausalLM(config).eval()
        result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))

    def check_for_masked_lm(self, config, input_ids, token_type_ids, input_mask, sequence_labels, token_labels):
        model = XArchForMaskedLM(config).eval()
        result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertTrue(torch.isfinite(result.loss))

    def check_for_sequence_classification(self, config, input_ids, token_type_ids, input_mask, sequence_labels, _):
        model = XArchForSequenceClassification(config).eval()
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        result = model(input_ids, attention_mask=input_mask, labels=sequence_labels, **extra)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertTrue(torch.isfinite(result.loss))

    def check_for_token_classification(self, config, input_ids, token_type_ids, input_mask, _, token_labels):
        model = XArchForTokenClassification(config).eval()
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        result = model(input_ids, attention_mask=input_mask, labels=token_labels, **extra)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.num_labels))
        self.parent.assertTrue(torch.isfinite(result.loss))

    def check_for_question_answering(self, config, input_ids, token_type_ids, input_mask, sequence_labels, _):
        model = XArchForQuestionAnswering(config).eval()
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        result = model(
            input_ids, attention_mask=input_mask, start_positions=sequence_labels, end_positions=sequence_labels, **extra
        )
        self.parent.assertEqual(result.start_logits.shape, (self.batch_size, self.seq_length))
        self.parent.assertEqual(result.end_logits.shape, (self.batch_size, self.seq_length))
        self.parent.assertTrue(torch.isfinite(result.loss))


class _XArchSuite(ModelTesterMixin):
    """What the encoder and decoder test classes share; subclasses set the tester and the classes."""

    tester_kwargs: ClassVar[dict] = {}
    config_tester_kwargs: ClassVar[dict] = {}
    # the mixin dates a model by the "# Copyright YYYY" line of its config file and skips this test for models from
    # before 2023 unless asked; ours has no such line, so ask: `_init_weights` must cover every parameter and buffer
    test_can_init_all_missing_weights_before_2023 = True

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls._mapping_patches = [mock.patch.dict(table, {"xarch": name}) for table, name in MAPPING_NAMES]
        for patch in cls._mapping_patches:
            patch.start()

    @classmethod
    def tearDownClass(cls):
        for patch in reversed(cls._mapping_patches):
            patch.stop()
        super().tearDownClass()

    def setUp(self):
        self.model_tester = XArchModelTester(self, **self.tester_kwargs)
        self.config_tester = ConfigTester(
            self, config_class=XArchConfig, hidden_size=36, vocab_size=99, **self.config_tester_kwargs
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_sequence_classification(self):
        self.model_tester.check_for_sequence_classification(*self.model_tester.prepare_config_and_inputs())

    def test_for_token_classification(self):
        self.model_tester.check_for_token_classification(*self.model_tester.prepare_config_and_inputs())

    def test_for_question_answering(self):
        self.model_tester.check_for_question_answering(*self.model_tester.prepare_config_and_inputs())

    def test_model_rope_scaling_frequencies(self):
        """The mixin finds the rotary module by the attribute names `rotary_emb` / `pos_emb`; XArch keeps it at
        `XArchModel.layer_positions` (the slot ALiBi also uses). Show it under the mixin's name and run its checks
        (default, linear, dynamic-NTK and YaRN frequencies) on our `RotaryEmbedding`; configurations without RoPE
        have no module there and the mixin skips itself."""
        named_modules = XArchModel.named_modules

        def renamed(module, *args, **kwargs):
            for name, sub in named_modules(module, *args, **kwargs):
                yield name.replace("layer_positions", "rotary_emb"), sub

        with mock.patch.object(XArchModel, "named_modules", renamed):
            super().test_model_rope_scaling_frequencies()


class _EncoderHeads(_XArchSuite):
    all_model_classes = tuple(head.model_class for head in HEADS if head.model_class is not XArchForCausalLM)

    def test_for_masked_lm(self):
        self.model_tester.check_for_masked_lm(*self.model_tester.prepare_config_and_inputs())


class _DecoderHeads(_XArchSuite, GenerationTesterMixin):
    all_model_classes = tuple(head.model_class for head in HEADS if head.model_class is not XArchForMaskedLM)
    config_tester_kwargs: ClassVar[dict] = {"is_decoder": True}

    def test_for_causal_lm(self):
        self.model_tester.check_for_causal_lm(*self.model_tester.prepare_config_and_inputs())


# The layouts every family runs in: BERT's for encoders (post-norm LayerNorm, plain GELU MLP, learned positions,
# embedding norm, token types, tied MLM), Llama's for decoders (pre-norm RMSNorm, SwiGLU, RoPE, grouped-query
# attention, untied output embeddings). A family whose flags refuse the layout's position scheme gets the first scheme
# it accepts.
ENCODER_LAYOUT = {
    "is_decoder": False,
    "type_vocab_size": 16,
    "config_overrides": {"norm_position": "post", "embedding_norm": True, "position_embedding_type": "learned"},
}
DECODER_LAYOUT = {
    "is_decoder": True,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "config_overrides": {
        "norm_type": "rmsnorm",
        "mlp_type": "gated",
        "position_embedding_type": "rope",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
    },
}
# Families other than `full` run the whole suite too, marked slow (about 100 s each on CPU); the default run keeps
# `full`, whose layouts also stand for the families' shared stack, embeddings and heads.
DEFAULT_RUN_FAMILIES = ("full",)


def family_variant(family: AttentionFamily, decoder: bool) -> type:
    """The test class for ``family`` in the decoder (or encoder) layout, with its options from tests/test_families.py
    (a window narrower than the tester's 7 tokens, so the band is exercised)."""
    layout = DECODER_LAYOUT if decoder else ENCODER_LAYOUT
    position = layout["config_overrides"]["position_embedding_type"]
    if not allowed(family, POSITION_SCHEMES[position], decoder):
        position = next(name for name, scheme in POSITION_SCHEMES.items() if allowed(family, scheme, decoder))
    options = {"attention_type": family.name, **FAMILY_OVERRIDES.get(family.name, {})}
    overrides = {**layout["config_overrides"], "position_embedding_type": position, **options}
    name = "".join(part.capitalize() for part in family.name.split("_"))
    test_class = type(
        f"XArch{name}{'Decoder' if decoder else 'Encoder'}ModelTest",
        (_DecoderHeads if decoder else _EncoderHeads, unittest.TestCase),
        {
            "tester_kwargs": {**layout, "config_overrides": overrides},
            "config_tester_kwargs": {**(_DecoderHeads if decoder else _EncoderHeads).config_tester_kwargs, **options},
            "__module__": __name__,
            "__qualname__": f"XArch{name}{'Decoder' if decoder else 'Encoder'}ModelTest",
        },
    )
    return test_class if family.name in DEFAULT_RUN_FAMILIES else pytest.mark.slow(test_class)


# an encoder and a decoder variant of every registered family its flags allow, read from the registry at collection
FAMILY_TEST_CLASSES = tuple(
    family_variant(family, decoder)
    for family in sorted(ATTENTION_FAMILIES.values(), key=lambda family: family.name)
    for decoder in (False, True)
    if (family.causal if decoder else family.bidirectional)
)
globals().update({test_class.__name__: test_class for test_class in FAMILY_TEST_CLASSES})


@pytest.mark.slow
class XArchFactorizedEncoderModelTest(_EncoderHeads, unittest.TestCase):
    # ALBERT-like: factorized embeddings (16 -> 32), sinusoidal positions, multi-query attention, pre-norm, mean pooling
    tester_kwargs: ClassVar[dict] = {
        "is_decoder": False,
        "num_key_value_heads": 1,
        "config_overrides": {
            "embedding_size": 16, "position_embedding_type": "sinusoidal", "norm_position": "pre", "classifier_pooling": "mean"
        },
    }


@pytest.mark.slow
class XArchTiedDecoderModelTest(_DecoderHeads, unittest.TestCase):
    # GPT-2-like with tied, factorized embeddings: learned positions, LayerNorm, plain MLP, output projected 32 -> 16
    # onto the tied table
    tester_kwargs: ClassVar[dict] = {
        "is_decoder": True,
        "config_overrides": {"embedding_size": 16, "position_embedding_type": "learned", "tie_word_embeddings": True},
    }


TEST_CLASSES = (*FAMILY_TEST_CLASSES, XArchFactorizedEncoderModelTest, XArchTiedDecoderModelTest)


def _skips_for(test_class: type) -> dict[str, str]:
    overrides = test_class.tester_kwargs["config_overrides"]
    uses_rope = overrides.get("position_embedding_type") == "rope"
    family_skips = FAMILY_SKIPS.get(overrides.get("attention_type", "full"), {})
    return {**SKIPS, **({} if uses_rope else WITHOUT_ROPE_SKIPS), **family_skips}


# (a loop variable holding a TestCase class would be collected by pytest a second time, hence no module-level loop)
list(map(apply_skips, TEST_CLASSES, map(_skips_for, TEST_CLASSES)))
list(map(mark_slow, TEST_CLASSES, [SLOW_TESTS] * len(TEST_CLASSES)))

