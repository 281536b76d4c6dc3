"""Overlap and surface-distance scores of a predicted label map against a reference.

Per label: Dice, the 95th-percentile symmetric Hausdorff distance (HD95) in millimetres, and the
voxel counts and volumes of both masks; then the means over labels. The scores are MONAI's
(``compute_dice``, ``compute_hausdorff_distance``), given the voxel spacing in the array's (z, y, x)
order so that distances are physical.

Conventions:
- A label absent from both images gets Dice and HD95 ``None`` and is left out of the means.
- A label present in only one gets Dice 0 and HD95 ``None`` (infinite): it counts in the mean
  Dice but cannot count in the mean HD95, which is over labels present in both; the number of
  such labels is reported beside it.
- ``label_map`` renumbers the prediction into the reference's numbering; prediction labels it
  does not list are ignored (set to background). Several prediction labels may map to one
  reference label (their union is scored).
- When the two grids differ (size, spacing, origin or direction beyond a small tolerance) but
  overlap in space, the reference is resampled onto the prediction grid with nearest-neighbour
  interpolation, and the result says so. Volumes are measured on the prediction grid.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage

from m4oe.errors import InputError
from m4oe.evaluate_released import released_scores

SPACING_TOLERANCE = 1e-3
"""Relative tolerance on spacing, and on origin as a fraction of the smallest spacing."""
DIRECTION_TOLERANCE = 1e-4
PROTOCOLS = ("native", "released")
MAX_LABEL = 1 << 20
"""Largest label value accepted: per-label counts are kept in an array of that length."""


def evaluate(
    pred: sitk.Image,
    ref: sitk.Image,
    labels: Sequence[int] | None = None,
    label_map: dict[int, int] | None = None,
    pred_path: str | Path | None = None,
    ref_path: str | Path | None = None,
    names: dict[int, str] | None = None,
    protocol: str = "native",
    test_spacing_mm: Sequence[float] | None = None,
) -> dict:
    """Score a predicted label map against a reference label map.

    Args:
        pred: predicted label map (integer voxels; a float image holding whole numbers is accepted).
        ref: reference label map, in physical space (LPS, mm) overlapping ``pred``.
        labels: reference label values to score. Default: with ``label_map``, the nonzero
            reference values it maps to (the labels the model predicts); without, every nonzero
            value in either image.
        label_map: prediction value -> reference value, when the two are numbered differently.
        names: reference label value -> structure name, copied into each row (``name``, else None).
        pred_path, ref_path: file names, used in messages and copied into the result.
        protocol: "native" (the scores below) or "released": also the scores as the released M4oE
            code computes them (:mod:`m4oe.evaluate_released`), in the block ``released``. Give it
            every label of the task (``labels``): the released means count labels absent from both.
        test_spacing_mm: (x, y, z) spacing in mm of the released protocol's test grid; None scores
            it on the prediction grid.

    Returns:
        A JSON-ready dict: ``labels`` (a list, one dict per label with ``label``, ``name``, ``dice``,
        ``hd95_mm``, ``pred_voxels``, ``ref_voxels``, ``pred_ml``, ``ref_ml``, ``status``),
        ``mean_dice``, ``mean_hd95_mm``, ``labels_missing_in_one`` (count), ``resampled``,
        ``notes`` (list of lines), ``spacing_mm`` (x, y, z), ``label_map``, ``prediction``,
        ``reference``, ``protocol``; with protocol "released" also ``released`` (see
        :func:`m4oe.evaluate_released.released_scores`).

    Raises:
        InputError: an image is not a label map, the images do not overlap, a label is invalid.
    """
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown evaluation protocol {protocol!r}; expected one of {PROTOCOLS}")
    pred_name = str(pred_path) if pred_path is not None else "prediction"
    ref_name = str(ref_path) if ref_path is not None else "reference"
    _check_label_image(pred, pred_name)
    _check_label_image(ref, ref_name)
    if label_map is not None:
        label_map = _check_label_map(label_map, "label_map")
    if labels is not None:
        labels = [_label_value(value, "labels") for value in labels]
    elif label_map is not None:
        labels = sorted(set(label_map.values()) - {0})
    if pred.GetDimension() != ref.GetDimension():
        raise InputError(
            f"is {ref.GetDimension()}D but the prediction {pred_name} is {pred.GetDimension()}D", ref_name
        )

    notes = []
    resampled = False
    mismatch = geometry_mismatch(pred, ref)
    if mismatch:
        if not _physical_overlap(pred, ref):
            raise InputError(f"does not overlap the prediction {pred_name} in space ({mismatch})", ref_name)
        ref = sitk.Resample(ref, pred, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, ref.GetPixelID())
        resampled = True
        notes.append(f"reference resampled onto the prediction grid (nearest neighbour): {mismatch}")

    pred_array = _label_array(pred, pred_name)
    ref_array = _label_array(ref, ref_name)
    if label_map is not None:
        pred_array, ignored = _apply_label_map(pred_array, label_map)
        if ignored:
            notes.append(f"prediction labels not in the label map, ignored: {ignored}")

    pred_counts = np.bincount(pred_array.reshape(-1))
    ref_counts = np.bincount(ref_array.reshape(-1))
    if labels is None:
        present = set(np.flatnonzero(pred_counts).tolist()) | set(np.flatnonzero(ref_counts).tolist())
        labels = sorted(present - {0})

    spacing_xyz = pred.GetSpacing()
    spacing_zyx = tuple(reversed(spacing_xyz))
    voxel_ml = math.prod(spacing_xyz) / 1000.0
    pred_boxes = ndimage.find_objects(pred_array)
    ref_boxes = ndimage.find_objects(ref_array)

    rows = []
    for label in labels:
        n_pred = int(pred_counts[label]) if label < len(pred_counts) else 0
        n_ref = int(ref_counts[label]) if label < len(ref_counts) else 0
        row = {
            "label": label,
            "name": (names or {}).get(label),
            "dice": None,
            "hd95_mm": None,
            "pred_voxels": n_pred,
            "ref_voxels": n_ref,
            "pred_ml": n_pred * voxel_ml,
            "ref_ml": n_ref * voxel_ml,
        }
        if n_pred and n_ref:
            box = _union_box(pred_boxes[label - 1], ref_boxes[label - 1], pred_array.shape)
            row["dice"], row["hd95_mm"] = _scores(
                pred_array[box] == label, ref_array[box] == label, spacing_zyx
            )
            row["status"] = "ok"
        elif n_pred or n_ref:
            row["dice"] = 0.0
            row["status"] = "missing in prediction" if n_ref else "absent from reference"
        else:
            row["status"] = "absent in both"
        rows.append(row)

    dices = [row["dice"] for row in rows if row["dice"] is not None]
    distances = [row["hd95_mm"] for row in rows if row["hd95_mm"] is not None]
    result = {
        "prediction": None if pred_path is None else str(pred_path),
        "reference": None if ref_path is None else str(ref_path),
        "labels": rows,
        "mean_dice": float(np.mean(dices)) if dices else None,
        "mean_hd95_mm": float(np.mean(distances)) if distances else None,
        "labels_missing_in_one": sum(
            row["status"] in ("missing in prediction", "absent from reference") for row in rows
        ),
        "resampled": resampled,
        "notes": notes,
        "spacing_mm": list(spacing_xyz),
        "label_map": None if label_map is None else {str(k): v for k, v in label_map.items()},
        "protocol": protocol,
    }
    if protocol == "released":
        if test_spacing_mm is not None and len(test_spacing_mm) != pred.GetDimension():
            raise InputError(
                f"the test spacing needs {pred.GetDimension()} values (x, y, z mm), "
                f"got {list(test_spacing_mm)}"
            )
        result["released"] = released_scores(
            pred_array,
            ref_array,
            spacing_zyx,
            labels,
            None if test_spacing_mm is None else tuple(reversed(test_spacing_mm)),
            names,
        )
    return result


def format_table(result: dict) -> str:
    """The result of :func:`evaluate` as a fixed-width text table for the command line."""

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    width = max([len(row.get("name") or "") for row in result["labels"]] + [4])
    lines = [
        f"{'label':>6}  {'name':<{width}}  {'dice':>6}  {'HD95 mm':>8}  {'pred ml':>9}  {'ref ml':>9}  status"
    ]
    for row in result["labels"]:
        lines.append(
            f"{row['label']:>6}  {row.get('name') or '-':<{width}}  {number(row['dice'], 4):>6}  "
            f"{number(row['hd95_mm'], 2):>8}  {row['pred_ml']:>9.2f}  {row['ref_ml']:>9.2f}  {row['status']}"
        )
    missing = result["labels_missing_in_one"]
    lines.append(
        f"{'mean':>6}  {'':<{width}}  {number(result['mean_dice'], 4):>6}  "
        f"{number(result['mean_hd95_mm'], 2):>8}"
        + (f"  (HD95 over labels in both; {missing} label(s) in one image only)" if missing else "")
    )
    lines.extend(f"note: {note}" for note in result["notes"])
    if "released" in result:
        lines += ["", format_protocols(result)]
    return "\n".join(lines)


def format_protocols(result: dict) -> str:
    """The native and released scores of :func:`evaluate` (protocol "released") side by side."""

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    released = result["released"]
    by_label = {row["label"]: row for row in result["labels"]}
    width = max([len(row.get("name") or "") for row in released["labels"]] + [4])
    head = f"{'':>6}  {'':<{width}}  {'Dice':^17}  {'HD95':^21}"
    lines = [
        "native (this grid, mm) beside released (M4oE test protocol, voxels):",
        head,
        f"{'label':>6}  {'name':<{width}}  {'native':>8} {'released':>8}  "
        f"{'native mm':>10} {'rel. vox':>10}  case",
    ]
    for row in released["labels"]:
        native = by_label.get(row["label"], {})
        lines.append(
            f"{row['label']:>6}  {row.get('name') or '-':<{width}}  {number(native.get('dice'), 4):>8} "
            f"{number(row['dice'], 4):>8}  {number(native.get('hd95_mm'), 2):>10} "
            f"{number(row['hd95_voxels'], 2):>10}  {row['case']}"
        )
    lines.append(
        f"{'mean':>6}  {'':<{width}}  {number(result['mean_dice'], 4):>8} "
        f"{number(released['mean_dice'], 4):>8}  "
        f"{number(result['mean_hd95_mm'], 2):>10} {number(released['mean_hd95_voxels'], 2):>10}"
    )
    grid = "x".join(f"{s:.3g}" for s in released["test_spacing_mm"])
    lines.append(
        f"released test grid: {grid} mm"
        + (" (resampled as nnU-Net v1 does)" if released["resampled"] else " (the prediction grid)")
    )
    lines.extend(f"released convention: {text}" for text in released["conventions"])
    return "\n".join(lines)


def load_label_map(path: str | Path) -> dict[int, int]:
    """Read a prediction -> reference label renumbering.

    Formats, by suffix:
    - ``.json``: an object ``{"5": 6, "1": 1}`` mapping prediction values (string keys) to
      reference values;
    - ``.csv``: two columns ``pred_value,ref_value``, one pair a row; an optional header row,
      blank rows and rows starting with ``#`` are skipped.

    Prediction values must be positive integers listed once; reference values non-negative
    integers (0 drops the label). Errors name the file and the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("label map file not found", path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InputError(f"not valid JSON ({error})", path) from None
        if not isinstance(data, dict):
            raise InputError(
                f"must hold a JSON object {{pred_value: ref_value}}, got {type(data).__name__}", path
            )
        pairs = list(data.items())
    elif suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [row for row in csv.reader(handle) if row and not row[0].lstrip().startswith("#")]
        if rows and not rows[0][0].strip().lstrip("-").isdigit():
            rows = rows[1:]
        pairs = []
        for row in rows:
            if len(row) != 2:
                raise InputError(f"row {row!r} must have two columns pred_value,ref_value", path)
            pairs.append((row[0].strip(), row[1].strip()))
    else:
        raise InputError(f"label map must be a .json or .csv file, not {suffix or 'no suffix'!r}", path)

    mapping = {}
    for key, value in pairs:
        pred_value = _parse_int(key, path, "prediction value")
        if pred_value in mapping:
            raise InputError(f"prediction value {pred_value} is listed twice", path)
        mapping[pred_value] = _parse_int(value, path, "reference value")
    return _check_label_map(mapping, str(path))


def dataset_label_map(reference: str | Path, labels: list) -> tuple[dict[int, int], Path] | None:
    """The prediction -> reference renumbering by structure, read from the reference's data set.

    When ``reference`` lies in the ``labelsTr/`` or ``labelsTs/`` folder of an nnU-Net data set, that
    data set's ``dataset.json`` names its label values (``"labels": {"liver": 1, ...}``, and an
    optional ``"terminology": {"its name": "structure key"}``). A class of ``labels`` (a model task's
    :class:`m4oe.model_card.Label` list) matches a data set label when their names agree as
    structure keys or display names, any case, spaces and underscores alike (``"right kidney"``,
    ``"kidney_right"``). A structure the data set does not label is left out, so it is not scored (a
    partially labelled data set does not count it as background). Region entries (a list of values,
    nnU-Net's region training) are skipped.

    Returns ``(mapping, dataset_json)``, or None when ``reference`` is not in such a folder.

    Raises:
        InputError: naming ``dataset.json``, when it cannot be read, has no ``labels`` object, or
            names none of the structures in ``labels``.
    """
    from m4oe.terminology import labels_by_name, name_key

    folder = Path(reference).parent
    manifest = folder.parent / "dataset.json"
    if folder.name not in ("labelsTr", "labelsTs") or not manifest.is_file():
        return None
    try:
        meta = json.loads(manifest.read_text(encoding="utf-8"))
        entries, terms = meta.get("labels"), dict(meta.get("terminology") or {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as error:
        raise InputError(f"not a readable nnU-Net dataset.json ({error})", manifest) from None
    if not isinstance(entries, dict):
        raise InputError('has no "labels" object naming the reference\'s label values', manifest)

    by_name = labels_by_name(labels)
    mapping = {}
    for name, value in entries.items():
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            for alias in (name, terms.get(name)):
                label = by_name.get(name_key(alias)) if alias else None
                if label is not None:
                    mapping.setdefault(label.value, value)
    if not mapping:
        known = ", ".join(name for name, value in entries.items() if isinstance(value, int) and value > 0)
        raise InputError(
            f"labels none of the structures to score ({', '.join(label.name for label in labels)}); "
            f"its labels: {known or 'none'}; pass --label-map",
            manifest,
        )
    return mapping, manifest


def geometry_mismatch(a: sitk.Image, b: sitk.Image) -> str:
    """How the grids of ``a`` and ``b`` differ ("" when they match within tolerance).

    Size must be equal; spacing within a relative 1e-3; origin within 1e-3 of the smallest spacing
    (mm, LPS); direction cosines within 1e-4.
    """
    problems = []
    if a.GetSize() != b.GetSize():
        problems.append(f"size {a.GetSize()} vs {b.GetSize()}")
    spacing_a, spacing_b = np.array(a.GetSpacing()), np.array(b.GetSpacing())
    if not np.allclose(spacing_a, spacing_b, rtol=SPACING_TOLERANCE, atol=0):
        problems.append(f"spacing {_fmt(spacing_a)} vs {_fmt(spacing_b)} mm")
    origin_tolerance = SPACING_TOLERANCE * min(spacing_a.min(), spacing_b.min())
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=origin_tolerance):
        problems.append(f"origin {_fmt(a.GetOrigin())} vs {_fmt(b.GetOrigin())} mm")
    if not np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=DIRECTION_TOLERANCE):
        problems.append(f"direction {_fmt(a.GetDirection())} vs {_fmt(b.GetDirection())}")
    return "; ".join(problems)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounds (LPS, mm) of the image's voxels, outer voxel edges included."""
    size = image.GetSize()
    corners = []
    for corner in np.ndindex(*(2,) * image.GetDimension()):
        index = [-0.5 if bit == 0 else n - 0.5 for bit, n in zip(corner, size, strict=True)]
        corners.append(image.TransformContinuousIndexToPhysicalPoint(index))
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def _physical_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    low_a, high_a = _physical_box(a)
    low_b, high_b = _physical_box(b)
    return bool(np.all(np.maximum(low_a, low_b) < np.minimum(high_a, high_b)))


def _check_label_image(image, name: str) -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"expected a SimpleITK image, got {type(image).__name__}", name)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"is not a label map: {image.GetNumberOfComponentsPerPixel()} components per voxel", name
        )
    if image.GetDimension() not in (2, 3):
        raise InputError(f"must be a 2D or 3D image, got {image.GetDimension()}D", name)


def _label_array(image: sitk.Image, name: str) -> np.ndarray:
    """The label values as a non-negative integer array, (z, y, x) for 3D.

    Float images holding whole numbers (as image readers that convert to float32 give) become
    int32; integer images keep their type, unless 64-bit.
    """
    array = sitk.GetArrayFromImage(image)
    if array.dtype.kind not in "iuf":
        raise InputError(f"is not a label map: voxel type {array.dtype}", name)
    if array.dtype.kind == "f" and (
        not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array))
    ):
        raise InputError("is not a label map: it holds non-integer values", name)
    if array.size and array.min() < 0:
        raise InputError(f"holds a negative label value {array.min():g}", name)
    if array.size and array.max() > MAX_LABEL:
        raise InputError(f"holds label value {array.max():g}, above the supported {MAX_LABEL}", name)
    if array.dtype.kind == "f" or array.dtype.itemsize == 8:
        array = array.astype(np.int32)
    return array


def _apply_label_map(array: np.ndarray, label_map: dict[int, int]) -> tuple[np.ndarray, list[int]]:
    """Renumber ``array`` through ``label_map``; unlisted values become 0. Returns (array, unlisted)."""
    present = np.flatnonzero(np.bincount(array.reshape(-1)))
    lookup = np.zeros(int(present.max()) + 1, dtype=np.int32)
    for pred_value, ref_value in label_map.items():
        if pred_value < lookup.size:
            lookup[pred_value] = ref_value
    ignored = [int(v) for v in present if v != 0 and v not in label_map]
    return lookup[array], ignored


def _check_label_map(label_map, name: str) -> dict[int, int]:
    if not isinstance(label_map, dict):
        raise InputError(
            f"label map must be a dict {{pred_value: ref_value}}, got {type(label_map).__name__}", name
        )
    checked = {}
    for pred_value, ref_value in label_map.items():
        key = _label_value(pred_value, name)
        if isinstance(ref_value, bool) or not isinstance(ref_value, (int, np.integer)) or ref_value < 0:
            raise InputError(
                f"reference value {ref_value!r} for label {key} is not a non-negative integer", name
            )
        checked[key] = int(ref_value)
    return checked


def _label_value(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"label {value!r} is not a positive integer", name)
    return int(value)


def _parse_int(text, path: Path, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and text.strip().lstrip("-").isdigit():
        return int(text)
    raise InputError(f"{what} {text!r} is not an integer", path)


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The bounding box of two boxes, grown by one voxel so that mask edges stay inside it."""
    return tuple(
        slice(max(min(sa.start, sb.start) - 1, 0), min(max(sa.stop, sb.stop) + 1, n))
        for sa, sb, n in zip(a, b, shape, strict=True)
    )


def _scores(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """(Dice, HD95 in mm) of two non-empty boolean masks; ``spacing`` in the masks' axis order."""
    y_pred = torch.from_numpy(pred_mask[None, None])
    y = torch.from_numpy(ref_mask[None, None])
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument on every call.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=list(spacing)
        )
    return float(dice.item()), float(hd95.item())


def segment_names(path: str | Path) -> dict[int, str]:
    """Label value -> segment name of a 3D Slicer segmentation file (``.seg.nrrd``); {} otherwise.

    Reads the header only (slicerio). Segments of other layers than the first are skipped, since
    a label value is only unique within one layer.
    """
    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        return {}
    import slicerio

    try:
        info = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception as error:  # slicerio raises plain exceptions for malformed headers
        raise InputError(f"cannot read segment names ({error})", path) from None
    return {
        int(segment["labelValue"]): str(segment["name"])
        for segment in info.get("segments", [])
        if segment.get("layer", 0) == 0 and "labelValue" in segment and segment.get("name")
    }
