"""Fine-tuning encoder-decoders (finetune task=seq2seq): the shipped BLEU / chrF / ROUGE modules against published
values, the demo task built from the default corpus, and the recipe end to end (offline, tiny) with an exact resume."""

from __future__ import annotations

import pytest

from hf_xarch.metrics import load_metric

# SacreBLEU's README example: three system sentences, two reference streams
SACREBLEU_HYPOTHESES = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACREBLEU_REFERENCES = [["The dog bit the man.", "The dog had bit the man."],
                        ["It was not unexpected.", "No one was surprised."],
                        ["The man bit him first.", "The man had bitten the dog."]]
# the Hub chrf module's documented example
CHRF_PREDICTIONS = ["The relationship between cats and dogs is not exactly friendly.",
                    "a good bookshop is just a genteel black hole that knows how to read."]
CHRF_REFERENCES = [["The relationship between dogs and cats is not exactly friendly."],
                   ["A good bookshop is just a genteel Black Hole that knows how to read."]]


def test_bleu_matches_sacrebleu_published_example():
    # sacrebleu prints: BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)
    result = load_metric("bleu").compute(predictions=SACREBLEU_HYPOTHESES, references=SACREBLEU_REFERENCES)
    assert result["score"] == pytest.approx(48.53, abs=0.005)
    assert [round(p, 1) for p in result["precisions"]] == [82.4, 50.0, 45.5, 37.5]
    assert (result["sys_len"], result["ref_len"]) == (17, 18) and result["bp"] == pytest.approx(0.943, abs=5e-4)


def test_bleu_smooths_zero_precisions_and_tokenizes_like_13a():
    bleu = load_metric("bleu")
    # "a b c" has no 4-gram at all: that order's precision stays 0 and corpus BLEU is 0, as in sacrebleu
    assert bleu.compute(predictions=["a b c"], references=["a b d"])["score"] == pytest.approx(0.0, abs=1e-9)
    # five tokens each, one substitution at the end: 4/5, 3/4, 2/3, 1/2 -> geometric mean, no brevity penalty
    result = bleu.compute(predictions=["the cat sat down today"], references=["the cat sat down now"])
    assert result["score"] == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # 13a splits punctuation off but keeps a decimal number whole: six tokens
    result = bleu.compute(predictions=["it costs 3.5 dollars, ok"], references=["it costs 3.5 dollars, no"])
    assert result["totals"] == [6, 5, 4, 3] and result["counts"] == [5, 4, 3, 2]
    # a zero precision is smoothed ("exp": 100 / (2 * total)) instead of zeroing the score
    result = bleu.compute(predictions=["a b x c d"], references=["a b y c d"])
    assert result["counts"] == [4, 2, 0, 0]
    assert result["precisions"] == pytest.approx([80.0, 50.0, 100 / (2 * 3), 100 / (4 * 2)])


def test_chrf_matches_published_examples():
    chrf = load_metric("chrf")
    assert chrf.compute(predictions=SACREBLEU_HYPOTHESES, references=SACREBLEU_REFERENCES)["score"] == pytest.approx(
        59.73, abs=0.005)  # sacrebleu's README: chrF2 = 59.73
    # the Hub chrf module's documented values: chrF, chrF++, chrF++ lowercased
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES)["score"] == pytest.approx(
        84.64214891738334)
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES, word_order=2)[
        "score"] == pytest.approx(82.87263732906315)
    assert chrf.compute(predictions=CHRF_PREDICTIONS, references=CHRF_REFERENCES, word_order=2, lowercase=True)[
        "score"] == pytest.approx(92.12853119829202)


def test_rouge_matches_hand_computed_values():
    rouge = load_metric("rouge")
    # the Hub rouge module's documented multi-reference example
    result = rouge.compute(predictions=["hello there", "general kenobi"],
                           references=[["hello", "there"], ["general kenobi", "general yoda"]])
    assert result == pytest.approx({"rouge1": 5 / 6, "rouge2": 0.5, "rougeL": 5 / 6, "rougeLsum": 5 / 6})
    # "the cat was found under the bed" vs "the cat was under the bed": unigrams 6/7 and 6/6, bigrams 4/6 and 4/5,
    # LCS 6 (all of the reference); tokens are lowercased and split at punctuation
    result = rouge.compute(predictions=["The cat was found under the bed."], references=["the cat, was under the bed"],
                           use_aggregator=False)
    assert result["rouge1"][0] == pytest.approx(2 * (6 / 7) * 1 / (6 / 7 + 1))
    assert result["rouge2"][0] == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert result["rougeL"][0] == pytest.approx(result["rouge1"][0])
    # rougeLsum: the order of the lines does not matter, within a line it does (rougeL sees one sequence)
    swapped = rouge.compute(predictions=["b c\na x"], references=["a x\nb c"], rouge_types=["rougeL", "rougeLsum"])
    assert swapped["rougeLsum"] == pytest.approx(1.0) and swapped["rougeL"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rouge_types"):
        rouge.compute(predictions=["a"], references=["a"], rouge_types=["rougeX"])


# ---- the demo task and batching ---------------------------------------------------------------------------------------
def test_demo_pairs_are_functions_without_docstrings_and_their_first_lines():
    from hf_xarch.train.text_pairs import function_docstring_pairs

    source = '''
def area(width, height):
    """Return the area of a rectangle.

    Both sides in metres.
    """
    return width * height  # a comment is not kept

class Box:
    async def open(self):
        """
        Open the box.
        """
        self.opened = True

def undocumented():
    return 1

def only_a_docstring():
    """Nothing else here."""
'''
    pairs = function_docstring_pairs(source)
    assert pairs == [{"source": "def area(width, height):\n    return width * height",
                      "target": "Return the area of a rectangle."},
                     {"source": "async def open(self):\n    self.opened = True", "target": "Open the box."}]
    assert function_docstring_pairs("not python (at all") == []


def test_a_seq2seq_batch_keeps_its_targets_when_sliced():
    """The source side is trimmed by attention_mask, the targets by their own mask, even when both are as wide."""
    from hf_xarch.train.data import slice_batch
    from hf_xarch.train.text_pairs import pad_pairs

    examples = [{"input_ids": [5, 6, 7, 8], "labels": [9, 3]}, {"input_ids": [5, 6], "labels": [9, 10, 11, 3]}]
    batch = pad_pairs(examples, pad_id=0)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 4)
    second = slice_batch(batch, 1, 2)  # its source holds 2 tokens, its target 4
    assert second["input_ids"].tolist() == [[5, 6]] and second["labels"].tolist() == [[9, 10, 11, 3]]
    assert second["decoder_attention_mask"].tolist() == [[1, 1, 1, 1]]
    first = slice_batch(batch, 0, 1)
    assert first["input_ids"].tolist() == [[5, 6, 7, 8]] and first["labels"].tolist() == [[9, 3]]


# ---- the recipe -------------------------------------------------------------------------------------------------------
MODEL = ["model.hidden_size=32", "model.num_hidden_layers=1", "model.num_decoder_layers=1",
         "model.num_attention_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64"]
SMALL = ["task=seq2seq", "tokenizer.vocab_size=300", "tokenizer.train_bytes=120000", "training.micro_batch_size=4",
         "evaluation.batch_size=8", "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false",
         "logging.plot=false", "data.max_length=48", "data.max_target_length=16", "data.max_bytes=200000"]


def _cfg(tmp, *overrides):
    from hf_xarch.train.config import load_config, xarch_config_fields
    from hf_xarch.train.finetune import DEFAULTS

    return load_config(DEFAULTS, overrides=[*MODEL, *SMALL, f"output_dir={tmp}", *overrides],
                       open_sections={"model": xarch_config_fields()})


def _pairs_file(tmp_path, count=80):
    """A JSON list of pairs whose target is learnable in a few steps: generation metrics must then reach 100."""
    import json
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    pairs = [{"source": " ".join(rng.choice(words) for _ in range(8)), "target": "the answer is yes"}
             for _ in range(count)]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(pairs))
    return path


@pytest.mark.one_thread
def test_cli_fine_tunes_on_a_json_file_of_pairs_and_scores_generated_text(tmp_path, capsys):
    import json

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from hf_xarch.cli import main

    out = tmp_path / "out"
    args = [*MODEL, *SMALL, f"data.files=[{_pairs_file(tmp_path)}]", "data.heldout_fraction=0.2",
            "tokenizer.min_frequency=1", "model.hidden_dropout=0.0", "training.max_steps=20", "training.micro_batch_size=8",
            "optimizer.lr=1e-2", "schedule.warmup_steps=0", "evaluation.every_steps=0", "checkpoint.every_steps=0",
            "data.max_target_length=24", f"output_dir={out}"]
    assert main(["finetune", *args]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("finetune: 20 steps; held-out loss") and "bleu 100, chrf 100, rouge1 1," in line
    entries = {e["metric_type"]: e for e in json.loads((out / "eval_results.json").read_text())}
    assert set(entries) == {"loss", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum"}
    assert entries["bleu"]["task_type"] == "text2text-generation"
    assert entries["chrf"]["dataset_args"]["coverage"] == (
        "the whole held-out set: 16 examples, greedy decoding of at most 24 new tokens")

    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval(), AutoTokenizer.from_pretrained(str(out))
    inputs = tokenizer(["kappa iota theta eta zeta alpha beta gamma"], return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert tokenizer.batch_decode(generated, skip_special_tokens=True) == ["the answer is yes"]


@pytest.mark.one_thread
def test_demo_task_runs_offline_and_states_what_its_scores_cover(tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from hf_xarch.train.finetune import run_finetune

    result = run_finetune(_cfg(tmp_path, "training.max_steps=3", "evaluation.every_steps=2",
                               "evaluation.max_batches=1", "checkpoint.every_steps=0"))
    metrics = result.eval_metrics
    assert {"eval/loss", "eval/bleu", "eval/chrf", "eval/rouge1", "eval/rougeL"} <= set(metrics)
    assert 0 <= metrics["eval/bleu"] <= 100 and 0 <= metrics["eval/chrf"] <= 100 and 0 <= metrics["eval/rouge1"] <= 1
    assert metrics["eval/examples"] == metrics["eval/heldout_examples"] > 8
    middle = next(r for r in result.loop.history if r.get("step") == 2 and "eval/coverage" in r)
    assert middle["eval/coverage"].startswith("a random sample (uniform, seed 0) of 8 of the")
    assert "code summarization demo task" in (tmp_path / "README.md").read_text()

    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path)).eval()
    ids, target = torch.randint(5, 300, (2, 12)), torch.randint(5, 300, (2, 5))
    with torch.no_grad():
        expected = result.loop.model.eval()(input_ids=ids, decoder_input_ids=target).logits
        torch.testing.assert_close(reloaded(input_ids=ids, decoder_input_ids=target).logits, expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.is_encoder_decoder=false"], "model.is_encoder_decoder=false is not allowed with task=seq2seq"),
        (["data.max_target_length=1"], r"data.max_target_length=1 is not allowed: an integer >= 2"),
        (["generation.num_beams=0"], "generation.num_beams=0 is not allowed"),
        (["data.files=[{pairs}]", "data.target_column=summary"], "data.target_column='summary' is not a column"),
        (["base_model={encoder}"], "is not an encoder-decoder"),
    ],
)
def test_bad_seq2seq_configs_fail_before_training(tmp_path, overrides, message):
    from hf_xarch import XArchConfig
    from hf_xarch.train.finetune import run_finetune

    encoder = tmp_path / "encoder"
    XArchConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(str(encoder))
    (encoder / "tokenizer.json").write_text("{}")
    overrides = [o.format(pairs=_pairs_file(tmp_path), encoder=encoder) for o in overrides]
    with pytest.raises(ValueError, match=message):
        run_finetune(_cfg(tmp_path / "out", "training.max_steps=2", *overrides))
    assert not (tmp_path / "out" / "model.safetensors").exists()


# runs the recipe and kills itself (SIGKILL) after its KILL_AT-th training step
KILLED_RUN = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from hf_xarch.train.config import load_config, xarch_config_fields
from hf_xarch.train.finetune import DEFAULTS, run_finetune
def kill(step, record):
    if step == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
run_finetune(load_config(DEFAULTS, overrides=sys.argv[1:], open_sections={"model": xarch_config_fields()}),
             callbacks=[kill])
"""


@pytest.mark.slow
@pytest.mark.one_thread
def test_a_killed_seq2seq_run_resumes_to_the_uninterrupted_weights(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import torch

    from hf_xarch.train.finetune import run_finetune

    steps = ["training.max_steps=4", "checkpoint.every_steps=2", "evaluation.every_steps=2", "evaluation.max_batches=1"]
    whole = run_finetune(_cfg(tmp_path / "whole", *steps))
    killed_dir = tmp_path / "killed"
    environment = {**os.environ, "KILL_AT": "3", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, *MODEL, *SMALL, *steps, f"output_dir={killed_dir}"],
                            check=False, env=environment, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (killed_dir / "model.safetensors").exists()
    resumed = run_finetune(_cfg(killed_dir, *steps))
    assert resumed.loop.resumed_from.endswith("checkpoint-00000002")
    for (name, tensor), (other, expected) in zip(resumed.loop.model.state_dict().items(),
                                                 whole.loop.model.state_dict().items()):
        assert name == other and torch.equal(tensor, expected), name
    assert resumed.eval_metrics == whole.eval_metrics


@pytest.mark.one_thread
def test_lora_seq2seq_saves_a_seq2seq_adapter_and_a_merged_model(tmp_path):
    import json

    from transformers import AutoModelForSeq2SeqLM

    from hf_xarch.train.finetune import run_finetune

    result = run_finetune(_cfg(tmp_path, f"data.files=[{_pairs_file(tmp_path, count=40)}]", "lora.enabled=true",
                               "training.max_steps=2", "evaluation.every_steps=0", "checkpoint.every_steps=0"))
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_2_SEQ_LM"
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    merged = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
    assert type(merged).__name__ == "XArchForConditionalGeneration" and "eval/bleu" in result.eval_metrics
