"""`hf-xarch` command line.

Each sub-command lives in its own module and exposes ``main(argv: list[str] | None) -> int``; this file only
dispatches, so adding a command is one line here and importing hf_xarch stays cheap (modules load on demand).

Errors, one rule for every command (and for the scripts in ``recipes/``, which come through here): a mistake the user
fixes - a ``ValueError`` (a bad config value or argument: the package's convention), a ``FileNotFoundError`` (a missing
file), a ``PermissionError`` (not logged in, a folder that cannot be written) or a ``ConnectionError`` (the Hub out of
reach) - prints one line, ``hf-xarch COMMAND: error: ...``, and exits with 2. ``--debug`` anywhere on the command line,
or ``HF_XARCH_DEBUG=1``, prints its traceback too. Any other exception is a bug and shows its traceback as usual.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("hf_xarch.quickstart", "train a tiny model on the default corpus, save, reload and generate"),
    "pretrain": ("hf_xarch.train.pretrain", "pretrain a causal or masked LM (recipe)"),
    "finetune": ("hf_xarch.train.finetune", "fine-tune for sequence/token classification or seq2seq (task=seq2seq), full or LoRA (recipe)"),
    "extend-context": ("hf_xarch.train.extend_context", "extend a RoPE model's context and fine-tune (recipe)"),
    "linearize": ("hf_xarch.train.linearize", "softmax -> linear attention: attention transfer, then LoRA (recipe)"),
    "compare": ("hf_xarch.compare.recipe", "train several configurations at equal compute and compare them"),
    "vocab-sweep": ("hf_xarch.vocab.sweep", "sweep tokenizer algorithms and vocabulary sizes"),
    "summary": ("hf_xarch.summary", "parameters, FLOPs and KV-cache bytes of a config or saved model"),
    "card": ("hf_xarch.hub", "(re)write the model card of a saved folder"),
    "push": ("hf_xarch.hub", "upload a saved folder to the Hub"),
}

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, ConnectionError)
DEBUG_VARIABLE = "HF_XARCH_DEBUG"


def version() -> str:
    from . import __version__

    return __version__


def _usage() -> str:
    lines = ["usage: hf-xarch [--version] COMMAND [ARGS...] [--debug]", "", "commands:"]
    lines += [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "COMMAND --help shows its options. A mistake in the arguments or the config prints one line and exits",
              f"with 2; --debug (or {DEBUG_VARIABLE}=1) adds the traceback."]
    return "\n".join(lines)


def debug_enabled(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def one_line(error: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def run_command(name: str, argv: list[str], debug: bool = False) -> int:
    """Run sub-command `name` with `argv`; user errors (USER_ERRORS) become one line on stderr and exit code 2."""
    module_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    # modules that serve several commands (hub: card/push) get the command name first
    entry = getattr(module, f"main_{name.replace('-', '_')}", None) or module.main
    try:
        return int(entry(argv) or 0)
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(f"hf-xarch {name}: error: {one_line(error)}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        print(f"hf-xarch {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-xarch: unknown command {name!r}; allowed: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_command(name, rest, debug)


if __name__ == "__main__":
    sys.exit(main())
