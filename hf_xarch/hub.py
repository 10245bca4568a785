"""Publishing: model cards from the templates in ``model_cards/`` (huggingface_hub's ``ModelCard`` + Jinja), written
by every ``save_pretrained`` of an XArch model, published by ``push_to_hub`` instead of transformers' generic card,
and the ``hf-xarch card`` / ``hf-xarch push`` commands.

The card says what the model is in words (stack, attention, positions, embeddings, parameters by part), carries the
metadata the Hub indexes (library, tags, pipeline tag, base model, datasets, license, ``model-index`` results), shows how
to load it with and without hf_xarch, and cites the papers behind the parts it uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .model import modeling_xarch, modeling_xarch_seq2seq
from .model.configuration_xarch import XArchConfig
from .model.registry import ATTENTION_FAMILIES, POSITION_SCHEMES, attention_family_for_layer_type

TEMPLATE_NAME = "xarch_model_card.md"
EVAL_RESULTS_NAME = "eval_results.json"  # what the recipes scored; a card rewritten for a saved folder reads it
# the templates live in the repository's model_cards/; an installed wheel carries them under share/hf-xarch/
TEMPLATE_DIRS = [Path(__file__).resolve().parent.parent / "model_cards", Path(sys.prefix) / "share" / "hf-xarch" / "model_cards"]

# the card's pipeline tag and the Auto class its usage example loads, per architecture (the modeling files' heads)
ALL_HEADS = (*modeling_xarch.HEADS, *modeling_xarch_seq2seq.SEQ2SEQ_HEADS)
PIPELINE_TAGS = {head.model_class.__name__: head.pipeline_tag for head in ALL_HEADS}
AUTO_CLASS_OF = {head.model_class.__name__: head.auto_class for head in ALL_HEADS}

CITATIONS = {
    "transformer": """@inproceedings{vaswani2017attention,
  title={Attention Is All You Need}, author={Vaswani, Ashish and Shazeer, Noam and Parmar, Niki and Uszkoreit, Jakob and Jones, Llion and Gomez, Aidan N. and Kaiser, Lukasz and Polosukhin, Illia},
  booktitle={Advances in Neural Information Processing Systems}, year={2017}}""",
    "gqa": """@inproceedings{ainslie2023gqa,
  title={GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints}, author={Ainslie, Joshua and Lee-Thorp, James and de Jong, Michiel and Zemlyanskiy, Yury and Lebr{\\'o}n, Federico and Sanghai, Sumit},
  booktitle={EMNLP}, year={2023}}""",
    "mqa": """@article{shazeer2019fast,
  title={Fast Transformer Decoding: One Write-Head is All You Need}, author={Shazeer, Noam}, journal={arXiv:1911.02150}, year={2019}}""",
    "albert": """@inproceedings{lan2020albert,
  title={ALBERT: A Lite BERT for Self-supervised Learning of Language Representations}, author={Lan, Zhenzhong and Chen, Mingda and Goodman, Sebastian and Gimpel, Kevin and Sharma, Piyush and Soricut, Radu},
  booktitle={ICLR}, year={2020}}""",
    "tying": """@inproceedings{press2017using,
  title={Using the Output Embedding to Improve Language Models}, author={Press, Ofir and Wolf, Lior}, booktitle={EACL}, year={2017}}""",
    "adaptive_softmax": """@inproceedings{grave2017efficient,
  title={Efficient softmax approximation for GPUs}, author={Grave, Edouard and Joulin, Armand and Ciss{\\'e}, Moustapha and Grangier, David and J{\\'e}gou, Herv{\\'e}},
  booktitle={ICML}, year={2017}}""",
    "rmsnorm": """@inproceedings{zhang2019root,
  title={Root Mean Square Layer Normalization}, author={Zhang, Biao and Sennrich, Rico}, booktitle={NeurIPS}, year={2019}}""",
    "glu": """@article{shazeer2020glu,
  title={GLU Variants Improve Transformer}, author={Shazeer, Noam}, journal={arXiv:2002.05202}, year={2020}}""",
}


# ---- describing a model ------------------------------------------------------------------------------------------
def _layer_ranges(items: list[str]) -> list[tuple[int, int, str]]:
    """[a, a, b] -> [(0, 1, a), (2, 2, b)]"""
    ranges: list[tuple[int, int, str]] = []
    for index, item in enumerate(items):
        if ranges and ranges[-1][2] == item:
            ranges[-1] = (ranges[-1][0], index, item)
        else:
            ranges.append((index, index, item))
    return ranges


def _family_details(config: XArchConfig, family: str) -> str:
    details = ATTENTION_FAMILIES[family].card_details
    return details(config) if details is not None else ""


def model_kind(config: XArchConfig) -> str:
    """"encoder-decoder", "decoder" or "encoder": what the card calls the model."""
    if config.is_encoder_decoder:
        return "encoder-decoder"
    return "decoder" if config.is_decoder else "encoder"


def describe_architecture(config: XArchConfig) -> list[str]:
    """The architecture in words, one line per aspect."""
    lines = []
    stack = "decoder (causal)" if config.is_decoder else "encoder (bidirectional)"
    if config.is_encoder_decoder:
        decoder = config.stack_config("decoder")
        families = sorted({attention_family_for_layer_type(t).name for t in decoder.layer_types})
        lines.append(f"**Encoder-decoder**: a causal decoder of {decoder.num_hidden_layers} layers of "
                     f"{', '.join(f'`{name}`' for name in families)} self-attention with full cross-attention to the "
                     "encoder output; one token table shared by both stacks"
                     f"{' and the LM head' if config.tie_word_embeddings else ''}.")
    lines.append(
        f"**Stack**: {stack}, {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"{config.norm_position}-norm {config.norm_type}, {config.mlp_type} MLP of width {config.intermediate_size} "
        f"with `{config.hidden_act}`."
    )
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    kind = "multi-head" if kv == heads else ("multi-query (MQA)" if kv == 1 else f"grouped-query (GQA, {heads // kv} query heads per KV head)")
    families = [attention_family_for_layer_type(t).name for t in config.layer_types]
    for start, end, family in _layer_ranges(families):
        spec = ATTENTION_FAMILIES[family]
        where = f"layer {start}" if start == end else f"layers {start}-{end}"
        details = _family_details(config, family)
        lines.append(f"**Attention** ({where}): `{family}` — {spec.description}{'; ' + details if details else ''}.")
    lines.append(f"**Heads**: {heads} query heads of {config.head_dim}, {kv} key/value heads: {kind}.")
    scheme = POSITION_SCHEMES[config.position_embedding_type]
    position = f"**Positions**: `{scheme.name}` — {scheme.description}"
    if scheme.card_details is not None:
        position += f"; {scheme.card_details(config)}"
    if scheme.bounded:
        position += f"; at most {config.max_position_embeddings} positions"
    lines.append(position + ".")
    embeddings = f"**Embeddings**: vocabulary {config.vocab_size}"
    if config.embedding_size != config.hidden_size:
        embeddings += f", factorized (ALBERT) to {config.embedding_size} then projected to {config.hidden_size}"
    embeddings += ", input and output tied" if config.tie_word_embeddings else ", untied output layer"
    if getattr(config, "output_layer", "full") == "adaptive":
        embeddings += f", adaptive softmax output with cutoffs {config.adaptive_cutoffs}"
    if config.type_vocab_size:
        embeddings += f", {config.type_vocab_size} token types"
    lines.append(embeddings + ".")
    groups = getattr(config, "num_hidden_groups", None)
    if groups or getattr(config, "inner_group_num", None):
        blocks = len(set(config.block_schedule())) if hasattr(config, "block_schedule") else None
        if blocks and blocks < config.num_hidden_layers:
            lines.append(f"**Cross-layer sharing** (ALBERT): {blocks} distinct blocks applied over {config.num_hidden_layers} layers.")
    return lines


def citations_for(config: XArchConfig) -> list[str]:
    keys = ["transformer"]
    kv = config.num_key_value_heads
    if kv == 1 and config.num_attention_heads > 1:
        keys.append("mqa")
    elif kv < config.num_attention_heads:
        keys.append("gqa")
    families = dict.fromkeys(attention_family_for_layer_type(t) for t in config.layer_types)  # in layer order
    family_entries = [entry for family in families if family.citations for entry in family.citations(config)]
    before_families = len(keys)
    scheme = POSITION_SCHEMES[config.position_embedding_type]
    family_entries += scheme.citations(config) if scheme.citations is not None else ()
    if config.embedding_size != config.hidden_size or getattr(config, "num_hidden_groups", None):
        keys.append("albert")
    if config.tie_word_embeddings:
        keys.append("tying")
    if getattr(config, "output_layer", "full") == "adaptive":
        keys.append("adaptive_softmax")
    if config.norm_type == "rmsnorm":
        keys.append("rmsnorm")
    if config.mlp_type == "gated":
        keys.append("glu")
    entries = [CITATIONS[key] for key in keys]
    return entries[:before_families] + list(dict.fromkeys(family_entries)) + entries[before_families:]


def parameters_by_part(model: torch.nn.Module) -> "OrderedDict[str, int]":
    """Unique parameters (tied ones once) in embeddings, attention, MLP, norms and heads."""
    parts: OrderedDict[str, int] = OrderedDict((k, 0) for k in ("embeddings", "attention", "mlp", "norms", "heads"))
    prefix = getattr(model, "base_model_prefix", "model")
    nested = hasattr(model, prefix) and isinstance(getattr(model, prefix), torch.nn.Module)
    for name, parameter in model.named_parameters():  # remove_duplicate=True: a tied weight counts once
        if nested and not name.startswith(prefix + "."):
            part = "heads"
        else:
            inner = name[len(prefix) + 1 :] if nested else name
            if inner.startswith("embeddings."):
                part = "embeddings"
            elif ".attention." in inner:
                part = "attention"
            elif ".mlp." in inner:
                part = "mlp"
            else:  # attention_norm, mlp_norm, the final norm
                part = "norms"
        parts[part] += parameter.numel()
    return parts


def _model_on_meta(config: XArchConfig, architecture: str) -> torch.nn.Module:
    model_class = getattr(modeling_xarch, architecture, modeling_xarch.XArchModel)
    with torch.device("meta"):
        return model_class(config)


def _card_data(model, *, base_model, datasets, license, language, tags, eval_results, model_name) -> ModelCardData:
    config = model.config
    families = sorted({attention_family_for_layer_type(t).name for t in config.layer_types})
    all_tags = ["hf_xarch", "xarch", *(f"attention-{f.replace('_', '-')}" for f in families),
                f"positions-{config.position_embedding_type}", model_kind(config)]
    all_tags += [t for t in (tags or []) if t not in all_tags]
    results = [r if isinstance(r, EvalResult) else EvalResult(**r) for r in (eval_results or [])]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=PIPELINE_TAGS.get(type(model).__name__),
        tags=all_tags,
        base_model=base_model,
        datasets=datasets,
        license=license,
        language=language,
        eval_results=results or None,
        model_name=model_name if results else None,
    )


def make_card(
    model: torch.nn.Module | XArchConfig,
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    license: str | None = "apache-2.0",
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    training_config: dict | str | None = None,
    training_summary: str | None = None,
    eval_results: list[EvalResult | dict] | None = None,
    limitations: list[str] | None = None,
    usage_example: str | None = None,
    has_tokenizer: bool = False,
    template_path: str | Path | None = None,
) -> ModelCard:
    """Fill the model-card template from what is known about ``model`` (an XArch model, or a config).

    eval_results: huggingface_hub ``EvalResult``s, or dicts of its fields (``task_type``, ``dataset_type``,
    ``dataset_name``, ``metric_type``, ``metric_value``, ...); they become the ``model-index`` block.
    training_config: the recipe's config (a dict is rendered as YAML).
    """
    import yaml

    if isinstance(model, XArchConfig):
        architectures = model.architectures or ["XArchModel"]
        model = _model_on_meta(model, architectures[0])
    config = model.config
    architecture = type(model).__name__
    name = model_name or (repo_id.split("/")[-1] if repo_id else f"xarch-{architecture.removeprefix('XArch').lower() or 'model'}")
    parts = parameters_by_part(model)
    total = sum(parts.values())
    default_limitations = [
        "A research architecture: its quality depends entirely on how it was trained; check the evaluation above.",
        "Loading without hf_xarch runs the repository's Python code (`trust_remote_code=True`).",
    ]
    if POSITION_SCHEMES[config.position_embedding_type].bounded:
        default_limitations.append(
            f"Learned positions: inputs longer than {config.max_position_embeddings} tokens raise an error."
        )
    if model_kind(config) != "encoder":
        default_limitations.append("May generate false or offensive text, like any language model.")
    if isinstance(training_config, dict):
        training_config = yaml.safe_dump(training_config, sort_keys=False).strip()
    template = Path(template_path) if template_path else find_template()
    card = ModelCard.from_template(
        _card_data(model, base_model=base_model, datasets=datasets, license=license, language=language, tags=tags,
                   eval_results=eval_results, model_name=name),
        template_path=str(template),
        model_name=name,
        summary=(
            f"An hf_xarch {model_kind(config)} "
            f"(`{architecture}`, {total:,} parameters)" + (f", fine-tuned from `{base_model}`" if base_model else "") + "."
        ),
        architecture=describe_architecture(config),
        parameters=[(part, count, count / total if total else 0.0) for part, count in parts.items() if count],
        total_parameters=total,
        auto_class=AUTO_CLASS_OF.get(architecture, "AutoModel"),
        repo_id=repo_id or f"your-name/{name}",
        has_tokenizer=has_tokenizer,
        min_transformers=getattr(config, "transformers_version", None) or transformers.__version__,
        training=training_config,
        training_summary=training_summary,
        results=[r if isinstance(r, EvalResult) else EvalResult(**r) for r in (eval_results or [])],
        limitations=limitations or default_limitations,
        citations=citations_for(config),
        usage_example=usage_example,
    )
    return card


def find_template(name: str = TEMPLATE_NAME) -> Path:
    for folder in TEMPLATE_DIRS:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"model card template {name!r} not found in {[str(d) for d in TEMPLATE_DIRS]}")


# ---- writing and publishing -----------------------------------------------------------------------------------
def set_card_info(model: torch.nn.Module, **card_kwargs: Any) -> None:
    """Remember ``make_card`` arguments (training config, results, base model...) for the card that the model's next
    ``save_pretrained`` writes."""
    info = dict(getattr(model, "_xarch_card_kwargs", {}) or {})
    info.update(card_kwargs)
    model._xarch_card_kwargs = info


def write_card(model: torch.nn.Module, folder: str | Path, overwrite: bool = False, **card_kwargs: Any) -> Path | None:
    """Write ``README.md`` into ``folder``; a card already there (a user's own) is kept unless ``overwrite``."""
    path = Path(folder) / "README.md"
    if path.exists() and not overwrite:
        return None
    kwargs = {**(getattr(model, "_xarch_card_kwargs", {}) or {}), **card_kwargs}
    kwargs.setdefault("has_tokenizer", (Path(folder) / "tokenizer.json").exists() or (Path(folder) / "tokenizer_config.json").exists())
    make_card(model, **kwargs).save(path)
    return path


def _write_card_on_save(model: torch.nn.Module, folder: str | Path) -> None:
    write_card(model, folder, overwrite=False)


def register_save_hook() -> None:
    """Make every XArch ``save_pretrained`` write our card (called on ``import hf_xarch``)."""
    if _write_card_on_save not in modeling_xarch.SAVE_HOOKS:
        modeling_xarch.SAVE_HOOKS.append(_write_card_on_save)


def card_for_folder(folder: str | Path, **card_kwargs: Any) -> ModelCard:
    """The card of a saved folder, built from its config (the model is instantiated on the meta device) and the
    recipe's ``eval_results.json`` when there is one: the card shows the numbers the run reported, not new ones."""
    config = XArchConfig.from_pretrained(folder)
    results = Path(folder) / EVAL_RESULTS_NAME
    if "eval_results" not in card_kwargs and results.is_file():
        card_kwargs["eval_results"] = json.loads(results.read_text())
    return make_card(config, **card_kwargs)


def check_hub_access(token: str | None = None) -> str:
    """The Hub user name of `token` (None: the saved login, or ``HF_TOKEN``). Run before an upload so that a missing
    login or an unreachable Hub is one error naming the fix (``PermissionError`` / ``ConnectionError``), not a network
    traceback halfway through a push."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        return api.whoami()["name"]
    except LocalTokenNotFoundError:
        raise PermissionError(
            "not logged in to the Hugging Face Hub: run `hf auth login`, set HF_TOKEN, or pass --token"
        ) from None
    except OfflineModeIsEnabled:
        raise ConnectionError("HF_HUB_OFFLINE is set, so nothing can be pushed: unset it to push") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise PermissionError(
                f"the Hub at {api.endpoint} rejected the token (401 Unauthorized): log in again with `hf auth login` "
                "or pass a valid --token"
            ) from None
        raise ConnectionError(f"the Hub at {api.endpoint} answered the login check with {status}: {error}") from None
    except HTTPError as error:  # no answer at all: DNS, refused connection, timeout, proxy
        raise ConnectionError(
            f"the Hub at {api.endpoint} is unreachable ({error}): check the network connection, proxy settings or "
            "HF_ENDPOINT"
        ) from None


def push_folder(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload hf_xarch model", revision: str | None = None):
    """Upload a saved folder (weights, config, code files, tokenizer, card) to the Hub; writes our card first when the
    folder has none."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"push: {folder} holds no config.json; save a model there with save_pretrained first")
    check_hub_access(token)
    if not (folder / "README.md").exists():
        card_for_folder(folder, repo_id=repo_id, has_tokenizer=(folder / "tokenizer.json").exists()).save(folder / "README.md")
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # one commit of every file (as transformers' own push_to_hub does), hidden folders such as .cache left out
    operations = [
        CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message, revision=revision)


# ---- command line --------------------------------------------------------------------------------------------------
def main_card(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-xarch card", description="(Re)write the model card of a saved folder.")
    parser.add_argument("path", help="a folder written by save_pretrained")
    parser.add_argument("--repo-id", help="the Hub repository the card should name")
    parser.add_argument("--base-model")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--keep", action="store_true", help="keep an existing README.md instead of rewriting it")
    args = parser.parse_args(argv)
    folder = Path(args.path)
    if not (folder / "config.json").exists():
        parser.error(f"{folder} holds no config.json")
    target = folder / "README.md"
    if args.keep and target.exists():
        print(f"kept existing {target}")
        return 0
    card_for_folder(folder, repo_id=args.repo_id, base_model=args.base_model, license=args.license,
                    has_tokenizer=(folder / "tokenizer.json").exists()).save(target)
    print(f"wrote {target}")
    return 0


def main_push(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-xarch push", description="Upload a saved folder to the Hub.")
    parser.add_argument("path")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--token")
    parser.add_argument("--message", default="Upload hf_xarch model")
    args = parser.parse_args(argv)
    info = push_folder(args.path, args.repo_id, token=args.token, private=args.private or None, commit_message=args.message)
    print(f"pushed {args.path} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


main = main_card
