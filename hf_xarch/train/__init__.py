"""The small training library the recipes stand on (``recipes/*.py``, ``hf-xarch pretrain|finetune|extend-context``).

- ``config``: YAML configs over in-code defaults, ``key=value`` overrides, unknown keys refused;
- ``corpus``: the default corpus (text and code of the Python standard library: there on every machine, offline);
- ``data``: records from the default corpus, local files or a Hub dataset; packing; MLM masking; the seeded order;
- ``tokenizer``: load a tokenizer, or train one on the fly with ``tokenizers``;
- ``loop``: the Accelerate training loop; ``checkpoint``: atomic, verified checkpoints and exact resume;
- ``evaluation``: loss, perplexity, bits per byte, accuracy and F1; ``tracking``: JSONL, TensorBoard, loss plot;
- ``pretrain``, ``finetune``, ``extend_context``: the recipes themselves (``main(argv)`` each).

Submodules load on demand, so ``import hf_xarch`` stays cheap.
"""
