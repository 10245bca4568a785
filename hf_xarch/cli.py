"""`hf-xarch` command line.

Each sub-command lives in its own module and exposes ``main(argv: list[str] | None) -> int``; this file only
dispatches, so adding a command is one line here and importing hf_xarch stays cheap (modules load on demand).
"""

from __future__ import annotations

import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("hf_xarch.quickstart", "train a tiny model on the default corpus, save, reload and generate"),
    "pretrain": ("hf_xarch.train.pretrain", "pretrain a causal or masked LM (recipe)"),
    "finetune": ("hf_xarch.train.finetune", "fine-tune for sequence/token classification, full or LoRA (recipe)"),
    "extend-context": ("hf_xarch.train.extend_context", "extend a RoPE model's context and fine-tune (recipe)"),
    "vocab-sweep": ("hf_xarch.vocab.sweep", "sweep tokenizer algorithms and vocabulary sizes"),
    "summary": ("hf_xarch.summary", "parameters, FLOPs and KV-cache bytes of a config or saved model"),
    "card": ("hf_xarch.hub", "(re)write the model card of a saved folder"),
    "push": ("hf_xarch.hub", "upload a saved folder to the Hub"),
}


def _usage() -> str:
    lines = ["usage: hf-xarch COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-xarch: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if module_name.startswith("recipes.") and err.name in ("recipes", module_name):
            print(f"hf-xarch {name}: run it from a checkout that holds recipes/ ({err})", file=sys.stderr)
            return 2
        raise
    # modules that serve several commands (hub: card/push) get the command name first
    entry = getattr(module, f"main_{name.replace('-', '_')}", None) or module.main
    result = entry(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
