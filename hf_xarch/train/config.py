"""Recipe configs: nested defaults in code, a YAML file over them, then ``key=value`` overrides (dotted keys).

torchtune's habit: every knob lives in one YAML file and the command line overrides single values. Each recipe
declares its defaults as a nested dict; that dict is the schema. A key the defaults do not know is an error (a typo
must not silently train the wrong model), except in *open* sections such as ``model``, whose allowed keys are
given separately (the fields of ``XArchConfig``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml


class Config(dict):
    """A nested dict whose keys also read as attributes (``cfg.training.max_steps``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; it has {sorted(self)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict:
        return {key: value.to_dict() if isinstance(value, Config) else copy.deepcopy(value) for key, value in self.items()}


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return Config({key: _wrap(item) for key, item in value.items()})
    return value


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of `default` (None: anything goes). YAML 1.1 reads `1e-3` as a string, so
    numbers written that way are converted instead of rejected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key}={value!r} must be true or false")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key}={value!r} must be an integer (default {default!r})")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key}={value!r} must be a number (default {default!r})")
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"config key {key}={value!r} must be a string (default {default!r})")  # noqa: TRY004
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        # a single string where a list is expected (data.files=corpus.txt) means a list of one
        if isinstance(value, str):
            return [value]
        raise ValueError(f"config key {key}={value!r} must be a list (default {default!r})")
    return value


def merge(
    base: Mapping, update: Mapping, open_sections: Mapping[str, Iterable[str] | None] | None = None, prefix: str = ""
) -> dict:
    """Return `base` with `update` merged in, refusing keys `base` does not have.

    `open_sections` maps a dotted section name to the keys it accepts beyond its defaults (None: any key)."""
    open_sections = open_sections or {}
    merged = copy.deepcopy(dict(base))
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        section = prefix.rstrip(".")
        if key not in merged:
            if section in open_sections:
                allowed = open_sections[section]
                if allowed is not None and key not in allowed:
                    raise ValueError(
                        f"unknown config key {dotted!r}: section {section!r} accepts {sorted(allowed)}"
                    )
                merged[key] = copy.deepcopy(value)
                continue
            known = sorted(merged) if not prefix else [f"{prefix}{name}" for name in sorted(merged)]
            raise ValueError(f"unknown config key {dotted!r}; known keys here: {known}")
        if isinstance(merged[key], Mapping) and merged[key] is not None:
            if value is None:
                raise ValueError(f"config key {dotted!r} is a section; give its keys, not null")
            if not isinstance(value, Mapping):
                raise ValueError(f"config key {dotted!r} is a section with keys {sorted(merged[key])}, got {value!r}")
            merged[key] = merge(merged[key], value, open_sections, prefix=f"{dotted}.")
        else:
            merged[key] = _coerce(dotted, value, merged[key])
    return merged


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": value}}}``; the value is parsed as YAML (numbers, lists, dicts)."""
    if "=" not in text:
        raise ValueError(f"command-line override {text!r} must look like key=value (dotted keys, e.g. training.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"command-line override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparseable value is taken as a plain string (paths with colons, ...)
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(
    defaults: Mapping,
    config_path: str | Path | None = None,
    overrides: Iterable[str] = (),
    open_sections: Mapping[str, Iterable[str] | None] | None = None,
) -> Config:
    """Defaults <- YAML file <- overrides, each layer checked against the defaults' keys and types."""
    config = copy.deepcopy(dict(defaults))
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"--config {str(path)!r}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"--config {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(loaded, Mapping):
            raise ValueError(f"--config {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        config = merge(config, loaded, open_sections)
    for override in overrides:
        config = merge(config, parse_override(override), open_sections)
    return _wrap(config)


def parse_args(argv: list[str] | None, defaults: Mapping, description: str, open_sections=None) -> Config | None:
    """The recipes' command line: ``[--config FILE] [key=value ...] [--print-config] [-h]``.

    Returns None when it only printed something (help or the resolved config)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, overrides, print_only = None, [], False
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg in ("-h", "--help"):
            print(description.strip())
            print("\nusage: [--config FILE.yaml] [section.key=value ...] [--print-config]\n\ndefaults:")
            print(yaml.safe_dump(dict(_plain(defaults)), sort_keys=False))
            return None
        if arg == "--print-config":
            print_only = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if index + 1 >= len(argv):
                    raise ValueError("--config needs a file name")
                index += 1
                config_path = argv[index]
        elif arg.startswith("--"):
            raise ValueError(f"unknown option {arg!r}; allowed: --config FILE, --print-config, -h, key=value overrides")
        else:
            overrides.append(arg)
        index += 1
    config = load_config(defaults, config_path, overrides, open_sections)
    if print_only:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return None
    return config


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def xarch_config_fields() -> list[str]:
    """Keys the ``model`` section accepts: the fields of ``XArchConfig`` (validated again when the config is built)."""
    import dataclasses

    from ..model.configuration_xarch import XArchConfig

    return [field.name for field in dataclasses.fields(XArchConfig)]
