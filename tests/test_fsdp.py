"""FSDP and meta-device builds, for every attention family in the registry.

One launch of `tests/fsdp_step.py` on two gloo processes (`accelerate launch --multi_gpu --num_processes 2` on CPU)
takes one FSDP2 step per family with a model that has tied embeddings and ALBERT sharing; the tests compare it with one
plain process on the same global batch, and reload its full and sharded checkpoints into plain and meta-built models.
The in-process tests build on the meta device with every position scheme, whose buffers `_init_weights` must rebuild.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from accelerate import init_empty_weights
from accelerate.utils import merge_fsdp_weights
from safetensors.torch import load_file

from hf_xarch import ATTENTION_FAMILIES, POSITION_SCHEMES, XArchForCausalLM
from tests.fsdp_step import fsdp_config
from tests.helpers import random_ids, tiny_config
from tests.test_train_distributed import REPO, _env, _free_port

FAMILIES = sorted(name for name, family in ATTENTION_FAMILIES.items() if family.causal)  # a causal LM each


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fsdp")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(REPO / "tests" / "fsdp_step.py"), str(folder)]
    run = subprocess.run(command, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=600,
                         cwd=REPO, check=False)
    assert run.returncode == 0, run.stderr[-5000:]
    return folder, json.loads((folder / "results.json").read_text())


@pytest.mark.slow
def test_accelerate_keeps_cpu_runs_off_fsdp(fsdp_run):
    """Why fsdp_step.py calls torch's `fully_shard` itself: Accelerate drops an `fsdp_plugin` on CPU (MULTI_CPU,
    DistributedDataParallel). When this fails, Accelerate shards on CPU and the script can use `accelerator.prepare`."""
    _, results = fsdp_run
    assert results["accelerate_distributed_type"] == "DistributedType.MULTI_CPU"
    assert results["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_step_matches_one_process(fsdp_run, family):
    """Loss, gradients and updated weights of one SGD step: FSDP over 2 processes (half the rows each) against one
    plain process with the whole batch. Each block runs at two depths (ALBERT) and lm_head is the embedding table."""
    folder, results = fsdp_run
    result = results[family]
    assert result["elements_held"] < result["elements"]  # really sharded: a rank holds part of the weights
    assert result["fsdp_loss"] == pytest.approx(result["reference_loss"], rel=1e-6)
    for kind in ("grads", "weights"):
        want = load_file(str(folder / family / f"reference_{kind}.safetensors"))
        got = load_file(str(folder / family / f"fsdp_{kind}.safetensors"))
        assert got.keys() == want.keys()
        for name in want:
            if kind == "grads":
                assert want[name].abs().max() > 0, f"{name} has no gradient: the comparison would prove nothing"
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=f"{kind} {name}")


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_checkpoints_reload_into_plain_models(fsdp_run, family, tmp_path):
    """The full state dict (saved with save_pretrained) loads with from_pretrained and gives the FSDP model's logits;
    the sharded checkpoint, merged with Accelerate's `merge_fsdp_weights` and loaded into a model built under
    `init_empty_weights`, gives the same logits bit for bit (the Performer projection travels in both)."""
    folder, _ = fsdp_run
    saved = load_file(str(folder / family / "logits.safetensors"))
    loaded = XArchForCausalLM.from_pretrained(folder / family / "full")
    want = _logits(loaded, saved["probe"])
    torch.testing.assert_close(want, saved["logits"], atol=1e-5, rtol=1e-5)

    merge_fsdp_weights(str(folder / family / "sharded"), str(tmp_path))
    with init_empty_weights():
        model = XArchForCausalLM(fsdp_config(family))
    model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own copy of the table
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    assert not [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    assert torch.equal(_logits(model, saved["probe"]), want)


def _meta_cases():
    for family in FAMILIES:
        for scheme in sorted(POSITION_SCHEMES):
            try:
                tiny_config(attention_type=family, position_embedding_type=scheme)
            except ValueError:  # a pair the config refuses (Performer has no score matrix for ALiBi)
                continue
            yield family, scheme


@pytest.mark.parametrize(("family", "scheme"), list(_meta_cases()))
def test_meta_build_then_init_and_load_is_identical(family, scheme):
    """FSDP's way of building: every tensor on the meta device, `to_empty`, `init_weights` (which must rebuild the
    buffers no checkpoint holds: rotary inv_freq, sinusoidal tables, ALiBi slopes, the Performer projection drawn from
    its seed), then the saved weights: the original model's logits, bit for bit."""
    config = tiny_config(attention_type=family, position_embedding_type=scheme, is_decoder=True,
                         tie_word_embeddings=True, **({"sliding_window": 4} if family == "sliding_window" else {}))
    original = XArchForCausalLM(config)
    ids = random_ids(2, 16, seed=3)
    with torch.device("meta"):
        model = XArchForCausalLM(config)
    model.to_empty(device="cpu")
    model.init_weights()
    for name, module in model.named_modules():
        if hasattr(module, "reset_features"):  # Performer: the projection is the one its (new) seed draws
            assert torch.equal(module.projection, module.projection_for_step(0)), name
    model.load_state_dict(original.state_dict(), strict=True)
    assert model.lm_head.weight is model.model.embeddings.word_embeddings.weight
    assert torch.equal(_logits(model, ids), _logits(original, ids))
