"""hf_xarch.linearize: softmax -> linear attention keeping every weight, and attention transfer (LoLCATs' first
stage) lowering each layer's error against the softmax layer."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_xarch import XArchForCausalLM, XArchForMaskedLM, attention_errors, attention_transfer, linearize
from hf_xarch.linearize import is_transfer_parameter, transfer_parameters

from .helpers import left_padded_mask, random_ids, tiny_config

pytestmark = pytest.mark.one_thread


def teacher_model(decoder=True, **overrides):
    torch.manual_seed(0)
    head = XArchForCausalLM if decoder else XArchForMaskedLM
    return head(tiny_config(is_decoder=decoder, position_embedding_type="rope", **overrides)).eval()


@pytest.mark.parametrize("decoder", [True, False], ids=["decoder", "encoder"])
def test_linearize_keeps_every_weight(decoder):
    teacher = teacher_model(decoder, num_key_value_heads=2)
    student = linearize(teacher, attention_type="linear_sliding", feature_map="t2r", window=8)
    old, new = teacher.state_dict(), student.state_dict()
    assert all(torch.equal(new[name], tensor) for name, tensor in old.items())
    added = set(new) - set(old)
    assert added and all(is_transfer_parameter(name) for name in added)
    assert {type(block.attention).family.name for block in student.model.layers} == {"linear_sliding"}
    assert student.config.linearized_from


@pytest.mark.parametrize("decoder", [True, False], ids=["decoder", "encoder"])
def test_hybrid_with_a_window_over_the_whole_input_is_the_teacher(decoder):
    """Every key inside the window: the hybrid is exact softmax, so the kept weights give the teacher's logits."""
    teacher = teacher_model(decoder)
    student = linearize(teacher, attention_type="linear_sliding", window=64).eval()
    ids, mask = random_ids(2, 20, seed=1), left_padded_mask([20, 13], 20)
    with torch.no_grad():
        expected, got = teacher(ids, attention_mask=mask).logits, student(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)


def test_linearize_a_transformers_gpt2():
    """Through from_hf: a GPT-2 becomes a hybrid that, with its window over the whole input, is still that GPT-2."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    student = linearize(gpt2, attention_type="linear_sliding", window=64).eval()
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, gpt2(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("attention_type", "feature_map"), [("linear", "hedgehog"), ("linear_sliding", "t2r")])
def test_attention_transfer_lowers_every_layer_error(attention_type, feature_map):
    teacher = teacher_model()
    student = linearize(teacher, attention_type=attention_type, feature_map=feature_map, window=4)
    frozen = {name: p.clone() for name, p in student.named_parameters() if not is_transfer_parameter(name)}
    batches = [{"input_ids": random_ids(4, 24, seed=s), "attention_mask": left_padded_mask([24, 20, 24, 10], 24)}
               for s in range(4)]
    heldout = [{"input_ids": random_ids(4, 24, seed=9)}]
    before = attention_errors(student, teacher, heldout)
    losses = attention_transfer(student, teacher, batches, steps=40, lr=3e-2)
    after = attention_errors(student, teacher, heldout)
    assert all(a < 0.9 * b for a, b in zip(after, before)), (before, after)
    assert losses[-1] < losses[0]
    # only the feature maps (and mixes) moved
    assert all(torch.equal(p, frozen[name]) for name, p in student.named_parameters() if name in frozen)
    assert all(p.requires_grad for p in transfer_parameters(student))


def test_linearize_refuses_what_it_cannot_do():
    teacher = teacher_model()
    with pytest.raises(ValueError, match="attention_type='performer'"):
        linearize(teacher, attention_type="performer")
    performer = XArchForCausalLM(tiny_config(is_decoder=True, attention_type="performer"))
    with pytest.raises(ValueError, match="softmax"):
        linearize(performer)
    alibi = XArchForCausalLM(tiny_config(is_decoder=True, position_embedding_type="alibi"))
    with pytest.raises(ValueError, match="alibi"):
        linearize(alibi)


# ---- the recipe -------------------------------------------------------------------------------------------------------
RECIPE = ["data.max_bytes=120000", "tokenizer.vocab_size=300", "tokenizer.train_bytes=120000", "data.block_size=32",
          "training.micro_batch_size=4", "evaluation.max_batches=2", "evaluation.final_max_batches=2",
          "evaluation.batch_size=8", "logging.every_steps=1", "logging.progress_bar=false", "transfer.max_steps=4",
          "training.max_steps=4", "checkpoint.every_steps=2", "window=8", "error_batches=1",
          "schedule.warmup_steps=1", "base.max_steps=4", "base.block_size=32", "base.model.hidden_size=32",
          "base.model.num_hidden_layers=2", "base.model.num_attention_heads=2", "base.model.intermediate_size=64",
          "base.model.max_position_embeddings=64"]
# runs the recipe and kills itself (SIGKILL) at the KILL_AT-th training step over both stages
KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from hf_xarch.train.config import load_config
from hf_xarch.train.linearize import DEFAULTS, OPEN_SECTIONS, run_linearize
calls = []
def kill(step, record):
    calls.append(step)
    if len(calls) == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
run_linearize(load_config(DEFAULTS, overrides=sys.argv[1:], open_sections=OPEN_SECTIONS), callbacks=[kill])
"""


def _recipe_cfg(*overrides):
    from hf_xarch.train.config import load_config
    from hf_xarch.train.linearize import DEFAULTS, OPEN_SECTIONS

    return load_config(DEFAULTS, overrides=[*RECIPE, *overrides], open_sections=OPEN_SECTIONS)


@pytest.mark.slow
def test_recipe_runs_end_to_end_and_resumes_exactly_after_a_kill(tmp_path):
    """Offline, tiny: the base is pretrained, linearized, transferred and LoRA-tuned; the saved model reloads (its card
    says what it was linearized from); a run killed mid-transfer resumes both stages to the same weights."""
    import os
    import signal
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from hf_xarch.train.linearize import ROWS, run_linearize

    whole = run_linearize(_recipe_cfg(f"output_dir={tmp_path / 'whole'}"))
    folder = whole.output_dir
    assert set(whole.table) == set(ROWS) and all("eval/bits_per_byte" in row for row in whole.table.values())
    assert "Linearized from" in (folder / "README.md").read_text() and (folder / "linearize.md").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert {type(block.attention).family.name for block in reloaded.model.layers} == {"linear_sliding"}
    ids = torch.randint(3, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, whole.model(ids).logits)

    killed_dir = tmp_path / "killed"
    base = [f"base_model={folder / 'base'}", f"output_dir={killed_dir}"]  # the same base, not pretrained again
    environment = {**os.environ, "KILL_AT": "3", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *RECIPE, *base], check=False, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (killed_dir / "model.safetensors").exists()
    resumed = run_linearize(_recipe_cfg(*base))
    for (name, tensor), (other, expected) in zip(resumed.model.state_dict().items(), whole.model.state_dict().items()):
        assert name == other and torch.equal(tensor, expected), name


def test_cli_refuses_a_bad_option_in_one_line(capsys):
    from hf_xarch.cli import main

    assert main(["linearize", "attention_type=performer", "output_dir=/nonexistent/x"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "attention_type='performer'" in error
