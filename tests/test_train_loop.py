"""The shared training loop against a plain PyTorch reference, and its checkpoints: atomic, verified, exact resume."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from accelerate import Accelerator
from transformers import get_scheduler

from hf_xarch import XArchForCausalLM, XArchForMaskedLM
from hf_xarch.train.checkpoint import latest_valid_checkpoint, list_checkpoints, verify_checkpoint
from hf_xarch.train.data import ExampleOrder, mask_for_mlm
from hf_xarch.train.loop import LoopSettings, count_label_items, train

from .helpers import tiny_config

pytestmark = pytest.mark.one_thread


class _Tok:  # what mask_for_mlm needs of a tokenizer
    all_special_ids = (0, 1, 2)
    mask_token_id = 3

    def __len__(self):
        return 99


def _model(task: str, seed: int = 0, dropout: float = 0.0, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(hidden_dropout=dropout, position_embedding_type="rope", is_decoder=task == "clm", **overrides)
    return (XArchForCausalLM if task == "clm" else XArchForMaskedLM)(config)


def _blocks(rows: int = 40, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 99, (rows, length), generator=torch.Generator().manual_seed(seed))


def _collate(task: str):
    def collate(items, step):
        ids = torch.stack(items)
        if task == "clm":
            return {"input_ids": ids, "labels": ids}
        inputs, labels = mask_for_mlm(ids, _Tok(), 0.3, torch.Generator().manual_seed(1000 + step))
        return {"input_ids": inputs, "labels": labels}

    return collate


def _optim(model, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=steps)


def _run(task, micro, accumulation, steps, model=None, **settings):
    model = model or _model(task)
    optimizer, scheduler = _optim(model, steps)
    options = {"max_steps": steps, "micro_batch_size": micro, "gradient_accumulation_steps": accumulation,
                   "max_grad_norm": 0.5, "log_every": 1, "resume": "never", "progress_bar": False}
    options.update(settings)
    callbacks = options.pop("callbacks", ())
    return train(Accelerator(cpu=True), model, optimizer, scheduler, ExampleOrder(examples=_blocks(), seed=7),
                 _collate(task), LoopSettings(**options), causal=task == "clm", callbacks=callbacks)


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_loop_with_accumulation_equals_one_big_batch_reference(task):
    """micro-batches of 2 x 3 accumulation steps == a plain loop taking the mean loss over all 6 rows at once (for MLM
    the micro-batches hold different numbers of masked tokens, so plain averaging of micro losses would differ)."""
    steps = 5
    result = _run(task, micro=2, accumulation=3, steps=steps)

    reference = _model(task)
    optimizer, scheduler = _optim(reference, steps)
    order, collate = ExampleOrder(examples=_blocks(), seed=7), _collate(task)
    for step in range(steps):
        batch = collate(order.take(6), step)
        reference(**batch).loss.backward()  # the mean over every labelled token of the global batch
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    for (name, got), want in zip(result.model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5, msg=name)
    losses = [r["train/loss"] for r in result.history]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))


def test_count_label_items():
    labels = torch.tensor([[5, -100, 7], [-100, 1, 2]])
    assert count_label_items({"labels": labels}, causal=False) == 4
    assert count_label_items({"labels": labels}, causal=True) == 3  # the first column is never predicted
    assert count_label_items({"labels": torch.tensor([1, 0, 1])}, causal=False) == 3


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    """Dropout on, so the restored RNG state matters; the resumed run starts from other random weights, so the
    result can only match if the checkpoint restored them."""
    full = _run("clm", 2, 2, 6, model=_model("clm", dropout=0.1))

    class Crash(RuntimeError):
        pass

    def crash_at_3(step, record):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        _run("clm", 2, 2, 6, model=_model("clm", dropout=0.1), checkpoint_dir=tmp_path, checkpoint_every=2,
             callbacks=[crash_at_3])
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2]
    resumed = _run("clm", 2, 2, 6, model=_model("clm", seed=99, dropout=0.1), checkpoint_dir=tmp_path,
                   checkpoint_every=2, resume="auto")
    assert resumed.resumed_from.endswith("checkpoint-00000002")
    for (name, got), want in zip(resumed.model.state_dict().items(), full.model.state_dict().values()):
        assert torch.equal(got, want), name
    assert [r["step"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]  # history restored, then continued
    assert [r["train/loss"] for r in resumed.history] == [r["train/loss"] for r in full.history]


def test_checkpoints_are_verified_pruned_and_corrupt_ones_skipped(tmp_path):
    _run("clm", 2, 1, 6, checkpoint_dir=tmp_path, checkpoint_every=2, keep_last=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 4]
    newest = tmp_path / "checkpoint-00000006"
    assert verify_checkpoint(newest) is None
    manifest = json.loads((newest / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.bin", "trainer_state.json"} <= set(manifest["files"])

    shutil.copytree(newest, tmp_path / ".tmp-checkpoint-00000008")  # a write that never finished: not a checkpoint
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10] + b"0123456789")  # same size, different bytes
    with pytest.warns(UserWarning, match="checkpoint-00000006: model.safetensors does not match its checksum"):
        assert latest_valid_checkpoint(tmp_path) == tmp_path / "checkpoint-00000004"
    (tmp_path / "checkpoint-00000004" / "manifest.json").unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_valid_checkpoint(tmp_path) is None
    assert any("no manifest" in str(w.message) for w in caught)

    # resuming with only broken checkpoints starts from scratch (with the warnings), it does not crash
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        result = _run("clm", 2, 1, 2, checkpoint_dir=tmp_path, checkpoint_every=0, resume="auto")
    assert result.resumed_from is None and result.step == 2


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_steps": 0}, "training.max_steps"),
        ({"micro_batch_size": 1.5}, "training.micro_batch_size"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"log_every": -2}, "log_every"),
        ({"resume": "/no/such/checkpoint"}, "checkpoint.resume"),
    ],
)
def test_loop_settings_are_validated(settings, message):
    options = {"max_steps": 3, "micro_batch_size": 2}
    options.update(settings)
    with pytest.raises(ValueError, match=message):
        LoopSettings(**options)


def test_progress_bar_labels_train_and_heldout_loss_apart(capsys):
    """The bar shows both losses under their own names (it once showed the held-out loss alone, as `loss=`)."""
    model = _model("clm", initializer_range=0.02)  # small init: near-uniform predictions, a loss near ln 99
    optimizer, scheduler = _optim(model, 2)
    settings = LoopSettings(max_steps=2, micro_batch_size=4, log_every=1, eval_every=1, resume="never",
                            progress_bar=True, description="bar")
    train(Accelerator(cpu=True), model, optimizer, scheduler, ExampleOrder(examples=_blocks(), seed=7),
          _collate("clm"), settings, causal=True, evaluate=lambda trained: {"eval/loss": 7.0})
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("bar: 100%") and "heldout_loss=7" in final
    shown = float(final.split("train_loss=")[1].split(",")[0].rstrip("]"))
    assert 4.0 < shown < 5.0  # a tiny untrained model on 99 token ids: about ln 99 = 4.6, not the held-out 7
