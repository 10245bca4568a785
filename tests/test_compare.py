"""`hf-xarch compare` end to end on tiny models and the default corpus (offline): what it writes, that the comparison
is fair (same batches, identical configurations give identical numbers), that it resumes per model, that budgets and
overrides mean what they say, and that the written summary follows the numbers."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest
import torch

from hf_xarch.cli import main as cli_main
from hf_xarch.compare import recipe
from hf_xarch.compare.measure import tensor_bytes
from hf_xarch.compare.recipe import budget_steps, check_config, parse_command_line, run_compare, shared_tokenizer
from hf_xarch.compare.report import summarize
from hf_xarch.train import pretrain

TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
        "model.intermediate_size=64", "model.max_position_embeddings=64", "data.max_bytes=120000",
        "tokenizer.vocab_size=300", "tokenizer.train_bytes=100000", "data.block_size=16",
        "evaluation.lengths=[16,32,64]", "evaluation.tokens_per_length=512", "evaluation.batch_size=8",
        "training.micro_batch_size=4", "budget.train_tokens=640", "measure.decode_tokens=4",
        "checkpoint.every_steps=5", "logging.every_steps=2", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.plot=false", "schedule.warmup_steps=2"]
MODELS = "models={rope: {}, rope_again: {}, alibi: {position_embedding_type: alibi}, learned: " \
         "{position_embedding_type: learned, max_position_embeddings: 32}}"

# the RoPE models extended 4x (16 -> 64 tokens) by position interpolation, fine-tuned one step of 4 x 64 tokens
EXTENSION = ["extension.rope_types=[linear]", "extension.train_tokens=256"]
BASES = {"rope", "rope_again", "alibi", "learned"}

pytestmark = pytest.mark.one_thread


def tiny_cfg(folder, *overrides, models=MODELS):
    return parse_command_line([*TINY, models, f"output_dir={folder}", *overrides])


def batch_recorder(monkeypatch) -> dict:
    """Records a digest of every training batch, per output folder (per model), by wrapping the pretrain collate."""
    seen: dict = {}
    original = pretrain.make_lm_collate

    def recording(task, tokenizer, mlm_probability, seed):
        collate = original(task, tokenizer, mlm_probability, seed)
        stream = seen.setdefault(len(seen), [])

        def wrapped(blocks, step):
            batch = collate(blocks, step)
            stream.append(hashlib.sha256(batch["input_ids"].numpy().tobytes()).hexdigest())
            return batch

        return wrapped

    monkeypatch.setattr(pretrain, "make_lm_collate", recording)
    return seen


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as monkeypatch:
        batches = batch_recorder(monkeypatch)
        data = run_compare(tiny_cfg(folder, *EXTENSION))
    return folder, data, batches


@pytest.mark.slow
def test_compare_writes_every_length_of_every_model(compared):
    folder, _, _ = compared
    saved = json.loads((folder / "results.json").read_text())
    assert set(saved["models"]) == BASES | {"rope+linear", "rope_again+linear"}
    for name, entry in saved["models"].items():
        assert set(entry["bits_per_byte"]) == {"16", "32", "64"}, name
        if name in BASES:
            assert entry["train"]["steps"] == 640 // (4 * 16) and entry["train"]["tokens"] == 640
        assert entry["parameters"] > 0 and entry["train_step_peak_bytes"] > 0
        assert entry["decode"]["decode_tokens"] == 4 and entry["decode"]["cache_bytes_after_prompt"] > 0
    # a learned table of 32 positions cannot run 64 tokens: recorded as not measured, with the reason, not guessed
    assert saved["models"]["learned"]["bits_per_byte"]["64"] is None
    assert "max_position_embeddings=32" in saved["models"]["learned"]["lengths"]["64"]["skipped"]
    assert saved["models"]["learned"]["decode"]["prompt_tokens"] == 32 - 4
    assert 0 < saved["models"]["alibi"]["bits_per_byte"]["64"] < 12
    # ALiBi caches keys and values like RoPE: the same cache bytes after the same prompt
    assert (saved["models"]["alibi"]["decode"]["cache_bytes_after_prompt"]
            == saved["models"]["rope"]["decode"]["cache_bytes_after_prompt"])
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert len(rows) == 6 * 3
    report = (folder / "report.md").read_text()
    assert all(line in report for line in saved["summary"])
    assert all((folder / "plots" / f"{name}.png").is_file() for name in (
        "bits_per_byte_vs_length", "bits_per_byte_vs_compute", "speed_vs_length", "memory_vs_length"))


@pytest.mark.slow
def test_identical_configurations_give_identical_results_on_the_same_batches(compared):
    _, data, batches = compared
    models = data["models"]
    assert models["rope"]["bits_per_byte"] == models["rope_again"]["bits_per_byte"]
    assert models["rope"]["train"]["final_loss"] == models["rope_again"]["train"]["final_loss"]
    streams = list(batches.values())  # in training order: the four models, then the two extensions
    assert len(streams) == 6 and len(streams[0]) == 640 // (4 * 16)
    assert all(stream == streams[0] for stream in streams[:4])  # every model saw the same batches in the same order
    assert streams[4] == streams[5] and streams[4] != streams[0]


@pytest.mark.slow
def test_extension_step_extends_rope_models_and_counts_their_base_training(compared):
    folder, data, _ = compared
    entry = data["models"]["rope+linear"]
    assert entry["extends"] == {"model": "rope", "rope_type": "linear", "new_length": 64}
    assert entry["trained_length"] == 64 and entry["train"]["tokens"] == 256 and entry["train"]["base_tokens"] == 640
    config = json.loads((folder / "models" / "rope+linear" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear" and config["rope_parameters"]["factor"] == 4
    assert not any(name.startswith(("alibi+", "learned+")) for name in data["models"])  # RoPE models only


@pytest.mark.slow
def test_a_rerun_skips_finished_models_and_a_killed_one_resumes(compared, monkeypatch):
    """After an interruption (simulated: one model's measurements missing, as if killed after its last checkpoint),
    only that model runs again, resuming from its checkpoint instead of retraining; the others are loaded."""
    folder, data, _ = compared
    (folder / "models" / "alibi" / "measurements.json").unlink()
    ran = []
    original = recipe.run_pretrain

    def spy(cfg, **kwargs):
        ran.append(cfg.output_dir)
        result = original(cfg, **kwargs)
        assert result.loop.resumed_from is not None and result.loop.tokens == 0  # nothing trained again
        return result

    monkeypatch.setattr(recipe, "run_pretrain", spy)
    again = run_compare(tiny_cfg(folder, *EXTENSION))
    assert ran == [str(folder / "models" / "alibi")]
    assert again["models"]["alibi"]["bits_per_byte"] == data["models"]["alibi"]["bits_per_byte"]
    assert again["models"]["rope"] == data["models"]["rope"]


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused(compared):
    folder, _, _ = compared
    with pytest.raises(ValueError, match="models.rope: .* was measured with other settings"):
        run_compare(tiny_cfg(folder, *EXTENSION, "optimizer.lr=0.01"))


def test_equal_flops_budget_gives_each_model_the_tokens_its_cost_allows():
    cfg = tiny_cfg("unused", "budget.train_flops=2e9", models="models={small: {}, wide: {intermediate_size: 512}}")
    check_config(cfg)
    assert cfg.budget.train_tokens is None

    class Tokenizer:
        def __len__(self):
            return 300

    fields = recipe.model_fields(cfg)
    tokens_per_step = 4 * 16
    steps = {}
    for name in fields:
        flops = recipe.training_flops_per_token(fields[name], Tokenizer(), 16)
        steps[name] = budget_steps(cfg, flops, 16, 1, name)
        # the most whole steps the budget pays for
        assert steps[name] * tokens_per_step * flops <= 2e9 < (steps[name] + 1) * tokens_per_step * flops
    assert steps["wide"] < steps["small"]
    with pytest.raises(ValueError, match="models.small gets .* less than one step"):
        budget_steps(tiny_cfg("unused", "budget.train_flops=1e3"), 1e3, 16, 1, "small")


def test_overrides_reach_every_section(tmp_path):
    cfg = tiny_cfg(tmp_path, "budget.train_flops=1e12", "evaluation.lengths=[16,128]", "data.files=[a.txt]",
                   "models.alibi.hidden_size=64", "extension.rope_types=[linear]")
    check_config(cfg)  # reads 1e12 (a string to YAML 1.1) as a number
    assert cfg.budget.to_dict() == {"train_tokens": None, "train_flops": 1e12}
    assert cfg.evaluation.lengths == [16, 128] and cfg.data.files == ["a.txt"]
    assert recipe.model_fields(cfg)["alibi"] == {**cfg.model.to_dict(), "position_embedding_type": "alibi",
                                                 "hidden_size": 64}
    with pytest.raises(ValueError, match="models.alibi.bogus"):
        tiny_cfg(tmp_path, "models.alibi.bogus=1")
    assert tiny_cfg(tmp_path, "budget.train_flops=1e12", "budget.train_tokens=10").budget.to_dict() == {
        "train_tokens": 10, "train_flops": None}  # the last budget given wins


@pytest.mark.parametrize("models, overrides, message", [
    ("models={}", [], "models is empty"),
    (MODELS, ["budget.train_tokens=null"], "exactly one of"),
    (MODELS, ["models.rope.attention_type=nope"], "models.rope: .*attention_type"),
    (MODELS, ["extension.rope_types=[stretchy]"], "extension.rope_types: 'stretchy'"),
    ("models={only_alibi: {position_embedding_type: alibi}}", ["extension.rope_types=[linear]"], "no model has"),
    (MODELS, ["tokenizer.algorithm=bytes"], "tokenizer.algorithm='bytes'"),
    ("models={'a/b': {}}", [], "the name 'a/b'"),
])
def test_bad_configs_fail_before_anything_loads(tmp_path, models, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(tiny_cfg(tmp_path, *overrides, models=models))
    assert not any(tmp_path.iterdir())


def test_cli_prints_one_line_for_a_bad_config(tmp_path, capsys):
    assert cli_main(["compare", *TINY, "models={}", f"output_dir={tmp_path}"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hf-xarch compare: error: models is empty") and "\n" not in error


def fake_entry(at_16: float, at_64: float, tokens_per_second: float) -> dict:
    lengths = {16: {"bits_per_byte": at_16, "coverage": "the whole held-out set: 9 blocks"},
               64: {"bits_per_byte": at_64, "coverage": "the whole held-out set: 2 blocks"}}
    return {"lengths": lengths, "trained_length": 16, "parameters": 1000,
            "train": {"tokens": 640, "flops": 1e9, "tokens_per_second": tokens_per_second}}


def test_summary_follows_the_numbers():
    results = {"a": fake_entry(2.0, 2.01, 100.0), "b": fake_entry(2.2, 3.0, 300.0)}
    budget = {"train_tokens": 640, "train_flops": None}
    lines = summarize(results, 16, [16, 64], budget, 0, "cpu")
    swapped = summarize({"a": results["b"], "b": results["a"]}, 16, [16, 64], budget, 0, "cpu")

    def line(lines, start):
        return next(text for text in lines if text.startswith(start))

    assert "a 2 < b 2.2" in line(lines, "Held-out bits per byte at 16")
    assert "b 2 < a 2.2" in line(swapped, "Held-out bits per byte at 16")
    assert "b 300 tok/s > a 100 tok/s" in line(lines, "Training speed")
    assert "a 300 tok/s > b 100 tok/s" in line(swapped, "Training speed")
    assert "at most 1% over their value at 16 tokens, or fall, for a; they rise by more for b" in line(lines, "At 4 x")
    assert "for b; they rise by more for a" in line(swapped, "At 4 x")
    assert "Parameters (lower is better): a 1,000 = b 1,000" in line(lines, "Parameters")
    assert "0.2000 bits per byte" in line(lines, "One training run")


def test_cache_bytes_count_the_storage_a_cache_keeps_alive_once():
    """A window kept as a view of a longer tensor holds the whole storage; two views of one storage count once."""
    keys = torch.zeros(1, 2, 128, 16)
    window = keys[:, :, -15:]

    class Layer:
        def __init__(self):
            self.keys, self.values, self.state = window, keys[:, :, :4], (torch.zeros(3), {"n": torch.zeros(2)})

    assert tensor_bytes(Layer()) == keys.numel() * 4 + 3 * 4 + 2 * 4
    assert tensor_bytes(window.clone()) == window.numel() * 4


def test_byte_level_tokenizer_is_one_token_per_byte(tmp_path):
    class MainProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    cfg = tiny_cfg(tmp_path, "tokenizer.algorithm=byte")
    tokenizer = shared_tokenizer(cfg, lambda: iter(["def f(x):\n    return x\n" * 20]), tmp_path, MainProcess())
    text = "naïve café ✓ and ASCII"
    assert len(tokenizer) == 5 + 256
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text.encode("utf-8"))
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()  # shared by every model, and reloaded on resume
