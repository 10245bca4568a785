"""Recipe configs: YAML over defaults, dotted overrides, unknown keys refused; the shipped YAML files load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hf_xarch.train import config as config_lib
from hf_xarch.train.config import load_config, parse_args, parse_override, xarch_config_fields

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "recipes" / "configs"
DEFAULTS = {"seed": 0, "name": "x", "lr": 1.0e-3, "flag": True, "files": [], "section": {"a": 1, "b": None}}


def _flat_keys(mapping, prefix=""):
    keys = set()
    for key, value in mapping.items():
        if isinstance(value, dict) and value and not prefix.startswith(("model", "base.model")) and key != "rope_kwargs":
            keys |= _flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


def test_overrides_are_dotted_and_parsed_as_yaml():
    assert parse_override("section.a=5") == {"section": {"a": 5}}
    assert parse_override("files=[1, 2]") == {"files": [1, 2]}
    assert parse_override("name=a:b") == {"name": "a:b"}
    cfg = load_config(DEFAULTS, overrides=["section.a=7", "lr=3e-4", "section.b={k: v}", "files=one.txt"])
    assert cfg.section.a == 7 and cfg["section"]["b"] == {"k": "v"}
    assert cfg.lr == pytest.approx(3e-4) and isinstance(cfg.lr, float)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.files == ["one.txt"]  # one value where a list is expected is a list of one


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\nsection:\n  a: 2\n")
    cfg = load_config(DEFAULTS, path, ["section.a=9"])
    assert (cfg.seed, cfg.section.a, cfg.name) == (3, 9, "x")


@pytest.mark.parametrize(
    "override, message",
    [
        ("sed=1", "unknown config key 'sed'"),
        ("section.c=1", "unknown config key 'section.c'"),
        ("seed=abc", "must be an integer"),
        ("flag=3", "true or false"),
        ("lr=fast", "must be a number"),
        ("section=3", "is a section"),
        ("novalue", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEFAULTS, overrides=[override])


def test_open_section_accepts_only_its_fields():
    defaults = {"model": {"hidden_size": 8}}
    fields = xarch_config_fields()
    cfg = load_config(defaults, overrides=["model.num_hidden_layers=3"], open_sections={"model": fields})
    assert cfg.model.num_hidden_layers == 3
    with pytest.raises(ValueError, match="unknown config key 'model.hiden_size'"):
        load_config(defaults, overrides=["model.hiden_size=3"], open_sections={"model": fields})


def test_missing_config_file_and_unknown_option(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_config(DEFAULTS, tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown option '--lr'"):
        parse_args(["--lr", "3"], DEFAULTS, "doc")


def test_print_config_and_help(capsys):
    assert parse_args(["--print-config", "seed=5"], DEFAULTS, "doc") is None
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 5
    assert parse_args(["--help"], DEFAULTS, "the doc") is None
    assert "the doc" in capsys.readouterr().out


def _recipe(name: str):
    from hf_xarch.train import extend_context, finetune, pretrain

    if name.startswith("pretrain"):
        return pretrain.DEFAULTS, {"model": xarch_config_fields()}
    if name.startswith("finetune"):
        return finetune.DEFAULTS, {"model": xarch_config_fields()}
    return extend_context.DEFAULTS, extend_context.OPEN_SECTIONS


# the configs of the three training recipes (other commands keep their own configs beside them)
RECIPE_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name.startswith(("pretrain", "finetune", "extend_context")))


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_every_shipped_recipe_config_loads(name):
    defaults, open_sections = _recipe(name)
    cfg = load_config(defaults, CONFIGS / name, open_sections=open_sections)
    assert cfg.output_dir.startswith("runs/")
    # the model it describes is a valid XArch config (the families it names exist, the combination is allowed)
    from hf_xarch import XArchConfig

    if "base" in cfg:  # extend_context: the base it pretrains is a causal LM
        model = {**cfg.base.model, "is_decoder": True}
    elif cfg.task in ("clm", "mlm"):  # pretrain sets is_decoder from the task
        model = {**cfg.model, "is_decoder": cfg.task == "clm"}
    else:
        model = dict(cfg.model)
    assert XArchConfig(vocab_size=100, **model).num_hidden_layers == model.get("num_hidden_layers", 12)


def test_the_reference_config_lists_every_pretrain_knob():
    from hf_xarch.train.pretrain import DEFAULTS as PRETRAIN

    written = yaml.safe_load((CONFIGS / "pretrain_clm.yaml").read_text())
    assert _flat_keys(written) == _flat_keys(PRETRAIN)


@pytest.mark.parametrize("name", ["accelerate_fsdp.yaml", "accelerate_deepspeed.yaml"])
def test_accelerate_launcher_configs_parse(name):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert cluster.num_processes == 8 and cluster.distributed_type.value in ("FSDP", "DEEPSPEED")


def test_cli_dispatches_recipes_from_the_package():
    import importlib

    from hf_xarch.cli import COMMANDS

    for command in ("quickstart", "pretrain", "finetune", "extend-context"):
        module_name, _ = COMMANDS[command]
        assert module_name.startswith("hf_xarch."), "an installed package has no recipes/ folder"
        assert callable(importlib.import_module(module_name).main)


def test_recipe_scripts_are_thin_wrappers():
    from hf_xarch.cli import COMMANDS

    for name in ("pretrain", "finetune", "extend_context"):
        text = (REPO / "recipes" / f"{name}.py").read_text()
        command = name.replace("_", "-")
        # through the CLI (its one-line errors and --debug), which runs the package's module
        assert "from hf_xarch.cli import main" in text and f'main(["{command}", *sys.argv[1:]])' in text
        assert COMMANDS[command][0] == f"hf_xarch.train.{name}"


def test_config_module_has_no_state():
    # defaults must not be mutated by loading (a second load sees the same defaults)
    before = yaml.safe_dump(DEFAULTS)
    load_config(DEFAULTS, overrides=["section.a=5"])
    assert yaml.safe_dump(DEFAULTS) == before
    assert config_lib.Config({"a": 1}).a == 1
