"""BTCV abdominal CT (13 organs, manual labels) in the few-shot repositories' layout -> an nnU-Net dataset.

BTCV ("Multi-Atlas Labeling Beyond the Cranial Vault", MICCAI 2015 challenge, Landman et al.;
Synapse syn3193805) has 30 portal-venous contrast CTs with 13 structures traced by hand. The
few-shot segmentation repositories (Ouyang et al., ECCV 2020, and the code built on it) keep it as
"SABS": ``sabs_CT_normalized/label_<N>.nii.gz`` (ids below, float voxels, N = 0..29), resampled to
257 x 257 pixels in plane and 3 mm slices, with identity direction and zero origin in the header,
and the image clipped to a soft-tissue window of [-125, 275] HU. Where the image volumes are not
there (they are the large files a repository snapshot leaves out), some keep the same images as
8-bit PNG slices, ``image_SABS_<N>_slice<KKK>.png`` (K = 0 .. slices - 1, the window mapped to
0..255, each slice the transpose of the label array's slice). This converter reads that pair: the
label volumes and a folder of those PNG slices.

What it writes, per case ``btcv_<NN>``:

- the image in HU, int16: ``-125 + 400 * v / 255`` for PNG value ``v``. The window's ends are
  clipped in the source, so two values are put back where the source lost them: air (connected
  areas of ``v = 0``, a 3 x 3 opening so isolated dark fat voxels stay fat) at :data:`AIR_HU`, and
  ``v = 255`` (cortical bone, excreted contrast) at :data:`CLIPPED_HIGH_HU`;
- the label map as uint8, the project's organ order without the vertebrae (liver 1, spleen 2, right
  kidney 3, left kidney 4, aorta 5, inferior vena cava 6, stomach 7, pancreas 8; training matches
  structures by name). BTCV does not label the vertebrae, so the dataset is partial: training
  counts them as unknown on its slices, not as background
  (:func:`.export.labelled_classes`). Gallbladder, oesophagus, portal and splenic veins and the
  adrenal glands are background for the task and generation classes of the anatomy maps
  (``anatomyTr``; :mod:`.anatomy`) that label-map renders draw;
- geometry in LPS: the few-shot arrays run from the patient's right to left (x), posterior to
  anterior (y) and inferior to superior (z), so the direction is ``diag(1, -1, 1)``; the spacing is
  the label file's. Each case's anatomy is checked against that frame (liver right of spleen,
  aorta behind the stomach, liver and spleen above the kidneys' centre); a case that fails is
  refused, naming its label file.

Command::

    python -m m4oe_training.converters btcv LABELS SLICES DST [--cases 0-25] [--overwrite]

``LABELS`` holds ``label_<N>.nii.gz`` (or is a parent of ``sabs_CT_normalized/`` or
``SABS/sabs_CT_normalized/``); ``SLICES`` holds the PNGs. Licence: BTCV's data are listed as CC BY
4.0 by dataset surveys (AbdomenAtlas); check the Synapse page's terms before redistributing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import InputError

from .anatomy import GENERATION_CLASSES
from .dataset_writer import FILE_ENDING, Case, ConversionResult, Job, Structure, write_datasets
from .nnunet import check_cancel

BTCV_STRUCTURES = (
    Structure(1, "liver", "liver", "liver"),
    Structure(2, "spleen", "spleen", "spleen"),
    Structure(3, "kidney_right", "kidney_right", "right kidney"),
    Structure(4, "kidney_left", "kidney_left", "left kidney"),
    Structure(5, "aorta", "aorta", "aorta"),
    Structure(6, "inferior_vena_cava", "inferior_vena_cava", "inferior vena cava"),
    Structure(7, "stomach", "stomach", "stomach"),
    Structure(8, "pancreas", "pancreas", "pancreas"),
)
"""Written values (1..8 without gaps, as nnU-Net requires; training matches structures by name) with
BTCV's own names."""

BTCV_IDS = {
    "spleen": 1,
    "kidney_right": 2,
    "kidney_left": 3,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "inferior_vena_cava": 9,
    "pancreas": 11,
}
"""BTCV label ids of the structures the project segments."""

BTCV_GENERATION = {"fluid_organ": (4,), "bowel": (5,), "blood": (10,), "gland": (12, 13)}
"""BTCV ids drawn as generation classes: gallbladder; oesophagus; portal and splenic veins; adrenals."""

BTCV_MAX_ID = 13
WINDOW_HU = (-125.0, 275.0)
"""The soft-tissue window the few-shot pre-processing clips BTCV to; PNG 0..255 spans it."""
AIR_HU = -1000.0
CLIPPED_HIGH_HU = 700.0
"""HU written where the source was clipped at the window's top (bone cortex, excreted contrast)."""
LPS_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

_LABEL = re.compile(r"label_(\d+)\.nii\.gz")


def btcv_tables() -> tuple[np.ndarray, np.ndarray]:
    """Two 256-entry uint8 tables on BTCV ids: the written organ value, and the generation class."""
    remap = np.zeros(256, dtype=np.uint8)
    for structure in BTCV_STRUCTURES:
        remap[BTCV_IDS[structure.name]] = structure.value
    generation = np.zeros(256, dtype=np.uint8)
    for key, ids in BTCV_GENERATION.items():
        generation[list(ids)] = GENERATION_CLASSES.index(key) + 1
    return remap, generation


def window_to_hu(values: np.ndarray) -> np.ndarray:
    """HU (float32) from PNG values (Z, Y, X) 0..255 of the clipped window, with air and bone put back.

    Air: voxels at the window's floor that survive a 3 x 3 in-plane opening (bowel gas, lung, the
    air around the body) are set to :data:`AIR_HU`; single dark voxels inside fat stay at -125 HU.
    Voxels at the window's top are set to :data:`CLIPPED_HIGH_HU`.
    """
    from scipy import ndimage

    values = np.asarray(values, dtype=np.float32)
    low, high = WINDOW_HU
    hu = low + (high - low) * values / 255.0
    floor = values <= 0
    square = np.ones((1, 3, 3), bool)  # in plane: beyond the slice's edge counts as air
    air = ndimage.binary_dilation(ndimage.binary_erosion(floor, square, border_value=1), square) & floor
    hu[air] = AIR_HU
    hu[values >= 255] = CLIPPED_HIGH_HU
    return hu


def read_slices(folder: Path, number: str, count: int) -> np.ndarray:
    """The PNG slices of case ``number`` as a (Z, Y, X) uint8 array on the label array's axes.

    Raises:
        InputError: a slice is missing, unreadable, not 8-bit grey, or not the label's in-plane size.
    """
    stack = []
    for k in range(count):
        path = folder / f"image_SABS_{number}_slice{k:03d}.png"
        if not path.is_file():
            raise InputError(f"missing: slice {k} of BTCV case {number} ({count} label slices)", path)
        try:
            png = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError:
            raise InputError("cannot be read as a PNG image", path) from None
        if png.ndim != 2 or png.dtype != np.uint8:
            raise InputError(f"is not an 8-bit grey slice (shape {png.shape}, {png.dtype})", path)
        stack.append(png.T)
    if (folder / f"image_SABS_{number}_slice{count:03d}.png").is_file():
        raise InputError(f"has more slices of BTCV case {number} than its label's {count}", folder)
    return np.stack(stack)


def check_orientation(labels: np.ndarray, spacing: tuple[float, ...], path: Path) -> None:
    """Refuse a case whose anatomy does not sit in LPS with :data:`LPS_DIRECTION`.

    ``labels`` (Z, Y, X) BTCV ids; ``spacing`` (x, y, z) mm. Physical x = i dx (patient's left),
    y = -j dy (posterior), z = k dz (superior).
    """

    def centre(*ids: int) -> np.ndarray | None:
        k, j, i = np.nonzero(np.isin(labels, ids))
        if k.size == 0:
            return None
        return np.array([i.mean() * spacing[0], -j.mean() * spacing[1], k.mean() * spacing[2]])

    liver, spleen = centre(BTCV_IDS["liver"]), centre(BTCV_IDS["spleen"])
    aorta, stomach = centre(BTCV_IDS["aorta"]), centre(BTCV_IDS["stomach"])
    kidneys = centre(BTCV_IDS["kidney_right"], BTCV_IDS["kidney_left"])
    problems = []
    if liver is not None and spleen is not None and not liver[0] < spleen[0]:
        problems.append("the liver is not on the patient's right of the spleen")
    if aorta is not None and stomach is not None and not aorta[1] > stomach[1]:
        problems.append("the aorta is not behind the stomach")
    upper = centre(BTCV_IDS["liver"], BTCV_IDS["spleen"])
    if upper is not None and kidneys is not None and not upper[2] > kidneys[2]:
        problems.append("the liver and spleen are not above the kidneys")
    if problems:
        raise InputError(f"orientation check failed: {'; '.join(problems)}", path)


def parse_cases(text: str) -> set[int]:
    """Case numbers from ranges such as "0-25" or "0-9,12"; raises InputError on anything else."""
    numbers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise InputError(f"--cases {text!r}: expected numbers and ranges such as 0-25 or 0-9,12")
        numbers.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return numbers


def find_labels(src: str | Path) -> tuple[Path, dict[str, Path]]:
    """The folder of ``label_<N>.nii.gz`` files and those files by case number (as written)."""
    src = Path(src)
    if not src.is_dir():
        raise InputError("is not a folder", src)
    candidates = (src, src / "sabs_CT_normalized", src / "SABS" / "sabs_CT_normalized")
    for root in candidates:
        labels = {
            m[1]: p for p in sorted(root.glob("label_*" + FILE_ENDING)) if (m := _LABEL.fullmatch(p.name))
        }
        if labels:
            return root, labels
    raise InputError(
        "holds no BTCV label_N.nii.gz files (looked in ., ./sabs_CT_normalized, ./SABS/sabs_CT_normalized)",
        src,
    )


def convert_btcv(
    labels_src: str | Path,
    slices_src: str | Path,
    dst: str | Path,
    *,
    cases: str | None = None,
    overwrite: bool = False,
    progress=None,
    cancel=None,
) -> ConversionResult:
    """Write BTCV's label volumes and PNG slices as an nnU-Net dataset at ``dst`` (modality "ct").

    ``cases``: case numbers to convert, as ranges ("0-25", "0-9,12"); None converts all. Returns
    what was written. Raises InputError or OutputError naming the file; nothing is left at
    ``dst`` (nor beside it) after a failure.
    """
    root, labels = find_labels(labels_src)
    if cases is not None:
        wanted = parse_cases(cases)
        missing = sorted(wanted - {int(n) for n in labels})
        if missing:
            raise InputError(f"has no label_N.nii.gz for case(s) {missing[:5]} of --cases {cases}", root)
        labels = {n: p for n, p in labels.items() if int(n) in wanted}
    slices = Path(slices_src)
    if not slices.is_dir():
        raise InputError("is not a folder", slices)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.{uuid.uuid4().hex[:12]}.btcv"
    work.mkdir()
    try:
        pairs = []
        for number in sorted(labels, key=int):
            check_cancel(cancel, labels[number])
            pairs.append(_reconstruct(number, labels[number], slices, work))
        remap, generation = btcv_tables()
        source = {
            "dataset": "BTCV abdomen CT",
            "reference": "Landman et al., MICCAI 2015 challenge; https://www.synapse.org/#!Synapse:syn3193805",
            "license": "CC-BY-4.0 (as listed by AbdomenAtlas; check the Synapse terms)",
            "folder": str(root.resolve()),
            "slices": str(slices.resolve()),
            "layout": {"label": "label_{id}.nii.gz", "image": "image_SABS_{id}_slice{k:03d}.png"},
            "window_hu": list(WINDOW_HU),
            "original_labels": {str(BTCV_IDS[s.name]): s.original for s in BTCV_STRUCTURES},
            "generation_labels": {key: list(ids) for key, ids in BTCV_GENERATION.items()},
            "partial_labels": "the vertebrae are not labelled",
            "cases": cases or "all",
        }
        job = Job("BTCV_CT", "ct", BTCV_STRUCTURES, dst, tuple(pairs), 0, source, remap, generation)
        return write_datasets([job], root, link=False, overwrite=overwrite, progress=progress, cancel=cancel)[
            0
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reconstruct(number: str, label_path: Path, slices: Path, work: Path) -> Case:
    """Write case ``number``'s HU image and its label ids, both in LPS, into ``work``."""
    try:
        label_image = sitk.ReadImage(str(label_path))
    except RuntimeError:
        raise InputError("cannot be read as a NIfTI volume", label_path) from None
    ids = sitk.GetArrayFromImage(label_image)
    if ids.ndim != 3:
        raise InputError(f"is not a 3D label volume (shape {ids.shape})", label_path)
    if ids.size and (ids.min() < 0 or ids.max() > BTCV_MAX_ID or np.any(ids != np.round(ids))):
        raise InputError(f"holds values outside BTCV's ids 0..{BTCV_MAX_ID}", label_path)
    ids = ids.astype(np.uint8)
    spacing = label_image.GetSpacing()
    check_orientation(ids, spacing, label_path)
    png = read_slices(slices, number, ids.shape[0])
    if png.shape != ids.shape:
        raise InputError(f"slices of {png.shape[1:]} pixels do not match label {ids.shape[1:]}", slices)
    case_id = f"btcv_{int(number):02d}"
    image_path, out_label = work / f"image_{number}{FILE_ENDING}", work / f"label_{number}{FILE_ENDING}"
    for array, path in ((np.round(window_to_hu(png)).astype(np.int16), image_path), (ids, out_label)):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing(spacing)
        volume.SetOrigin((0.0, 0.0, 0.0))
        volume.SetDirection(LPS_DIRECTION)
        sitk.WriteImage(volume, str(path), useCompression=True)
    return Case(case_id, number, image_path, out_label)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "labels", type=Path, help="folder of label_N.nii.gz (sabs_CT_normalized), or a parent"
    )
    parser.add_argument("slices", type=Path, help="folder of image_SABS_N_sliceKKK.png slices")
    parser.add_argument("dst", type=Path, help="output dataset folder")
    parser.add_argument("--cases", help="case numbers to convert, e.g. 0-25 (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
