"""The recipes end to end on tiny models and the default corpus (offline): what they write, that it reloads, and
that bad configs and data fail before training starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForTokenClassification, AutoTokenizer

import hf_xarch
from hf_xarch.train.config import load_config, xarch_config_fields
from hf_xarch.train.finetune import DEFAULTS as FINETUNE_DEFAULTS
from hf_xarch.train.finetune import demo_records, run_finetune, word_tag
from hf_xarch.train.pretrain import DEFAULTS as PRETRAIN_DEFAULTS
from hf_xarch.train.pretrain import main as pretrain_main
from hf_xarch.train.pretrain import run_pretrain

MODEL = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
         "model.intermediate_size=64", "model.max_position_embeddings=64"]
SMALL = ["data.max_bytes=120000", "tokenizer.vocab_size=300", "tokenizer.train_bytes=120000",
         "training.micro_batch_size=4", "evaluation.max_batches=2", "evaluation.batch_size=8",
         "logging.every_steps=1", "logging.progress_bar=false"]
OPEN = {"model": xarch_config_fields()}


pytestmark = pytest.mark.one_thread


def _pretrain_cfg(tmp, *overrides):
    return load_config(PRETRAIN_DEFAULTS, overrides=[*MODEL, *SMALL, "data.block_size=32", "training.max_steps=4",
                                                     "evaluation.every_steps=2", "checkpoint.every_steps=2",
                                                     f"output_dir={tmp}", *overrides], open_sections=OPEN)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny causal LM pretrained by the recipe (shared by the tests that need a base model)."""
    folder = tmp_path_factory.mktemp("pretrain_clm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_pretrain(_pretrain_cfg(folder))
    finally:
        torch.set_num_threads(threads)
    return result


def test_pretrain_writes_everything_and_reloads(pretrained):
    folder = pretrained.output_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe_config.yaml", "loss.png",
                 "eval_results.json", "logs/metrics.jsonl"):
        assert (folder / name).is_file(), name
    assert list((folder / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert [step for step in sorted(p.name for p in (folder / "checkpoints").iterdir())] == [
        "checkpoint-00000002", "checkpoint-00000004"]
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records == pretrained.loop.history
    assert all(r["train/tokens_per_second"] > 0 for r in records)

    metrics = pretrained.eval_metrics
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(metrics["eval/loss"]))
    assert 0 < metrics["eval/bits_per_byte"] < metrics["eval/loss"] / math.log(2)  # several bytes per token
    assert records[-1]["eval/loss"] == metrics["eval/loss"]

    reloaded = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    ids = tokenizer("import sys\nprint(sys.argv)", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pretrained.loop.model.eval()(input_ids=ids).logits)
    assert reloaded.config.vocab_size == len(tokenizer) and reloaded.config.pad_token_id == tokenizer.pad_token_id


def test_pretrain_main_resumes_a_finished_run_without_retraining(pretrained, capsys):
    """`checkpoint.resume=auto` on a finished run loads the last checkpoint and only saves again."""
    before = (pretrained.output_dir / "model.safetensors").read_bytes()
    args = [*MODEL, *SMALL, "data.block_size=32", "training.max_steps=4", "evaluation.every_steps=2",
            "checkpoint.every_steps=2", f"output_dir={pretrained.output_dir}"]
    assert pretrain_main(args) == 0
    assert "pretrain: 4 steps" in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(str(pretrained.output_dir))
    for name, value in pretrained.loop.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    assert len(before) > 0


def test_pretrain_mlm_streaming(tmp_path):
    result = run_pretrain(_pretrain_cfg(tmp_path, "task=mlm", "data.streaming=true", "data.heldout_records=3",
                                        "model.position_embedding_type=learned", "checkpoint.every_steps=0"))
    assert result.loop.step == 4 and result.train_tokens == 0  # streamed: nothing packed up front
    assert math.isfinite(result.eval_metrics["eval/loss"]) and "eval/bits_per_byte" not in result.eval_metrics
    reloaded = AutoModelForMaskedLM.from_pretrained(str(tmp_path))
    assert not reloaded.config.is_decoder


def test_pretrain_reports_what_its_held_out_figures_cover(pretrained):
    """Mid-training evaluations score a stated random sample (evaluation.max_batches=2 x batch 8); the final, reported
    figure scores the whole held-out set; eval_results.json, metrics.jsonl and the model card all say so, and the card
    shows eval_results.json's numbers (also when `hf-xarch card` rewrites it)."""
    from huggingface_hub import ModelCard

    from hf_xarch.hub import card_for_folder

    folder, metrics = pretrained.output_dir, pretrained.eval_metrics
    records = [json.loads(line) for line in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    middle = next(r for r in records if r["step"] == 2)
    assert middle["eval/blocks"] == 16 < middle["eval/heldout_blocks"]
    assert middle["eval/coverage"].startswith("a random sample (uniform, seed 0) of 16 of the")
    assert metrics["eval/blocks"] == metrics["eval/heldout_blocks"] == middle["eval/heldout_blocks"]
    assert metrics["eval/coverage"].startswith("the whole held-out set") and records[-1] == {**records[-1], **metrics}
    assert metrics["eval/tokens"] == metrics["eval/blocks"] * 31 and metrics["eval/bytes"] > metrics["eval/tokens"]

    entries = json.loads((folder / "eval_results.json").read_text())
    assert {e["metric_type"]: e["metric_value"] for e in entries} == {
        name: round(metrics[f"eval/{name}"], 6) for name in ("loss", "perplexity", "bits_per_byte")}
    assert all(e["dataset_args"]["coverage"] == metrics["eval/coverage"] for e in entries)
    assert all(e["dataset_args"]["blocks"] == metrics["eval/blocks"] for e in entries)
    for card in (ModelCard.load(folder / "README.md"), card_for_folder(folder)):
        shown = {(r.metric_type, r.metric_value, r.dataset_args["tokens"]) for r in card.data.eval_results}
        assert shown == {(e["metric_type"], e["metric_value"], metrics["eval/tokens"]) for e in entries}
        assert f"Scored on {metrics['eval/coverage']}." in card.text


def test_pretrain_bf16_autocast_after_fp32_runs(tmp_path):
    """bf16 mixed precision on CPU, in a process whose Accelerate state was set up for fp32 by earlier runs."""
    from accelerate.state import AcceleratorState

    try:
        result = run_pretrain(_pretrain_cfg(tmp_path, "training.mixed_precision=bf16", "training.max_steps=2",
                                            "checkpoint.every_steps=0", "logging.tensorboard=false"))
        assert AcceleratorState().mixed_precision == "bf16"
    finally:
        AcceleratorState._reset_state()  # later tests in this process build their own fp32 Accelerator
    assert result.loop.step == 2 and all(math.isfinite(r["train/loss"]) for r in result.loop.history)
    assert next(result.loop.model.parameters()).dtype == torch.float32  # autocast: fp32 master weights


def test_finetune_sequence_demo_task(tmp_path):
    overrides = [*MODEL, *SMALL, "data.max_length=48", "training.max_steps=3", "evaluation.every_steps=0",
                 "checkpoint.every_steps=0", "data.max_bytes=60000", f"output_dir={tmp_path}"]
    result = run_finetune(load_config(FINETUNE_DEFAULTS, overrides=overrides, open_sections=OPEN))
    assert result.label_names == ["shuffled", "original"]
    assert {"eval/loss", "eval/accuracy", "eval/f1"} <= set(result.eval_metrics)
    # the reported figures cover the whole held-out set (evaluation.max_batches limits only evaluations mid-training)
    assert result.eval_metrics["eval/examples"] == result.eval_metrics["eval/heldout_examples"] > 16
    assert result.eval_metrics["eval/coverage"].startswith("the whole held-out set")
    assert 0.0 <= result.eval_metrics["eval/accuracy"] <= 1.0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "shuffled", "1": "original"}


def test_finetune_lora_token_from_a_base_model(pretrained, tmp_path):
    """LoRA on a pretrained base: the merged model in output_dir and base + adapter give the same logits."""
    from peft import PeftModel

    overrides = [*SMALL, "data.max_length=48", "task=token", "lora.enabled=true", f"base_model={pretrained.output_dir}",
                 "training.max_steps=3", "evaluation.every_steps=0", "checkpoint.every_steps=0",
                 "data.max_bytes=60000", "optimizer.lr=0.05", f"output_dir={tmp_path}"]
    result = run_finetune(load_config(FINETUNE_DEFAULTS, overrides=overrides, open_sections=OPEN))
    assert result.label_names == ["other", "keyword", "identifier", "number"]
    merged = AutoModelForTokenClassification.from_pretrained(str(tmp_path)).eval()
    base = AutoModelForTokenClassification.from_pretrained(str(pretrained.output_dir), num_labels=4)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
        plain = AutoModelForTokenClassification.from_pretrained(str(pretrained.output_dir), num_labels=4)
        assert not torch.allclose(plain(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_demo_tasks_are_labelled_as_documented():
    text = "def f ( x ) : return 42 if x else None " * 4
    token = demo_records([text], "token", words_per_example=8, seed=0)
    assert token[0]["tokens"][:4] == ["def", "f", "(", "x"] and token[0]["tags"][:4] == [1, 2, 0, 2]
    assert word_tag("42") == 3 and word_tag("3.5") == 3 and word_tag("None") == 1
    words = " ".join(f"w{i}" for i in range(400))
    sequence = demo_records([words], "sequence", words_per_example=10, seed=1)
    assert {r["label"] for r in sequence} == {0, 1}
    for record in sequence:
        ordered = record["text"].split() == sorted(record["text"].split(), key=lambda w: int(w[1:]))
        assert ordered == (record["label"] == 1)


@pytest.mark.skipif(not hasattr(hf_xarch, "extend_context"), reason="hf_xarch.extend_context (issue 3) not there yet")
def test_extend_context_reports_every_length(pretrained, tmp_path):
    from hf_xarch.train.extend_context import COLUMNS, DEFAULTS, OPEN_SECTIONS, run_extend_context

    overrides = [*SMALL, f"base_model={pretrained.output_dir}", "factor=2", "training.max_steps=2",
                 "training.micro_batch_size=2", "evaluation.every_steps=0", "checkpoint.every_steps=0",
                 "eval_tokens_per_length=256", f"output_dir={tmp_path}"]
    result = run_extend_context(load_config(DEFAULTS, overrides=overrides, open_sections=OPEN_SECTIONS))
    # trained on blocks of 32 (data.block_size), though built for max_position_embeddings=64: L is 32
    assert json.loads((pretrained.output_dir / "config.json").read_text())["trained_sequence_length"] == 32
    assert (result.base_length, result.new_length) == (32, 64)
    assert list(result.table) == [32, 64]
    for row in result.table.values():
        assert set(row) == set(COLUMNS) and all(math.isfinite(v) and v > 1 for v in row.values())
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_position_embeddings"] == 128 and saved["rope_parameters"]["rope_type"] == "linear"
    for name in ("context_extension.md", "context_extension.json", "context_extension.png"):
        assert (tmp_path / name).is_file()


# ---- errors before training -----------------------------------------------------------------------------------------
def _no_training_happened(folder: Path) -> bool:
    return not (folder / "logs").exists() and not (folder / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.mixed_precision=fp16"], "needs a GPU"),
        (["task=seq2seq"], "task='seq2seq'"),
        (["optimizer.name=lion"], "optimizer.name"),
        (["schedule.name=triangle"], "schedule.name"),
        (["hub.push=true"], "hub.repo_id"),
        (["data.files=[/no/such/corpus.txt]"], "no such file"),
        (["model.position_embedding_type=learned", "data.block_size=128"], "longer than the model allows"),
        (["model.attention_type=no_such_attention"], "attention_type"),
        (["data.heldout_fraction=1.5"], "heldout_fraction"),
    ],
)
def test_pretrain_refuses_bad_configs_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_pretrain(_pretrain_cfg(tmp_path, *overrides))
    assert _no_training_happened(tmp_path)


def test_pretrain_refuses_an_empty_dataset(tmp_path):
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        run_pretrain(_pretrain_cfg(tmp_path / "out", f"data.files=[{tmp_path / 'empty.txt'}]"))
    assert _no_training_happened(tmp_path / "out")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["lora.enabled=true", "lora.target_modules=[query, value]"], r"lora.target_modules \['query', 'value'\]"),
        (["base_model=/no/such/model"], "no such folder"),
        (["data.streaming=true"], "not supported by finetune"),
        (["model.position_embedding_type=learned", "data.max_length=100"], "data.max_length=100"),
        (["data.label_column=stars", "data.files=[{json}]"], "data.label_column='stars' is not a column"),
    ],
)
def test_finetune_refuses_bad_configs_before_training(tmp_path, overrides, message):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(20)))
    overrides = [o.format(json=tmp_path / "d.jsonl") for o in overrides]
    args = [*MODEL, *SMALL, "data.max_bytes=30000", "data.max_length=48", "training.max_steps=2",
            f"output_dir={tmp_path / 'out'}",
            *overrides]
    with pytest.raises(ValueError, match=message):
        run_finetune(load_config(FINETUNE_DEFAULTS, overrides=args, open_sections=OPEN))
    assert _no_training_happened(tmp_path / "out")
