"""Every invariant, for every registered attention family x every position scheme it accepts x encoder/decoder.

The cases are read from the registry when this module is collected (with the families tests/toy_families.py
defines), so a family is tested here the moment it is registered. Each test calls the public kit
(``hf_xarch.testing``), so the kit is what is tested: these tests, and the ones below that feed it deliberately
broken families, are its test suite too. Files named after a family keep only what is specific to it (parity with
the transformers model it generalises, kernel edge cases).
"""

from __future__ import annotations

from contextlib import ExitStack

import pytest
import torch

from hf_xarch import XArchConfig, XArchModel
from hf_xarch.model.registry import ATTENTION_FAMILIES
from hf_xarch.testing import (
    NOT_SAVED,
    check_attention_family,
    check_case,
    check_loads_without_hf_xarch,
    family_cases,
    invariants_for,
    registered_family,
    travels_with_saved_models,
)

from .helpers import FAMILY_OVERRIDES
from .toy_families import (
    TOY_FAMILIES,
    DriftingCacheAttention,
    DropoutIgnoringAttention,
    FutureLeakingAttention,
    PaddingBlindAttention,
    ToySoftmaxAttention,
    broken_family,
)

TINY = {"vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}


def toy_families_registered() -> ExitStack:
    stack = ExitStack()
    for module_cls, record in TOY_FAMILIES:
        stack.enter_context(registered_family(module_cls, record))
    return stack


def _collect():
    cases, fresh = [], []
    for name in sorted(ATTENTION_FAMILIES):
        of_family = family_cases(name, **FAMILY_OVERRIDES.get(name, {}))
        cases += [pytest.param(case, invariant, id=f"{case.id}-{invariant}")
                  for case in of_family for invariant in invariants_for(case)]
        if travels_with_saved_models(name):  # a family defined outside hf_xarch/model/ cannot travel with a model
            first = next((case for case in of_family if case.decoder), of_family[0])
            fresh.append(pytest.param(first, id=first.id))
    return cases, fresh


with toy_families_registered():  # the test-suite families are registered only while collected and tested here
    CASES, FRESH_CASES = _collect()


@pytest.fixture(scope="module", autouse=True)
def _toy_families():
    with toy_families_registered():
        yield


pytestmark = pytest.mark.one_thread


@pytest.mark.parametrize(("case", "invariant"), CASES)
def test_invariant(case, invariant):
    check_case(case, invariant)


@pytest.mark.slow  # a fresh Python importing transformers: 14-18 s each on the shared 2-core machine
@pytest.mark.parametrize("case", FRESH_CASES)
def test_loads_in_a_fresh_process_without_hf_xarch(case):
    check_loads_without_hf_xarch(case)


def test_the_test_suite_family_gets_every_invariant():
    """A family defined in the test suite is one file plus its registration, and is in CASES above."""
    for _, record in TOY_FAMILIES:
        invariants = {param.values[1] for param in CASES if param.values[0].family == record.name}
        assert invariants == {"visibility", "padding", "reference", "cached_decode", "save_reload", "meta_init",
                              "summary_cost", "capabilities"}


def test_check_attention_family_reports_what_it_checked():
    report = check_attention_family("toy_softmax", invariants=["visibility", "padding"], position_embedding_type="rope")
    assert [(case, invariant) for case, invariant, _ in report.checked] == [
        ("toy_softmax-rope-decoder", "visibility"), ("toy_softmax-rope-decoder", "padding"),
        ("toy_softmax-rope-encoder", "visibility"), ("toy_softmax-rope-encoder", "padding"),
    ]
    assert report.skipped == [("fresh_process", NOT_SAVED)]
    assert "toy_softmax-rope-decoder: visibility: no decoder position is influenced by a later one" in str(report)


@pytest.mark.parametrize(
    ("module_cls", "invariant", "message"),
    [
        (FutureLeakingAttention, "visibility", r"decoder position \d+ is influenced by position \d+"),
        (PaddingBlindAttention, "padding", r"row \d \(\d+ tokens of (left|right) padding\): the output at real token"),
        (DriftingCacheAttention, "cached_decode",
         r"cached decode drifts from the full forward at position \d+ of row \d of \d, in decode step 1"),
        (DropoutIgnoringAttention, "capabilities",
         r"attention_weights=True, but attention_dropout=0.5 leaves a training-mode forward unchanged"),
    ],
    ids=["leaks-the-future", "ignores-padding", "cache-decode-drifts", "ignores-attention-dropout"],
)
def test_the_kit_catches_a_broken_family(module_cls, invariant, message):
    name = f"broken_{invariant}"
    expected = pytest.raises(AssertionError, match=rf"{name}-rope-decoder: {invariant}: {message}")
    with registered_family(module_cls, broken_family(name)), expected:
        check_attention_family(name, fresh_process=False, position_embedding_type="rope", is_decoder=True)
    assert name not in ATTENTION_FAMILIES  # never left registered for other tests


class SecretlyCausalAttention(ToySoftmaxAttention):
    """Declares bidirectional=True (the toy's flags) but masks the future in an encoder too."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_causal = True


def test_a_bidirectional_flag_that_lies_is_caught():
    message = "secretly_causal-none-encoder: visibility: no encoder position is influenced by any later position"
    with registered_family(SecretlyCausalAttention, broken_family("secretly_causal")), \
            pytest.raises(AssertionError, match=message):
        check_attention_family("secretly_causal", invariants=["visibility"], fresh_process=False, is_decoder=False,
                               position_embedding_type="none")


def test_a_family_option_needs_no_config_field():
    """An option declared in the family record is taken, defaulted, validated, saved and refused where unread, with
    no field in XArchConfig."""
    assert "toy_temperature" not in XArchConfig.__annotations__
    assert XArchConfig(attention_type="toy_softmax").toy_temperature == 1.0
    config = XArchConfig(attention_type="toy_softmax", toy_temperature=2.0, **TINY)
    assert XArchConfig.from_dict(config.to_dict()).toy_temperature == 2.0
    assert XArchConfig.from_dict(XArchConfig(attention_type="toy_softmax").to_dict(),
                                 toy_temperature=0.5).toy_temperature == 0.5
    with pytest.raises(ValueError, match=r"XArchConfig.toy_temperature=-1 is not allowed: a positive number"):
        XArchConfig(attention_type="toy_softmax", toy_temperature=-1)
    with pytest.raises(ValueError, match=r"toy_temperature=2.0 is not allowed: 1.0: it is read only by "
                                         r"attention_type='toy_softmax' layers"):
        XArchConfig(attention_type="full", toy_temperature=2.0)
    torch.manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (1, 7))
    model = XArchModel(config).eval()
    hotter = XArchModel(XArchConfig(attention_type="toy_softmax", toy_temperature=1.0, **TINY)).eval()
    hotter.load_state_dict(model.state_dict())
    assert not torch.allclose(model(ids).last_hidden_state, hotter(ids).last_hidden_state)  # the option is read


def test_unknown_family_and_invariant_raise_value_errors():
    with pytest.raises(ValueError, match="name='nope' is not a registered family"):
        check_attention_family("nope")
    with pytest.raises(ValueError, match=r"invariants=\['speed'\]"):
        check_attention_family("full", invariants=["speed"])
