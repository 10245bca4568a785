"""Publishing: cards from model_cards/ render for every kind of model and their metadata parses back; save_pretrained
writes our card but never overwrites a user's; push_to_hub uploads exactly the right files with our card (the Hub
cannot be reached here, so `HfApi.create_commit` / `create_repo` are intercepted and their operations inspected); the
saved folder of an encoder and a decoder of every attention family loads in a Python without hf_xarch."""

from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from transformers.dynamic_module_utils import get_relative_import_files

import hf_xarch
from hf_xarch import (
    ATTENTION_FAMILIES,
    XArchForCausalLM,
    XArchForConditionalGeneration,
    XArchForMaskedLM,
    XArchForQuestionAnswering,
    XArchForSequenceClassification,
    XArchForTokenClassification,
    XArchModel,
)
from hf_xarch.cli import main as cli_main
from hf_xarch.hub import make_card, parameters_by_part, push_folder

from .helpers import random_ids, run_without_hf_xarch, tiny_config

KINDS = [
    (XArchModel, dict(), "feature-extraction"),
    (XArchForCausalLM, dict(is_decoder=True, position_embedding_type="rope", num_key_value_heads=1,
                            rope_parameters={"rope_type": "linear", "factor": 4.0}), "text-generation"),
    (XArchForMaskedLM, dict(embedding_size=16, position_embedding_type="sinusoidal"), "fill-mask"),
    (XArchForSequenceClassification, dict(num_labels=3), "text-classification"),
    (XArchForTokenClassification, dict(num_labels=5), "token-classification"),
    (XArchForQuestionAnswering, dict(norm_type="rmsnorm", mlp_type="gated"), "question-answering"),
    (XArchForConditionalGeneration, dict(is_encoder_decoder=True, num_decoder_layers=1, decoder_start_token_id=1),
     "text2text-generation"),
]


@pytest.mark.parametrize("model_class, overrides, pipeline_tag", KINDS, ids=[k[0].__name__ for k in KINDS])
def test_card_renders_and_metadata_parses_back(model_class, overrides, pipeline_tag, tmp_path):
    model = model_class(tiny_config(**overrides))
    results = [dict(task_type="text-generation", dataset_type="stdlib", dataset_name="Python stdlib",
                    metric_type="perplexity", metric_value=12.5, dataset_split="heldout")]
    card = make_card(model, repo_id="me/tiny", base_model="me/base", datasets=["stdlib"], eval_results=results,
                     training_config={"learning_rate": 3e-4, "steps": 10})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data
    assert data.library_name == "transformers" and data.pipeline_tag == pipeline_tag
    kind = "encoder-decoder" if overrides.get("is_encoder_decoder") else \
        "decoder" if overrides.get("is_decoder") else "encoder"
    assert {"hf_xarch", "attention-full", f"positions-{model.config.position_embedding_type}", kind} <= set(data.tags)
    assert data.base_model == "me/base" and data.datasets == ["stdlib"] and data.license == "apache-2.0"
    assert data.eval_results[0].metric_value == 12.5 and data.eval_results[0].dataset_name == "Python stdlib"
    text = loaded.text
    assert f"An hf_xarch {kind} (`{type(model).__name__}`" in text
    assert ("May generate false or offensive text" in text) == (kind != "encoder")
    assert "trust_remote_code=True" in text and "import hf_xarch" in text
    assert f"{sum(parameters_by_part(model).values()):,}" in text
    assert "Attention Is All You Need" in text and "learning_rate: 0.0003" in text
    if overrides.get("position_embedding_type") == "rope":
        assert "rope_type `linear`" in text and "factor 4.0" in text and "Positional Interpolation" in text
        assert "MQA" in text or "multi-query" in text
    if overrides.get("embedding_size"):
        assert "factorized" in text and "ALBERT" in text


def test_parameters_by_part_add_up_to_the_model():
    for model_class, overrides, _ in KINDS:
        model = model_class(tiny_config(**overrides))
        assert sum(parameters_by_part(model).values()) == model.num_parameters()


def test_save_writes_our_card_but_keeps_a_users_own(tmp_path):
    model = XArchForCausalLM(tiny_config())
    model.save_pretrained(tmp_path / "fresh")
    assert "hf_xarch" in (tmp_path / "fresh" / "README.md").read_text()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my own card")
    model.save_pretrained(tmp_path / "mine")
    assert (tmp_path / "mine" / "README.md").read_text() == "my own card"
    # the CLI rewrites it on request
    assert cli_main(["card", str(tmp_path / "mine")]) == 0
    assert "hf_xarch" in (tmp_path / "mine" / "README.md").read_text()


class FakeHub:
    """Stands in for the Hub: records what create_commit would have uploaded (path -> bytes)."""

    def __init__(self, monkeypatch):
        self.uploads: dict[str, bytes] = {}
        self.repos: list[str] = []
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append(repo_id)
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, **kwargs):
            for op in operations:
                source = op.path_or_fileobj
                hub.uploads[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source.read()
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                              commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        monkeypatch.setattr(HfApi, "create_branch", lambda *a, **k: None)
        monkeypatch.setattr(HfApi, "whoami", lambda *a, **k: {"name": "me"})  # push_folder checks the login first


def code_files() -> set[str]:
    """The Python files transformers copies (modeling and its relative imports), and the native kernel's C source,
    which save_pretrained writes beside them."""
    modeling = Path(hf_xarch.model.modeling_xarch.__file__)
    python = {modeling.name} | {Path(f).name for f in get_relative_import_files(str(modeling))}
    return python | {hf_xarch.model.attention_sliding_native.KERNEL_FILE}


def test_push_to_hub_uploads_exactly_weights_config_code_and_our_card(monkeypatch):
    hub = FakeHub(monkeypatch)
    model = XArchForCausalLM(tiny_config())
    model.push_to_hub("me/tiny-decoder", tags=["extra-tag"])
    assert hub.repos == ["me/tiny-decoder"]
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md"} | code_files()
    assert set(hub.uploads) == expected
    card = ModelCard(hub.uploads["README.md"].decode())
    assert "hf_xarch" in card.data.tags and "extra-tag" in card.data.tags
    assert "transformers model that has been pushed" not in card.text  # not transformers' generic card


def test_push_folder_uploads_tokenizer_too(monkeypatch, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hub = FakeHub(monkeypatch)
    XArchForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "README.md").unlink()
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    assert cli_main(["push", str(tmp_path), "me/tiny-encoder"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "README.md", "config.json", "model.safetensors"} <= set(hub.uploads)
    assert code_files() <= set(hub.uploads)
    assert "AutoTokenizer" in hub.uploads["README.md"].decode()
    with pytest.raises(ValueError, match="config.json"):
        push_folder(tmp_path / "nowhere", "me/x")


def family_variants():
    """An encoder and a decoder of every registered attention family that supports them."""
    for name, family in sorted(ATTENTION_FAMILIES.items()):
        for is_decoder in (False, True):
            if (family.causal if is_decoder else family.bidirectional):
                yield pytest.param(name, is_decoder, id=f"{name}-{'decoder' if is_decoder else 'encoder'}")


@pytest.mark.parametrize("family, is_decoder", list(family_variants()))
def test_every_family_loads_without_hf_xarch(family, is_decoder, tmp_path):
    config = tiny_config(attention_type=family, is_decoder=is_decoder, position_embedding_type="rope")
    model_class = XArchForCausalLM if is_decoder else XArchForMaskedLM
    model = model_class(config).eval()
    model.save_pretrained(tmp_path / "m")
    card = yaml.safe_load((tmp_path / "m" / "README.md").read_text().split("---")[1])
    assert f"attention-{family.replace('_', '-')}" in card["tags"]
    ids = random_ids(2, 9)
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    auto = "AutoModelForCausalLM" if is_decoder else "AutoModelForMaskedLM"
    script = f"""
import torch, transformers
data = torch.load({str(tmp_path / 'expected.pt')!r})
model = transformers.{auto}.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
torch.testing.assert_close(model(data['ids']).logits, data['logits'], rtol=0, atol=0)
print('ok')
"""
    result = run_without_hf_xarch(script)
    assert result.returncode == 0, result.stdout + result.stderr
