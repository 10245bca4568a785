"""PEFT: LoRA works on XArch models with no target_modules given (our defaults are registered on import), and
adapters save and reload with identical outputs."""

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from hf_xarch import XArchForCausalLM, XArchForSequenceClassification, XArchForTokenClassification

from .helpers import random_ids, tiny_config

CASES = [
    (XArchForCausalLM, TaskType.CAUSAL_LM, dict(is_decoder=True, num_key_value_heads=2)),
    (XArchForSequenceClassification, TaskType.SEQ_CLS, dict(num_labels=3)),
    (XArchForTokenClassification, TaskType.TOKEN_CLS, dict(num_labels=4)),
]


@pytest.mark.parametrize("model_class, task, overrides", CASES, ids=[c[1].value for c in CASES])
def test_lora_defaults_train_and_reload(model_class, task, overrides, tmp_path):
    torch.manual_seed(0)
    base = model_class(tiny_config(**overrides))
    peft_model = get_peft_model(base, LoraConfig(task_type=task, r=4, lora_alpha=8))
    adapted = {name.split(".")[-2] for name, _ in peft_model.named_modules() if name.endswith(".lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)

    # one optimisation step moves the adapters (B starts at zero, so outputs change only after training)
    ids = random_ids(2, 7)
    labels = ids if task == TaskType.CAUSAL_LM else (
        torch.tensor([0, 2]) if task == TaskType.SEQ_CLS else torch.randint(0, 4, (2, 7))
    )
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    peft_model.train()
    peft_model(input_ids=ids, labels=labels).loss.backward()
    optimizer.step()
    peft_model.eval()
    before = peft_model(input_ids=ids).logits

    peft_model.save_pretrained(tmp_path / "adapter")
    # a fresh base model, given the frozen base weights (the adapter file holds only the adapter)
    reloaded = PeftModel.from_pretrained(model_class(tiny_config(**overrides)), tmp_path / "adapter")
    base_state = {k: v for k, v in peft_model.get_base_model().state_dict().items() if "lora_" not in k}
    missing = reloaded.get_base_model().load_state_dict(base_state, strict=False)
    assert not [k for k in missing.missing_keys if "lora_" not in k]
    reloaded.eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, before)


def test_unknown_lora_target_is_reported():
    with pytest.raises(ValueError):
        get_peft_model(XArchForCausalLM(tiny_config()), LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["nope"]))
