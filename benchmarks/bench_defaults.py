"""Defaults: how fast a small byte-level decoder learns with XArch's defaults, candidate defaults, and x-transformers'.

Corpus: the English prose of the Python documentation that ships inside the standard library
(``pydoc_data.topics.topics``: the language reference's topics, about 0.75 MB, offline everywhere). The bytes are
cut once: the first 90% train, the last 10% held out.

Protocol, the same for every arm (one decoder per arm, each seed builds and trains it from scratch):
byte-level LM (vocab 256), ``--hidden`` wide, ``--layers`` deep, ``hidden / 32`` heads, MLP 4x, pre-norm LayerNorm,
no dropout; ``--steps`` AdamW steps (lr ``--lr``, weight decay 0.01, no schedule) on ``--batch`` random windows of
``--length`` bytes. Reported: held-out bits per byte (mean next-byte loss / ln 2) over the whole held-out text, cut into
consecutive windows of ``--length`` bytes (and of ``8 x --length`` with ``--long``: extrapolation), averaged over seeds.

Arms (``--arms``):

- ``xarch-old-<pos>``: XArch before issue 22: ``initializer_range=0.02``, tied embeddings;
- ``xarch-<pos>``: XArch with the current defaults (whatever ``XArchConfig()`` gives now);
- ``xarch-init<std>-<pos>``, ``xarch-untied-<pos>``: single changes, for the record;
- ``xarch-init<std>-depth-<pos>``: ``initializer_range=<std>`` with GPT-2's depth scaling of the projections that write
  into the residual stream (attention ``o_proj``, MLP ``down_proj``): std / sqrt(2 x layers);
- ``xt-<pos>``: x-transformers' ``TransformerWrapper(Decoder(...))`` with its defaults and the same sizes (heads of
  32, not its default 64; skipped
  when x-transformers is not installed: ``pip install x-transformers``);
- ``<pos>`` is ``rope``, ``alibi`` or ``sinusoidal``; ``xarch-old-sinusoidal`` also keeps the unscaled sinusoid
  (amplitude 1, as before the fix).

    python benchmarks/bench_defaults.py                      # every default arm (results/defaults.md: the runs made)
    python benchmarks/bench_defaults.py --steps 50 --arms xarch-rope xt-rope --output scratch   # a quick look

Results are written after every run (an interrupted run keeps what it finished); ``--first-seed`` adds seeds to a
protocol already run (its rows are then merged by hand: results/defaults.md says how).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))

from common import RESULTS_DIR, markdown_table, write_results

DEFAULT_ARMS = [
    "xarch-old-rope", "xarch-rope", "xt-rope",
    "xarch-old-alibi", "xarch-alibi", "xt-alibi",
    "xarch-old-sinusoidal", "xarch-sinusoidal", "xt-sinusoidal",
]


def load_corpus() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = torch.frombuffer(bytearray("\n\n".join(topics[key] for key in sorted(topics)).encode()), dtype=torch.uint8)
    cut = int(0.9 * len(data))
    return data[:cut].long(), data[cut:].long()


def build_xarch(arm: str, args) -> torch.nn.Module:
    from hf_xarch import XArchConfig, XArchForCausalLM

    position = arm.rsplit("-", 1)[1]
    fields = {
        "vocab_size": 256, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 32, "max_position_embeddings": 8 * args.length, "is_decoder": True,
        "position_embedding_type": position,
    }
    if arm.startswith("xarch-old-"):
        fields.update(initializer_range=0.02, tie_word_embeddings=True)
    elif arm.startswith("xarch-init"):
        fields["initializer_range"] = float(arm.split("-")[1][len("init"):])
    elif arm.startswith("xarch-untied-"):
        fields["tie_word_embeddings"] = False
    model = XArchForCausalLM(XArchConfig(**fields))
    if "-depth-" in arm:  # GPT-2: the residual stream adds 2 projections per layer; keep its variance at init
        std = model.config.initializer_range / math.sqrt(2 * args.layers)
        for name, module in model.named_modules():
            if name.endswith(("attention.o_proj", "mlp.down_proj")):
                torch.nn.init.normal_(module.weight, mean=0.0, std=std)
    if arm == "xarch-old-sinusoidal":  # the sinusoid as it was: amplitude 1, not learned
        scale = model.model.embeddings.position_embeddings.scale
        scale.data.fill_(1.0)
        scale.requires_grad_(False)
    return model


class XTransformersLM(torch.nn.Module):
    """x-transformers' decoder, returning logits like the XArch model's ``.logits``."""

    def __init__(self, position: str, args):
        super().__init__()
        from x_transformers import Decoder, TransformerWrapper

        options = {"rope": {"rotary_pos_emb": True}, "alibi": {"alibi_pos_bias": True}, "sinusoidal": {}}[position]
        self.net = TransformerWrapper(
            num_tokens=256, max_seq_len=8 * args.length, scaled_sinu_pos_emb=position == "sinusoidal",
            attn_layers=Decoder(
                dim=args.hidden, depth=args.layers, heads=args.hidden // 32, attn_dim_head=32, **options
            ),
        )

    def forward(self, ids):
        return self.net(ids)


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def heldout_bits_per_byte(model, heldout: torch.Tensor, length: int) -> float:
    model.eval()
    windows = heldout[: len(heldout) // length * length].view(-1, length)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = logits_of(model, batch[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
    model.train()
    return total / count / math.log(2)


def train_arm(arm: str, seed: int, train: torch.Tensor, heldout: torch.Tensor, args) -> dict:
    torch.manual_seed(seed)
    model = XTransformersLM(arm.split("-", 1)[1], args) if arm.startswith("xt-") else build_xarch(arm, args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1000 + seed)  # the same windows for every arm
    start, losses = time.perf_counter(), []
    for _ in range(args.steps):
        offsets = torch.randint(0, len(train) - args.length - 1, (args.batch,), generator=generator)
        batch = torch.stack([train[o : o + args.length + 1] for o in offsets.tolist()])
        logits = logits_of(model, batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    row = {
        "arm": arm, "seed": seed, "parameters": sum(p.numel() for p in model.parameters()),
        "train_bpb_last10": sum(losses[-10:]) / len(losses[-10:]) / math.log(2),
        "heldout_bpb": heldout_bits_per_byte(model, heldout, args.length),
        "seconds": time.perf_counter() - start,
    }
    if args.long:
        row["heldout_bpb_8x"] = heldout_bits_per_byte(model, heldout, 8 * args.length)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--long", action="store_true", help="also evaluate at 8x the training length")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="defaults")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, heldout = load_corpus()
    arms = [arm for arm in args.arms if not arm.startswith("xt-") or _have_x_transformers()]
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in arms:
            rows.append(train_arm(arm, seed, train, heldout, args))
            report(rows, arms, args, train, heldout)
    print(report(rows, arms, args, train, heldout))


def report(rows: list[dict], arms: list[str], args, train: torch.Tensor, heldout: torch.Tensor) -> str:
    """Write the results of the runs done so far; return the markdown."""
    seeds = sorted({row["seed"] for row in rows})
    columns = ["train_bpb_last10", "heldout_bpb"] + (["heldout_bpb_8x"] if args.long else [])
    table = []
    for arm in arms:
        mine = [row for row in rows if row["arm"] == arm]
        if not mine:
            continue
        means = [sum(row[c] for row in mine) / len(mine) for c in columns]
        spread = max(row["heldout_bpb"] for row in mine) - min(row["heldout_bpb"] for row in mine)
        table.append([arm, mine[0]["parameters"], *means, spread, sum(row["seconds"] for row in mine) / len(mine)])
    headers = ["arm", "parameters", *columns, "held-out spread over seeds", "seconds per run"]
    markdown = "\n".join([
        "# Defaults: bits per byte after equal steps (`benchmarks/bench_defaults.py`)",
        "",
        f"Command: `python benchmarks/bench_defaults.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        "",
        f"Corpus: `pydoc_data.topics` (English prose of the Python docs), {len(train)} train / {len(heldout)} held-out "
        f"bytes. {args.steps} AdamW steps (lr {args.lr}, wd 0.01) x batch {args.batch} x {args.length} bytes, hidden "
        f"{args.hidden}, {args.layers} layers, {args.hidden // 32} heads, seeds {seeds} "
        "(means shown). "
        f"Held out: every byte of the held-out text, in windows of {args.length}"
        + (f" (and {8 * args.length})" if args.long else "") + ".",
        "",
        markdown_table(headers, table),
    ])
    write_results(args.output, markdown, {"args": vars(args), "rows": rows}, directory=RESULTS_DIR)
    return markdown


def _have_x_transformers() -> bool:
    try:
        import x_transformers  # noqa: F401
    except ImportError:
        print("x-transformers is not installed: its arms are skipped (pip install x-transformers)", flush=True)
        return False
    return True


if __name__ == "__main__":
    main()
