"""Fresh processes: a run killed with SIGKILL (mid-run and mid-checkpoint) resumes to exactly the weights of an
uninterrupted run; two gloo processes (`accelerate launch --multi_gpu --num_processes 2` on CPU) reach the weights of
one process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.intermediate_size=64",
        "model.max_position_embeddings=32", "data.block_size=32", "data.max_bytes=100000", "tokenizer.vocab_size=300",
        "tokenizer.train_bytes=100000", "evaluation.max_batches=2", "evaluation.batch_size=4", "logging.every_steps=1",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]

# runs the pretrain recipe; with KILL_AT=N it kills itself (SIGKILL) inside the write of checkpoint N: its files are
# written, its manifest is not yet
DRIVER = """
import os, signal, sys
from hf_xarch.train import checkpoint
from hf_xarch.train.pretrain import DEFAULTS, run_pretrain
from hf_xarch.train.config import load_config, xarch_config_fields

at = int(os.environ.get("KILL_AT", "0"))
if at:
    real = checkpoint._sha256
    def sha_then_die(path):
        if f"checkpoint-{at:08d}" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path)
    checkpoint._sha256 = sha_then_die
cfg = load_config(DEFAULTS, overrides=sys.argv[1:], open_sections={"model": xarch_config_fields()})
run_pretrain(cfg)
"""


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("KILL_AT", None)
    env.update(extra)
    return env


def _run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DRIVER, *args], env=_env(**env), capture_output=True, text=True,
                          timeout=600, cwd=REPO, check=False)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_exact(tmp_path):
    """Killed while writing checkpoint 6 of 8 (so mid-run, and with a partial checkpoint on disk); the restart skips
    the partial folder, resumes from checkpoint 4 and ends with the uninterrupted run's weights, bit for bit."""
    args = [*TINY, "model.hidden_dropout=0.1", "training.max_steps=8", "training.micro_batch_size=2",
            "training.gradient_accumulation_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "evaluation.every_steps=4"]
    reference = _run([*args, f"output_dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "interrupted"
    killed = _run([*args, f"output_dir={out}"], KILL_AT="6")  # dies in step 6's checkpoint
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        ".tmp-checkpoint-00000006", "checkpoint-00000002", "checkpoint-00000004"]
    partial = checkpoints / ".tmp-checkpoint-00000006"
    assert (partial / "model.safetensors").is_file() and not (partial / "manifest.json").exists()
    assert not (out / "model.safetensors").exists()

    resumed = _run([*args, f"output_dir={out}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr and "checkpoint-00000004" in resumed.stdout + resumed.stderr
    want, got = _weights(tmp_path / "reference"), _weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    history = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    reference_history = [json.loads(x) for x in (tmp_path / "reference" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 9))
    assert [r["train/loss"] for r in history] == [r["train/loss"] for r in reference_history]
    assert not partial.exists()  # the re-written checkpoint 6 replaced the partial one


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """MLM with accumulation: micro-batches hold different numbers of masked tokens, so this also checks that the loss
    weighting makes the gradient the global-batch mean for any split of rows over processes."""
    # the key projection's bias has a zero gradient up to rounding (softmax ignores a shift shared by every key), and
    # Adam turns that rounding noise into lr-sized steps once it exceeds eps: at the default init (hidden ** -0.5) this
    # bias was the first weight to differ between the two reduction orders; at 0.02 every weight agrees
    args = [*TINY, "task=mlm", "model.position_embedding_type=learned", "model.initializer_range=0.02",
            "training.max_steps=5",
            "training.gradient_accumulation_steps=2", "checkpoint.every_steps=0", "evaluation.every_steps=5"]
    single = _run([*args, "training.micro_batch_size=4", f"output_dir={tmp_path / 'one'}"])
    assert single.returncode == 0, single.stderr[-3000:]

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(REPO / "recipes" / "pretrain.py"),
               *args, "training.micro_batch_size=2", f"output_dir={tmp_path / 'two'}"]
    double = subprocess.run(command, env=_env(ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=600,
                            cwd=REPO, check=False)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "pretrain: 5 steps" in double.stdout

    want, got = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4, msg=name)
    one = [json.loads(x) for x in (tmp_path / "one" / "logs" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "two" / "logs" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(one, two):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
    assert one[-1]["eval/loss"] == pytest.approx(two[-1]["eval/loss"], rel=1e-4)
    assert one[-1]["eval/tokens"] == two[-1]["eval/tokens"]  # the same held-out rows, whoever evaluated them
