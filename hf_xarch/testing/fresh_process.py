"""Loading a saved model in a fresh Python that has transformers but cannot import hf_xarch (``trust_remote_code``)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..model.registry import ATTENTION_MODULES
from .cases import FamilyCase

# a meta-path finder that makes `import hf_xarch` fail, as it would for someone who never installed it
BLOCKER = """import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == 'hf_xarch' or name.startswith('hf_xarch.'):
            raise ImportError('hf_xarch is blocked in this process')
        return None
sys.meta_path.insert(0, _Block())
try:
    import hf_xarch
    raise SystemExit('hf_xarch imported although blocked')
except ImportError:
    pass
"""


def run_without_hf_xarch(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python in which ``import hf_xarch`` fails, offline, outside the checkout."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    return subprocess.run([sys.executable, "-c", BLOCKER + script], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/", check=False)


NOT_SAVED = "the family's code is not in hf_xarch/model/, so a saved model cannot bring it"


def travels_with_saved_models(family: str) -> bool:
    """Whether a family's code is saved with a model: only files in ``hf_xarch/model/`` (reached from
    ``modeling_xarch.py`` by ``from .sibling import Name``) are; a family defined elsewhere cannot load without its
    own code."""
    return ATTENTION_MODULES[family].__module__.startswith("hf_xarch.model.")


def check_loads_without_hf_xarch(case: FamilyCase) -> str:
    """Save a model of ``case``; in a fresh process without hf_xarch, the Auto class loads it with
    ``trust_remote_code=True`` and gives identical outputs on a padded batch (and, for a decoder, the same greedy
    generation). Returns what was checked; raises AssertionError with the fresh process's error otherwise."""
    from ..model.modeling_xarch import XArchForCausalLM, XArchModel

    if not travels_with_saved_models(case.family):
        raise ValueError(f"{case.id}: {NOT_SAVED} (it is in {ATTENTION_MODULES[case.family].__module__})")
    model = case.model(XArchForCausalLM if case.decoder else XArchModel)
    ids = case.ids(2, 9, "fresh")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(Path(folder) / "model")
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        expected = out.logits if case.decoder else out.last_hidden_state
        generated = (model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
                     if case.decoder else None)
        torch.save((ids, mask, expected, generated), Path(folder) / "io.pt")
        auto = "AutoModelForCausalLM" if case.decoder else "AutoModel"
        script = f"""
import torch, transformers
torch.set_num_threads({torch.get_num_threads()})  # as here: another thread count may sum in another order
ids, mask, expected, generated = torch.load({str(Path(folder) / 'io.pt')!r})
model = transformers.{auto}.from_pretrained({str(Path(folder) / 'model')!r}, trust_remote_code=True).eval()
assert 'hf_xarch' not in type(model).__module__, type(model).__module__
with torch.no_grad():
    out = model(ids, attention_mask=mask)
got = out.logits if generated is not None else out.last_hidden_state
assert torch.equal(got, expected), f'outputs differ by {{(got - expected).abs().max():.2e}}'
if generated is not None:
    again = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(again, generated), f'greedy generation differs: {{again.tolist()}} vs {{generated.tolist()}}'
print('loaded and identical')
"""
        result = run_without_hf_xarch(script)
    if result.returncode != 0 or "loaded and identical" not in result.stdout:
        last = (result.stderr.strip().splitlines() or ["(no error output)"])[-1]
        raise AssertionError(f"{case.id}: fresh_process: a saved model does not load or differs in a Python "
                             f"without hf_xarch: {last}\n{result.stdout}{result.stderr[-3000:]}")
    return "loads with trust_remote_code in a Python without hf_xarch, with identical outputs" + (
        " and greedy generation" if case.decoder else "")
