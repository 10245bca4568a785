"""XArchConfig: defaults, serialisation, and a clear ValueError for every bad value or impossible combination."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import hf_xarch
from hf_xarch import ATTENTION_FAMILIES, POSITION_SCHEMES, XArchConfig, XArchModel
from hf_xarch.conversions import CONVERTERS

from .helpers import tiny_config


def test_derived_defaults():
    config = tiny_config(num_key_value_heads=None, intermediate_size=None)
    assert config.num_key_value_heads == config.num_attention_heads
    assert config.head_dim == config.hidden_size // config.num_attention_heads
    assert config.intermediate_size == 4 * config.hidden_size
    assert config.embedding_size == config.hidden_size
    assert config.layer_types == ["full_attention"] * config.num_hidden_layers
    assert config.final_norm is True and tiny_config(norm_position="post").final_norm is False
    assert config.classifier_pooling == "first" and tiny_config(is_decoder=True).classifier_pooling == "last"


def test_initializer_range_scales_with_width_unless_given():
    """Issue 22: the default std is hidden_size ** -0.5 (measured in benchmarks/results/defaults.md); it follows a
    changed hidden_size, reaches the weights, and a value given (transformers' 0.02) is kept."""
    config = tiny_config(hidden_size=64)
    assert config.initializer_range == pytest.approx(64**-0.5)
    config.hidden_size = 128
    assert config.initializer_range == pytest.approx(128**-0.5)
    given = tiny_config(hidden_size=64, initializer_range=0.02)
    given.hidden_size = 128
    assert given.initializer_range == 0.02
    torch.manual_seed(0)
    weight = XArchModel(tiny_config(hidden_size=64)).layers[0].attention.q_proj.weight
    assert weight.std().item() == pytest.approx(64**-0.5, rel=0.1)


@pytest.mark.parametrize("model_type", sorted(CONVERTERS))
def test_converted_configs_keep_the_transformers_initializer_range(model_type):
    """A converted model keeps its family's std (0.02 in every transformers default), not XArch's width-scaled one."""
    converter = CONVERTERS[model_type]
    hf_config = AutoConfig.for_model(model_type)
    converted = converter.config_from_hf(hf_config, next(iter(converter.heads)))
    # BART calls it init_std; T5 scales d_model ** -0.5 by initializer_factor
    std = {"bart": lambda c: c.init_std, "t5": lambda c: c.initializer_factor * c.d_model**-0.5}
    assert converted.initializer_range == std.get(model_type, lambda c: c.initializer_range)(hf_config)


def test_auto_config_round_trip(tmp_path):
    config = tiny_config(num_key_value_heads=2, position_embedding_type="rope",
                         rope_parameters={"rope_type": "linear", "factor": 2.0})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, XArchConfig)
    ignore = {"_name_or_path", "transformers_version"}
    strip = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())


def test_layer_types_accept_family_names_and_store_transformers_names():
    config = tiny_config(layer_types=["full", "full_attention"])
    assert config.layer_types == ["full_attention", "full_attention"]
    assert [family.name for family in config.layer_families()] == ["full", "full"]


BAD_CONFIGS = [
    (dict(hidden_size=33), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(attention_type="nope"), "attention_type"),
    (dict(position_embedding_type="nope"), "position_embedding_type"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(intermediate_size=-1), "intermediate_size"),
    (dict(head_dim=0), "head_dim"),
    (dict(embedding_size=-2), "embedding_size"),
    (dict(max_position_embeddings=0), "max_position_embeddings"),
    (dict(type_vocab_size=-1), "type_vocab_size"),
    (dict(norm_type="batchnorm"), "norm_type"),
    (dict(norm_position="middle"), "norm_position"),
    (dict(mlp_type="moe"), "mlp_type"),
    (dict(hidden_act="not-an-activation"), "hidden_act"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(initializer_range=-0.02), "initializer_range"),
    (dict(classifier_pooling="max"), "classifier_pooling"),
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention", "mystery"]), "layer_types"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), "rope_parameters"),  # not a rope model
    (dict(position_embedding_type="rope", rope_parameters={"rope_type": "linear"}), "rope_parameters"),
    (dict(position_embedding_type="rope", rope_parameters={"rope_type": "warp"}), "rope_parameters"),
    (dict(position_embedding_type="rope", hidden_size=36, num_attention_heads=4), "head_dim"),  # odd head_dim 9
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS, ids=[field for _, field in BAD_CONFIGS])
def test_bad_config_raises_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("family", sorted(ATTENTION_FAMILIES))
@pytest.mark.parametrize("scheme", sorted(POSITION_SCHEMES))
@pytest.mark.parametrize("is_decoder", [False, True])
def test_registry_capabilities_decide_validity(family, scheme, is_decoder):
    """Every (family, scheme, stack) either builds or fails with a ValueError, exactly as the declared flags say."""
    spec, position = ATTENTION_FAMILIES[family], POSITION_SCHEMES[scheme]
    allowed = (spec.causal if is_decoder else spec.bidirectional) and not (
        (position.kind == "bias" and not spec.additive_position_bias) or (position.kind == "rotary" and not spec.rotary)
    )
    build = lambda: tiny_config(attention_type=family, position_embedding_type=scheme, is_decoder=is_decoder)  # noqa: E731
    if allowed:
        assert build().attention_type == family
    else:
        with pytest.raises(ValueError):
            build()


LIGHT_IMPORT = """
import importlib.util, sys
folder = sys.argv[1]
spec = importlib.util.spec_from_file_location("copied_model", folder + "/__init__.py", submodule_search_locations=[folder])
package = importlib.util.module_from_spec(spec)
sys.modules["copied_model"] = package
spec.loader.exec_module(package)
import copied_model.configuration_xarch as configuration
heavy = sorted(name for name in sys.modules if name.startswith("copied_model.") and not (
    name.endswith(("_spec", "_specs")) or name.split(".")[1] in ("configuration_xarch", "registry", "specs", "transformers_private")))
print(heavy, "transformers.masking_utils" in sys.modules, "hf_xarch" in sys.modules)
print(sorted(configuration.ATTENTION_FAMILIES))
"""


def test_the_config_imports_only_the_light_specs():
    """configuration_xarch (all AutoConfig loads of a saved model) imports the registry and each family's light spec,
    never an attention module, a kernel or transformers' masking utilities; and it still knows every family."""
    folder = Path(hf_xarch.__file__).parent / "model"
    result = subprocess.run([sys.executable, "-c", LIGHT_IMPORT, str(folder)], capture_output=True, text=True,
                            check=True)
    heavy, families = result.stdout.strip().splitlines()
    assert heavy == "[] False False", heavy
    assert families == str(sorted(ATTENTION_FAMILIES))


@pytest.mark.parametrize("attention_type", ["performer", "linear"])
def test_attention_dropout_on_layers_without_weights_is_not_silently_ignored(attention_type):
    from transformers.testing_utils import CaptureLogger

    from hf_xarch.model import configuration_xarch

    # a value of its own per case: the warning is logged once per message
    dropout = {"performer": 0.137, "linear": 0.139}[attention_type]
    with CaptureLogger(configuration_xarch.logger) as captured:
        XArchConfig(attention_type=attention_type, attention_dropout=dropout)
    assert f"attention_dropout={dropout} has no effect on the ['{attention_type}'] layers" in captured.out
    with CaptureLogger(configuration_xarch.logger) as captured:
        XArchConfig(attention_type=attention_type, attention_dropout=0.0)
        XArchConfig(attention_type="full", attention_dropout=0.141)
    assert "has no effect" not in captured.out
