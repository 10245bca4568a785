"""Text-to-text pairs for ``finetune task=seq2seq``: the offline demo task built from the default corpus, encoding
and batching.

A pair is a record with a source text and a target text (columns ``data.source_column`` / ``data.target_column``,
``source`` / ``target`` by default): a JSON file holding a list of such objects, JSON Lines, CSV or Parquet.

The demo task is real code summarization: each documented Python function of the default corpus (the standard
library) becomes a pair whose source is the function without its docstring (parsed and unparsed, so comments are
gone too) and whose target is its docstring's first line, as in CodeSearchNet (Husain et al. 2019).
"""

from __future__ import annotations

import ast
import copy

from .data import pad_batch


def function_docstring_pairs(source: str) -> list[dict]:
    """The demo pairs of one Python file: ``{"source": code without the docstring, "target": its first line}`` for
    every function (methods and nested ones too) with a docstring and some code. Text that does not parse (prose,
    a file cut short by the corpus' byte budget) gives none."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        docstring = ast.get_docstring(node)
        summary = docstring.strip().splitlines()[0].strip() if docstring and docstring.strip() else ""
        if not summary:
            continue
        code = copy.copy(node)
        code.body = node.body[1:]  # the docstring is the first statement
        pairs.append({"source": ast.unparse(code), "target": summary})
    return pairs


def demo_pairs(texts: list[str]) -> list[dict]:
    return [pair for text in texts for pair in function_docstring_pairs(text)]


def encode_pairs(records: list[dict], tokenizer, data_cfg) -> list[dict]:
    """Source ids (the tokenizer's template, truncated to ``data.max_length``) and target ids (no template: the
    decoder starts from ``decoder_start_token_id``; truncated to ``data.max_target_length`` with EOS last, so the
    model learns to stop); the target text is kept as the reference for generation metrics."""
    examples = []
    for record in records:
        source, target = record[data_cfg.source_column], record[data_cfg.target_column]
        for key, value in (("source_column", source), ("target_column", target)):
            if not isinstance(value, str):  # a data problem the user fixes in the file: one clean ValueError line
                raise ValueError(  # noqa: TRY004
                    f"data.{key}={data_cfg[key]!r} holds {type(value).__name__} values ({value!r}); text-to-text "
                    "pairs need strings")
        source_ids = tokenizer(source, truncation=True, max_length=data_cfg.max_length)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False, truncation=True,
                               max_length=data_cfg.max_target_length - 1)["input_ids"]
        examples.append({"input_ids": source_ids, "labels": target_ids + [tokenizer.eos_token_id], "target": target})
    return examples


def pad_pairs(examples: list[dict], pad_id: int) -> dict:
    """A seq2seq batch: padded sources with their mask, padded targets as labels (-100 on padding) with theirs."""
    batch = pad_batch([e["input_ids"] for e in examples], pad_id)
    targets = pad_batch([e["labels"] for e in examples], pad_id, [e["labels"] for e in examples])
    batch["labels"], batch["decoder_attention_mask"] = targets["labels"], targets["attention_mask"]
    return batch
