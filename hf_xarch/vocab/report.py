"""The sweep's outputs: the recommendation, the tables (terminal, Markdown, CSV, JSON) and the plots.

The recommendation, step by step (`recommend`):

1. Tokenizers whose unknown rate on the held-out text exceeds `max_unk_rate` (default 0.1% of bytes) are set aside,
   unless every one does.
2. With bits per byte measured: the lowest held-out bits per byte wins; among the tokenizers within 1% of it, the one
   with the fewest embedding parameters (the cheaper vocabulary buys the same quality).
3. Without: per algorithm, the knee of its compression curve (bytes per token against log2 of the vocabulary size,
   Kneedle: Satopää et al. 2011, the point farthest above the chord of the normalised curve): beyond it each doubling of
   the vocabulary buys less compression. That size is capped at the largest one whose rarest tokens are still
   frequent enough to learn (Gowda & May 2020: 95% of tokens seen at least `min_token_count` times in training,
   counted on the training split; learned tokens only, see `metrics.learned_token_mask`). When even the smallest size
   fails that rule, the smallest is the pick. The algorithm that compresses best at its capped size wins; Rényi
   efficiency breaks ties.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# column key -> (header, format); the terminal and Markdown tables show these, the CSV and JSON hold everything
COLUMNS = {
    "algorithm": ("algorithm", "{}"),
    "requested_size": ("size", "{}"),
    "vocab_size": ("vocab", "{}"),
    "bytes_per_token": ("bytes/tok", "{:.3f}"),
    "tokens_per_word": ("tok/word", "{:.3f}"),
    "split_word_share": ("split words", "{:.1%}"),
    "unk_per_byte": ("unk/byte", "{:.2e}"),
    "renyi_efficiency": ("Rényi 2.5", "{:.3f}"),
    "unused_share": ("unused", "{:.1%}"),
    "rare_token_count": ("p5 count", "{:.0f}"),
    "embedding_params": ("emb params", "{:,}"),
    "embedding_share": ("emb share", "{:.1%}"),
    "ood_bytes_per_token": ("OOD bytes/tok", "{:.3f}"),
    "ood_unk_per_byte": ("OOD unk/byte", "{:.2e}"),
    "bits_per_byte": ("bits/byte", "{:.4f}"),
}

# metric -> (axis label, higher is better?) for the plots against vocabulary size
PLOTTED = {
    "bytes_per_token": ("bytes per token (held-out)", True),
    "tokens_per_word": ("tokens per word", False),
    "split_word_share": ("share of words split into 2+ tokens", False),
    "unk_per_byte": ("unknown rate per byte", False),
    "renyi_efficiency": ("Rényi efficiency (alpha = 2.5)", True),
    "unused_share": ("share of learned tokens never used", False),
    "rare_token_count": ("5th-percentile learned-token count in training", True),
    "embedding_share": ("embedding + output share of parameters", False),
    "ood_bytes_per_token": ("bytes per token (out of domain)", True),
    "ood_unk_per_byte": ("unknown rate per byte (out of domain)", False),
    "bits_per_byte": ("held-out bits per byte", False),
}


# ---- recommendation ---------------------------------------------------------------------------------------------------
def knee(sizes: list[float], values: list[float]) -> float | None:
    """Kneedle (Satopää et al. 2011) on an increasing, concave curve of `values` against log2(`sizes`): the size
    whose normalised value lies farthest above the chord from the first to the last point. None with fewer than three
    points, or when no point lies above the chord (no diminishing returns to find)."""
    points = sorted(zip(sizes, values))
    if len(points) < 3:
        return None
    xs = [math.log2(size) for size, _ in points]
    ys = [value for _, value in points]
    x_span, y_span = xs[-1] - xs[0], max(ys) - min(ys)
    if x_span <= 0 or y_span <= 0:
        return None
    gaps = [(y - ys[0]) / y_span - (x - xs[0]) / x_span for x, y in zip(xs, ys)]
    best = max(range(len(points)), key=lambda index: gaps[index])
    return points[best][0] if gaps[best] > 1e-12 else None


def recommend(rows: list[dict], min_token_count: float = 100.0, max_unk_rate: float = 1e-3) -> dict:
    """Pick an algorithm and size from the sweep's rows (see the module docstring); returns the choice and the
    reasons, one sentence each."""
    rows = [row for row in rows if row.get("reached", True)]
    if not rows:
        raise ValueError("no tokenizer reached its requested size: nothing to recommend")
    reasons = []
    clean = [row for row in rows if row["unk_per_byte"] <= max_unk_rate]
    if clean and len(clean) < len(rows):
        dropped = sorted({row["algorithm"] for row in rows} - {row["algorithm"] for row in clean})
        reasons.append(
            f"set aside for an unknown rate above {max_unk_rate:.1%} of bytes: "
            + ", ".join(f"{row['algorithm']}-{row['requested_size']}" for row in rows if row not in clean)
            + (f" (all of {', '.join(dropped)})" if dropped else "")
        )
    candidates = clean or rows
    how = "estimated" if "estimate" in str(rows[0].get("rare_token_source", "")) else "counted"
    per_algorithm = {}
    for algorithm in dict.fromkeys(row["algorithm"] for row in candidates):
        mine = sorted((row for row in candidates if row["algorithm"] == algorithm), key=lambda row: row["vocab_size"])
        knee_size = knee([row["vocab_size"] for row in mine], [row["bytes_per_token"] for row in mine])
        frequent = [row for row in mine if row["rare_token_count"] >= min_token_count]
        # no size passes the rare-token rule: the smallest is the least undertrained
        rare_cap = frequent[-1]["vocab_size"] if frequent else mine[0]["vocab_size"]
        cap = min(rare_cap, knee_size) if knee_size is not None else rare_cap
        pick = max((row for row in mine if row["vocab_size"] <= cap), key=lambda row: row["vocab_size"])
        per_algorithm[algorithm] = {"knee": knee_size, "rare_cap": rare_cap, "row": pick}
        knee_text = (f"knee of the compression curve at {knee_size:,} tokens" if knee_size
                     else "no knee in the compression curve (fewer than 3 sizes, or no diminishing returns)")
        rare_text = (
            f"largest size whose 5%-rarest learned tokens appear >= {min_token_count:g} times in training ({how}): "
            f"{rare_cap:,}"
            if frequent
            else f"even at {rare_cap:,} tokens the 5%-rarest learned tokens appear < {min_token_count:g} times in "
            f"training ({how})"
        )
        reasons.append(f"{algorithm}: {knee_text}; {rare_text}; so {pick['vocab_size']:,}")

    measured = [row for row in candidates if row.get("bits_per_byte") is not None]
    if measured:
        best = min(row["bits_per_byte"] for row in measured)
        near = [row for row in measured if row["bits_per_byte"] <= best * 1.01]
        choice = min(near, key=lambda row: (row["embedding_params"], row["bits_per_byte"]))
        reasons.append(
            f"lowest held-out bits per byte: {best:.4f}; within 1% of it, {choice['algorithm']}-{choice['requested_size']}"
            f" ({choice['bits_per_byte']:.4f} bits/byte) has the fewest embedding parameters "
            f"({choice['embedding_params']:,}, {choice['embedding_share']:.1%} of the target model)"
        )
        basis = "bits per byte"
    else:
        choice = max(
            (entry["row"] for entry in per_algorithm.values()),
            key=lambda row: (row["bytes_per_token"], row["renyi_efficiency"]),
        )
        reasons.append(
            f"best compression at its capped size: {choice['algorithm']}-{choice['requested_size']} with "
            f"{choice['bytes_per_token']:.3f} bytes/token (Rényi efficiency {choice['renyi_efficiency']:.3f}); "
            f"embedding + output layer {choice['embedding_params']:,} parameters, {choice['embedding_share']:.1%} of the "
            "target model. Run with --train-steps N to decide on bits per byte"
        )
        basis = "compression knee and rare-token frequency"
    return {
        "algorithm": choice["algorithm"],
        "vocab_size": choice["vocab_size"],
        "requested_size": choice["requested_size"],
        "tokenizer_path": choice.get("tokenizer_path"),
        "basis": basis,
        "reasons": reasons,
        "per_algorithm": {
            name: {"knee": entry["knee"], "rare_cap": entry["rare_cap"], "pick": entry["row"]["requested_size"]}
            for name, entry in per_algorithm.items()
        },
    }


# ---- tables -----------------------------------------------------------------------------------------------------------
def _columns(rows: list[dict]) -> list[str]:
    return [key for key in COLUMNS if any(row.get(key) is not None for row in rows)]


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    text = COLUMNS[key][1].format(value)
    return text + ("*" if key == "vocab_size" and not row.get("reached", True) else "")


def terminal_table(rows: list[dict]) -> str:
    keys = _columns(rows)
    cells = [[COLUMNS[key][0] for key in keys]] + [[_cell(row, key) for key in keys] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(keys))]
    lines = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    keys = _columns(rows)
    lines = ["| " + " | ".join(COLUMNS[key][0] for key in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(row, key) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")


def markdown_report(result: dict, plots: list[Path], folder: Path) -> str:
    recommendation = result["recommendation"]
    lines = [
        "# Tokenizer vocabulary sweep",
        "",
        (f"Corpus: {result['corpus']['description']}; {result['corpus']['train_bytes']:,} training bytes, "
        f"{result['corpus']['heldout_bytes']:,} held-out bytes ({result['corpus']['train_documents']} / "
        f"{result['corpus']['heldout_documents']} documents)."),
        f"Target model for the parameter counts: {result['settings']['target_description']}.",
        "",
        markdown_table(result["rows"]),
        "",
        ("`*` after a vocabulary size: the corpus could not reach the requested size. "
        "`p5 count`: occurrences in the training split of the token at the 5th percentile of learned-token counts "
        f"({result['rows'][0].get('rare_token_source', '')}). "
        "`unused`: learned tokens (beyond special tokens, bytes and single characters) the held-out text never uses."),
        "",
        f"## Recommendation: {recommendation['algorithm']} with {recommendation['vocab_size']:,} tokens",
        "",
        f"Decided on {recommendation['basis']}.",
        "",
    ]
    lines += [f"- {reason}" for reason in recommendation["reasons"]]
    if any(row.get("bits_per_byte") is not None for row in result["rows"]):
        lines += [
            "",
            "Bits per byte, not per-token perplexity: a per-token loss is not comparable across vocabularies (longer "
            "tokens make fewer, harder predictions); dividing the total information by the text's bytes is. "
            + result["settings"].get("equal_compute", ""),
        ]
    lines += ["", "## Plots", ""]
    lines += [f"![{plot.stem}]({plot.relative_to(folder).as_posix()})" for plot in plots]
    return "\n".join(lines) + "\n"


# ---- plots ------------------------------------------------------------------------------------------------------------
def write_plots(
    rows: list[dict], folder: Path, recommendation: dict | None = None, min_token_count: float | None = None
) -> list[Path]:
    """`overview.png`: every metric against the vocabulary size, a panel each, a line per algorithm;
    `bytes_per_token.png`: the compression curve on its own, with each algorithm's knee; and, when measured,
    `bits_per_byte_vs_params.png`: held-out bits per byte against the parameters of the LM that scored it. The
    recommended tokenizer is circled in red; a dashed line marks `min_token_count` on the rare-token panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    folder.mkdir(parents=True, exist_ok=True)
    algorithms = list(dict.fromkeys(row["algorithm"] for row in rows))
    metrics = [key for key in PLOTTED if any(row.get(key) is not None for row in rows)]

    def draw(axis, key, x_key="vocab_size", knees=False):
        for algorithm in algorithms:
            mine = sorted((row for row in rows if row["algorithm"] == algorithm and row.get(key) is not None),
                          key=lambda row: row[x_key])
            if not mine:
                continue
            line, = axis.plot([row[x_key] for row in mine], [row[key] for row in mine], marker="o", label=algorithm)
            at = knee([row["vocab_size"] for row in mine], [row[key] for row in mine]) if knees else None
            if at is not None:
                axis.axvline(at, color=line.get_color(), linestyle=":", alpha=0.7)
        chosen = [row for row in rows if recommendation and row.get(key) is not None
                  and (row["algorithm"], row["requested_size"])
                  == (recommendation["algorithm"], recommendation["requested_size"])]
        if chosen:
            axis.scatter([chosen[0][x_key]], [chosen[0][key]], s=160, facecolors="none", edgecolors="red", zorder=5,
                         label="recommended")
        if key == "rare_token_count" and min_token_count is not None:
            axis.axhline(min_token_count, color="gray", linestyle="--", linewidth=1, label="rare-token rule")
        if x_key == "vocab_size":
            axis.set_xscale("log", base=2)
        else:  # parameter counts span a few percent: a linear axis in millions reads better
            axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1e6:.2f}M"))
        axis.set_title(f"{PLOTTED[key][0]} ({'higher' if PLOTTED[key][1] else 'lower'} is better)", fontsize=9)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)

    paths = []

    def save(figure, name):
        paths.append(folder / name)
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)

    columns = 3
    lines = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.4 * lines), squeeze=False,
                                layout="constrained")
    for axis, key in zip(axes.flat, metrics):
        draw(axis, key)
    for axis in list(axes.flat)[len(metrics):]:
        axis.axis("off")
    figure.suptitle("tokenizer vocabulary sweep: each metric against the vocabulary size (log2 axis)")
    save(figure, "overview.png")
    figure, axis = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    draw(axis, "bytes_per_token", knees=True)
    axis.set_xlabel("vocabulary size (tokens); dotted: knee of each curve")
    save(figure, "bytes_per_token.png")
    if any(row.get("bits_per_byte") is not None for row in rows):
        figure, axis = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
        draw(axis, "bits_per_byte", x_key="lm_params")
        axis.set_xlabel("parameters of the LM that was scored (embedding and output layer included)")
        save(figure, "bits_per_byte_vs_params.png")
    return paths


__all__ = [
    "knee",
    "markdown_report",
    "markdown_table",
    "recommend",
    "terminal_table",
    "write_csv",
    "write_json",
    "write_plots",
]
