"""A reviewed case saved as a new training case of an nnU-Net v2 dataset.

After the radiologist corrects the masks, the volume and the corrected label map become one case
of a dataset the training subpackage reads (``m4oe_training.data.DatasetInfo``)::

    DATASET/imagesTr/{case}_0000.nii.gz   the volume, voxels and geometry unchanged (LPS, mm)
    DATASET/labelsTr/{case}.nii.gz        the label map on the same grid, uint8 (uint16 if needed)
    DATASET/dataset.json                  nnU-Net v2 keys: channel_names {"0": "CT" | "MRI"},
                                          labels {"background": 0, name: value}, numTraining,
                                          file_ending; ours: modality ("ct" | "mr"), terminology
                                          {label name: key of m4oe.terminology.TERMS or null}

Label names in the dataset are the keys of :data:`m4oe.terminology.TERMS` that the labels' SNOMED
CT codes (type and modifier) identify ("right kidney" -> ``kidney_right``), the names the phantoms,
the converters and the training configs use, so an exported case's label table is the model's own
and ``m4oe train`` puts each organ on the output channel its model gave it. A label without a
standard code keeps its name with spaces replaced by underscores. The ``terminology`` block ties
each name to its key (null for none), so a model trained on the dataset carries the same codes.
The first export creates the dataset; later ones add cases, and a dataset whose modality or labels
differ is refused. Every file is written atomically (temporary name, then rename); a failed export
removes what it wrote.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import InputError, OutputError
from m4oe.io import WRITE_EXTENSIONS, same_geometry, write_atomic, write_image
from m4oe.labels import Label
from m4oe.terminology import TERMS

CHANNEL_NAMES = {"ct": "CT", "mr": "MRI"}
FILE_ENDING = ".nii.gz"
CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def dataset_label_name(label: Label) -> str:
    """The label's name as a dataset.json key: its :data:`m4oe.terminology.TERMS` key (found from
    its codes, :func:`terminology_key`), else its name with spaces replaced by underscores."""
    return terminology_key(label) or "_".join(label.name.split())


def terminology_key(label: Label) -> str | None:
    """The key of :data:`m4oe.terminology.TERMS` with the label's type code and modifier, or None."""
    modifier = label.modifier.value if label.modifier else None
    for key, term in TERMS.items():
        term_modifier = term.modifier.value if term.modifier else None
        if term.type.value == label.type.value and term_modifier == modifier:
            return key
    return None


def dataset_labels(labels: Sequence[Label]) -> dict[str, int]:
    """The ``labels`` block of dataset.json: background 0, then each label's name and value.

    Raises ValueError unless the values are 1..K without gaps (nnU-Net's rule) and the names,
    as keys, are distinct.
    """
    values = sorted(label.value for label in labels)
    if values != list(range(1, len(labels) + 1)):
        raise ValueError(f"label values must be 1..{len(labels)} without gaps for nnU-Net, got {values}")
    block = {"background": 0}
    for label in sorted(labels, key=lambda lab: lab.value):
        name = dataset_label_name(label)
        if name in block:
            raise ValueError(f"label name {name!r} appears twice")
        block[name] = label.value
    return block


def export_case(
    volume: sitk.Image,
    labelmap: sitk.Image,
    labels: Sequence[Label],
    dataset_dir: str | Path,
    *,
    modality: str,
    case_name: str | None = None,
) -> str:
    """Save a volume and its (corrected) label map as a new case of a training dataset.

    Args:
        volume: 3D scalar image (x, y, z), geometry in LPS (mm); CT in HU. Written unchanged.
        labelmap: 3D integer image on the volume's exact grid (size; spacing, origin, direction
            within 1e-5), 0 = background, other values = ``Label.value``.
        labels: every label of the task (values 1..K).
        dataset_dir: the dataset folder, created when missing.
        modality: "ct" or "mr", the dataset's modality.
        case_name: the case's name; default ``{dataset folder name}_{NNN}`` with NNN one more than
            the largest number already used that way (001 for the first case).
    Returns:
        The case name.

    Raises InputError (a ValueError) naming the file: an existing dataset.json that is unreadable
    or whose modality, channel, labels or terminology differ from this case's; ValueError for
    images that do not match or values no label describes; OutputError when the case exists or a
    file cannot be written.
    """
    if modality not in CHANNEL_NAMES:
        raise ValueError(f"modality must be one of {sorted(CHANNEL_NAMES)}, got {modality!r}")
    label_block = dataset_labels(labels)
    terminology = {dataset_label_name(label): terminology_key(label) for label in labels}
    labelmap = _checked_labelmap(volume, labelmap, labels)
    root = Path(dataset_dir)
    meta_path = root / "dataset.json"
    meta = _read_meta(meta_path) if meta_path.exists() else None
    if meta is None:
        ending = FILE_ENDING
        meta = {
            "name": root.name,
            "description": "cases reviewed and corrected in 3D Slicer (M4oE Segmentation)",
            "channel_names": {"0": CHANNEL_NAMES[modality]},
            "labels": label_block,
            "numTraining": 0,
            "file_ending": ending,
            "modality": modality,
            "terminology": terminology,
        }
    else:
        ending = _check_meta(meta, meta_path, modality, label_block, terminology)
        meta["terminology"] = {**terminology, **(meta.get("terminology") or {})}
        meta.setdefault("modality", modality)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    for folder in (images_dir, labels_dir):
        folder.mkdir(parents=True, exist_ok=True)
    case = case_name if case_name is not None else _next_case_name(root, labels_dir, ending)
    if not CASE_NAME.fullmatch(case):
        raise ValueError(
            f"case name {case!r} must be letters, digits, '_', '-' or '.', starting alphanumeric"
        )
    image_path = images_dir / f"{case}_0000{ending}"
    label_path = labels_dir / f"{case}{ending}"
    for path in (image_path, label_path):
        if path.exists():
            raise OutputError(f"case {case!r} exists already", path)
    written: list[Path] = []
    try:
        written.append(write_image(volume, image_path))
        written.append(write_image(labelmap, label_path))
        meta["numTraining"] = len(_cases(labels_dir, ending))
        text = json.dumps(meta, indent=1) + "\n"
        write_atomic(meta_path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return case


def _checked_labelmap(volume: sitk.Image, labelmap: sitk.Image, labels: Sequence[Label]) -> sitk.Image:
    """The label map, checked against the volume and the labels, with the volume's exact geometry."""
    for what, image in (("volume", volume), ("label map", labelmap)):
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError(f"the {what} must be a 3D scalar image")
    values = sitk.GetArrayViewFromImage(labelmap)
    if values.dtype.kind not in "iu":
        raise ValueError(f"the label map must have integer voxels, got {values.dtype}")
    if not same_geometry(volume, labelmap):
        raise ValueError(
            f"the label map's grid (size {labelmap.GetSize()}, spacing {labelmap.GetSpacing()}, origin "
            f"{labelmap.GetOrigin()}) is not the volume's (size {volume.GetSize()}, spacing "
            f"{volume.GetSpacing()}, origin {volume.GetOrigin()})"
        )
    unknown = sorted(set(np.unique(values).tolist()) - {0, *(label.value for label in labels)})
    if unknown:
        raise ValueError(f"the label map holds values {unknown} that no label describes")
    exact = sitk.Image(labelmap)
    exact.CopyInformation(volume)
    return exact


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot be read as JSON ({error})", path) from None
    if not isinstance(meta, dict):
        raise InputError("is not a JSON object", path)
    return meta


def _check_meta(meta: dict, path: Path, modality: str, labels: dict, terminology: dict) -> str:
    """Refuse an existing dataset.json this case does not fit; return its file ending."""
    channels = meta.get("channel_names")
    if channels != {"0": CHANNEL_NAMES[modality]}:
        raise InputError(
            f"channel_names is {channels!r}; this {modality.upper()} case needs "
            f"{{'0': {CHANNEL_NAMES[modality]!r}}}",
            path,
        )
    if meta.get("modality", modality) != modality:
        raise InputError(f"is a {meta['modality']!r} dataset; this case is {modality!r}", path)
    if meta.get("labels") != labels:
        raise InputError(f"has labels {meta.get('labels')!r}; this case has {labels!r}", path)
    for name, key in (meta.get("terminology") or {}).items():
        if name in terminology and key != terminology[name]:
            raise InputError(
                f"label {name!r} has terminology {key!r}; this case's is {terminology[name]!r}", path
            )
    ending = meta.get("file_ending")
    if ending not in WRITE_EXTENSIONS:
        raise InputError(f"file_ending {ending!r} is not one of {', '.join(WRITE_EXTENSIONS)}", path)
    return ending


def _cases(labels_dir: Path, ending: str) -> list[str]:
    return sorted(
        p.name[: -len(ending)]
        for p in labels_dir.iterdir()
        if p.name.endswith(ending) and not p.name.startswith(".")
    )


def _next_case_name(root: Path, labels_dir: Path, ending: str) -> str:
    """``{dataset}_{NNN}``, NNN one more than the largest such number in labelsTr or imagesTr."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", root.resolve().name).lstrip("_.-") or "case"
    pattern = re.compile(re.escape(prefix) + r"_(\d+)")
    numbers = [0]
    for folder in (labels_dir, root / "imagesTr"):
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match and path.name.endswith(ending):
                numbers.append(int(match[1]))
    return f"{prefix}_{max(numbers) + 1:03d}"
