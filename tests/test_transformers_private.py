"""The adapter over transformers' private APIs (``hf_xarch/model/transformers_private.py``), one test per protocol it
wraps, each named after the function: when a transformers release moves one of them, the failing test says which."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedConfig, Trainer, TrainingArguments
from transformers.cache_utils import DynamicCache, DynamicLayer, StaticCache

from hf_xarch import XArchForCausalLM
from hf_xarch.model.cache_performer import PerformerStateLayer
from hf_xarch.model.registry import ATTENTION_FAMILIES
from hf_xarch.model.transformers_private import (
    PastRecording,
    allow_layer_type,
    cache_layer_for,
    register_cache_layer,
    transformers_layer_types,
)

from .helpers import random_ids, tiny_config


def test_allow_layer_type_lets_transformers_base_config_read_every_registered_layer_type(tmp_path):
    for family in ATTENTION_FAMILIES.values():
        assert family.layer_type in transformers_layer_types(), family.name
    config = tiny_config(layer_types=["performer", "full"], is_decoder=True)
    config.save_pretrained(tmp_path)
    # what Trainer's resume_from_checkpoint does with the saved config
    reread = PreTrainedConfig.from_json_file(str(tmp_path / "config.json"))
    assert reread.layer_types == ["performer_attention", "full_attention"]
    allow_layer_type("full_attention")  # already known: no duplicate
    assert transformers_layer_types().count("full_attention") == 1


def test_register_cache_layer_builds_our_layer_and_refuses_a_second_class():
    config = tiny_config(layer_types=["performer", "full"], is_decoder=True)
    assert cache_layer_for("performer_attention") is PerformerStateLayer
    assert cache_layer_for("performer_attention", static=True) is PerformerStateLayer
    cache = DynamicCache(config=config)
    assert [type(layer) for layer in cache.layers] == [PerformerStateLayer, DynamicLayer]
    static = StaticCache(config=config, max_cache_len=16)
    assert isinstance(static.layers[0], PerformerStateLayer)

    class Impostor(DynamicLayer):
        pass

    with pytest.raises(ValueError, match="performer_attention.*layer type of its own"):
        register_cache_layer("performer_attention", Impostor)
    assert cache_layer_for("performer_attention") is PerformerStateLayer


def test_past_recording_accepts_whatever_generate_passes():
    model = XArchForCausalLM(tiny_config(attention_type="performer", is_decoder=True)).eval()
    cache = DynamicCache(config=model.config)
    assert all(isinstance(layer, PastRecording) for layer in cache.layers)
    cache.activate_past_recording()  # older transformers pass nothing to the layers
    assert all(layer.record_past for layer in cache.layers)
    # transformers >= 5.24 passes recurrent_states_to_keep through Cache.activate_past_recording to every layer
    for layer in cache.layers:
        layer.activate_past_recording(recurrent_states_to_keep=3)
    assert cache.layers[0].recording_options == {"recurrent_states_to_keep": 3}
    with torch.no_grad():
        model(random_ids(1, 5, seed=1), cache=cache, use_cache=True)
        model(random_ids(1, 2, seed=2), cache=cache, use_cache=True)
    cache.crop(-2)
    assert cache.get_seq_length() == 5


def test_trainer_resumes_a_performer_model_from_its_checkpoint(tmp_path):
    """Trainer's resume_from_checkpoint re-reads the saved config through PreTrainedConfig, whose layer-type check
    used to reject 'performer_attention'."""
    config = tiny_config(attention_type="performer", is_decoder=True)
    ids = random_ids(8, 12, seed=3)
    data = [{"input_ids": row, "labels": row} for row in ids]

    def trainer(steps):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                 save_steps=2, report_to=[], use_cpu=True, logging_steps=1, seed=0,
                                 lr_scheduler_type="constant")
        torch.manual_seed(0)
        return Trainer(model=XArchForCausalLM(config), args=args, train_dataset=data)

    trainer(2).train()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    straight = trainer(4)
    straight.args.output_dir = str(tmp_path / "straight")
    straight.train()
    for (name, a), b in zip(resumed.model.named_parameters(), straight.model.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_quantized_cache_generation_takes_over_generates_quantized_cache_only_for_its_backend():
    """GenerationMixin._prepare_cache_for_generation builds the cache of generate(cache_implementation=...)."""
    from transformers import GenerationConfig
    from transformers.cache_utils import QuantizedCache

    from hf_xarch.model.cache_quantized import XArchQuantizedCache
    from hf_xarch.model.transformers_private import QuantizedCacheGeneration

    model = XArchForCausalLM(tiny_config(is_decoder=True)).eval()
    assert isinstance(model, QuantizedCacheGeneration) and model.quantized_cache_class is XArchQuantizedCache
    prompt = random_ids(1, 4, seed=3)
    out = model.generate(prompt, max_new_tokens=2, cache_implementation="quantized",
                         cache_config={"backend": "xarch", "nbits": 2}, return_dict_in_generate=True)
    assert isinstance(out.cache, XArchQuantizedCache) and out.cache.settings["nbits"] == 2
    # another backend is transformers' own QuantizedCache (which needs optimum-quanto / HQQ to run)
    model_kwargs = {}
    config = GenerationConfig(cache_implementation="quantized", cache_config={"backend": "quanto"})
    try:
        model._prepare_cache_for_generation(config, model_kwargs, None, 1, 8)
    except ImportError:  # optimum-quanto missing: QuantizedCache's layer refused to build, so it was transformers'
        return
    assert isinstance(model_kwargs["cache"], QuantizedCache)
