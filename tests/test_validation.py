"""Bad values fail early: every impossible config raises a ValueError naming the field when it is built (or changed,
then checked when saved or when a model is built), and every bad input raises one naming the argument. One setting,
one field: a derived field (``sliding_window``, ``layer_types``, ``head_dim``...) follows the fields it comes from,
even when they change after construction, so a saved config always loads."""

import copy
import json

import pytest
import torch
from transformers import AutoConfig, DynamicCache

from hf_xarch import XArchConfig, XArchForCausalLM, XArchModel
from hf_xarch.model.attention_sliding import validate_sliding_config

from .helpers import random_ids, tiny_config

BOOLEAN_FIELDS = [f for f, kind in XArchConfig.__annotations__.items() if kind in ("bool", "bool | None")]


def test_every_boolean_field_is_found():
    assert {"is_decoder", "global_projections", "tie_word_embeddings", "use_cache"} <= set(BOOLEAN_FIELDS)


@pytest.mark.parametrize("field", BOOLEAN_FIELDS)
def test_boolean_fields_take_only_booleans(field):
    with pytest.raises(ValueError, match=rf"XArchConfig\.{field}='yes' is not allowed: True or False"):
        tiny_config(**{field: "yes"})


@pytest.mark.parametrize("load", [XArchConfig.from_pretrained, AutoConfig.from_pretrained], ids=["xarch", "auto"])
def test_a_config_json_with_a_string_boolean_does_not_load(tmp_path, load):
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**saved, "is_decoder": "yes"}))
    with pytest.raises(ValueError, match="is_decoder='yes'"):
        load(tmp_path)


@pytest.mark.parametrize("rope", ["yarn", ["linear", 2.0]], ids=str)
def test_rope_parameters_that_are_not_a_dict(rope):
    with pytest.raises(ValueError, match="XArchConfig.rope_parameters=.* is not allowed: a dict"):
        tiny_config(position_embedding_type="rope", rope_parameters=rope)


IMPOSSIBLE_ROPE = [
    ({"rope_type": "linear", "factor": -2.0}, "factor=-2.0"),
    ({"rope_type": "linear", "factor": 0}, "factor=0"),
    ({"rope_type": "dynamic", "factor": "2"}, "factor='2'"),
    ({"rope_type": "default", "rope_theta": 0.0}, "rope_theta=0.0"),
    ({"rope_type": "default", "rope_theta": -10000.0}, "rope_theta=-10000.0"),
    ({"rope_type": "default", "partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": -1.0}, "attention_factor=-1.0"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1.0, "beta_slow": 8.0}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, "original_max_position_embeddings=0"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16}, "high_freq_factor above low_freq_factor"),
    ({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 3, "long_factor": [1.0] * 4,
      "original_max_position_embeddings": 16}, "short_factor of 4 entries"),
]


@pytest.mark.parametrize("rope, problem", IMPOSSIBLE_ROPE, ids=[problem for _, problem in IMPOSSIBLE_ROPE])
def test_impossible_rope_values_raise_instead_of_warning(rope, problem):
    with pytest.raises(ValueError, match=rf"XArchConfig\.rope_parameters=.*{problem}"):
        tiny_config(position_embedding_type="rope", rope_parameters=rope)


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 0.5}, {"rope_type": "yarn", "factor": 4.0},
                                  {"rope_type": "default", "partial_rotary_factor": 0.5}], ids=str)
def test_possible_rope_values_still_build(rope):
    assert tiny_config(position_embedding_type="rope", rope_parameters=rope).rope_parameters["rope_type"] == rope[
        "rope_type"]


ENCODER_ONLY_AT_BUILD = [
    ({"attention_window": 5}, "attention_window=5 is not allowed: even windows in an encoder"),
    ({"attention_window": [4, 5], "num_hidden_layers": 2}, r"attention_window=\[4, 5\] is not allowed: even .* layer 1 has 5"),
    ({"sliding_window": 3}, "attention_window=3 is not allowed: even windows"),
    ({"attention_window": 4, "attention_sink_size": 2}, "attention_sink_size=2 is not allowed: 0 in an encoder"),
]


@pytest.mark.parametrize("overrides, message", ENCODER_ONLY_AT_BUILD, ids=[m[:40] for _, m in ENCODER_ONLY_AT_BUILD])
def test_sliding_encoder_problems_fail_when_the_config_is_built(overrides, message):
    with pytest.raises(ValueError, match=message):
        XArchConfig(attention_type="sliding_window", **overrides)
    decoder = XArchConfig(attention_type="sliding_window", is_decoder=True, **overrides)  # any window, sinks too
    assert decoder.sliding_window in (3, 4, 5)


def test_global_projections_only_where_global_tokens_exist():
    with pytest.raises(ValueError, match="global_projections=True is not allowed: False in a decoder"):
        tiny_config(attention_type="sliding_window", attention_window=4, is_decoder=True, global_projections=True)


UNREAD_OPTIONS = [
    ({"global_projections": True}, "global_projections=True"),
    ({"attention_dilation": 2}, "attention_dilation=2"),
    ({"attention_dilation": [1, [1, 2, 1, 1]]}, "attention_dilation="),
    ({"attention_sink_size": 2, "is_decoder": True}, "attention_sink_size=2"),
]


@pytest.mark.parametrize("family", ["full", "performer"])
@pytest.mark.parametrize("overrides, field", UNREAD_OPTIONS, ids=[field for _, field in UNREAD_OPTIONS])
def test_sliding_options_on_layers_that_do_not_read_them_raise(family, overrides, field):
    with pytest.raises(ValueError, match=rf"XArchConfig\.{field}.*read only by attention_type='sliding_window'"):
        tiny_config(attention_type=family, **overrides)


@pytest.mark.parametrize("family", ["full", "sliding_window"])
@pytest.mark.parametrize("option, value", [("performer_nb_features", 64), ("performer_kernel", "relu"),
                                           ("performer_redraw_interval", 10), ("performer_feature_floor", 0.0)])
def test_family_options_of_a_family_no_layer_uses_raise(family, option, value):
    """The registry record's `options`: set on a model none of whose layers reads them, they would be ignored."""
    with pytest.raises(ValueError, match=rf"XArchConfig\.{option}=.*read only by attention_type='performer'"):
        tiny_config(attention_type=family, **{option: value})
    tiny_config(layer_types=[family, "performer"], is_decoder=True, **{option: value})  # one layer reads them: fine


def test_dilation_is_per_layer_and_only_for_sliding_layers_of_a_mixed_stack():
    layer_types = ["sliding_window", "full"]
    assert tiny_config(layer_types=layer_types, attention_window=4, attention_dilation=[2, 1]).sliding_window == 7
    with pytest.raises(ValueError, match=r"attention_dilation=\[1, 2\].*layer 1 \('full_attention'\)"):
        tiny_config(layer_types=layer_types, attention_window=4, attention_dilation=[1, 2])


def test_validate_sliding_config_returns_derived_values_and_never_writes():
    config = tiny_config(attention_type="sliding_window", is_decoder=True)
    # the fields as given, before __post_init__ derives from them (set in __dict__: no re-deriving)
    config.__dict__.update(attention_window=(4, 6), attention_dilation=((1, 2, 1, 3), 1), sliding_window=None)
    before = copy.deepcopy(config.__dict__)
    derived = validate_sliding_config(config)
    assert config.__dict__ == before
    assert derived == {"attention_window": [4, 6], "attention_dilation": [[1, 2, 1, 3], 1], "sliding_window": 10}
    config.__dict__.update(attention_window=None, attention_dilation=None, sliding_window=7)  # Mistral's way
    assert validate_sliding_config(config) == {"attention_window": 7, "attention_dilation": None, "sliding_window": 7}


# ---- inputs -----------------------------------------------------------------------------------------------------
FAMILIES = [{}, {"attention_type": "sliding_window", "attention_window": 4}, {"attention_type": "performer"}]


@pytest.mark.parametrize("family", FAMILIES, ids=["full", "sliding", "performer"])
def test_an_empty_batch_raises_a_value_error_naming_the_input(family):
    model = XArchModel(tiny_config(**family)).eval()
    with pytest.raises(ValueError, match=r"input_ids of shape \(0, 5\).*at least one row"):
        model(torch.zeros(0, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds of shape \(0, 5, 32\)"):
        model(inputs_embeds=torch.zeros(0, 5, 32))


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("family", FAMILIES, ids=["full", "sliding", "performer"])
def test_an_attention_mask_that_does_not_cover_the_input_raises(family, is_decoder):
    model = XArchModel(tiny_config(is_decoder=is_decoder, **family)).eval()
    ids = random_ids(2, 5)
    for shape in [(2, 4), (2, 6), (1, 5), (2, 5, 1)]:
        with pytest.raises(ValueError, match=rf"attention_mask of shape \({', '.join(map(str, shape))}\) does not "
                                             r"fit the inputs: expected \(2, 5\)"):
            model(ids, attention_mask=torch.ones(shape, dtype=torch.long))
    assert model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long)).last_hidden_state.shape == (2, 5, 32)


@pytest.mark.parametrize("family", FAMILIES, ids=["full", "sliding", "performer"])
def test_with_a_cache_the_mask_covers_past_and_new_tokens(family):
    model = XArchForCausalLM(tiny_config(is_decoder=True, **family)).eval()
    ids = random_ids(2, 6)
    cache = DynamicCache(config=model.config)
    model(ids[:, :5], attention_mask=torch.ones(2, 5, dtype=torch.long), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match=r"attention_mask of shape \(2, 1\) .* expected \(2, 6\).* 5 cached and 1 new"):
        model(ids[:, 5:], attention_mask=torch.ones(2, 1, dtype=torch.long), cache=cache, use_cache=True)
    model(ids[:, 5:], attention_mask=torch.ones(2, 6, dtype=torch.long), cache=cache, use_cache=True)


# ---- one setting, one field ---------------------------------------------------------------------------------------
def saved_and_loaded(config, tmp_path):
    config.save_pretrained(tmp_path)
    return AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_sliding_window_set_after_construction_is_honoured_and_reloads(tmp_path, is_decoder):
    config = tiny_config(attention_type="sliding_window", attention_window=[4, 6], is_decoder=is_decoder)
    config.sliding_window = 8
    assert config.attention_window == 8 and config.sliding_window == 8
    loaded = saved_and_loaded(config, tmp_path)
    assert loaded.attention_window == 8 and loaded.sliding_window == 8
    assert XArchModel(loaded).layers[1].attention.window == 8


def test_attention_window_set_after_construction_updates_sliding_window(tmp_path):
    config = tiny_config(attention_type="sliding_window", attention_window=4, attention_dilation=2, is_decoder=True)
    config.attention_window = 3
    assert config.sliding_window == (3 - 1) * 2 + 1
    config.attention_dilation = 1
    assert config.sliding_window == 3
    assert saved_and_loaded(config, tmp_path).sliding_window == 3


def test_sliding_window_cannot_stand_for_a_dilated_window():
    config = tiny_config(attention_type="sliding_window", attention_window=4, attention_dilation=2, is_decoder=True)
    with pytest.raises(ValueError, match="sliding_window=5 is not allowed: set only without dilation"):
        config.sliding_window = 5
    with pytest.raises(ValueError, match="sliding_window=0 is not allowed"):
        config.sliding_window = 0


def test_sliding_window_on_a_model_without_sliding_layers_saves_and_reloads(tmp_path):
    """transformers' ModelTesterMixin sets config.sliding_window on every config that has the field."""
    config = tiny_config(is_decoder=True)
    config.sliding_window = 2
    loaded = saved_and_loaded(config, tmp_path)
    assert loaded.sliding_window == 2 and loaded.attention_window == 2
    loaded.attention_type = "sliding_window"  # the window set under either name is the one a sliding layer gets
    assert loaded.layer_types == ["sliding_attention"] * 2 and loaded.sliding_window == 2


def test_from_pretrained_override_of_sliding_window_sets_the_window(tmp_path):
    tiny_config(attention_type="sliding_window", attention_window=4, is_decoder=True).save_pretrained(tmp_path)
    loaded = XArchConfig.from_pretrained(tmp_path, sliding_window=6)
    assert loaded.attention_window == 6 and loaded.sliding_window == 6


def test_attention_type_and_num_hidden_layers_set_after_construction_update_layer_types(tmp_path):
    config = tiny_config(is_decoder=True)
    config.attention_type = "sliding_window"
    config.num_hidden_layers = 3
    assert config.layer_types == ["sliding_attention"] * 3 and config.sliding_window == 512
    assert saved_and_loaded(config, tmp_path).layer_types == ["sliding_attention"] * 3
    mixed = tiny_config(layer_types=["full", "performer"])
    mixed.attention_type = "full"  # unchanged: nothing to follow
    with pytest.raises(ValueError, match="attention_type='performer' is not allowed: set alone only on a model whose"):
        mixed.attention_type = "performer"


def test_size_defaults_follow_their_sources_after_construction(tmp_path):
    config = tiny_config(intermediate_size=None)  # head_dim, num_key_value_heads, embedding_size derived too
    config.num_attention_heads = 2
    config.hidden_size = 64
    assert (config.head_dim, config.num_key_value_heads) == (32, 2)
    assert (config.intermediate_size, config.embedding_size) == (256, 64)
    loaded = saved_and_loaded(config, tmp_path)
    assert (loaded.head_dim, loaded.num_key_value_heads, loaded.intermediate_size) == (32, 2, 256)


def test_values_given_explicitly_do_not_follow():
    config = tiny_config(num_key_value_heads=2, head_dim=12, intermediate_size=37)
    config.hidden_size = 64
    config.num_attention_heads = 8
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 12, 37)


def test_flag_defaults_follow_their_sources_after_construction(tmp_path):
    config = tiny_config(attention_bias=True)
    config.is_decoder = True
    config.norm_position = "post"
    config.attention_bias = False
    assert (config.classifier_pooling, config.final_norm, config.qkv_bias) == ("last", False, False)
    loaded = saved_and_loaded(config, tmp_path)
    assert (loaded.classifier_pooling, loaded.final_norm, loaded.qkv_bias) == ("last", False, False)


def test_a_config_changed_into_an_impossible_one_fails_at_save_and_at_model_build(tmp_path):
    config = tiny_config(attention_type="sliding_window", attention_window=4)
    config.attention_window = 5  # odd: impossible for an encoder
    with pytest.raises(ValueError, match="attention_window=5 is not allowed: even windows in an encoder"):
        XArchModel(config)
    with pytest.raises(ValueError, match="attention_window=5"):
        config.save_pretrained(tmp_path)
    config.is_decoder = True  # a decoder takes it
    assert XArchForCausalLM(config).model.layers[0].attention.window == 5


def test_rope_parameters_set_after_construction_are_standardized_and_checked_at_save(tmp_path):
    config = tiny_config(position_embedding_type="rope", is_decoder=True)
    config.rope_parameters = {"rope_type": "yarn", "factor": 2.0}  # as transformers' rope tests set it
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.rope_parameters["original_max_position_embeddings"] == 64
    assert saved_and_loaded(config, tmp_path).rope_parameters == config.rope_parameters
    config.rope_parameters = {"rope_type": "linear", "factor": -1.0}
    with pytest.raises(ValueError, match="factor=-1.0"):
        config.save_pretrained(tmp_path)
