"""``swap_attention`` / ``reconfigured``: the same model with other attention settings, its weights kept."""

import pytest
import torch

from hf_xarch import XArchForCausalLM, XArchForMaskedLM, reconfigured, swap_attention

from .helpers import tiny_config

GLOBAL_PROJECTIONS = ("query_global", "key_global", "value_global")


def longformer_like(**overrides):
    """An encoder whose every layer is sliding-window attention with options (window, global projections)."""
    torch.manual_seed(0)
    return XArchForMaskedLM(tiny_config(attention_type="sliding_window", attention_window=8, global_projections=True,
                                        **overrides)).eval()


def names(model, *parts):
    return sorted(name for name in model.state_dict() if any(f".{part}." in name for part in parts))


def assert_kept(model, swapped, dropped, added):
    """Every weight of ``model`` not dropped is in ``swapped``, equal; nothing else was copied."""
    old, new = model.state_dict(), swapped.state_dict()
    for name, tensor in old.items():
        if name not in dropped:
            assert torch.equal(new[name], tensor), name
    assert set(new) - set(added) == set(old) - set(dropped)


def test_sliding_to_bigbird_keeps_every_weight_but_the_global_projections():
    model = longformer_like()
    swapped, dropped, added = swap_attention(model, attention_type="bigbird", block_size=4, num_random_blocks=1)
    assert dropped == names(model, *GLOBAL_PROJECTIONS) and added == []
    assert_kept(model, swapped, dropped, added)
    assert {f.name for f in swapped.config.layer_families()} == {"bigbird"}
    assert (swapped.config.block_size, swapped.config.global_projections) == (4, False)


def test_sliding_to_lsh_drops_the_key_projection_and_adds_the_rotations():
    model = longformer_like()
    swapped, dropped, added = swap_attention(model, attention_type="lsh", num_buckets=4, lsh_chunk_length=8)
    assert dropped == names(model, "k_proj", *GLOBAL_PROJECTIONS)
    assert added and all(name.endswith(".attention.rotations") for name in added)
    assert len(added) == model.config.num_hidden_layers
    assert_kept(model, swapped, dropped, added)
    assert (swapped.config.num_buckets, swapped.config.lsh_chunk_length) == (4, 8)


def test_a_weight_whose_shape_changes_is_both_dropped_and_added():
    model = XArchForMaskedLM(tiny_config(position_embedding_type="learned")).eval()
    swapped, dropped, added = swap_attention(model, max_position_embeddings=128)
    assert dropped == added == ["model.embeddings.position_embeddings.weight"]
    assert_kept(model, swapped, dropped, added)


def test_options_of_the_family_swapped_in_are_kept_and_shared_options_survive():
    config = tiny_config(is_decoder=True, attention_type="linear", linear_feature_map="t2r")
    new = reconfigured(config, attention_type="linear_sliding", linear_window=4)
    # linear_feature_map is read by both linear families: it stays; linear_window is the caller's
    assert (new.linear_feature_map, new.linear_window) == ("t2r", 4)


def test_an_option_the_caller_passes_is_never_dropped():
    with pytest.raises(ValueError, match="block_size=8.*read only by attention_type='bigbird'"):
        reconfigured(longformer_like().config, attention_type="full", block_size=8)


def test_sliding_window_alone_sets_attention_window_and_attention_type_sets_every_layer():
    decoder = tiny_config(is_decoder=True, attention_type="sliding_window", attention_window=8)
    assert (reconfigured(decoder, sliding_window=4).attention_window, reconfigured(decoder).sliding_window) == (4, 8)
    mixed = tiny_config(layer_types=["full", "sliding_window"], attention_window=8)
    assert {f.name for f in reconfigured(mixed, attention_type="lsh").layer_families()} == {"lsh"}


def test_a_position_scheme_swapped_out_takes_its_options_with_it():
    config = tiny_config(position_embedding_type="t5_relative", relative_attention_num_buckets=16)
    new = reconfigured(config, position_embedding_type="rope")
    assert new.relative_attention_num_buckets == type(config)().relative_attention_num_buckets


def test_a_decoder_to_linformer_raises_the_configs_error():
    with pytest.raises(ValueError, match="attention_type='linformer'.*no causal form"):
        swap_attention(XArchForCausalLM(tiny_config(is_decoder=True)), attention_type="linformer")


def test_the_input_model_is_unchanged():
    model = longformer_like()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config_before = model.config.to_dict()
    swapped, _, _ = swap_attention(model, attention_type="full")
    with torch.no_grad():  # the copies share no storage with the input
        for parameter in swapped.parameters():
            parameter.add_(1.0)
    assert model.config.to_dict() == config_before
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())


@pytest.mark.parametrize("training", [True, False])
def test_mode_dtype_and_attn_implementation(training):
    model = longformer_like().to(torch.bfloat16).train(training)
    swapped, dropped, added = swap_attention(model, attn_implementation="eager", attention_type="full")
    assert swapped.training is training and swapped.dtype == torch.bfloat16
    assert swapped.config._attn_implementation == "eager"
    assert_kept(model, swapped, dropped, added)


def test_the_decoder_stack_keeps_an_option_its_family_shares_with_an_unused_one():
    config = tiny_config(is_encoder_decoder=True, attention_type="linear", linear_feature_map="t2r",
                         decoder_attention_type="linear_sliding")
    assert config.stack_config("decoder").linear_feature_map == "t2r"
