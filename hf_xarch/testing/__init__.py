"""The attention-family test kit: the invariants every family keeps, runnable on any registered family, yours too.

    >>> from hf_xarch.testing import check_attention_family
    >>> report = check_attention_family("sliding_window", attention_window=4)
    >>> print(report)

``check_attention_family(name, **config_overrides)`` builds tiny random models (hidden 32, 2 layers, vocab 99, GQA)
of the family with every position scheme its flags accept, as an encoder and as a decoder where its flags allow, and
checks in each (``INVARIANTS``):

- ``visibility``: in a decoder no position sees the future; in an encoder positions see later ones;
- ``padding``: outputs at real tokens do not change with left or right padding in a batch;
- ``reference``: the default path equals the family's plain reference (``reference_implementation``), forward and
  backward;
- ``cached_decode``: a prefill, single-token steps and a multi-token step through the cache equal the full forward;
- ``save_reload``: ``save_pretrained`` then ``from_pretrained`` gives identical outputs;
- ``meta_init``: a meta-device build followed by ``init_weights`` works, and with the weights loaded is the original;
- ``summary_cost``: ``hf_xarch.summary`` knows the family's FLOPs and cache bytes;
- ``capabilities``: every capability flag is honest (a family without global tokens refuses
  ``global_attention_mask``; refused position schemes or encoder/decoder raise at config build; the cache holds the
  declared cache layer);

and, once per family whose code lives in ``hf_xarch/model/``, that a saved model loads in a fresh Python without
hf_xarch (``fresh_process``). A failure raises ``AssertionError`` that names the case, the invariant and where it
broke, in plain words ("sliding_window-rope-decoder: visibility: decoder position 3 is influenced by position 5").
It returns a ``FamilyReport`` of what it checked.

Pytest form, one test per case and invariant::

    CASES = [(case, invariant) for case in family_cases("my_family") for invariant in invariants_for(case)]

    @pytest.mark.parametrize(("case", "invariant"), CASES, ids=[f"{c.id}-{i}" for c, i in CASES])
    def test_my_family(case, invariant):
        check_case(case, invariant)

A family defined in a test only: ``with registered_family(MyAttention, MY_RECORD): ...`` registers it for the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .cases import TINY, FamilyCase, allowed, family_cases, registered_family
from .fresh_process import NOT_SAVED, check_loads_without_hf_xarch, run_without_hf_xarch, travels_with_saved_models
from .invariants import INVARIANTS, check_case, influence, invariants_for


@dataclass
class FamilyReport:
    """What ``check_attention_family`` checked: (case id, invariant, what it verified) per check, and what it skipped
    with the reason."""

    family: str
    checked: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"attention family {self.family!r}: {len(self.checked)} checks passed"]
        lines += [f"  {case}: {invariant}: {what}" for case, invariant, what in self.checked]
        lines += [f"  skipped {what}: {why}" for what, why in self.skipped]
        return "\n".join(lines)


def check_attention_family(
    name: str, *, invariants: list[str] | None = None, fresh_process: bool = True, seed: int = 0, **config_overrides
) -> FamilyReport:
    """Check every invariant of the registered attention family ``name`` in every combination its flags allow.

    invariants: a subset of ``INVARIANTS`` (default: all of them).
    fresh_process: also load one saved model in a Python without hf_xarch (a few seconds; only for families whose
        code is in ``hf_xarch/model/``, the files a saved model brings).
    seed: added to every case's own seeds, for a different draw of weights and inputs.
    config_overrides: ``XArchConfig`` fields for every case (the family's options, ``num_hidden_layers``, ...);
        ``position_embedding_type`` or ``is_decoder`` restrict the cases to that value.

    Raises ``AssertionError`` listing every check that failed (case, invariant, where); returns a ``FamilyReport``.
    """
    wanted = list(INVARIANTS) if invariants is None else list(invariants)
    unknown = [invariant for invariant in wanted if invariant not in INVARIANTS]
    if unknown:
        raise ValueError(f"check_attention_family: invariants={unknown} are not among {list(INVARIANTS)}")
    report, failures = FamilyReport(name), []
    cases = family_cases(name, seed=seed, **config_overrides)
    if not cases:
        raise ValueError(f"check_attention_family: no position scheme and encoder/decoder combination is allowed for "
                         f"{name!r} with {config_overrides} (see its capability flags)")
    for case in cases:
        for invariant in invariants_for(case):
            if invariant in wanted:
                _run(report, failures, case.id, invariant, lambda c=case, i=invariant: check_case(c, i))
    if fresh_process:
        case = next((c for c in cases if c.decoder), cases[0])
        if travels_with_saved_models(name):
            _run(report, failures, case.id, "fresh_process", lambda: check_loads_without_hf_xarch(case))
        else:
            report.skipped.append(("fresh_process", NOT_SAVED))
    if failures:
        raise AssertionError(f"attention family {name!r}: {len(failures)} of {len(failures) + len(report.checked)} "
                             "checks failed:\n" + "\n".join(f"- {failure}" for failure in failures))
    return report


def _run(report: FamilyReport, failures: list[str], case_id: str, invariant: str, check) -> None:
    try:
        report.checked.append((case_id, invariant, check()))
    except AssertionError as error:
        failures.append(str(error).splitlines()[0] if invariant == "fresh_process" else str(error))
    except Exception as error:  # noqa: BLE001  (a crash is a failure of that check too, reported beside the others)
        failures.append(f"{case_id}: {invariant}: raised {type(error).__name__}: {error}")


__all__ = [
    "INVARIANTS",
    "NOT_SAVED",
    "TINY",
    "FamilyCase",
    "FamilyReport",
    "allowed",
    "check_attention_family",
    "check_case",
    "check_loads_without_hf_xarch",
    "family_cases",
    "influence",
    "invariants_for",
    "registered_family",
    "run_without_hf_xarch",
    "travels_with_saved_models",
]
