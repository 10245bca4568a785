"""GPT-2 (Radford et al. 2019) <-> XArch.

GPT-2 is a pre-norm decoder: ``x + Attention(LN(x))``, ``h + MLP(LN(h))``, a final LayerNorm, learned absolute
positions, ``gelu_new`` and an output layer tied to the token embeddings. In XArch terms: ``is_decoder=True``,
``norm_position="pre"``, ``final_norm=True``, ``position_embedding_type="learned"``.

Two weight quirks: GPT-2's projections are ``Conv1D`` layers, which store the weight as (in, out), the transpose of
``nn.Linear``; and its attention has one fused ``c_attn`` projection whose output is [q | k | v], split here into
``q_proj``/``k_proj``/``v_proj`` (PEFT and every XArch attention family expect the three).

GPT-2's two attention-scale options change the score scale, ``scale_attn_weights=False`` (no 1/sqrt(d)) and
``scale_attn_by_inverse_layer_idx`` (a further 1/(layer+1)). Scores are linear in q, so both are folded into q_proj
(weight and bias multiplied by GPT-2's scale over XArch's 1/sqrt(d)): same outputs, the options need no XArch field.

The config is ``FIELDS`` over GPT-2's shape (``fields.LAYERNORM_DECODER``, which BLOOM shares), the weights are
``TABLE`` after the fused projection is split (``split_fused_qkv``, which BLOOM shares), both read in both directions.

Inputs that differ: GPT-2 numbers positions 0..n-1 whatever the mask, XArch skips left padding (so a left-padded
row starts at position 0, as it would unpadded); without left padding, or given ``position_ids``, both agree. GPT-2
also accepts ``token_type_ids`` and embeds them with its token table; the converted model has no token types and
raises ``ValueError`` if given them.
"""

from __future__ import annotations

import logging

import torch
from transformers import GPT2Config
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    register_converter,
    rename,
    unsupported,
)
from .fields import LAYERNORM_DECODER, ConfigTable, add_zero_bias, drop_zero_bias, token_classifier_dropout

logger = logging.getLogger(__name__)

HEADS = heads("GPT2", "Model", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")

# (transformers key, XArch key) after `split_fused_qkv`; `{i}` is the layer, `{p}` weight or bias
TABLE = [
    ("transformer.wte.weight", "model.embeddings.word_embeddings.weight"),
    ("transformer.wpe.weight", "model.embeddings.position_embeddings.weight"),
    ("transformer.h.{i}.ln_1.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("transformer.h.{i}.attn.q_proj.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("transformer.h.{i}.attn.k_proj.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("transformer.h.{i}.attn.v_proj.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("transformer.h.{i}.attn.c_proj.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("transformer.h.{i}.ln_2.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("transformer.h.{i}.mlp.c_fc.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("transformer.h.{i}.mlp.c_proj.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("transformer.ln_f.{p}", "model.norm.{p}"),
    ("lm_head.weight", "lm_head.weight"),
    ("classifier.{p}", "classifier.{p}"),
    ("qa_outputs.{p}", "qa_outputs.{p}"),
]
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
FUSED, PARTS = ".attn.c_attn.", ".attn.{}_proj."
# buffers that GPT-2 checkpoints older than transformers 4.3x carry (the causal mask); masks are built on the fly now
LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")


FIELDS = ConfigTable(
    GPT2Config,
    renamed=(
        ("vocab_size", "vocab_size"),
        ("n_embd", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("n_inner", "intermediate_size"),  # None: 4 * n_embd in both
        ("activation_function", "hidden_act"),
        ("n_positions", "max_position_embeddings"),
        ("layer_norm_epsilon", "norm_eps"),
        ("resid_pdrop", "hidden_dropout"),
        ("attn_pdrop", "attention_dropout"),
        ("initializer_range", "initializer_range"),
    ),
    fixed=LAYERNORM_DECODER,
)


def head_table(hf_class_name: str) -> list[tuple[str, str]]:
    """The weight table of one head: GPT2ForSequenceClassification's classifier is its `score` (bias-free: given a
    zero bias, see ``add_zero_bias``)."""
    if hf_class_name.endswith("ForSequenceClassification"):
        return [("score.{p}", "classifier.{p}") if hf == "classifier.{p}" else (hf, xarch) for hf, xarch in TABLE]
    return TABLE


def split_fused_qkv(state_dict: StateDict, fused: str, parts: str, groups: int) -> StateDict:
    """Every ``<prefix><fused><param>`` weight split into ``<prefix><parts.format(q|k|v)><param>``. The fused
    projection's output rows are laid out (groups, 3, rows): GPT-2 has one group, [q | k | v]; BLOOM one per head,
    [q_0 k_0 v_0 | q_1 k_1 v_1 | ...]."""
    out = {}
    for key, tensor in state_dict.items():
        if fused not in key:
            out[key] = tensor
            continue
        prefix, param = key.split(fused)
        per_group = tensor.reshape(groups, 3, -1, *tensor.shape[1:])
        for index, name in enumerate("qkv"):
            out[f"{prefix}{parts.format(name)}{param}"] = per_group[:, index].reshape(-1, *tensor.shape[1:])
    return out


def fuse_qkv(state_dict: StateDict, fused: str, parts: str, groups: int) -> StateDict:
    """``split_fused_qkv`` the other way."""
    out = {}
    for key, tensor in state_dict.items():
        if parts.format("k") in key or parts.format("v") in key:
            continue
        if parts.format("q") not in key:
            out[key] = tensor
            continue
        prefix, param = key.split(parts.format("q"))
        qkv = [state_dict[f"{prefix}{parts.format(name)}{param}"] for name in "qkv"]
        stacked = torch.stack([part.reshape(groups, -1, *part.shape[1:]) for part in qkv], dim=1)
        out[f"{prefix}{fused}{param}"] = stacked.reshape(-1, *tensor.shape[1:])
    return out


def q_scale(hf_config: PreTrainedConfig, layer: int) -> float:
    """GPT-2's score scale for ``layer`` divided by XArch's 1/sqrt(head_dim): the factor folded into q_proj."""
    head_dim = hf_config.n_embd // hf_config.n_head
    scale = 1.0 if hf_config.scale_attn_weights else head_dim**0.5
    if hf_config.scale_attn_by_inverse_layer_idx:
        scale /= layer + 1
    return scale


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if getattr(hf_config, "add_cross_attention", False):
        problems.append("add_cross_attention=True: XArch has no cross-attention")
    if hf_config.n_embd % hf_config.n_head:
        problems.append(f"n_embd={hf_config.n_embd} is not a multiple of n_head={hf_config.n_head}")
    unsupported("GPT-2", problems)
    if hf_config.embd_pdrop != hf_config.resid_pdrop:
        # dropout only acts in training; XArch has one hidden dropout for the embeddings and the residual branches
        logger.warning(
            "GPT-2 embd_pdrop=%s differs from resid_pdrop=%s; the XArch model uses hidden_dropout=%s for both",
            hf_config.embd_pdrop, hf_config.resid_pdrop, hf_config.resid_pdrop,
        )
    return FIELDS.to_xarch(
        hf_config,
        # GPT2ForSequenceClassification has no dropout before `score`; GPT2ForTokenClassification has the generic one
        classifier_dropout=0.0 if hf_class_name == "GPT2ForSequenceClassification" else token_classifier_dropout(hf_config),
        classifier_pooling="last",
        train_pad_embedding=True,  # GPT-2's wte has no padding_idx: its pad token (often EOS) trains like any other
    )


def config_to_hf(config: XArchConfig, hf_class_name: str) -> GPT2Config:
    required = dict(FIELDS.fixed)
    if hf_class_name == "GPT2ForSequenceClassification":
        required["classifier_pooling"] = "last"  # GPT-2 classifies from the last real token
    unsupported("XArch", check_xarch_config(config, "GPT-2", required) + check_no_layer_sharing(config, "GPT-2"))
    return FIELDS.to_hf(config, embd_pdrop=config.hidden_dropout)


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    if hf_config.reorder_and_upcast_attn:
        dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
        if dtypes != {torch.float32}:
            unsupported("GPT-2", [(
                f"reorder_and_upcast_attn=True with {sorted(map(str, dtypes))} weights: GPT-2 then computes the "
                "attention scores in fp32; XArch computes them in the model dtype (identical for fp32 models only)"
            )])
    if "score.weight" in state_dict:
        state_dict = add_zero_bias(state_dict, "score")
    # Conv1D keeps (in, out); nn.Linear keeps (out, in)
    linear = {
        key: tensor.t() if key.endswith(CONV1D) else tensor
        for key, tensor in state_dict.items()
        if not key.endswith(LEGACY_BUFFERS)
    }
    split = split_fused_qkv(linear, FUSED, PARTS, groups=1)
    for key in split:
        if PARTS.format("q") in key:  # transformer.h.{i}.attn.q_proj.*
            split[key] = split[key] * q_scale(hf_config, int(key.split(".")[2]))
    return {key: tensor.contiguous() for key, tensor in rename(split, head_table(hf_class_name)).items()}


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    if hf_class_name == "GPT2ForSequenceClassification":
        state_dict = drop_zero_bias(state_dict, "classifier", hf_class_name)
    out = fuse_qkv(rename(state_dict, head_table(hf_class_name), reverse=True), FUSED, PARTS, groups=1)
    return {key: (tensor.t() if key.endswith(CONV1D) else tensor).contiguous() for key, tensor in out.items()}


GPT2 = register_converter(Converter("gpt2", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf))
