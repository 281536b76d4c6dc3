"""The scan check (m4oe.ood) measured: no warning on abdominal scans, a warning on everything else.

Builds three groups of inputs and segments each with the model (``Predictor.predict`` with gate
statistics), then prints, per input, the statistics the check reads, two it does not (the
network's mean highest class probability in the voxels it labelled, and the gate's routing
confidence), and whether a warning came:

- abdominal (a warning here is a false alarm): the real scans ``example_ct`` (abdomen and
  pelvis), ``example_ct_sm`` (upper abdomen), the DICOM series ``example_ct_dicom`` (40 mm of upper
  abdomen), ``example_mr_sm`` (MRI), and fresh phantoms of each sequence (``--phantoms`` per
  sequence, generator seeds from 20261201 as ``benchmarks/phantom_accuracy.py``, ``--max-size``);
- not abdominal (a warning is a hit): crops of ``example_ct`` outside the upper abdomen (its
  lowest 20 and 40 slices, the pelvis; slices 31-60, below the kidneys), Gaussian noise (CT range,
  soft tissue, MR range), a nearly constant volume, a constant one (refused with an error before
  the network runs: counted as a hit), and a head phantom built here (:func:`head_phantom`, CT and
  MR);
- mis-oriented abdomen (a warning is a hit): ``example_ct`` with its array flipped left-right, or
  head-feet, under the same header, and its sagittal planes stored as axial slices.

The shared volumes reach no thorax (their top slices hold the liver dome), so there is no thorax
input. Run: ``python benchmarks/ood.py [--data DIR] [--phantoms 8] [--max-size 128] [--tta 1]
[--threads 1] [--json]``. Exit code 2 when the data folder is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "totalsegmentator"
PHANTOM_SEED = 20261201
GROUPS = ("abdominal", "not abdominal", "mis-oriented")


def volume(array: np.ndarray, spacing_mm: float = 3.0) -> sitk.Image:
    """A float32 image of a (Z, Y, X) array: identity direction (so the array is the axial stack:
    slices inferior -> superior, rows anterior -> posterior, columns patient right -> left),
    isotropic ``spacing_mm``, origin 0."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((spacing_mm,) * 3)
    return image


def head_phantom(modality: str, seed: int = 0) -> sitk.Image:
    """A head-like volume: scalp, skull and brain ellipsoids with a ventricle, 2 mm voxels.

    100 x 110 x 90 voxels (x, y, z; 200 x 220 x 180 mm), identity direction. The head is an
    ellipsoid of semi-axes 72 (left-right), 92 (front-back) and 85 mm (head-feet): scalp in the
    outer 4 %, skull in the next 6 %, brain inside, a ventricle box in the middle. ``modality``:
    ``"ct"`` (HU: air -1000, scalp 40, bone 900, brain 35, ventricle 8; noise sd 8) or ``"mr"``
    (T1-like, arbitrary units: air 0, scalp fat 600, bone 30, brain 380, deep grey 450, ventricle
    80; noise sd 10, clipped at 0).
    """
    if modality not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', got {modality!r}")
    sp = 2.0
    shape = (90, 110, 100)  # (Z, Y, X)
    z, y, x = np.meshgrid(*((np.arange(n) - n / 2) * sp for n in shape), indexing="ij")
    r = np.sqrt((x / 72) ** 2 + (y / 92) ** 2 + (z / 85) ** 2)
    ventricle = (np.abs(x) < 8) & (np.abs(y) < 20) & (np.abs(z) < 15)
    rng = np.random.default_rng(seed)
    if modality == "ct":
        a = np.full(shape, -1000.0)
        a[r < 1] = 40
        a[r < 0.96] = 900
        a[r < 0.9] = 35
        a[ventricle] = 8
        a += rng.normal(0, 8, shape)
    else:
        a = np.zeros(shape)
        a[r < 1] = 600
        a[r < 0.96] = 30
        a[r < 0.9] = 380
        a[r < 0.6] = 450
        a[ventricle] = 80
        a = np.clip(a + rng.normal(0, 10, shape), 0, None)
    return volume(a, sp)


def inputs(data: Path, phantoms: int, max_size: int) -> list[tuple[str, str, Callable]]:
    """``(name, group, build)`` per input; ``build()`` returns ``(image, dicom_modality or None)``."""
    from m4oe.io import read_image
    from m4oe.phantom import generate_case

    def read(name: str):
        def build():
            loaded = read_image(data / name)
            return loaded.image, loaded.dicom_modality

        return build

    def ct_crop(first: int, stop: int):
        return lambda: (sitk.ReadImage(str(data / "example_ct.nii.gz"))[:, :, first:stop], None)

    def ct_changed(change: Callable[[np.ndarray], np.ndarray], same_header: bool = True):
        def build():
            ct = sitk.ReadImage(str(data / "example_ct.nii.gz"))
            array = change(sitk.GetArrayFromImage(ct))
            if not same_header:
                return volume(array), None
            image = sitk.GetImageFromArray(np.ascontiguousarray(array))
            image.CopyInformation(ct)
            return image, None

        return build

    def noise(mean: float, sd: float, absolute: bool = False):
        def build():
            a = np.random.default_rng(0).normal(mean, sd, (30, 120, 120))
            return volume(np.abs(a) if absolute else a), None

        return build

    def phantom(sequence: str, seed: int):
        return lambda: (generate_case(sequence, seed, max_size=max_size)[0], None)

    rows = [
        ("example_ct (abdomen and pelvis)", "abdominal", read("example_ct.nii.gz")),
        ("example_ct_sm (upper abdomen)", "abdominal", read("example_ct_sm.nii.gz")),
        ("example_ct_dicom (DICOM, 40 mm)", "abdominal", read("example_ct_dicom")),
        ("example_mr_sm (MRI)", "abdominal", read("example_mr_sm.nii.gz")),
    ]
    for sequence in ("ct", "t1", "t2"):
        for k in range(phantoms):
            seed = PHANTOM_SEED + k
            rows.append((f"phantom {sequence} {seed}", "abdominal", phantom(sequence, seed)))
    rows += [
        ("pelvis: example_ct slices 0-19", "not abdominal", ct_crop(0, 20)),
        ("pelvis: example_ct slices 0-39", "not abdominal", ct_crop(0, 40)),
        ("below the kidneys: slices 31-60", "not abdominal", ct_crop(31, 61)),
        ("noise, CT range (0 +- 200 HU)", "not abdominal", noise(0, 200)),
        ("noise, soft tissue (40 +- 30 HU)", "not abdominal", noise(40, 30)),
        ("noise, MR range (abs(300 +- 150))", "not abdominal", noise(300, 150, absolute=True)),
        ("nearly constant (0 +- 1)", "not abdominal", noise(0, 1)),
        ("constant (0)", "not abdominal", lambda: (volume(np.zeros((30, 120, 120))), None)),
        ("head phantom, CT", "not abdominal", lambda: (head_phantom("ct"), None)),
        ("head phantom, MR", "not abdominal", lambda: (head_phantom("mr"), None)),
        ("example_ct flipped left-right", "mis-oriented", ct_changed(lambda a: a[:, :, ::-1])),
        ("example_ct flipped head-feet", "mis-oriented", ct_changed(lambda a: a[::-1])),
        (
            "example_ct sagittal planes as axial",
            "mis-oriented",
            # (Z, Y, X) of the RAS-stored file -> x slices of (y, z) planes, under an identity header.
            ct_changed(lambda a: np.transpose(a[:, ::-1, ::-1], (2, 1, 0)), same_header=False),
        ),
    ]
    return rows


def measure(predictor, name: str, group: str, build: Callable, tta: int | None) -> dict:
    """Segment one input; its statistics, diagnostics, warning and time."""
    from m4oe.errors import InputError

    image, dicom_modality = build()
    row = {"input": name, "group": group}
    start = time.perf_counter()
    try:
        prediction = predictor.predict(
            image,
            dicom_modality=dicom_modality,
            gates=predictor.model.cfg.is_moe,
            probabilities="uint8",
            test_time_passes=tta,
            body_crop=False,  # the whole field of view, as the figures in benchmarks/README.md
        )
    except InputError as error:
        return dict(row, refused=str(error), warning=True, seconds=round(time.perf_counter() - start, 2))
    labels = sitk.GetArrayViewFromImage(prediction.labelmap)
    top = sitk.GetArrayViewFromImage(prediction.probabilities).max(axis=-1)
    labelled = labels > 0
    summary = prediction.gate_summary or {}
    check = prediction.scan_check
    return dict(
        row,
        modality=prediction.modality.modality,
        statistics=None if check is None else check.statistics,
        reasons=[] if check is None else list(check.reasons),
        warning=bool(check is not None and check.warning),
        top_class_probability=round(float(top[labelled].mean()) / 255, 3) if labelled.any() else None,
        routing_confidence=summary.get("overall", {}).get("routing_confidence"),
        seconds=round(time.perf_counter() - start, 2),
    )


def format_table(rows: list[dict]) -> str:
    """The rows as a Markdown table, then the false-alarm and hit rates per group."""

    def figure(value, digits=0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| input | modality | largest solid organ mL | vertebrae mL | liver right of spine mm | "
        "liver above kidneys mm | spleen / liver | top-class probability | routing confidence | warning |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['input']} | - | - | - | - | - | - | - | - | refused: {r['refused']} |")
            continue
        s = r["statistics"] or {}
        reasons = "; ".join(r["reasons"])
        lines.append(
            f"| {r['input']} | {r['modality']} | {figure(s.get('largest_solid_organ_ml'))} | "
            f"{figure(s.get('vertebrae_ml'))} | {figure(s.get('liver_right_of_spine_mm'))} | "
            f"{figure(s.get('liver_above_kidneys_mm'))} | {figure(s.get('spleen_to_liver_volume'), 2)} | "
            f"{figure(r['top_class_probability'], 3)} | {figure(r['routing_confidence'], 3)} | "
            f"{'yes: ' + reasons if r['warning'] else 'no'} |"
        )
    lines.append("")
    for group, (hits, total) in rates(rows).items():
        what = "false alarms" if group == "abdominal" else "warned"
        lines.append(f"{group}: {what} {hits}/{total}")
    return "\n".join(lines)


def rates(rows: list[dict]) -> dict[str, tuple[int, int]]:
    """Per group: (inputs warned about or refused, inputs)."""
    members = {group: [r for r in rows if r["group"] == group] for group in GROUPS}
    return {group: (sum(r["warning"] for r in found), len(found)) for group, found in members.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model name or folder (default: the embedded model)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"shared volumes (default {DEFAULT_DATA})")
    p.add_argument("--phantoms", type=int, default=8, help="fresh phantoms per sequence (default 8)")
    p.add_argument("--max-size", type=int, default=128, help="phantom voxels along any axis (default 128)")
    p.add_argument("--tta", type=int, default=1, help="test-time passes (default 1; 0: the card's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the rows and rates as JSON")
    args = p.parse_args(argv)

    from m4oe.predictor import Predictor

    if not args.data.is_dir():
        print(f"error: {args.data}: data folder not found", file=sys.stderr)
        return 2
    predictor = Predictor.from_pretrained(args.model, device=args.device, threads=args.threads)
    rows = [
        measure(predictor, name, group, build, args.tta or None)
        for name, group, build in inputs(args.data, args.phantoms, args.max_size)
    ]
    if args.json:
        result = {"model": predictor.card.name, "tta": args.tta or "card", "rows": rows, "rates": rates(rows)}
        print(json.dumps(result, indent=1))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
