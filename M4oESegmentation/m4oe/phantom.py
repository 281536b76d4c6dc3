"""Synthetic abdominal phantoms: CT, T1 and T2 MR volumes with nine organ labels, for training and demos.

No trained model or public data set can be fetched where this project is built, so smoke training,
demos and tests run on these phantoms. They are not anatomy-faithful; they get right what a
segmentation pipeline can get wrong: which side is the patient's left, tissue contrasts in the
usual order per modality, partial volume, noise, an MR bias field, and varied acquisitions (voxel
spacing, field of view, slice count, and stored orientation: identity, RAS-stored as most CT NIfTI
files are, or with x and y swapped).

Frames and units. Organs are defined in an anatomy frame in millimetres, axes as LPS (x towards the
patient's left, y towards posterior, z towards superior), origin at the centre of the torso's
cross-section near the level of the renal hila. A case places that frame in the scanner with a
random shift; image and label map share one geometry exactly. CT intensities are HU, MR intensities
arbitrary non-negative units (about 0..1500, random gain per case).

How a case is built: (1) anatomy parameters drawn from ``seed`` (sizes, positions, rotations per
organ, fat and muscle thickness, a smooth random deformation); (2) an acquisition drawn from
``(seed, sequence)``; (3) on the acquisition's grid, every voxel's anatomy-frame position is
displaced by the deformation (cubic B-spline on a 50 mm control grid) and organs are evaluated as
implicit shapes there, painted in priority order so that they never overlap; (4) each tissue class
gets an intensity from the sequence's table, a smooth texture, a Gaussian blur (partial volume)
and noise (Gaussian for CT; for MR a bias field and Rician noise).

Same ``seed``, different sequences: the same anatomy, imaged with different acquisitions and lying
at a different place in the scanner. :func:`write_dataset` derives each case's seed from
``(seed, sequence, index)``, so CT, T1 and T2 data sets written with one seed hold different
anatomies (better for training a mixture of experts that must not pair cases across modalities).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe import __version__
from m4oe.errors import CancelledError, InputError, OutputError
from m4oe.io import write_atomic, write_image
from m4oe.labels import Label
from m4oe.phantom_anatomy import ANATOMY_STREAM, PHANTOM_LABELS, draw_anatomy
from m4oe.phantom_imaging import (
    CONTRASTS,
    MAX_IN_PLANE,
    MAX_SLICES,  # noqa: F401  (part of this module's documented interface)
    MIN_SIZE,
    ORIENTATIONS,  # noqa: F401  (part of this module's documented interface)
    SEQUENCE_STREAM,
    SEQUENCES,
    draw_acquisition,
    render,
)
from m4oe.terminology import standard_label

CHANNEL_NAMES = {"ct": "CT", "t1": "T1", "t2": "T2"}
"""nnU-Net channel name per sequence: ``"CT"`` selects its CT normalisation, the others z-score."""

GENERATOR_VERSION = "3"
"""Bumped whenever the same seed starts to give a different case (2: the pancreas in a sleeve of
retroperitoneal fat; 3: fat on T2 brighter than the renal medulla)."""

_FILE_ENDING = ".nii.gz"


def phantom_labels() -> list[Label]:
    """The phantom's labels with standard terminology, in label-value order (1 liver .. 9 pancreas)."""
    return [standard_label(key, value) for key, value in PHANTOM_LABELS.items()]


# ---------------------------------------------------------------------------------------------
# Public API


def _check_sequence(modality: str) -> str:
    name = modality.strip().lower() if isinstance(modality, str) else None
    if name not in SEQUENCES:
        raise InputError(f"phantom modality {modality!r} is not one of {', '.join(SEQUENCES)}")
    return name


def _check_int(value, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _make_case(modality: str, seed: int, max_size: int | None) -> tuple[sitk.Image, sitk.Image, dict]:
    sequence = _check_sequence(modality)
    seed = _check_int(seed, "phantom seed", 0)
    cap = MAX_IN_PLANE if max_size is None else _check_int(max_size, "phantom max_size", MIN_SIZE)
    anatomy = draw_anatomy(np.random.default_rng((seed, ANATOMY_STREAM)))
    rng = np.random.default_rng((seed, SEQUENCE_STREAM[sequence]))
    acq = draw_acquisition(anatomy, sequence, rng, cap)
    intensities, labels = render(anatomy, acq, rng)
    images = []
    for array in (intensities, labels):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(acq.spacing)
        image.SetOrigin(acq.origin)
        images.append(sitk.DICOMOrient(image, acq.orientation))
    info = {
        "seed": seed,
        "sequence": sequence,
        "contrast": acq.contrast,
        "orientation": acq.orientation,
        "size": list(images[0].GetSize()),
        "spacing_mm": [round(s, 4) for s in images[0].GetSpacing()],
    }
    return images[0], images[1], info


def generate_case(modality: str, seed: int, *, max_size: int | None = None) -> tuple[sitk.Image, sitk.Image]:
    """One synthetic abdominal volume and its label map.

    Args:
        modality: ``"ct"`` (HU), ``"t1"`` or ``"t2"`` (MR, arbitrary non-negative units); any case.
        seed: integer >= 0. The same seed gives the same anatomy for every modality (see the
            module docstring) and the same arrays every time.
        max_size: at most this many voxels along any axis (>= 16; default 256 in-plane and 64
            slices); the field of view and the anatomy are unchanged, the spacing grows.

    Returns:
        ``(image, labels)``: 3D SimpleITK images of one geometry (size, spacing in mm, origin and
        direction in LPS). ``image`` is float32; ``labels`` uint8 with :data:`PHANTOM_LABELS`
        values, 0 elsewhere (air, fat, muscle, bowel, ribs, discs, canal). The stored orientation
        is one of :data:`ORIENTATIONS`: direction identity, diag(-1, -1, 1), or x and y swapped.
        In-plane spacing 0.7-1.8 mm (CT) or 1.2-2.0 mm (MR), 2-5 mm slices over 120-200 mm.

    Raises:
        InputError: ``modality`` is not ct, t1 or t2; ``seed`` or ``max_size`` is not an integer in range.
    """
    image, labels, _ = _make_case(modality, seed, max_size)
    return image, labels


def case_contrast(modality: str, seed: int) -> str:
    """The contrast state :func:`generate_case` draws for ``(modality, seed)``, without rendering.

    CT: ``"native"``, ``"arterial"`` or ``"portal_venous"``; T1: ``"flow_void"`` or
    ``"bright_blood"``; T2: ``"flow_void"`` (see :data:`CONTRASTS`). It does not depend on
    ``max_size``.
    """
    sequence = _check_sequence(modality)
    seed = _check_int(seed, "phantom seed", 0)
    anatomy = draw_anatomy(np.random.default_rng((seed, ANATOMY_STREAM)))
    rng = np.random.default_rng((seed, SEQUENCE_STREAM[sequence]))
    return draw_acquisition(anatomy, sequence, rng, MAX_IN_PLANE).contrast


def case_seed(seed: int, modality: str, index: int) -> int:
    """The :func:`generate_case` seed of case ``index`` of a data set written with ``seed``."""
    stream = (_check_int(seed, "phantom seed", 0), SEQUENCE_STREAM[_check_sequence(modality)], index)
    return int(np.random.SeedSequence(stream).generate_state(1, np.uint64)[0] >> np.uint64(1))


def write_dataset(
    out_dir: str | Path,
    modality: str,
    cases: int,
    seed: int,
    *,
    dataset_name: str | None = None,
    max_size: int | None = None,
    contrast: str | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """Write ``cases`` phantom cases as an nnU-Net v2 raw data set; returns ``out_dir``.

    Layout: ``imagesTr/{name}_{i:03d}_0000.nii.gz`` (CT as int16 HU, MR as uint16, as scanners
    store them), ``labelsTr/{name}_{i:03d}.nii.gz`` (uint8, same geometry as its image), and
    ``dataset.json`` with nnU-Net's ``channel_names`` (``CT``, ``T1`` or ``T2``), ``labels``,
    ``numTraining`` and ``file_ending``, plus ``modality`` (ct/mr), ``sequence``, ``generator``,
    ``seed`` and ``phantom_cases`` (per case: files, seed for :func:`generate_case`, contrast,
    orientation, size, spacing). ``name`` defaults to ``phantom{sequence}``. Case ``i`` uses
    :func:`case_seed` ``(seed, modality, i)``. With ``contrast`` (a CT phase or MR blood signal
    of :data:`CONTRASTS`, e.g. ``"native"``), only cases drawing that contrast are kept: case ``i``
    is then the ``i``-th index ``j`` whose :func:`case_seed` ``(seed, modality, j)`` draws it (its
    ``index`` is recorded), so a data set of hard cases can be written. ``dataset.json`` is
    written last, so a folder holding one holds a complete data set.

    ``progress(done, total)`` is called after each case; ``cancel()`` returning True stops
    before the next case with :class:`CancelledError`.

    Raises:
        InputError: a bad modality, count, seed, size, contrast or name.
        OutputError: ``out_dir`` already holds a ``dataset.json`` or any of the case files and
            ``overwrite`` is False; it holds image files of another data set; or it cannot be written.
    """
    sequence = _check_sequence(modality)
    cases = _check_int(cases, "number of phantom cases", 1)
    seed = _check_int(seed, "phantom seed", 0)
    if max_size is not None:
        _check_int(max_size, "phantom max_size", MIN_SIZE)
    if contrast is not None and contrast not in CONTRASTS[sequence]:
        raise InputError(
            f"phantom contrast {contrast!r} is not one of {sequence}'s: {', '.join(CONTRASTS[sequence])}"
        )
    name = f"phantom{sequence}" if dataset_name is None else dataset_name
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise InputError(f"dataset name {name!r} must be letters, digits, '_' or '-'")

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError("is not a folder", out)
    manifest = out / "dataset.json"
    if manifest.exists() and not overwrite:
        raise OutputError("holds a data set already (dataset.json); pass --overwrite to replace it", out)
    images, labels = out / "imagesTr", out / "labelsTr"
    image_paths = [images / f"{name}_{i:03d}_0000{_FILE_ENDING}" for i in range(cases)]
    label_paths = [labels / f"{name}_{i:03d}{_FILE_ENDING}" for i in range(cases)]
    ours = re.compile(rf"{re.escape(name)}_\d{{3,}}(_0000)?{re.escape(_FILE_ENDING)}")
    stale = []
    for folder in (images, labels):
        for path in sorted(folder.glob(f"*{_FILE_ENDING}")) if folder.is_dir() else []:
            if not ours.fullmatch(path.name):
                raise OutputError(
                    f"holds {path.name}, not a file of data set {name!r}; use another folder", folder
                )
            if not overwrite:
                raise OutputError("exists; pass --overwrite to replace it", path)
            if path not in image_paths and path not in label_paths:
                stale.append(path)
    try:
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        manifest.unlink(missing_ok=True)
        for path in stale:
            path.unlink()
    except OSError as error:
        raise OutputError(f"cannot be written ({error.strerror or error})", out) from None

    records = []
    # (index in the seed's case order, generator seed) of the cases to write
    chosen = ((j, case_seed(seed, sequence, j)) for j in itertools.count())
    if contrast is not None:
        chosen = ((j, c) for j, c in chosen if case_contrast(sequence, c) == contrast)
    for i in range(cases):
        if cancel is not None and cancel():
            raise CancelledError(f"cancelled after {i} of {cases} phantom cases", out)
        index, case = next(chosen)
        image, label_map, info = _make_case(sequence, case, max_size)
        if contrast is not None:
            info = {"index": index, **info}
        stored = sitk.Cast(sitk.Round(image), sitk.sitkInt16 if sequence == "ct" else sitk.sitkUInt16)
        write_image(stored, image_paths[i], overwrite=overwrite)
        write_image(label_map, label_paths[i], overwrite=overwrite)
        records.append(
            {"image": f"imagesTr/{image_paths[i].name}", "label": f"labelsTr/{label_paths[i].name}", **info}
        )
        if progress is not None:
            progress(i + 1, cases)

    dataset = {
        "channel_names": {"0": CHANNEL_NAMES[sequence]},
        "labels": {"background": 0, **PHANTOM_LABELS},
        "numTraining": cases,
        "file_ending": _FILE_ENDING,
        "name": name,
        "description": f"synthetic abdominal {CHANNEL_NAMES[sequence]} phantoms, not patient data",
        "licence": "CC0-1.0",
        "modality": "ct" if sequence == "ct" else "mr",
        "sequence": sequence,
        "generator": f"m4oe phantom {GENERATOR_VERSION} (m4oe {__version__})",
        "seed": seed,
        **({"contrast": contrast} if contrast is not None else {}),
        "phantom_cases": records,
    }
    write_atomic(manifest, lambda tmp: tmp.write_text(json.dumps(dataset, indent=1) + "\n"), overwrite=True)
    return out


# ---------------------------------------------------------------------------------------------
# Command line


def add_phantom_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``m4oe phantom OUT_DIR --modality ct|t1|t2 --cases N --seed S [--contrast C] [--max-size N]``.

    Also ``--name`` and ``--overwrite``.
    """
    parser = subparsers.add_parser(
        "phantom", help="write synthetic abdominal CT/T1/T2 cases as an nnU-Net v2 raw data set"
    )
    parser.add_argument("out_dir", help="data set folder (imagesTr/, labelsTr/, dataset.json)")
    parser.add_argument("--modality", default="ct", metavar="{ct,t1,t2}", help="default: ct")
    parser.add_argument("--cases", type=int, default=10, help="number of cases (default: 10)")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (default: 0)")
    parser.add_argument(
        "--max-size", type=int, default=None, help="at most this many voxels along any axis (default: 256/64)"
    )
    parser.add_argument(
        "--contrast",
        default=None,
        help="only cases of this contrast: CT native, arterial or portal_venous; T1 flow_void or "
        "bright_blood; T2 flow_void (default: drawn per case)",
    )
    parser.add_argument("--name", default=None, help="case name prefix (default: phantom<modality>)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already there")
    return parser


def run_phantom(args) -> int:
    """Run the ``phantom`` command from parsed arguments; returns the exit code (0)."""
    bar = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if bar:
            sys.stderr.write(f"\rphantom {args.modality}: {done}/{total} cases")
            sys.stderr.write("\n" if done == total else "")
            sys.stderr.flush()

    out = write_dataset(
        args.out_dir,
        args.modality,
        args.cases,
        args.seed,
        dataset_name=args.name,
        max_size=args.max_size,
        contrast=args.contrast,
        overwrite=args.overwrite,
        progress=progress,
    )
    kind = f"{args.modality} {args.contrast}" if args.contrast else args.modality
    print(f"wrote {args.cases} {kind} phantom cases to {out} (dataset.json, imagesTr, labelsTr)")
    return 0
