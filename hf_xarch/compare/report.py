"""The report of `hf-xarch compare`: results.json, results.csv, report.md with its plots, and a written summary.

The summary is computed from the measurements: it ranks the models per criterion and says what the numbers can and
cannot support (one seed, the budget's side effects, what the held-out figures cover, the scale, how speed was
measured). It holds no expected conclusion: swap two models' numbers and its ranking swaps with them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

# "holds its quality": bits per byte at most 1% above the training length's (Press et al.; falling is holding too)
EXTRAPOLATION_TOLERANCE = 0.01
MIB = 1 << 20


@dataclass(frozen=True)
class Criterion:
    title: str
    values: dict  # model -> number (models without one are left out and named)
    lower_is_better: bool
    unit: str = ""
    digits: int = 4
    notes: dict | None = None  # model -> a remark shown beside its value (e.g. a shorter prompt)

    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.values.items(), key=lambda item: item[1] if self.lower_is_better else -item[1])

    def format(self, value: float) -> str:
        if isinstance(value, int) or abs(value) >= 10 ** self.digits:
            return f"{value:,.0f}{self.unit}"
        return f"{value:.{self.digits}g}{self.unit}"


def bits_per_byte(entry: dict, length: int) -> float | None:
    return entry["lengths"].get(length, entry["lengths"].get(str(length), {})).get("bits_per_byte")


def _collect(results: dict, get) -> dict:
    values = {}
    for name, entry in results.items():
        value = get(entry)
        if value is not None and math.isfinite(value):
            values[name] = value
    return values


def criteria(results: dict, train_length: int, lengths: list[int]) -> list[Criterion]:
    """Every criterion the summary ranks, in the order it reports them."""
    longest = max(lengths)

    def change(entry):
        base, far = bits_per_byte(entry, train_length), bits_per_byte(entry, longest)
        return None if base is None or far is None else far / base - 1

    decode = max((e["decode"] for e in results.values() if "decode" in e), key=lambda d: d["prompt_tokens"],
                 default=None)
    found = [
        Criterion(f"held-out bits per byte at {train_length} tokens (the training length)",
                  _collect(results, lambda e: bits_per_byte(e, train_length)), True),
        Criterion(f"held-out bits per byte at {longest} tokens ({longest / train_length:g} x the training length)",
                  _collect(results, lambda e: bits_per_byte(e, longest)), True),
        Criterion(f"extrapolation: change of bits per byte from {train_length} to {longest} tokens",
                  _collect(results, change), True),
        Criterion("training speed at each model's training length (tokens/s, median over log windows)",
                  _collect(results, lambda e: e["train"]["tokens_per_second"]), False, " tok/s", 3),
        Criterion("training-step peak memory at each model's training length (one micro-batch forward + backward, MiB)",
                  _collect(results, lambda e: _mib(e.get("train_step_peak_bytes"))), True, " MiB", 3),
    ]
    if decode is not None:
        # a bounded position table may have forced a shorter prompt: such values are marked, not hidden
        shorter = {name: f"after {e['decode']['prompt_tokens']} tokens" for name, e in results.items()
                   if "decode" in e and e["decode"]["prompt_tokens"] != decode["prompt_tokens"]}
        found += [
            Criterion(f"decode speed after {decode['prompt_tokens']} tokens (tokens/s)",
                      _collect(results, lambda e: e.get("decode", {}).get("decode_tokens_per_second")), False,
                      " tok/s", 3, shorter),
            Criterion(f"cache memory after {decode['prompt_tokens']} + {decode['decode_tokens']} decoded tokens "
                      "(MiB of tensor storage held)",
                      _collect(results, lambda e: _mib(e.get("decode", {}).get("cache_bytes_after_decode"))), True,
                      " MiB", 3, shorter),
        ]
    found.append(Criterion("parameters", _collect(results, lambda e: e.get("parameters")), True, "", 4))
    return found


def _mib(value):
    return None if value is None else value / MIB


def _percent(value: float) -> str:
    return f"{value:+.2%}"


def summarize(results: dict, train_length: int, lengths: list[int], budget: dict, seed: int, device: str) -> list[str]:
    """The written summary: one ranking line per criterion, then what the numbers do and do not show."""
    lines = []
    for criterion in criteria(results, train_length, lengths):
        ranked = criterion.ranked()
        if not ranked:
            continue
        better = "lower" if criterion.lower_is_better else "higher"
        plain = _percent if criterion.title.startswith("extrapolation") else criterion.format

        def fmt(value, name, plain=plain, notes=criterion.notes or {}):
            return plain(value) + (f" ({notes[name]})" if name in notes else "")

        order = f"{ranked[0][0]} {fmt(ranked[0][1], ranked[0][0])}"
        for (_, previous), (name, value) in itertools.pairwise(ranked):
            order += (" = " if value == previous else " < " if criterion.lower_is_better else " > ")
            order += f"{name} {fmt(value, name)}"
        missing = sorted(set(results) - set(criterion.values))
        lines.append(f"{criterion.title[0].upper()}{criterion.title[1:]} ({better} is better): {order}."
                     + (f" Not measured: {', '.join(missing)}." if missing else ""))
    lines += caveats(results, train_length, lengths, budget, seed, device)
    return lines


def caveats(results: dict, train_length: int, lengths: list[int], budget: dict, seed: int, device: str) -> list[str]:
    """What the numbers show and what they do not, each sentence computed from them."""
    lines = []
    longest = max(lengths)
    changes = {name: bits_per_byte(e, longest) / bits_per_byte(e, train_length) - 1 for name, e in results.items()
               if bits_per_byte(e, longest) is not None and bits_per_byte(e, train_length) is not None}
    if changes and longest > train_length:
        held = sorted(name for name, value in changes.items() if value <= EXTRAPOLATION_TOLERANCE)
        lost = sorted(name for name, value in changes.items() if value > EXTRAPOLATION_TOLERANCE)
        lines.append(f"At {longest / train_length:g} x the training length, bits per byte rise by at most "
                     f"{EXTRAPOLATION_TOLERANCE:.0%} over their value at {train_length} tokens, or fall, for "
                     f"{', '.join(held) or 'no model'}; they rise by more for {', '.join(lost) or 'no model'}.")
    at_train = sorted(_collect(results, lambda e: bits_per_byte(e, train_length)).items(), key=lambda item: item[1])
    if len(at_train) > 1:
        gaps = [(b[1] - a[1], a[0], b[0], a[1]) for a, b in itertools.pairwise(at_train)]
        gap, first, second, value = min(gaps)
        lines.append(f"One training run per model (seed {seed}): this report does not measure the spread between "
                     f"seeds, so differences smaller than that spread are not resolved. The closest pair at "
                     f"{train_length} tokens, {first} and {second}, is {gap:.4f} bits per byte ({gap / value:.2%}) "
                     "apart.")
    tokens, flops = _collect(results, total_tokens), _collect(results, total_flops)
    if budget.get("train_tokens") is not None and flops:
        low, high = min(flops, key=flops.get), max(flops, key=flops.get)
        lines.append(f"Equal training tokens ({budget['train_tokens']:,.0f} each, in whole steps), not equal compute: "
                     f"training FLOPs range from {flops[low]:.3g} ({low}) to {flops[high]:.3g} ({high}), "
                     f"{flops[high] / flops[low]:.2f} x.")
    elif tokens:
        low, high = min(tokens, key=tokens.get), max(tokens, key=tokens.get)
        lines.append(f"Equal training FLOPs ({budget['train_flops']:.3g} each, in whole steps): the models saw from "
                     f"{tokens[low]:,} ({low}) to {tokens[high]:,} ({high}) training tokens.")
    extended = [name for name, e in results.items() if "extends" in e]
    if extended:
        lines.append(f"{', '.join(extended)} also trained at the longer length (their base model's tokens and FLOPs "
                     "are counted in theirs); the others never saw a sequence longer than the training length.")
    coverage = next((e["lengths"][key]["coverage"] for e in results.values() for key in e["lengths"]
                     if str(key) == str(longest) and "coverage" in e["lengths"][key]), None)
    if coverage:
        lines.append(f"Held-out figures at {longest} tokens cover {coverage} (every model the same rows).")
    parameters = _collect(results, lambda e: e.get("parameters"))
    if parameters and tokens:
        lines.append(f"Scale: {min(parameters.values()):,} to {max(parameters.values()):,} parameters, at most "
                     f"{max(tokens.values()):,} training tokens; rankings at this scale need not hold for larger "
                     "models or longer training.")
    threads = torch.get_num_threads()
    lines.append(f"Speeds and memory are single measurements on {device} with {threads} thread{'s' * (threads != 1)}; "
                 "this report does not measure their run-to-run noise, and other load on the machine slows them.")
    shrinking = [f"{name} ({_mib(e['decode']['cache_bytes_after_prompt']):.3g} -> "
                 f"{_mib(e['decode']['cache_bytes_after_decode']):.3g} MiB)" for name, e in results.items()
                 if "decode" in e and e["decode"]["cache_bytes_after_prompt"] > e["decode"]["cache_bytes_after_decode"]]
    if shrinking:
        lines.append(f"Caches that hold more storage right after the prompt than after the decoded tokens: "
                     f"{', '.join(shrinking)}; they keep memory from the prefill that decoding releases (a sliding "
                     "window kept as a view of the prefill's keys holds their whole storage), so their peak is the "
                     "prefill's.")
    for name, entry in results.items():
        skipped = [length for length, figures in entry["lengths"].items() if "skipped" in figures]
        if skipped:
            reason = entry["lengths"][skipped[0]]["skipped"]
            lines.append(f"Not measured: {name} at {', '.join(map(str, skipped))} tokens ({reason}).")
    return lines


def total_tokens(entry: dict) -> int:
    """Training tokens, the base model's included for an extended model."""
    return entry["train"]["tokens"] + (entry["train"].get("base_tokens") or 0)


def total_flops(entry: dict) -> float | None:
    flops = entry["train"]["flops"]
    return None if flops is None else flops + (entry["train"].get("base_flops") or 0)


# ---- files ----------------------------------------------------------------------------------------------------------
def results_data(cfg, results: dict, train_length: int, lengths: list[int], processes: int, device) -> dict:
    """results.json: the settings, the environment, and per model ``bits_per_byte.LENGTH`` beside everything else."""
    models = {}
    for name, entry in results.items():
        per_length = {str(k): v for k, v in entry["lengths"].items()}
        models[name] = {**entry, "lengths": per_length,
                        "bits_per_byte": {key: value.get("bits_per_byte") for key, value in per_length.items()}}
    budget = cfg.budget.to_dict()
    summary = summarize(results, train_length, lengths, budget, cfg.seed, str(device))
    return {
        "training_length": train_length,
        "evaluation_lengths": lengths,
        "budget": budget,
        "seed": cfg.seed,
        "environment": {"device": str(device), "processes": processes, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine()},
        "settings": cfg.to_dict(),
        "models": models,
        "summary": summary,
    }


CSV_COLUMNS = ("model", "length", "bits_per_byte", "loss", "forward_tokens_per_second", "forward_peak_bytes",
               "cache_bytes", "trained_length", "parameters", "train_tokens", "train_flops", "train_tokens_per_second",
               "train_step_peak_bytes", "decode_tokens_per_second", "decode_prompt_tokens", "decode_cache_bytes_after_prompt",
               "decode_cache_bytes_after_decode")


def csv_rows(data: dict) -> list[dict]:
    rows = []
    for name, entry in data["models"].items():
        decode = entry.get("decode", {})
        for length, figures in entry["lengths"].items():
            rows.append({
                "model": name, "length": int(length), **{key: figures.get(key) for key in CSV_COLUMNS[2:7]},
                "trained_length": entry["trained_length"], "parameters": entry.get("parameters"),
                "train_tokens": total_tokens(entry), "train_flops": total_flops(entry),
                "train_tokens_per_second": entry["train"]["tokens_per_second"],
                "train_step_peak_bytes": entry.get("train_step_peak_bytes"),
                "decode_tokens_per_second": decode.get("decode_tokens_per_second"),
                "decode_prompt_tokens": decode.get("prompt_tokens"),
                "decode_cache_bytes_after_prompt": decode.get("cache_bytes_after_prompt"),
                "decode_cache_bytes_after_decode": decode.get("cache_bytes_after_decode"),
            })
    return rows


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if 10**digits <= abs(value) < 1e9 else f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]


def markdown(data: dict, plots: dict, plot_note: str | None) -> str:
    models, lengths = data["models"], [str(n) for n in data["evaluation_lengths"]]
    length = data["training_length"]
    budget = ", ".join(f"{key} = {_cell(value)}" for key, value in data["budget"].items() if value is not None)
    lines = [f"# hf-xarch compare: {len(models)} models", "",
             (f"Training length {length} tokens; budget {budget} per model; seed {data['seed']}; "
              f"{data['environment']['device']}, {data['environment']['processes']} process(es), "
              f"{data['environment']['threads']} torch thread(s), torch {data['environment']['torch']}."), "",
             "## Summary", "", *[f"- {line}" for line in data["summary"]], "",
             "## Held-out bits per byte by evaluation length", ""]
    lines += _table(["model", "trained at", *lengths],
                    [[name, e["trained_length"], *[e["bits_per_byte"].get(n) for n in lengths]]
                     for name, e in models.items()])
    lines += ["", "## Cost", ""]
    lines += _table(["model", "parameters", "train tokens", "train FLOPs", "train tok/s", "train step MiB",
                     "decode tok/s", "cache MiB after prompt", "prompt tokens", "cache MiB after decode"],
                    [[name, e.get("parameters"), total_tokens(e), total_flops(e),
                      e["train"]["tokens_per_second"], _mib(e.get("train_step_peak_bytes")),
                      e.get("decode", {}).get("decode_tokens_per_second"),
                      _mib(e.get("decode", {}).get("cache_bytes_after_prompt")), e.get("decode", {}).get("prompt_tokens"),
                      _mib(e.get("decode", {}).get("cache_bytes_after_decode"))]
                     for name, e in models.items()])
    for title, key, scale in (("Forward speed by length (tokens/s, evaluation batches)", "forward_tokens_per_second", 1),
                              ("Forward peak memory by length (MiB, one sequence)", "forward_peak_bytes", MIB),
                              ("Cache memory by length (MiB of tensor storage held after a one-sequence prefill)",
                               "cache_bytes", MIB)):
        lines += ["", f"## {title}", ""]
        lines += _table(["model", *lengths], [[name, *[_scaled(e["lengths"].get(n, {}).get(key), scale)
                                                       for n in lengths]] for name, e in models.items()])
    # by length, shortest first (a set of strings would sort "128" before "64")
    coverage = list(dict.fromkeys(f"{n} tokens: {e['lengths'][n]['coverage']}" for n in lengths
                                  for e in models.values() if "coverage" in e["lengths"].get(n, {})))
    lines += ["", "## What was scored", "", *[f"- {line}" for line in coverage]]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}](plots/{path.name})" for name, path in plots.items()] if plots else [plot_note or ""]
    lines += ["", ("Data: `results.json` (per model: `bits_per_byte.LENGTH`, `lengths.LENGTH`, `train`, `decode`), "
                   "`results.csv` (one row per model and length).")]
    return "\n".join(lines) + "\n"


def _scaled(value, scale):
    return None if value is None else (value / scale if scale != 1 else value)


def plot(data: dict, folder: Path) -> tuple[dict, str | None]:
    """bits per byte vs length and vs training compute, speed vs length, memory vs length (PNG); without matplotlib,
    no plots and a note saying so."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, ("matplotlib is not installed: no plots (pip install matplotlib, then rerun; finished models are "
                    "not trained again).")
    folder.mkdir(parents=True, exist_ok=True)
    models, written = data["models"], {}

    def series(key, scale=1.0):
        for name, entry in models.items():
            points = [(int(n), v[key] / scale) for n, v in entry["lengths"].items() if v.get(key) is not None]
            if points:
                yield name, sorted(points)

    for file, key, scale, label in (("bits_per_byte_vs_length", "bits_per_byte", 1.0, "held-out bits per byte"),
                                    ("speed_vs_length", "forward_tokens_per_second", 1.0, "forward tokens/s"),
                                    ("memory_vs_length", "forward_peak_bytes", MIB, "forward peak memory (MiB)")):
        figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
        for name, points in series(key, scale):
            axes.plot(*zip(*points), marker="o", label=name)
        if file == "memory_vs_length":
            for name, points in series("cache_bytes", MIB):
                axes.plot(*zip(*points), linestyle="--", marker="x", label=f"{name} (cache)")
        axes.axvline(data["training_length"], color="grey", linestyle=":", label="training length")
        axes.set_xscale("log", base=2)
        axes.set_xlabel("evaluation length (tokens)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        written[file] = folder / f"{file}.png"
        figure.savefig(written[file])
        plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    length = str(data["training_length"])
    for name, entry in models.items():
        flops, value = total_flops(entry), entry["bits_per_byte"].get(length)
        if flops and value is not None:
            axes.scatter(flops, value)
            axes.annotate(name, (flops, value), fontsize=7)
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel(f"bits per byte at {length} tokens")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    written["bits_per_byte_vs_compute"] = folder / "bits_per_byte_vs_compute.png"
    figure.savefig(written["bits_per_byte_vs_compute"])
    plt.close(figure)
    return written, None


def write_report(output_dir: Path, cfg, results: dict, train_length: int, lengths: list[int], processes: int,
                 device) -> dict:
    data = results_data(cfg, results, train_length, lengths, processes, device)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(data, indent=1, default=str))
    with open(output_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(data))
    plots, note = plot(data, output_dir / "plots")
    (output_dir / "report.md").write_text(markdown(data, plots, note))
    return data
