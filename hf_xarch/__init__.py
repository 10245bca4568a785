"""hf_xarch: efficient attention and positional-encoding ideas behind one transformers config.

Importing this package registers the model type ``xarch`` with transformers' Auto classes and our default LoRA
targets with PEFT. Models saved by hf_xarch load without it through ``trust_remote_code=True``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

import transformers

from .model.configuration_xarch import XArchConfig
from .model.modeling_xarch import (
    HEADS,
    XArchForCausalLM,
    XArchForMaskedLM,
    XArchForQuestionAnswering,
    XArchForSequenceClassification,
    XArchForTokenClassification,
    XArchModel,
    XArchPreTrainedModel,
)
from .model.modeling_xarch_seq2seq import SEQ2SEQ_HEADS, XArchForConditionalGeneration, XArchSeq2SeqModel
from .model.registry import ATTENTION_FAMILIES, POSITION_SCHEMES

try:  # one source of truth: pyproject.toml's version, as installed
    __version__ = _distribution_version("hf-xarch")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"

# the attention projections every family keeps (PEFT's LoRA default for Llama-like models is q_proj/v_proj; we
# adapt all four, as the QLoRA paper found adapting every attention projection matters)
PEFT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
PEFT_FEEDFORWARD_MODULES = ["down_proj"]


def register() -> None:
    """Register ``xarch`` with transformers' Auto classes and PEFT's default target tables (idempotent)."""
    transformers.AutoConfig.register("xarch", XArchConfig, exist_ok=True)
    for head in (*HEADS, *SEQ2SEQ_HEADS):  # every model class with its Auto class, listed once in the modeling files
        getattr(transformers, head.auto_class).register(XArchConfig, head.model_class, exist_ok=True)
    _register_peft()


def _register_peft() -> None:
    try:
        from peft.utils import constants
    except ImportError:  # peft is a dependency, but importing hf_xarch must not need it
        return
    for name in dir(constants):
        table = getattr(constants, name)
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict)):
            continue
        if "FEEDFORWARD" in name:
            table.setdefault("xarch", list(PEFT_FEEDFORWARD_MODULES))
        elif "IA3" in name:
            table.setdefault("xarch", ["k_proj", "v_proj", "down_proj"])
        elif "llama" in table:  # other adapter kinds: the same modules they pick for Llama
            table.setdefault("xarch", table["llama"])
    constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["xarch"] = list(PEFT_TARGET_MODULES)


register()

from .hub import make_card, register_save_hook, set_card_info, write_card  # noqa: E402

register_save_hook()

# `hf_xarch.summary(config, seq_len=...)`; the module stays importable as `from hf_xarch.summary import ...`
from .summary import ModelSummary, summary  # noqa: E402

# `hf_xarch.longformerize(model, max_position_embeddings=4096, attention_window=512)`: Longformer's recipe
from .longformerize import longformerize  # noqa: E402

# `hf_xarch.extend_context(model, 4)`: a RoPE/ALiBi model ready to fine-tune on 4x longer sequences
from .context import extend_context  # noqa: E402

# `hf_xarch.swap_attention(model, attention_type="lsh")`: the same model with other attention, its weights kept
from .swap_attention import reconfigured, swap_attention  # noqa: E402

# `hf_xarch.linearize(model)`: softmax -> linear attention keeping the weights; then `attention_transfer` (LoLCATs)
from .linearize import attention_errors, attention_transfer, linearize  # noqa: E402

__all__ = [
    "__version__",
    "XArchConfig",
    "XArchPreTrainedModel",
    # the model classes of modeling_xarch.HEADS, imported by name above (tests/test_model.py checks the two agree)
    "XArchModel",
    "XArchForCausalLM",
    "XArchForMaskedLM",
    "XArchForSequenceClassification",
    "XArchForTokenClassification",
    "XArchForQuestionAnswering",
    "XArchForConditionalGeneration",
    "XArchSeq2SeqModel",
    "ATTENTION_FAMILIES",
    "POSITION_SCHEMES",
    "register",
    "make_card",
    "write_card",
    "set_card_info",
    "summary",
    "ModelSummary",
    "longformerize",
    "swap_attention",
    "reconfigured",
    "extend_context",
    "linearize",
    "attention_transfer",
    "attention_errors",
]
