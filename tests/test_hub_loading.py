"""Saved folders load with transformers' Auto classes, with hf_xarch (identical outputs) and without it
(`trust_remote_code=True` in a fresh Python where `import hf_xarch` fails)."""

import json
import sys

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from hf_xarch import (
    XArchForCausalLM,
    XArchForMaskedLM,
    XArchForQuestionAnswering,
    XArchForSequenceClassification,
    XArchForTokenClassification,
    XArchModel,
)
from hf_xarch.model.modeling_xarch import AUTO_MAP

from .helpers import random_ids, run_without_hf_xarch, tiny_config

HEADS = [
    (XArchModel, AutoModel, "last_hidden_state"),
    (XArchForCausalLM, AutoModelForCausalLM, "logits"),
    (XArchForMaskedLM, AutoModelForMaskedLM, "logits"),
    (XArchForSequenceClassification, AutoModelForSequenceClassification, "logits"),
    (XArchForTokenClassification, AutoModelForTokenClassification, "logits"),
    (XArchForQuestionAnswering, AutoModelForQuestionAnswering, "start_logits"),
]

VARIANTS = {
    "encoder-learned": {"is_decoder": False},
    "decoder-rope-gqa": {"is_decoder": True, "position_embedding_type": "rope", "num_key_value_heads": 2,
                         "norm_type": "rmsnorm", "mlp_type": "gated", "hidden_act": "silu",
                         "rope_parameters": {"rope_type": "linear", "factor": 2.0}},
    "post-norm-sinusoidal-factorized": {"norm_position": "post", "position_embedding_type": "sinusoidal",
                                        "embedding_size": 16, "embedding_norm": True, "type_vocab_size": 2},
}


def heads_for(variant):
    is_decoder = VARIANTS[variant].get("is_decoder", False)
    return [h for h in HEADS if not (is_decoder and h[0] is XArchForMaskedLM)]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_and_reload_with_auto_classes(variant, tmp_path):
    ids = random_ids(2, 9)
    for model_class, auto_class, field in heads_for(variant):
        model = model_class(tiny_config(**VARIANTS[variant])).eval()
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP
        assert {"modeling_xarch.py", "configuration_xarch.py", "registry.py", "families.py"} <= {
            p.name for p in folder.iterdir()
        }
        assert isinstance(AutoConfig.from_pretrained(folder), type(model.config))
        loaded = auto_class.from_pretrained(folder).eval()
        assert type(loaded) is model_class
        torch.testing.assert_close(getattr(loaded(ids), field), getattr(model(ids), field), rtol=0, atol=0)


def test_saved_files_only_import_torch_transformers_and_siblings(tmp_path):
    """The Hub rule: a saved folder is self-contained."""
    import ast

    XArchForCausalLM(tiny_config()).save_pretrained(tmp_path)
    siblings = {p.stem for p in tmp_path.glob("*.py")}
    for path in tmp_path.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1 and node.module in siblings, f"{path.name}: from .{node.module}"
                else:
                    root = node.module.split(".")[0]  # the standard library is in every Python
                    assert root in {"torch", "transformers", "__future__", *sys.stdlib_module_names}, (
                        f"{path.name} imports {node.module}"
                    )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in {"hf_xarch"}, f"{path.name} imports {alias.name}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_load_with_trust_remote_code_without_hf_xarch(variant, tmp_path):
    """Every registered head loads in a Python in which hf_xarch cannot be imported, with identical outputs."""
    ids = random_ids(2, 9)
    torch.save(ids, tmp_path / "ids.pt")
    expected = {}
    cases = []
    for model_class, auto_class, field in heads_for(variant):
        model = model_class(tiny_config(**VARIANTS[variant])).eval()
        folder = tmp_path / model_class.__name__
        model.save_pretrained(folder)
        expected[model_class.__name__] = getattr(model(ids), field)
        cases.append((str(folder), auto_class.__name__, field, model_class.__name__))
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch, transformers
ids = torch.load({str(tmp_path / 'ids.pt')!r})
expected = torch.load({str(tmp_path / 'expected.pt')!r})
for folder, auto_name, field, class_name in {cases!r}:
    auto_class = getattr(transformers, auto_name)
    model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == class_name, (type(model).__name__, class_name)
    assert 'hf_xarch' not in type(model).__module__, type(model).__module__
    got = getattr(model(ids), field)
    torch.testing.assert_close(got, expected[class_name], rtol=0, atol=0)
    print('ok', class_name)
"""
    result = run_without_hf_xarch(script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(cases)

