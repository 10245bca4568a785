"""Fine-tune an XArch model for sequence classification, token classification or text-to-text generation
(an encoder-decoder), fully or with LoRA (PEFT).

    accelerate launch recipes/finetune.py --config recipes/configs/finetune_sequence.yaml base_model=runs/pretrain_mlm
    hf-xarch finetune task=token data.files=[ner.jsonl] data.tokens_column=words data.tags_column=ner_tags
    hf-xarch finetune --config recipes/configs/finetune_seq2seq.yaml data.files=[pairs.json]

The recipe: read labelled records -> the tokenizer and model of ``base_model`` (or a fresh model from the ``model``
section with a tokenizer trained on the fly) -> optionally wrap it with LoRA adapters -> train with the shared loop ->
report held-out loss with accuracy and F1 (classification) or BLEU, chrF and ROUGE of generated text (seq2seq),
through the ``evaluate`` modules hf_xarch ships -> save.

Without data files it runs offline on tasks made from the default corpus: ``sequence`` - was this snippet's word
order shuffled? (shuffled / original); ``token`` - is each word a Python keyword, a number, an identifier-like word
or something else? (both meant for demos and tests); ``seq2seq`` - a Python function without its docstring -> the
docstring's first line (real code summarization; see ``text_pairs``).
"""

from __future__ import annotations

import copy
import keyword
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import (
    COMMON_SECTIONS,
    check_common,
    check_length,
    check_model_section,
    check_saved_model,
    eval_result_entries,
    get_tokenizer,
    loop_settings,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    save_outputs,
)
from .config import Config, parse_args, xarch_config_fields
from .data import ExampleOrder, load_records, pad_batch
from .evaluation import check_evaluation, evaluate_classifier, evaluate_seq2seq, format_scores
from .loop import LoopResult, train
from .text_pairs import demo_pairs, encode_pairs, pad_pairs
from .tokenizer import check_tokenizer_folder, check_tokenizer_for_task
from .tracking import MetricsLogger

TASKS = ("sequence", "token", "seq2seq")
DEFAULT_LABELS = {"sequence": ["shuffled", "original"], "token": ["other", "keyword", "identifier", "number"]}

DEFAULTS = {
    **copy.deepcopy(COMMON_SECTIONS),
    "output_dir": "runs/finetune",
    # sequence (XArchForSequenceClassification) | token (XArchForTokenClassification)
    # | seq2seq (XArchForConditionalGeneration: is_encoder_decoder=True)
    "task": "sequence",
    "base_model": None,  # a saved model folder (its tokenizer too); null: a fresh model from the `model` section
    "model": {  # any XArchConfig field, for a fresh model only
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "max_position_embeddings": 256,
        "position_embedding_type": "rope",
        "is_decoder": False,
        "hidden_dropout": 0.1,
    },
    "lora": {
        "enabled": False,
        "r": 8,
        "alpha": 16,
        "dropout": 0.05,
        "target_modules": None,  # null: hf_xarch's default, the attention projections q_proj k_proj v_proj o_proj
        "modules_to_save": None,  # null: the task head (classifier, and the pooler when there is one)
    },
    "data": {
        "files": [],  # local .json/.jsonl/.csv/.parquet; empty (and no dataset): a demo task from the default corpus
        "dataset": None,
        "dataset_config": None,
        "split": "train",
        "text_column": "text",  # sequence task
        "text_pair_column": None,  # sequence task, sentence pairs
        "label_column": "label",  # sequence task
        "tokens_column": "tokens",  # token task: a list of words per record
        "tags_column": "tags",  # token task: a label per word
        "source_column": "source",  # seq2seq task: the input text
        "target_column": "target",  # seq2seq task: the text to generate
        "max_target_length": 64,  # seq2seq task: target tokens (EOS included; longer targets are truncated)
        "label_names": None,  # class names in id order; null: from the data
        "sample_by": "document",
        "streaming": False,  # not supported by this recipe (labels must be known up front)
        "shuffle_buffer": 10_000,
        "heldout_fraction": 0.1,
        "heldout_records": 200,
        "max_bytes": 1_000_000,  # default corpus: how much of it the demo tasks use
        "max_examples": 0,  # 0: all
        "max_length": 128,  # tokens per example (seq2seq: per source; longer ones are truncated)
        "words_per_example": 24,  # demo tasks: words per snippet
    },
}
DEFAULTS["generation"] = {  # seq2seq task: how held-out targets are generated for BLEU / chrF / ROUGE
    "max_new_tokens": None,  # null: data.max_target_length
    "num_beams": 1,  # 1: greedy
}
DEFAULTS["training"] = {**DEFAULTS["training"], "max_steps": 100, "micro_batch_size": 16}
DEFAULTS["optimizer"] = {**DEFAULTS["optimizer"], "lr": 5.0e-4}


@dataclass
class FinetuneResult:
    output_dir: Path
    loop: LoopResult
    eval_metrics: dict
    written: dict
    label_names: list[str]


# ---- the demo tasks -------------------------------------------------------------------------------------------------
def word_tag(word: str) -> int:
    """The demo token task's label of one word (ids into DEFAULT_LABELS["token"])."""
    if keyword.iskeyword(word):
        return 1
    try:
        float(word)
        return 3
    except ValueError:
        pass
    return 2 if word.isidentifier() else 0


def demo_records(texts: list[str], task: str, words_per_example: int, seed: int) -> list[dict]:
    """Cut texts into snippets of `words_per_example` words and label them for `task` (see the module docstring).
    Labels are balanced and deterministic in `seed`."""
    rng = random.Random(seed)
    records = []
    for text in texts:
        words = text.split()
        for start in range(0, len(words) - words_per_example + 1, words_per_example):
            snippet = words[start : start + words_per_example]
            if task == "token":
                records.append({"tokens": snippet, "tags": [word_tag(word) for word in snippet]})
                continue
            label = rng.randrange(2)
            if label == 0:
                shuffled = snippet[:]
                while shuffled == snippet and len(set(snippet)) > 1:
                    rng.shuffle(shuffled)
                snippet = shuffled
            records.append({"text": " ".join(snippet), "label": label})
    return records


# ---- labels and encoding --------------------------------------------------------------------------------------------
def label_vocabulary(values: list, given: list[str] | None) -> tuple[list[str], dict]:
    """Class names in id order and a map from the raw label values to ids. Integer labels are ids already; strings
    are sorted (or looked up in `given`)."""
    distinct = sorted({value for value in values}, key=str)
    if given:
        names = [str(name) for name in given]
        if all(isinstance(value, int) for value in distinct):
            bad = [value for value in distinct if not 0 <= value < len(names)]
            if bad:
                raise ValueError(f"labels {bad} are outside data.label_names (ids 0..{len(names) - 1})")
            return names, {value: value for value in distinct}
        unknown = [value for value in distinct if str(value) not in names]
        if unknown:
            raise ValueError(f"labels {unknown} are not in data.label_names={names}")
        return names, {value: names.index(str(value)) for value in distinct}
    if not distinct:
        raise ValueError("the data holds no labels")
    if all(isinstance(value, int) and not isinstance(value, bool) for value in distinct):
        if min(distinct) < 0:
            raise ValueError(f"integer labels must be >= 0 (got {min(distinct)}); -100 is only for ignored tokens")
        return [str(i) for i in range(max(distinct) + 1)], {value: value for value in distinct}
    names = [str(value) for value in distinct]
    return names, {value: index for index, value in enumerate(distinct)}


def encode(records: list[dict], task: str, tokenizer, data_cfg, label_ids: dict) -> list[dict]:
    """Token ids and labels of each record; token labels go to the first sub-token of each word (-100 elsewhere)."""
    examples = []
    for record in records:
        if task == "sequence":
            pair = record[data_cfg.text_pair_column] if data_cfg.text_pair_column else None
            ids = tokenizer(record[data_cfg.text_column], pair, truncation=True, max_length=data_cfg.max_length)
            examples.append({"input_ids": ids["input_ids"], "labels": label_ids[record[data_cfg.label_column]]})
            continue
        words, tags = record[data_cfg.tokens_column], record[data_cfg.tags_column]
        if len(words) != len(tags):
            raise ValueError(f"a record has {len(words)} words but {len(tags)} tags: {words[:5]}...")
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=data_cfg.max_length)
        labels, previous = [], None
        for word in encoded.word_ids():
            labels.append(-100 if word is None or word == previous else label_ids[tags[word]])
            previous = word
        examples.append({"input_ids": encoded["input_ids"], "labels": labels})
    return examples


# ---- model ----------------------------------------------------------------------------------------------------------
def build_model(cfg, tokenizer, label_names: list[str]):
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    from ..model.configuration_xarch import XArchConfig
    from ..model.modeling_xarch import XArchForSequenceClassification, XArchForTokenClassification
    from ..model.modeling_xarch_seq2seq import XArchForConditionalGeneration

    if cfg.task == "seq2seq":
        if cfg.base_model:
            model = AutoModelForSeq2SeqLM.from_pretrained(cfg.base_model)
        else:  # the decoder starts from BOS, as the tokenizer's sources do
            fields = {"is_encoder_decoder": True, "decoder_start_token_id": tokenizer.bos_token_id,
                      **fresh_model_fields(cfg, tokenizer)}
            model = XArchForConditionalGeneration(XArchConfig(**fields))
        check_length(cfg.data.max_length, model.config, key="data.max_length")
        check_length(cfg.data.max_target_length, model.config, key="data.max_target_length")
        return model
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    if cfg.base_model:
        auto = AutoModelForSequenceClassification if cfg.task == "sequence" else AutoModelForTokenClassification
        model = auto.from_pretrained(cfg.base_model, **labels)
    else:
        model_class = XArchForSequenceClassification if cfg.task == "sequence" else XArchForTokenClassification
        model = model_class(XArchConfig(**fresh_model_fields(cfg, tokenizer), **labels))
    check_length(cfg.data.max_length, model.config, key="data.max_length")
    return model


def fresh_model_fields(cfg, tokenizer) -> dict:
    """The ``model`` section with the tokenizer's vocabulary size and special token ids where it leaves them out."""
    fields = dict(cfg.model)
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["vocab_size"] < len(tokenizer):
        raise ValueError(f"model.vocab_size={fields['vocab_size']} is smaller than the tokenizer's {len(tokenizer)}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        fields.setdefault(name, getattr(tokenizer, name))
    return fields


def add_lora(model, cfg):
    """Wrap `model` with LoRA adapters (Hu et al. 2021); the task head stays fully trainable. Targets that match no
    module are refused here, naming the modules that exist."""
    from peft import LoraConfig, TaskType, get_peft_model

    from .. import PEFT_TARGET_MODULES

    targets = list(cfg.lora.target_modules or PEFT_TARGET_MODULES)
    names = [name for name, _ in model.named_modules()]
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})
    missing = [t for t in targets if not any(name == t or name.endswith("." + t) for name in names)]
    if missing:
        raise ValueError(f"lora.target_modules {missing} match no module of the model; its linear layers are {linear}")
    heads = cfg.lora.modules_to_save
    if heads is None:
        heads = [name for name in ("classifier", "pooler") if getattr(model, name, None) is not None]
    task_type = {"sequence": TaskType.SEQ_CLS, "token": TaskType.TOKEN_CLS, "seq2seq": TaskType.SEQ_2_SEQ_LM}[cfg.task]
    config = LoraConfig(
        task_type=task_type,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        modules_to_save=list(heads),
    )
    return get_peft_model(model, config)


def check_config(cfg) -> None:
    check_common(cfg)
    check_evaluation(cfg)
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is not allowed: one of {list(TASKS)}")
    if cfg.data.streaming:
        raise ValueError("data.streaming=true is not supported by finetune (labels are collected up front)")
    seq2seq = cfg.task == "seq2seq"
    if cfg.base_model:
        check_saved_model(cfg.base_model)
        if not cfg.tokenizer.path:
            check_tokenizer_folder(cfg.base_model, key="base_model")
        if seq2seq:
            from transformers import AutoConfig

            if not AutoConfig.from_pretrained(cfg.base_model).is_encoder_decoder:
                raise ValueError(f"base_model={cfg.base_model!r} is not an encoder-decoder, which task=seq2seq needs "
                                 "(is_encoder_decoder=True)")
    elif seq2seq:
        if cfg.model.get("is_encoder_decoder") is False:
            raise ValueError("model.is_encoder_decoder=false is not allowed with task=seq2seq: it trains an "
                             "encoder-decoder")
        check_model_section(cfg.model, is_encoder_decoder=True)
    else:
        check_model_section(cfg.model)
    if seq2seq:
        check_seq2seq_lengths(cfg)
    if not 0.0 < cfg.data.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction={cfg.data.heldout_fraction} is not allowed: in (0, 1)")
    if cfg.lora.enabled and cfg.lora.r < 1:
        raise ValueError(f"lora.r={cfg.lora.r} is not allowed: a positive integer")


def check_seq2seq_lengths(cfg) -> None:
    for key, value, least in (("data.max_target_length", cfg.data.max_target_length, 2),
                              ("generation.num_beams", cfg.generation.num_beams, 1),
                              ("generation.max_new_tokens", cfg.generation.max_new_tokens, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            why = " (a token and EOS)" if least == 2 else ""
            raise ValueError(f"{key}={value!r} is not allowed: an integer >= {least}{why}")


def run_finetune(cfg: Config, callbacks=()) -> FinetuneResult:
    check_config(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    seq2seq = cfg.task == "seq2seq"
    if seq2seq:
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(f"task=seq2seq under {accelerator.distributed_type.value}: its evaluation generates text "
                             "with the unwrapped model, which needs whole parameters; use DDP or one process")
    demo = not cfg.data.files and not cfg.data.dataset
    data_cfg = Config(dict(cfg.data))
    if demo and seq2seq:
        records = load_records(data_cfg, cfg.seed, required_columns={})
        train_records, heldout_records = demo_pairs([r["text"] for r in records.train]), demo_pairs(
            [r["text"] for r in records.heldout])
        data_cfg.update(source_column="source", target_column="target")
        description = (f"a code summarization demo task (a function -> its docstring's first line; "
                       f"{len(train_records)} train / {len(heldout_records)} held-out pairs) made from "
                       f"{records.description}")
    elif demo:
        records = load_records(data_cfg, cfg.seed, required_columns={})
        words = data_cfg.words_per_example
        train_records = demo_records([r["text"] for r in records.train], cfg.task, words, cfg.seed)
        heldout_records = demo_records([r["text"] for r in records.heldout], cfg.task, words, cfg.seed + 1)
        data_cfg.update(text_column="text", label_column="label", tokens_column="tokens", tags_column="tags",
                        text_pair_column=None, label_names=data_cfg.label_names or DEFAULT_LABELS[cfg.task])
        description = f"a {cfg.task}-labelling demo task made from {records.description}"
    else:
        required = {
            "sequence": {"text_column": data_cfg.text_column, "label_column": data_cfg.label_column},
            "token": {"tokens_column": data_cfg.tokens_column, "tags_column": data_cfg.tags_column},
            "seq2seq": {"source_column": data_cfg.source_column, "target_column": data_cfg.target_column},
        }[cfg.task]
        if cfg.task == "sequence" and data_cfg.text_pair_column:
            required["text_pair_column"] = data_cfg.text_pair_column
        records = load_records(data_cfg, cfg.seed, required_columns=required)
        train_records, heldout_records = records.train, records.heldout
        description = records.description
    if not train_records or not heldout_records:
        raise ValueError(f"{description}: no training or no held-out examples (the dataset is too small or empty)")

    if seq2seq:
        label_names, label_ids = [], {}
    else:
        if cfg.task == "sequence":
            raw = [r[data_cfg.label_column] for r in train_records + heldout_records]
        else:
            raw = [tag for r in train_records + heldout_records for tag in r[data_cfg.tags_column]]
        label_names, label_ids = label_vocabulary(raw, data_cfg.label_names)

    if cfg.base_model and not cfg.tokenizer.path:
        from .tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.base_model, key="base_model")
    else:
        texts = {
            "sequence": lambda: (r[data_cfg.text_column] for r in train_records),
            "token": lambda: (" ".join(r[data_cfg.tokens_column]) for r in train_records),
            "seq2seq": lambda: (r[column] for r in train_records
                                for column in (data_cfg.source_column, data_cfg.target_column)),
        }[cfg.task]
        causal = bool(cfg.model.get("is_decoder", False)) and not seq2seq
        tokenizer = get_tokenizer(cfg, texts, output_dir, causal, accelerator)
    check_tokenizer_for_task(tokenizer, cfg.task)
    if seq2seq:
        train_examples = encode_pairs(train_records, tokenizer, data_cfg)
        heldout_examples = encode_pairs(heldout_records, tokenizer, data_cfg)
    else:
        train_examples = encode(train_records, cfg.task, tokenizer, data_cfg, label_ids)
        heldout_examples = encode(heldout_records, cfg.task, tokenizer, data_cfg, label_ids)

    model = build_model(cfg, tokenizer, label_names)
    if cfg.lora.enabled:
        model = add_lora(model, cfg)
    pad_id = tokenizer.pad_token_id

    def collate(examples: list[dict], step: int) -> dict:
        if seq2seq:
            return pad_pairs(examples, pad_id)
        if cfg.task == "token":
            return pad_batch([e["input_ids"] for e in examples], pad_id, [e["labels"] for e in examples])
        batch = pad_batch([e["input_ids"] for e in examples], pad_id)
        batch["labels"] = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return batch

    from ..metrics import load_metric

    names = ("bleu", "chrf", "rouge") if seq2seq else ("accuracy", "f1")
    metrics = {name: load_metric(name) for name in names}
    generation = {"max_new_tokens": cfg.generation.max_new_tokens or data_cfg.max_target_length,
                  "num_beams": cfg.generation.num_beams, "do_sample": False}

    def evaluate(trained, max_batches=cfg.evaluation.max_batches):
        if seq2seq:
            return evaluate_seq2seq(accelerator, trained, heldout_examples, cfg.evaluation.batch_size, tokenizer,
                                    metrics, generation, max_batches=max_batches or None, sample_seed=cfg.seed)
        return evaluate_classifier(accelerator, trained, heldout_examples, cfg.evaluation.batch_size, pad_id, cfg.task,
                                   metrics, len(label_names), max_batches=max_batches or None, sample_seed=cfg.seed)

    def evaluate_final(trained):  # the reported figure: the whole held-out set unless the config limits it
        return evaluate(trained, cfg.evaluation.final_max_batches)

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg)
    logger = MetricsLogger(output_dir / "logs", enabled=accelerator.is_main_process,
                           tensorboard=cfg.logging.tensorboard, jsonl=cfg.logging.jsonl)
    result = train(
        accelerator, model, optimizer, scheduler, ExampleOrder(examples=train_examples, seed=cfg.seed), collate,
        loop_settings(cfg, output_dir, description=f"finetune ({cfg.task}{', LoRA' if cfg.lora.enabled else ''})"),
        causal=False, evaluate=evaluate, logger=logger, callbacks=callbacks, final_evaluate=evaluate_final,
    )
    logger.close()
    eval_metrics = result.final_eval or evaluate_final(result.model)
    trained = result.model
    if cfg.lora.enabled:
        if accelerator.is_main_process:
            trained.save_pretrained(str(output_dir / "adapter"))  # the adapter alone, for PeftModel.from_pretrained
        trained = trained.merge_and_unload()  # and a plain model that loads with AutoModel*
    task_type = {"sequence": "text-classification", "token": "token-classification",
                 "seq2seq": "text2text-generation"}[cfg.task]
    written = save_outputs(
        accelerator, trained, tokenizer, cfg, output_dir, result.history,
        eval_results=eval_result_entries(eval_metrics, task_type, "held-out " + description.split(";")[0]),
        datasets=cfg.data.dataset, base_model=cfg.base_model,
        training_summary=f"{result.step} steps of {'LoRA' if cfg.lora.enabled else 'full'} fine-tuning on {description}.",
        plot_title="seq2seq fine-tuning" if seq2seq else f"{cfg.task} classification fine-tuning",
        state_dict=None if cfg.lora.enabled else result.state_dict,
    )
    if cfg.lora.enabled and accelerator.is_main_process:
        written["adapter"] = output_dir / "adapter"
    return FinetuneResult(output_dir, result, eval_metrics, written, label_names)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv, DEFAULTS, __doc__, open_sections={"model": xarch_config_fields()})
    if cfg is None:
        return 0
    result = run_finetune(cfg)
    if result.written:
        print(f"finetune: {result.loop.step} steps; held-out {format_scores(result.eval_metrics)}; "
              f"saved to {result.output_dir}")
    return 0
