"""Did a fine-tune on corrected cases help them without hurting the model elsewhere? Before against after.

The correction loop (training/README.md, "The correction loop") fine-tunes a model on cases a
radiologist corrected; it must raise the model's Dice on those cases and keep what the model knew.
This benchmark scores the model before the fine-tune and after it, with the card defaults of each
(as ``m4oe segment`` runs them, on the CPU), on three things:

- the corrected cases: every case of the nnU-Net data set(s) given with ``--corrected`` (as the
  Slicer module's "Export for training" writes them), mean Dice over the structures each case's
  label map holds, matched to the model's classes by their standard codes;
- the real validation scans (:mod:`m4oe_training.realval`: ``example_ct_dicom``, ``example_mr_sm``),
  mean Dice over the organs present; left out, and said so, when their folder is missing;
- fresh phantoms of each sequence (``benchmarks/phantom_accuracy.py``'s ``measure``), mean Dice.

It prints a table (before, after, change, per figure) and a verdict: the corrected cases improved,
and no held-out figure (real scans, phantoms) fell by more than ``--tolerance`` (default 0.02,
issue #22's bound). With ``--check`` a failed verdict exits with code 1, so the check can gate a
script that ships fine-tuned models. Bad input (a missing data set or model) exits with code 2.

Run (from the repository root):
  PYTHONPATH=M4oESegmentation:training python benchmarks/correction_loop.py \\
      --before m4oe-phantom --after runs/m4oe-phantom-corrected/model \\
      --corrected data/real/example_ct [--phantoms 24] [--threads 2] [--json out.json] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "M4oESegmentation"))
sys.path.insert(0, str(ROOT / "training"))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_REAL = ROOT.parent / "shared" / "data" / "totalsegmentator"


def score_corrected(predictor, dataset: Path) -> dict:
    """Mean Dice of ``predictor`` on every case of one nnU-Net data set.

    Each case's image is read as the engine reads it (LPS, mm; HU for CT) and segmented with the
    card's defaults and the data set's modality; the prediction is scored against the case's label
    map on its grid. Model classes and data-set labels are matched by their standard structure
    (:func:`m4oe.terminology.organ_keys` on the model's first task; the data set's ``terminology``
    block, else its label names, for the labels), so the two may number their structures
    differently. Structures of the data set the model does not know are left out.

    Returns:
        {"modality", "cases": {case: {"mean_dice", "dice": {structure key: Dice}}},
        "mean_dice": mean over cases}.

    Raises:
        InputError: the data set shares no structure with the model (with both lists), or a case's
            label map holds none of the shared ones.
    """
    import SimpleITK as sitk

    from m4oe.errors import InputError
    from m4oe.evaluate import evaluate
    from m4oe.io import read_image
    from m4oe.terminology import organ_keys
    from m4oe_training.data import DatasetInfo

    info = DatasetInfo.read(dataset)
    model_keys = organ_keys(predictor.card.tasks[0].labels)  # model value -> structure key
    dataset_keys = {
        value: info.terminology.get(name) or name for name, value in info.labels.items() if value != 0
    }
    key_to_ref = {key: value for value, key in dataset_keys.items()}
    label_map = {value: key_to_ref[key] for value, key in model_keys.items() if key in key_to_ref}
    if not label_map:
        raise InputError(
            f"data set shares no structure with model {predictor.card.name!r} "
            f"(data set: {', '.join(sorted(dataset_keys.values()))}; "
            f"model: {', '.join(sorted(model_keys.values()))})",
            dataset,
        )
    names = {ref: dataset_keys[ref] for ref in label_map.values()}
    cases = {}
    for case in info.cases:
        image = read_image(info.image_path(case)).image
        reference = sitk.ReadImage(str(info.label_path(case)))
        prediction = predictor.predict(image, modality=info.modality, body_crop=True)  # as the CLI
        result = evaluate(prediction.labelmap, reference, label_map=label_map, names=names)
        if result["mean_dice"] is None:
            raise InputError("label map holds none of the structures the model knows", info.label_path(case))
        cases[case] = {
            "mean_dice": round(float(result["mean_dice"]), 4),
            "dice": {row["name"]: round(float(row["dice"]), 4) for row in result["labels"]},
        }
    mean = sum(c["mean_dice"] for c in cases.values()) / len(cases)
    return {"modality": info.modality, "cases": cases, "mean_dice": round(mean, 4)}


def measure_model(model: str, corrected: list[Path], real: Path | None, phantoms: int, threads: int) -> dict:
    """Every figure of one model: {"corrected": {name: score_corrected}, "real": {scan: mean Dice},
    "phantoms": {sequence: mean Dice}}; "real" is None without the real data, "phantoms" is None
    with ``phantoms`` 0."""
    from m4oe.hub import resolve_model
    from m4oe.predictor import Predictor

    folder = resolve_model(model)
    predictor = Predictor.from_pretrained(folder, device="cpu", threads=threads, backend="torch")
    figures = {"model": predictor.card.name, "folder": str(folder)}
    figures["corrected"] = {str(path): score_corrected(predictor, path) for path in corrected}
    if real is not None:
        from m4oe_training.realval import benchmark

        figures["real"] = {name: entry["mean_dice"] for name, entry in benchmark(predictor, real).items()}
    else:
        figures["real"] = None
    if phantoms > 0:
        from phantom_accuracy import SEQUENCES, measure

        result = measure(str(folder), phantoms, 20261201, 128, threads)
        figures["phantoms"] = {sequence: result[sequence]["mean_dice"] for sequence in SEQUENCES}
    else:
        figures["phantoms"] = None
    return figures


def compare(before: dict, after: dict, tolerance: float) -> dict:
    """Rows (figure, before, after, change) and the verdict.

    The corrected cases must gain (mean Dice after > before, per data set); every held-out figure
    (each real scan, each phantom sequence) may fall by at most ``tolerance``.

    Returns:
        {"rows": [{"figure", "kind" ("corrected" or "held-out"), "before", "after", "change"}],
        "improved": bool, "kept": bool, "worst_held_out_change": float or None, "passed": bool}.
    """
    rows = []
    for name, entry in before["corrected"].items():
        rows.append(
            ("corrected", f"corrected {name}", entry["mean_dice"], after["corrected"][name]["mean_dice"])
        )
    for group, label in (("real", "real scan"), ("phantoms", "phantoms")):
        if before[group] is not None:
            for name, value in before[group].items():
                rows.append(("held-out", f"{label} {name}", value, after[group][name]))
    table = [
        {"figure": figure, "kind": kind, "before": b, "after": a, "change": round(a - b, 4)}
        for kind, figure, b, a in rows
    ]
    improved = all(row["change"] > 0 for row in table if row["kind"] == "corrected")
    held_out = [row["change"] for row in table if row["kind"] == "held-out"]
    worst = min(held_out) if held_out else None
    kept = worst is None or worst >= -tolerance
    return {
        "rows": table,
        "improved": improved,
        "kept": kept,
        "worst_held_out_change": worst,
        "passed": improved and kept,
    }


def format_report(result: dict, tolerance: float) -> str:
    lines = [f"{'figure (mean Dice)':<44} {'before':>7} {'after':>7} {'change':>7}"]
    for row in result["rows"]:
        lines.append(f"{row['figure']:<44} {row['before']:>7.3f} {row['after']:>7.3f} {row['change']:>+7.3f}")
    worst = result["worst_held_out_change"]
    lines.append(f"corrected cases improved: {'yes' if result['improved'] else 'NO'}")
    if worst is None:
        lines.append("held-out figures: none measured (no real data, --phantoms 0)")
    else:
        lines.append(
            f"held-out figures kept (worst change {worst:+.3f}, allowed -{tolerance}): "
            f"{'yes' if result['kept'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", default="m4oe-phantom", help="the model fine-tuned from (name or folder)")
    p.add_argument("--after", required=True, help="the fine-tuned model (name or folder)")
    p.add_argument(
        "--corrected",
        type=Path,
        action="append",
        required=True,
        help="nnU-Net data set of corrected cases (repeatable)",
    )
    p.add_argument("--real", type=Path, default=DEFAULT_REAL, help=f"real scans (default {DEFAULT_REAL})")
    p.add_argument("--phantoms", type=int, default=24, help="fresh phantoms per sequence; 0 leaves them out")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest allowed held-out Dice fall")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("--check", action="store_true", help="exit with code 1 when the verdict fails")
    args = p.parse_args(argv)
    if args.phantoms < 0 or args.tolerance < 0:
        p.error("--phantoms and --tolerance must not be negative")

    from m4oe.errors import M4oEError

    real = args.real if args.real.is_dir() else None
    if real is None:
        print(f"note: {args.real}: real validation data not found; real scans left out", file=sys.stderr)
    start = time.perf_counter()
    try:
        before = measure_model(args.before, args.corrected, real, args.phantoms, args.threads)
        after = measure_model(args.after, args.corrected, real, args.phantoms, args.threads)
    except M4oEError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = compare(before, after, args.tolerance)
    print(format_report(result, args.tolerance))
    print(f"{time.perf_counter() - start:.0f} s")
    if args.json is not None:
        payload = {"before": before, "after": after, **result, "tolerance": args.tolerance}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 1 if args.check and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
