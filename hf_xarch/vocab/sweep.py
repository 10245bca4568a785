"""`hf-xarch vocab-sweep`: train tokenizers over algorithms x vocabulary sizes, measure them, recommend one.

    hf-xarch vocab-sweep --algorithms bpe,wordpiece,unigram --sizes 1000,2000,4000,8000,16000,32000
    hf-xarch vocab-sweep --corpus my_texts/ --ood other_domain.txt --train-steps 300 --output-dir sweep-out
    python recipes/vocab_sweep.py --config recipes/configs/vocab_sweep.yaml train_steps=200 target.hidden_size=1024

Steps (`run_sweep`):
1. read the corpus (`sources.load_documents`) and split whole documents into training and held-out parts;
2. train every tokenizer on the training part (`algorithms`), several at once on a thread pool (`tokenizers` drops
   the GIL while training and parallelises its own counting, so every core works), and save each under
   `OUTPUT/tokenizers/<algorithm>-<size>/` where `AutoTokenizer.from_pretrained` loads it;
3. measure each on the held-out part and any out-of-domain text (`metrics.text_metrics`) and count what its vocabulary
   costs the target model (`metrics.model_costs`);
4. with `train_steps > 0`, train a small XArch LM per tokenizer at equal compute and score held-out bits per byte
   (`language_model`); under `accelerate launch` with several processes, the tokenizers are shared out among them;
5. recommend (`report.recommend`) and write `results.json`, `results.csv`, `results.md` and `plots/*.png`.

Configuration: in-code defaults (`SweepConfig`) < a YAML file (`--config`) < command-line flags and `key=value`
overrides (`target.hidden_size=1024`, `lm.num_hidden_layers=4`, `sizes=[1000,2000]`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import Tokenizer
from tqdm.auto import tqdm

from hf_xarch.train.corpus import corpus_bytes, train_heldout_split

from . import report
from .algorithms import (
    MERGE_PREFIX_ALGORITHMS,
    TrainedTokenizer,
    check_algorithms,
    minimum_vocab_size,
    save_tokenizer,
    train_merge_prefix,
    train_tokenizer,
)
from .language_model import DEFAULT_LM, LMSettings, bits_per_byte
from .metrics import count_chunks, model_costs, target_config, text_metrics, token_counts_from_chunks
from .sources import load_documents

DEFAULT_SIZES = [1000, 2000, 4000, 8000, 16000, 32000]
# the model whose embedding cost the table reports: a small Llama-like decoder (about 25M body parameters)
DEFAULT_TARGET = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "intermediate_size": 2048,
    "position_embedding_type": "rope",
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


@dataclass
class SweepConfig:
    """Every knob of the sweep (the YAML keys and the command-line flags have these names)."""

    corpus: list[str] = field(default_factory=lambda: ["default"])  # "default", local paths, or Hub dataset names
    max_bytes: int | None = 4_000_000  # of the corpus, before the split
    heldout_fraction: float = 0.1
    text_column: str = "text"  # for .jsonl files and Hub datasets
    split: str = "train"  # Hub split
    ood: list[str] = field(default_factory=list)  # out-of-domain text (local paths or Hub names), held-out only
    algorithms: list[str] = field(default_factory=lambda: ["bpe", "wordpiece", "unigram"])
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    limit_alphabet: int | None = None  # WordPiece characters kept; None: a third of the smallest size
    skip_unreachable: bool = False  # keep going (and mark the row) when the corpus cannot reach a size
    target: dict = field(default_factory=dict)  # XArchConfig overrides over DEFAULT_TARGET
    train_steps: int = 0  # > 0: the bits-per-byte step
    lm: dict = field(default_factory=dict)  # XArchConfig overrides over language_model.DEFAULT_LM
    batch_size: int = 16
    seq_len: int = 128
    learning_rate: float = 3e-3
    eval_bytes: int = 200_000
    min_token_count: float = 100.0
    exact_rare_counts: bool = True  # count tokens on the training split (else: estimate from the held-out counts)
    max_unk_rate: float = 1e-3
    output_dir: str = "vocab_sweep"
    seed: int = 0
    jobs: int | None = None  # tokenizer trainings at once; None: every core
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if isinstance(self.ood, str):
            self.ood = [self.ood]
        self.algorithms = check_algorithms(self.algorithms)
        self.sizes = check_sizes(self.sizes, self.algorithms)
        for name in ("target", "lm"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: a mapping of XArchConfig fields")
        if not isinstance(self.train_steps, int) or self.train_steps < 0:
            raise ValueError(f"train_steps={self.train_steps!r} is not allowed: an integer >= 0 (0 skips the LM step)")
        if self.jobs is not None and (not isinstance(self.jobs, int) or self.jobs < 1):
            raise ValueError(f"jobs={self.jobs!r} is not allowed: a positive integer, or None for every core")
        if self.limit_alphabet is None:
            self.limit_alphabet = max(1, (min(self.sizes) - 4) // 3)

    def lm_settings(self) -> LMSettings:
        return LMSettings(
            steps=self.train_steps, batch_size=self.batch_size, seq_len=self.seq_len,
            learning_rate=self.learning_rate, eval_bytes=self.eval_bytes, seed=self.seed, model=dict(self.lm),
        )


def check_sizes(sizes, algorithms: list[str]) -> list[int]:
    """Sorted, de-duplicated sizes; ValueError for non-integers and sizes below an algorithm's fixed tokens."""
    if isinstance(sizes, str):
        sizes = [part for part in sizes.split(",") if part.strip()]
    try:
        values = sorted({int(str(size).replace("_", "").lower().replace("k", "000")) for size in sizes})
    except ValueError:
        raise ValueError(f"sizes={sizes!r} is not allowed: integers such as 1000,2000 (or 1k,2k)") from None
    if not values:
        raise ValueError("sizes is empty: give one or more vocabulary sizes, e.g. 1000,2000,4000")
    for algorithm in algorithms:
        if values[0] < minimum_vocab_size(algorithm):
            raise ValueError(
                f"sizes: {values[0]} is too small for {algorithm}, which starts from {minimum_vocab_size(algorithm)} "
                "tokens (special tokens" + (" + 256 byte tokens)" if algorithm != "wordpiece" else " + characters)")
            )
    return values


@contextmanager
def tokenizers_parallelism():
    """`tokenizers` obeys TOKENIZERS_PARALLELISM (test suites often set it to false); the sweep wants every core."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _training_jobs(config: SweepConfig, documents: list[str]) -> list[tuple]:
    """(callable returning TrainedTokenizers, how many it returns): one for BPE (one training, cut to every size) and
    one per WordPiece/Unigram size. Unigram's small sizes prune longest, so they go first to keep the pool busy."""
    jobs = []
    for algorithm in config.algorithms:
        if algorithm in MERGE_PREFIX_ALGORITHMS:
            jobs.append(((1, 0), lambda a=algorithm: train_merge_prefix(a, documents, config.sizes), len(config.sizes)))
            continue
        for size in config.sizes:
            def one(a=algorithm, s=size):
                start = time.perf_counter()
                tokenizer = train_tokenizer(a, documents, s, config.limit_alphabet if a == "wordpiece" else None)
                return [TrainedTokenizer(a, s, tokenizer, time.perf_counter() - start)]
            jobs.append(((0 if algorithm == "unigram" else 1, size), one, 1))
    return [(job, count) for _, job, count in sorted(jobs, key=lambda entry: entry[0])]


def _unreachable(trained: TrainedTokenizer, train_bytes: int) -> ValueError:
    return ValueError(
        f"sizes: {trained.algorithm} cannot reach {trained.requested_size} tokens on this corpus ({train_bytes:,} "
        f"training bytes): training stopped at {trained.vocab_size} tokens. Use sizes <= {trained.vocab_size} for "
        f"{trained.algorithm}, a larger corpus, or --skip-unreachable to keep the smaller vocabulary and go on"
    )


def train_and_measure(config: SweepConfig, train, heldout, ood) -> list[tuple[TrainedTokenizer, dict]]:
    """Train every (algorithm, size) tokenizer and measure its text metrics, on a thread pool: `tokenizers` releases
    the GIL while it trains and encodes, so trainings and measurements overlap on every core. Raises ValueError on
    the first size the corpus cannot reach unless `skip_unreachable`."""
    train_bytes = corpus_bytes(train)
    chunks, weights = count_chunks(train) if config.exact_rare_counts else (None, None)

    def measure_one(item: TrainedTokenizer):
        counts = token_counts_from_chunks(item.tokenizer, chunks, weights) if chunks is not None else None
        row = text_metrics(item.tokenizer, heldout, train_bytes, counts)
        if ood:
            ood_metrics = text_metrics(item.tokenizer, ood)
            row.update(ood_bytes_per_token=ood_metrics["bytes_per_token"], ood_unk_per_byte=ood_metrics["unk_per_byte"])
        return item, row

    jobs = _training_jobs(config, train)
    total = sum(count for _, count in jobs)
    workers = config.jobs or len(os.sched_getaffinity(0))
    # one bar (two bars redrawn from one loop tangle in a terminal): it counts tokenizers trained and measured, and
    # its postfix how many are trained so far; the unit is spelled out, since "tok/s" reads as tokens per second
    bar = tqdm(total=total, desc="tokenizers trained and measured", unit="tokenizer", disable=not config.progress)
    results, trained = [], 0
    with tokenizers_parallelism(), ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(job): "train" for job, _ in jobs}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    if pending.pop(future) == "measure":
                        results.append(future.result())
                        bar.update(1)
                        continue
                    for item in future.result():
                        trained += 1
                        bar.set_postfix_str(f"trained {trained}/{total}")
                        if not item.reached and not config.skip_unreachable:
                            raise _unreachable(item, train_bytes)
                        pending[pool.submit(measure_one, item)] = "measure"
        finally:
            for future in pending:
                future.cancel()
            bar.close()
    order = {key: index for index, key in enumerate((a, s) for a in config.algorithms for s in config.sizes)}
    return sorted(results, key=lambda pair: order[(pair[0].algorithm, pair[0].requested_size)])


def make_rows(config: SweepConfig, measured: list[tuple[TrainedTokenizer, dict]], folder: Path) -> list[dict]:
    """One row per tokenizer: saved for AutoTokenizer, its text metrics and the target model's costs (counted in
    this thread: building on the meta device is not something to do from several threads at once)."""
    rows, costs = [], {}
    target = dict(DEFAULT_TARGET, **config.target)
    for item, text in measured:
        path = save_tokenizer(item.tokenizer, folder / "tokenizers" / item.name)
        if item.vocab_size not in costs:
            costs[item.vocab_size] = model_costs(target_config(target, item.vocab_size))
        rows.append({
            "algorithm": item.algorithm, "requested_size": item.requested_size, "vocab_size": item.vocab_size,
            "reached": item.reached, **text, **costs[item.vocab_size],
            "tokenizer_train_seconds": item.train_seconds, "note": item.note, "tokenizer_path": str(path),
        })
    return rows


def measure_bits_per_byte(config: SweepConfig, rows: list[dict], train, heldout, state) -> dict[str, dict]:
    """The LM step for this process's share of the tokenizers; {tokenizer name: stats}."""
    settings = config.lm_settings()
    mine = rows[state.process_index :: state.num_processes]
    results = {}
    bar = tqdm(total=len(mine) * settings.steps, desc="LM steps (bits/byte)", unit="step",
               disable=not config.progress or not state.is_local_main_process)
    with tokenizers_parallelism():
        for row in mine:
            tokenizer = Tokenizer.from_file(str(Path(row["tokenizer_path"]) / "tokenizer.json"))
            bar.set_description(f"LM {row['algorithm']}-{row['requested_size']}")
            results[f"{row['algorithm']}-{row['requested_size']}"] = bits_per_byte(
                tokenizer, train, heldout, settings, device=state.device, progress=bar
            )
    bar.close()
    return results


def _usage_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_sweep(config: SweepConfig) -> dict:
    """Run the whole sweep (module docstring); returns the result that `results.json` holds."""
    from accelerate import PartialState

    state = PartialState()
    folder = Path(config.output_dir)
    start, cpu_start, load_start = time.perf_counter(), _usage_seconds(), os.getloadavg()[0]
    timing = {}
    documents, description = load_documents(config.corpus, config.max_bytes, config.seed, config.text_column,
                                             config.split)
    train, heldout = train_heldout_split(documents, config.heldout_fraction, config.seed)
    ood = load_documents(config.ood, None, config.seed, config.text_column, config.split, for_training=False)[0] \
        if config.ood else []
    timing["load_seconds"] = time.perf_counter() - start
    partial = folder / "rows.partial.json"
    if state.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        mark = time.perf_counter()
        try:
            rows = make_rows(config, train_and_measure(config, train, heldout, ood), folder)
        except ValueError as error:  # hand the error to the other processes too, or they wait at the barrier forever
            rows = {"error": str(error)}
        timing["tokenizer_seconds"] = time.perf_counter() - mark  # training and measuring overlap
        partial.write_text(json.dumps(rows))
    state.wait_for_everyone()
    rows = json.loads(partial.read_text())
    if isinstance(rows, dict):
        raise ValueError(rows["error"])
    if config.train_steps:
        mark = time.perf_counter()
        (folder / "lm").mkdir(exist_ok=True)
        for name, stats in measure_bits_per_byte(config, rows, train, heldout, state).items():
            (folder / "lm" / f"{name}.json").write_text(json.dumps(stats))
        state.wait_for_everyone()
        for row in rows:
            row.update(json.loads((folder / "lm" / f"{row['algorithm']}-{row['requested_size']}.json").read_text()))
        timing["lm_seconds"] = time.perf_counter() - mark
    if not state.is_main_process:
        return {}
    partial.unlink(missing_ok=True)
    recommendation = report.recommend(rows, config.min_token_count, config.max_unk_rate)
    timing.update(
        total_seconds=time.perf_counter() - start, cpu_seconds=_usage_seconds() - cpu_start,
        cores=len(os.sched_getaffinity(0)), load_average_start=load_start, load_average_end=os.getloadavg()[0],
    )
    target = dict(DEFAULT_TARGET, **config.target)
    result = {
        "settings": {
            **dataclasses.asdict(config),
            "target_resolved": target,
            "target_description": ", ".join(f"{key}={value}" for key, value in target.items()),
            "lm_resolved": dict(DEFAULT_LM, **config.lm) if config.train_steps else None,
            "equal_compute": (
                "Equal compute: the same LM body, steps, batch and sequence length in tokens for every tokenizer "
                f"({config.train_steps} steps x {config.batch_size} x {config.seq_len} tokens); the output layer's "
                "V x E cost differs (lm_train_flops) and better compression means more bytes seen (lm_train_bytes)."
            ) if config.train_steps else "",
        },
        "corpus": {
            "description": description,
            "train_documents": len(train), "heldout_documents": len(heldout),
            "train_bytes": corpus_bytes(train), "heldout_bytes": corpus_bytes(heldout),
            "ood_bytes": corpus_bytes(ood),
        },
        "timing": timing,
        "rows": rows,
        "recommendation": recommendation,
    }
    write_outputs(result, folder, config.plots)
    return result


def write_outputs(result: dict, folder: Path, plots: bool = True) -> None:
    plot_paths = report.write_plots(result["rows"], folder / "plots", result["recommendation"],
                                    result["settings"].get("min_token_count")) if plots else []
    result["plots"] = [str(path) for path in plot_paths]
    report.write_json(result, folder / "results.json")
    report.write_csv(result["rows"], folder / "results.csv")
    (folder / "results.md").write_text(report.markdown_report(result, plot_paths, folder))


# ---- command line -----------------------------------------------------------------------------------------------------
def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _overrides(pairs: list[str], where: str) -> dict:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{where}: {pair!r} is not key=value")
        values[key.strip()] = _parse_value(value)
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-xarch vocab-sweep",
        description="Sweep tokenizer algorithms and vocabulary sizes; measure compression, unknowns, Rényi efficiency, "
        "embedding cost and (with --train-steps) held-out bits per byte; recommend one.",
        epilog="Trailing key=value pairs override any setting, e.g. target.hidden_size=1024 lm.num_hidden_layers=4; "
        "after --target/--lm/--corpus/--ood (which take several values) separate them with --.",
    )
    S = argparse.SUPPRESS  # flags not given stay out of the namespace, so YAML values are not overwritten by defaults
    parser.add_argument("--config", default=None, help="YAML file of settings (keys: the long flag names, with _)")
    parser.add_argument("--corpus", nargs="+", default=S, help="'default', local files/folders, or Hub dataset names")
    parser.add_argument("--max-bytes", type=int, default=S, help="corpus bytes to use (default 4000000)")
    parser.add_argument("--heldout-fraction", type=float, default=S, help="share of the text held out (default 0.1)")
    parser.add_argument("--text-column", default=S, help="text field of .jsonl files and Hub datasets")
    parser.add_argument("--split", default=S, help="Hub dataset split (default train)")
    parser.add_argument("--ood", nargs="+", default=S, help="out-of-domain text to measure unknowns and compression on")
    parser.add_argument("--algorithms", default=S, help="comma-separated: bpe,wordpiece,unigram")
    parser.add_argument("--sizes", default=S, help="comma-separated vocabulary sizes (1k = 1000)")
    parser.add_argument("--limit-alphabet", type=int, default=S, help="WordPiece characters kept")
    parser.add_argument("--skip-unreachable", action="store_true", default=S,
                        help="keep sizes the corpus cannot reach (marked) instead of stopping")
    parser.add_argument("--target", nargs="+", default=S, metavar="KEY=VALUE",
                        help="XArchConfig fields of the model whose embedding cost is counted")
    parser.add_argument("--train-steps", type=int, default=S, help="train a small LM per tokenizer (bits per byte)")
    parser.add_argument("--lm", nargs="+", default=S, metavar="KEY=VALUE", help="XArchConfig fields of the small LM")
    parser.add_argument("--batch-size", type=int, default=S)
    parser.add_argument("--seq-len", type=int, default=S)
    parser.add_argument("--learning-rate", type=float, default=S)
    parser.add_argument("--eval-bytes", type=int, default=S, help="held-out bytes the LM is scored on")
    parser.add_argument("--min-token-count", type=float, default=S, help="rare-token rule threshold (default 100)")
    parser.add_argument("--estimate-rare-counts", dest="exact_rare_counts", action="store_false", default=S,
                        help="estimate rare-token counts from the held-out text instead of counting the training split")
    parser.add_argument("--max-unk-rate", type=float, default=S, help="unknown rate tolerated (default 0.001)")
    parser.add_argument("--output-dir", default=S, help="where results go (default ./vocab_sweep)")
    parser.add_argument("--seed", type=int, default=S)
    parser.add_argument("--jobs", type=int, default=S, help="tokenizer trainings at once (default: every core)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=S)
    parser.add_argument("--quiet", dest="progress", action="store_false", default=S, help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. target.hidden_size=1024")
    return parser


def config_from_args(argv: list[str]) -> SweepConfig:
    """Defaults < YAML (--config) < flags < trailing key=value overrides."""
    import yaml

    args = vars(build_parser().parse_args(argv))
    values: dict = {}
    config_path = args.pop("config", None)
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise ValueError(f"--config {path}: no such file")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    overrides = args.pop("overrides", [])
    for name in ("target", "lm"):
        if name in args:
            args[name] = {**values.get(name, {}), **_overrides(args[name], f"--{name}")}
    values.update(args)
    for key, value in _overrides(overrides, "overrides").items():
        section, dot, field_name = key.partition(".")
        if dot and section in ("target", "lm"):
            values[section] = {**values.get(section, {}), field_name: value}
        else:
            values[key] = value
    known = {item.name for item in dataclasses.fields(SweepConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown settings {unknown}; allowed: {sorted(known)}")
    return SweepConfig(**values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-xarch vocab-sweep` and `recipes/vocab_sweep.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config = config_from_args(argv)  # a ValueError is the user's: hf_xarch.cli prints it on one line
    result = run_sweep(config)
    if not result:  # a non-main process of a distributed launch
        return 0
    recommendation = result["recommendation"]
    print()
    print(report.terminal_table(result["rows"]))
    print()
    print(f"recommended: {recommendation['algorithm']} with {recommendation['vocab_size']:,} tokens "
          f"(on {recommendation['basis']})")
    for reason in recommendation["reasons"]:
        print(f"  - {reason}")
    timing = result["timing"]
    print(f"\n{timing['total_seconds']:.1f} s wall ({timing['cpu_seconds']:.1f} s CPU, {timing['cores']} cores, load "
          f"{timing['load_average_start']:.1f} -> {timing['load_average_end']:.1f}); results in {config.output_dir}/ "
          "(results.md, results.json, results.csv, plots/, tokenizers/)")
    return 0


__all__ = ["DEFAULT_SIZES", "DEFAULT_TARGET", "SweepConfig", "config_from_args", "main", "run_sweep", "train_and_measure"]


if __name__ == "__main__":
    from hf_xarch.cli import main as cli_main

    sys.exit(cli_main(["vocab-sweep", *sys.argv[1:]]))
