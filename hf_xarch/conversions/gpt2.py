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
    register_converter,
    rename,
    shared_config_kwargs,
    shared_hf_kwargs,
    unsupported,
)

logger = logging.getLogger(__name__)

HEADS = {
    "GPT2Model": "XArchModel",
    "GPT2LMHeadModel": "XArchForCausalLM",
    "GPT2ForSequenceClassification": "XArchForSequenceClassification",
    "GPT2ForTokenClassification": "XArchForTokenClassification",
    "GPT2ForQuestionAnswering": "XArchForQuestionAnswering",
}

# (transformers key, XArch key) after `split_fused` below; `{i}` is the layer, `{p}` weight or bias
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
# buffers that GPT-2 checkpoints older than transformers 4.3x carry (the causal mask); masks are built on the fly now
LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")


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
    # GPT2ForSequenceClassification has no dropout before `score`; GPT2ForTokenClassification reads these fields
    if hf_class_name == "GPT2ForSequenceClassification":
        classifier_dropout = 0.0
    else:
        classifier_dropout = getattr(hf_config, "classifier_dropout", None)
        if classifier_dropout is None:
            classifier_dropout = getattr(hf_config, "hidden_dropout", None)
        if classifier_dropout is None:
            classifier_dropout = 0.1
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.n_embd,
        num_hidden_layers=hf_config.n_layer,
        num_attention_heads=hf_config.n_head,
        intermediate_size=hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd,
        hidden_act=hf_config.activation_function,
        max_position_embeddings=hf_config.n_positions,
        type_vocab_size=0,
        is_decoder=True,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="pre",
        norm_eps=hf_config.layer_norm_epsilon,
        final_norm=True,
        embedding_norm=False,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        hidden_dropout=hf_config.resid_pdrop,
        attention_dropout=hf_config.attn_pdrop,
        classifier_dropout=classifier_dropout,
        classifier_pooling="last",
        initializer_range=hf_config.initializer_range,
        train_pad_embedding=True,  # GPT-2's wte has no padding_idx: its pad token (often EOS) trains like any other
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    if hf_config.reorder_and_upcast_attn:
        dtypes = {tensor.dtype for tensor in state_dict.values() if tensor.is_floating_point()}
        if dtypes != {torch.float32}:
            unsupported("GPT-2", [
                f"reorder_and_upcast_attn=True with {sorted(map(str, dtypes))} weights: GPT-2 then computes the "
                "attention scores in fp32; XArch computes them in the model dtype (identical for fp32 models only)"
            ])
    state_dict = dict(state_dict)
    split = {}
    if "score.weight" in state_dict:  # GPT2ForSequenceClassification: a bias-free `score`; a zero bias is the same
        score = state_dict.pop("score.weight")
        split["classifier.weight"] = score
        split["classifier.bias"] = torch.zeros(score.shape[0], dtype=score.dtype, device=score.device)
    for key, tensor in state_dict.items():
        if key.endswith(LEGACY_BUFFERS):
            continue
        if key.endswith(CONV1D):
            tensor = tensor.t()  # Conv1D keeps (in, out); nn.Linear keeps (out, in)
        if ".attn.c_attn." in key:
            prefix, param = key.split(".attn.c_attn.")
            layer = int(prefix.rsplit(".", 1)[1])
            query, key_, value = tensor.chunk(3, dim=0)
            split[f"{prefix}.attn.q_proj.{param}"] = query * q_scale(hf_config, layer)
            split[f"{prefix}.attn.k_proj.{param}"] = key_
            split[f"{prefix}.attn.v_proj.{param}"] = value
        else:
            split[key] = tensor
    return {key: tensor.contiguous() for key, tensor in rename(split, TABLE).items()}


def config_to_hf(config: XArchConfig, hf_class_name: str) -> GPT2Config:
    required = dict(
        is_decoder=True,
        type_vocab_size=0,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="pre",
        final_norm=True,
        embedding_norm=False,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
    )
    if hf_class_name == "GPT2ForSequenceClassification":
        required["classifier_pooling"] = "last"  # GPT-2 classifies from the last real token
    problems = check_xarch_config(config, "GPT-2", required) + check_no_layer_sharing(config, "GPT-2")
    unsupported("XArch", problems)
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function=config.hidden_act,
        resid_pdrop=config.hidden_dropout,
        embd_pdrop=config.hidden_dropout,
        attn_pdrop=config.attention_dropout,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.initializer_range,
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    out = {}
    if hf_class_name == "GPT2ForSequenceClassification":
        if bool(state_dict.pop("classifier.bias").any()):
            unsupported("XArch", ["XArchForSequenceClassification has a non-zero classifier bias; GPT-2's has none"])
        out["score.weight"] = state_dict.pop("classifier.weight")
    split = rename(state_dict, TABLE, reverse=True)
    for key, tensor in split.items():
        if ".attn.q_proj." in key:
            prefix, param = key.split(".attn.q_proj.")
            parts = [split[f"{prefix}.attn.{name}_proj.{param}"] for name in ("q", "k", "v")]
            out[f"{prefix}.attn.c_attn.{param}"] = torch.cat(parts, dim=0)
        elif ".attn.k_proj." in key or ".attn.v_proj." in key:
            continue
        else:
            out[key] = tensor
    return {key: (tensor.t() if key.endswith(CONV1D) else tensor).contiguous() for key, tensor in out.items()}


GPT2 = register_converter(
    Converter(
        model_type="gpt2",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
    )
)
