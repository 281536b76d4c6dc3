"""Accuracy of a model on the two real validation scans: Dice and HD95 per organ, gate routing.

The scans (``example_ct_dicom``, contrast CT; ``example_mr_sm``, MRI) and their TotalSegmentator
reference labels are described in ``m4oe_training.realval``; no model of this project trains on
them. The model runs with its card's defaults, as ``m4oe segment`` runs it (``--tta`` overrides
the test-time passes), on the CPU. ``--record`` writes the figures into the model folder's card
(``metrics.real_validation``); it needs ``--model FOLDER``: the embedded model's card is part of
the source tree and a downloaded model's card is checked against the catalogue's SHA-256, so
neither is rewritten.

Run: ``python benchmarks/real_accuracy.py [--model NAME_OR_FOLDER] [--data DIR] [--tta N]
[--threads 2] [--json] [--record] [--protocol released] [--spacing-sweep MM,MM,...]
[--held-out DATASET [--held-out-cases 4]]``.
``--held-out`` adds the held-out cases of a labelled dataset (the last N in sorted order, those a
run with ``val_cases = N`` never trains on; e.g. the converted CHAOS MRIs,
``m4oe_training.converters chaos``), scored on the organs it labels, as one more row group
(``m4oe_training.realval.benchmark_held_out``); it may be given more than once, and with
``--record`` its figures go into the card too (``metrics.held_out_validation``).
``--protocol released`` adds the released M4oE code's scores (its Dice conventions, HD95 in voxels)
beside the native ones. ``--spacing-sweep`` scores the model once per in-plane pixel spacing (mm,
square pixels) in place of its card's ``target_spacing_mm``, one row per spacing and scan (and
per ``--held-out`` dataset, so that one scan's preferred scale can be checked on other patients):
how much the figures depend on the scale a patient is shown at (a model card with ``in_plane =
"spacing"`` only; a field of view too large for the model input is still shrunk to fit, so a wide
CT moves only with spacings above its fitted one). Exit code 2 when the data folder or a file is
missing, or the sweep does not apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "totalsegmentator"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded model)")
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help=f"the scans' folder (default {DEFAULT_DATA})"
    )
    p.add_argument("--tta", type=int, default=None, help="test-time passes (default: the card's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--record", action="store_true", help="write the result into the model's card")
    p.add_argument(
        "--protocol",
        choices=("native", "released"),
        default="native",
        help="released: add the released M4oE code's Dice and HD95 (voxels) columns beside the native ones",
    )
    p.add_argument(
        "--spacing-sweep",
        type=spacings,
        default=None,
        metavar="MM,MM,...",
        help="score once per in-plane spacing (mm) instead of the card's target spacing",
    )
    p.add_argument(
        "--held-out",
        type=Path,
        action="append",
        default=[],
        metavar="DATASET",
        help="also score the held-out cases of this labelled dataset folder",
    )
    p.add_argument(
        "--held-out-cases", type=int, default=4, help="how many last cases are held out (default 4)"
    )
    args = p.parse_args(argv)
    if args.spacing_sweep and args.record:
        p.error("--record writes the card's own figures: it cannot go with --spacing-sweep")

    from m4oe.errors import M4oEError
    from m4oe.hub import EMBEDDED_DIR, cache_dir, resolve_model
    from m4oe.predictor import Predictor
    from m4oe_training.realval import benchmark, format_table, record

    if not args.data.is_dir():
        print(f"error: {args.data}: real validation data folder not found", file=sys.stderr)
        return 2
    protected = (EMBEDDED_DIR.resolve(), cache_dir().resolve())
    if args.record and (
        args.model is None
        or not Path(args.model).is_dir()
        or any(Path(args.model).resolve().is_relative_to(folder) for folder in protected)
    ):
        print(
            f"error: {args.model or 'the embedded model'}: --record needs --model FOLDER, a model folder "
            "of yours (embedded and downloaded models' cards are not rewritten)",
            file=sys.stderr,
        )
        return 2
    try:
        folder = resolve_model(args.model)
        predictor = Predictor.from_pretrained(folder, device="cpu", threads=args.threads)
        start = time.perf_counter()
        if args.spacing_sweep:
            return sweep(predictor, args, start)
        results = benchmark(predictor, args.data, args.tta, args.protocol)
        held_out = score_held_out(predictor, args)
    except M4oEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = round(time.perf_counter() - start, 1)
    if args.record:
        card = folder / "model.json"
        command = "python benchmarks/real_accuracy.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
        record(card, results, command, held_out)
    results = {**results, **held_out}
    if args.json:
        print(
            json.dumps(
                {"model": str(args.model or predictor.card.name), "seconds": seconds, "scans": results},
                indent=1,
            )
        )
    else:
        print(format_table(results))
        print(f"({seconds} s)")
    return 0


def score_held_out(predictor, args) -> dict:
    """{"NAME (N held out)": entry} of :func:`m4oe_training.realval.benchmark_held_out` for each
    ``--held-out`` data set, in the order given."""
    from m4oe_training.realval import benchmark_held_out

    entries = {}
    for dataset in args.held_out:
        entry = benchmark_held_out(predictor, dataset, args.held_out_cases, args.tta)
        entries[f"{dataset.name} ({len(entry['cases'])} held out)"] = entry
    return entries


def spacings(text: str) -> list[float]:
    """``"3.5,4"`` -> [3.5, 4.0]: positive in-plane spacings in mm."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated spacings in mm, got {text!r}") from None
    if not all(v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"spacings must be positive, got {text!r}")
    return values


def at_target_spacing(card, spacing_mm: float):
    """The card with its in-plane target spacing set to ``spacing_mm`` (rows and columns alike)."""
    from m4oe.errors import ModelError

    if card.preprocessing.in_plane != "spacing":
        raise ModelError(
            f"model {card.name!r} resizes every slice to its input (in_plane "
            f"{card.preprocessing.in_plane!r}): it has no target spacing to sweep"
        )
    pre = dataclasses.replace(card.preprocessing, target_spacing_mm=(spacing_mm, spacing_mm))
    return dataclasses.replace(card, preprocessing=pre)


def sweep(predictor, args, start: float) -> int:
    """Score the real scans, and the held-out cases of each ``--held-out`` dataset, once per spacing
    of ``args.spacing_sweep``; print a table or JSON (a row's held-out entries are named as in the
    plain run's output, after the scans)."""
    from m4oe_training.realval import benchmark

    card = predictor.card
    rows = []
    for spacing in args.spacing_sweep:
        predictor.card = at_target_spacing(card, spacing)
        scans = benchmark(predictor, args.data, args.tta, args.protocol)
        rows.append({"spacing_mm": spacing, "scans": {**scans, **score_held_out(predictor, args)}})
    predictor.card = card
    seconds = round(time.perf_counter() - start, 1)
    if args.json:
        name = str(args.model or card.name)
        print(
            json.dumps(
                {
                    "model": name,
                    "seconds": seconds,
                    "card_spacing_mm": card.preprocessing.target_spacing_mm,
                    "sweep": rows,
                },
                indent=1,
            )
        )
        return 0
    print(f"card target spacing {card.preprocessing.target_spacing_mm} mm; mean Dice, then Dice per organ")
    for row in rows:
        for scan, entry in row["scans"].items():
            organs = " ".join(f"{organ} {dice:.2f}" for organ, dice in entry["dice"].items())
            print(f"{row['spacing_mm']:>5.2f} mm  {scan:<24} {entry['mean_dice']:.3f}  {organs}")
    print(f"({seconds} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
