"""Speed of one mixture-of-experts feed-forward layer and Swin block against the plain MLP ones.

At each encoder stage's width and token count (a 224 x 224 slice stack: 56x56, 28x28, 14x14, 7x7
tokens per slice at 96, 192, 384, 768 channels) four forms are timed on ``--device`` (the CPU by
default; on CUDA each call is synchronised before the clock stops), under
``torch.no_grad``, in one run, interleaved and repeated (median of ``--repeats`` after warm-up):

    dense   the plain Swin MLP (``DenseFeedForward``, C -> 4C -> C)
    top-1   M4oE with 3 experts, each token through its most probable expert (``top_k=1``), the
            tokens sorted by expert and each expert run on its own (``dispatch="sort"``)
    top-1 dense  the same routing with every expert run on every token, each token keeping its
            expert's output (``dispatch="dense"``: no host synchronisation; "auto" on a GPU)
    mixture M4oE with 3 experts, every token through all experts, gate-weighted (``top_k=None``)

once for the feed-forward layer alone and once for the whole Swin block (window attention + ffn).
Ratios are to the dense form; the total row sums the four stages (so it is token-weighted).

Run: ``make benchmark``, or ``PYTHONPATH=M4oESegmentation python benchmarks/moe_block.py
[--tokens N] [--repeats R] [--device cuda] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from functools import partial

import torch

from m4oe.model import DenseFeedForward, MoEFeedForward
from m4oe.model.swin_unet import SwinBlock

# Encoder stages of the published Swin-UNet at a 224 input: (width, heads, token grid side).
STAGES = ((96, 3, 56), (192, 6, 28), (384, 12, 14), (768, 24, 7))
NUM_EXPERTS = 3
WINDOW = 7


def routed(dim: int, dispatch: str) -> MoEFeedForward:
    ffn = MoEFeedForward(dim, num_experts=NUM_EXPERTS, top_k=1)
    ffn.dispatch = dispatch
    return ffn


FORMS = {
    "dense": partial(DenseFeedForward),
    "top-1": partial(routed, dispatch="sort"),
    "top-1 dense": partial(routed, dispatch="dense"),
    "mixture": partial(MoEFeedForward, num_experts=NUM_EXPERTS, top_k=None),
}
TARGET = 1.3  # top-1 block at most this many times the plain MLP block


def build_cases(slices: int, device: torch.device) -> list[dict]:
    """One case per (stage, layer kind, form): a module in eval mode and its input, on ``device``."""
    torch.manual_seed(0)
    cases = []
    for dim, heads, side in STAGES:
        tokens = torch.randn(slices, side * side, dim, device=device)
        grid = tokens.reshape(slices, side, side, dim)
        for form, ffn in FORMS.items():
            cases.append(
                dict(stage=dim, kind="ffn", form=form, module=ffn(dim).to(device).eval(), input=tokens)
            )
            block = SwinBlock(
                ffn_layer=ffn, dim=dim, input_resolution=(side, side), num_heads=heads, window_size=WINDOW
            )
            cases.append(dict(stage=dim, kind="block", form=form, module=block.to(device).eval(), input=grid))
    return cases


def time_cases(cases: list[dict], repeats: int, warmup: int) -> None:
    """Fill each case's ``ms`` with the median of ``repeats`` timed calls, the cases interleaved."""
    samples = {id(c): [] for c in cases}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for case in cases:
                start = time.perf_counter()
                case["module"](case["input"])
                if case["input"].is_cuda:
                    torch.cuda.synchronize(case["input"].device)
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    samples[id(case)].append(elapsed * 1e3)
    for case in cases:
        case["ms"] = statistics.median(samples[id(case)])


def table(cases: list[dict], kind: str) -> list[dict]:
    """Rows {stage, tokens, ms per form, ratio per form} for one layer kind, and a total row."""
    rows = []
    for dim, _, _ in STAGES:
        ms = {c["form"]: c["ms"] for c in cases if c["kind"] == kind and c["stage"] == dim}
        rows.append(dict(stage=str(dim), ms=ms))
    rows.append(dict(stage="total", ms={f: sum(r["ms"][f] for r in rows) for f in FORMS}))
    for row in rows:
        row["ratio"] = {f: row["ms"][f] / row["ms"]["dense"] for f in FORMS}
    return rows


def print_table(title: str, rows: list[dict], tokens: list[int]) -> None:
    print(f"\n{title}")
    header = f"{'width':>6} {'tokens':>7} " + " ".join(f"{f + ' ms':>15}" for f in FORMS)
    header += " " + " ".join(f"{f + ' x':>13}" for f in FORMS if f != "dense")
    print(header)
    for row, n in zip(rows, [*tokens, sum(tokens)], strict=True):
        line = f"{row['stage']:>6} {n:>7} " + " ".join(f"{row['ms'][f]:>15.2f}" for f in FORMS)
        line += " " + " ".join(f"{row['ratio'][f]:>13.2f}" for f in FORMS if f != "dense")
        print(line)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return dict(cpu=cpu, torch=torch.__version__, threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tokens",
        type=int,
        default=8 * 56 * 56,
        help="tokens at the first stage, a multiple of 56*56 = 3136 (one 224 slice); default 8 slices",
    )
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    first = STAGES[0][2] ** 2
    if args.tokens < first or args.tokens % first:
        parser.error(f"--tokens must be a positive multiple of {first} (one 224 slice), got {args.tokens}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    slices = args.tokens // first

    info = machine()
    print(f"CPU {info['cpu']}, torch {info['torch']}, {info['threads']} threads, {slices} slices of 224x224")
    device = torch.device(args.device)
    info["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    cases = build_cases(slices, device)
    time_cases(cases, args.repeats, args.warmup)
    tokens = [slices * side * side for _, _, side in STAGES]
    results = dict(machine=info, slices=slices, repeats=args.repeats, tokens=tokens)
    for kind, title in (("ffn", "Feed-forward layer only"), ("block", "Whole Swin block (attention + ffn)")):
        results[kind] = table(cases, kind)
        print_table(title, results[kind], tokens)
    top1 = results["block"][-1]["ratio"]["top-1"]
    verdict = "met" if top1 <= TARGET else "missed"
    print(f"\ntop-1 block / plain MLP block, all stages: {top1:.2f}x (target <= {TARGET}x: {verdict})")
    block = results["block"][-1]["ms"]
    print(
        f"top-1 block, sorted / dense dispatch / dense mixture: {block['top-1']:.1f} / "
        f"{block['top-1 dense']:.1f} / {block['mixture']:.1f} ms ({info['device']})"
    )
    results["target"] = dict(limit=TARGET, top1_block_ratio=top1, met=top1 <= TARGET)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
