"""`hf-xarch quickstart` (shrunk by overrides): trains, writes its folder under the current directory, reloads with
the Auto classes, generates, and says what it did and where."""

from __future__ import annotations

import json

import torch

from hf_xarch.cli import main as cli_main
from hf_xarch.quickstart import QUICKSTART, quickstart_defaults


def test_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = cli_main(["quickstart", "training.max_steps=3", "data.max_bytes=80000", "tokenizer.vocab_size=300",
                         "model.hidden_size=32", "model.num_hidden_layers=1", "model.intermediate_size=64",
                         "data.block_size=32", "model.max_position_embeddings=32", "evaluation.max_batches=2",
                         "logging.progress_bar=false"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert code == 0, out
    folder = tmp_path / QUICKSTART["output_dir"]
    assert "same logits as the trained model" in out and str(folder) in out
    assert "sample" in out and "held-out" in out and "3 steps" in out
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "logs/metrics.jsonl"):
        assert (folder / name).is_file(), name
    assert list((folder / "logs" / "tensorboard").iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "xarch" and config["is_decoder"] and config["num_hidden_layers"] == 1


def test_quickstart_defaults_are_the_pretrain_recipe_shrunk():
    defaults = quickstart_defaults()
    assert defaults["task"] == "clm" and defaults["checkpoint"]["every_steps"] == 0
    assert not defaults["data"]["files"] and not defaults["data"]["dataset"]  # the default corpus: offline
    assert defaults["data"]["block_size"] <= defaults["model"]["max_position_embeddings"]
