"""Public abdominal datasets and TotalSegmentator outputs -> nnU-Net v2 raw dataset folders.

The training layout is nnU-Net v2's raw dataset folder::

    DST/imagesTr/{case}_0000.nii.gz     one channel per case
    DST/labelsTr/{case}.nii.gz          integer label map on the image's exact grid
    DST/dataset.json                    channel_names, labels, numTraining, file_ending, plus ours:
                                        modality ("ct" | "mr"), source, terminology

Each public dataset keeps its own label numbering: every dataset trains its own task head, so no
label is remapped and label files are copied (or linked) byte for byte after validation. The
``terminology`` block maps each label name to a key of :data:`m4oe.terminology.TERMS` (or null
where no single standard structure fits, AMOS's "prostate/uterus") so a model card can carry
standard codes. The exception is TotalSegmentator output (:mod:`.totalsegmentator`): its
label maps hold ids of TotalSegmentator's ``total`` (CT) or ``total_mr`` (MRI) task and are
mapped onto the project's nine organs (liver 1 ... pancreas 9, the embedded model's task) and
rewritten as uint8 on the image's exact grid.

Commands (``m4oe convert`` will wrap the same functions)::

    python -m m4oe_training.converters flare22   FLARE2022/           data/FLARE22_CT
    python -m m4oe_training.converters amos22    amos22/              data/AMOS22_CT data/AMOS22_MR
    python -m m4oe_training.converters atlas2023 atlas-train-dataset-1.0.1/ data/ATLAS2023_MR
    python -m m4oe_training.converters totalsegmentator SRC/ data/real/my_cts --modality ct
    python -m m4oe_training.converters totalsegmentator data/real/example_ct --modality ct \
        --image example_ct.nii.gz --labels example_seg_fast_force_split.nii.gz --case example_ct
    python -m m4oe_training.converters chaos     CHAOS_Train_Sets/ data/CHAOS_MR_T2  (see .chaos)
    python -m m4oe_training.converters chaos     CHAOS_Train_Sets/ data/CHAOS_T1_in --sequence t1-in
    python -m m4oe_training.converters btcv      SABS/ slices/ data/BTCV_CT     (see .btcv)
    python -m m4oe_training.converters verify    data/AMOS22_MR

``totalsegmentator`` reads ``SRC/images/<case>.nii.gz`` with ``SRC/labels/<case>.nii.gz``
(TotalSegmentator's ``--ml`` multi-label file), or TotalSegmentator's default output
(``SRC/<case>/<image>.nii.gz`` beside ``SRC/<case>/segmentations/<structure>.nii.gz``), or one
``--image`` / ``--labels`` pair named ``--case``; ``--task total|total_mr`` when the ids are not
the modality's default task.

Options: ``--link`` hard-links the files (symbolic links across file systems) instead of copying;
``--overwrite`` replaces an existing dataset folder. The expected source layouts and the label
tables are in each converter's docstring and in ``training/DATASETS.md``.

Images are read with SimpleITK: geometry is size (voxels, x y z), spacing (mm), origin (mm, LPS)
and direction cosines; label and image must agree on all four (within
:data:`.nnunet.GEOMETRY_TOLERANCE`). Every problem is an :class:`~m4oe.errors.InputError` or
:class:`~m4oe.errors.OutputError` whose one-line message names the file. A conversion is built in
a hidden folder next to DST and renamed into place when complete (:mod:`.dataset_writer`), so a
failed or cancelled run leaves no partial dataset behind.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from m4oe.errors import InputError, M4oEError
from m4oe.progress import CancelCheck, ProgressCallback
from m4oe.terminology import TERMS

from .btcv import add_arguments as add_btcv_arguments
from .btcv import convert_btcv
from .chaos import add_arguments as add_chaos_arguments
from .chaos import convert_chaos
from .dataset_writer import (
    FILE_ENDING,
    Case,
    ConversionResult,
    Job,
    Structure,
    print_progress,
    write_datasets,
)
from .nnunet import CHANNEL_NAMES, load_json, verify_dataset
from .totalsegmentator import add_arguments as add_totalsegmentator_arguments
from .totalsegmentator import convert_totalsegmentator, run_from_arguments

__all__ = [
    "AMOS22_LABELS",
    "ATLAS2023_LABELS",
    "FILE_ENDING",
    "FLARE22_LABELS",
    "ConversionResult",
    "Structure",
    "convert_amos22",
    "convert_atlas2023",
    "convert_btcv",
    "convert_chaos",
    "convert_flare22",
    "convert_totalsegmentator",
    "main",
    "verify_dataset",
]

AMOS_LAST_CT_ID = 500
"""AMOS22 cases amos_0001..amos_0500 are CT, amos_0501..amos_0600 MRI."""


def _table(*rows: tuple[int, str, str]) -> tuple[Structure, ...]:
    """Rows of (value, TERMS key, original name); the label name is the TERMS key."""
    return tuple(Structure(value, term, term, original) for value, term, original in rows)


# JunMa11/FLARE FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py (organ order 1..13).
FLARE22_LABELS = _table(
    (1, "liver", "liver"),
    (2, "kidney_right", "right kidney"),
    (3, "spleen", "spleen"),
    (4, "pancreas", "pancreas"),
    (5, "aorta", "aorta"),
    (6, "inferior_vena_cava", "inferior vena cava"),
    (7, "adrenal_gland_right", "right adrenal gland"),
    (8, "adrenal_gland_left", "left adrenal gland"),
    (9, "gallbladder", "gallbladder"),
    (10, "esophagus", "esophagus"),
    (11, "stomach", "stomach"),
    (12, "duodenum", "duodenum"),
    (13, "kidney_left", "left kidney"),
)
# The "labels" of amos22/dataset.json, typos ("arota", "postcava") included.
AMOS22_LABELS = (
    *_table(
        (1, "spleen", "spleen"),
        (2, "kidney_right", "right kidney"),
        (3, "kidney_left", "left kidney"),
        (4, "gallbladder", "gall bladder"),
        (5, "esophagus", "esophagus"),
        (6, "liver", "liver"),
        (7, "stomach", "stomach"),
        (8, "aorta", "arota"),
        (9, "inferior_vena_cava", "postcava"),
        (10, "pancreas", "pancreas"),
        (11, "adrenal_gland_right", "right adrenal gland"),
        (12, "adrenal_gland_left", "left adrenal gland"),
        (13, "duodenum", "duodenum"),
        (14, "urinary_bladder", "bladder"),
    ),
    # One class for two sex-specific organs: no single standard code fits it.
    Structure(15, "prostate_or_uterus", None, "prostate/uterus"),
)
# ATLAS release dataset.json: 0 background, 1 liver, 2 tumour; the liver label excludes the tumours.
ATLAS2023_LABELS = _table((1, "liver", "liver"), (2, "liver_tumor", "tumor"))


@dataclass(frozen=True)
class _Naming:
    """File names of one public layout; ``{id}`` is the case number as written in the file name."""

    image: str
    label: str
    case: Callable[[str], str]
    id_pattern: str = r"\d{4}"

    def regex(self, template: str) -> re.Pattern:
        before, after = template.split("{id}")
        return re.compile(re.escape(before) + f"({self.id_pattern})" + re.escape(after))


FLARE22_NAMING = _Naming("FLARE22_Tr_{id}_0000.nii.gz", "FLARE22_Tr_{id}.nii.gz", "FLARE22_Tr_{}".format)
AMOS22_NAMING = _Naming("amos_{id}.nii.gz", "amos_{id}.nii.gz", "amos_{}".format)
ATLAS2023_NAMING = _Naming("im{id}.nii.gz", "lb{id}.nii.gz", lambda n: f"atlas_{int(n):04d}", r"\d+")


# ---------------------------------------------------------------------------------------------
# Converters


def convert_flare22(
    src: str | Path,
    dst: str | Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> ConversionResult:
    """Convert the 50 labelled FLARE22 training CTs into an nnU-Net dataset at ``dst``.

    Source layout (as distributed by the FLARE22 organisers): ``src`` is the folder that holds
    ``images/`` and ``labels/``, or one of its parents ``src/FLARE22Train/``,
    ``src/FLARE22_LabeledCase50/``, ``src/Training/FLARE22_LabeledCase50/``::

        images/FLARE22_Tr_0001_0000.nii.gz ... FLARE22_Tr_0050_0000.nii.gz
        labels/FLARE22_Tr_0001.nii.gz      ... FLARE22_Tr_0050.nii.gz

    The 2000 unlabelled CTs (``FLARE22_UnlabeledCase*/Case_00001_0000.nii.gz`` ... in ``src`` or
    ``src/Training``) are counted and skipped; the validation images are not read.

    Labels (kept as is; TERMS key = label name): 1 liver, 2 kidney_right, 3 spleen, 4 pancreas,
    5 aorta, 6 inferior_vena_cava, 7 adrenal_gland_right, 8 adrenal_gland_left, 9 gallbladder,
    10 esophagus, 11 stomach, 12 duodenum, 13 kidney_left. Case ids: ``FLARE22_Tr_0001`` ...

    ``progress`` is called after each case; ``cancel`` is checked before each case and raises
    :class:`CancelledError` when it returns True. Raises InputError (bad source) or OutputError
    (``dst`` exists without ``overwrite``) naming the file.
    """
    src = _source_folder(src)
    root = _find_root(
        src,
        ("", "FLARE22Train", "FLARE22_LabeledCase50", "Training/FLARE22_LabeledCase50"),
        ("images", "labels"),
        "FLARE22 training folder",
    )
    cases = _pair_cases(root / "images", root / "labels", FLARE22_NAMING)
    unlabelled = sum(
        _count_images(folder)
        for parent in (src, src / "Training")
        if parent.is_dir()
        for folder in parent.glob("FLARE22_UnlabeledCase*")
        if folder.is_dir()
    )
    source = _source("FLARE22", "https://flare22.grand-challenge.org/", root, FLARE22_NAMING, FLARE22_LABELS)
    job = Job("FLARE22", "ct", FLARE22_LABELS, Path(dst), cases, unlabelled, source)
    return write_datasets([job], src, link=link, overwrite=overwrite, progress=progress, cancel=cancel)[0]


def convert_amos22(
    src: str | Path,
    dst_ct: str | Path | None,
    dst_mr: str | Path | None,
    *,
    link: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> tuple[ConversionResult | None, ConversionResult | None]:
    """Convert the labelled AMOS22 cases into a CT dataset and an MRI dataset (one per expert).

    Source layout (``amos22.zip`` from Zenodo record 7262581): ``src`` is the ``amos22/`` folder
    (or its parent)::

        dataset.json                     (optional here; its labels must be the AMOS22 table)
        imagesTr/amos_0001.nii.gz  labelsTr/amos_0001.nii.gz
        imagesVa/amos_0008.nii.gz  labelsVa/amos_0008.nii.gz
        imagesTs/amos_0002.nii.gz  (no labels: counted and skipped)

    Validation cases with labels join the training cases (AMOS names no use for them); a split
    whose labels folder is absent counts as unlabelled. Ids 0001-0500 are CT (-> ``dst_ct``),
    0501-0600 MRI (-> ``dst_mr``); pass None to skip one modality.

    Labels (kept as is): 1 spleen, 2 kidney_right, 3 kidney_left, 4 gallbladder, 5 esophagus,
    6 liver, 7 stomach, 8 aorta, 9 inferior_vena_cava, 10 pancreas, 11 adrenal_gland_right,
    12 adrenal_gland_left, 13 duodenum, 14 urinary_bladder, 15 prostate_or_uterus (terminology
    null: prostate in men, uterus in women). Case ids: ``amos_0001`` ...

    Returns (CT result, MRI result), None for a skipped modality. Errors as :func:`convert_flare22`.
    """
    if dst_ct is None and dst_mr is None:
        raise InputError("give a CT or an MRI output folder (or both)")
    src = _source_folder(src)
    root = _find_root(src, ("", "amos22"), ("imagesTr",), "AMOS22 folder")
    _check_amos_dataset_json(root)
    cases: list[Case] = []
    unlabelled: list[str] = []
    for split in ("Tr", "Va"):
        images, labels = root / f"images{split}", root / f"labels{split}"
        if images.is_dir() and labels.is_dir():
            cases += _pair_cases(images, labels, AMOS22_NAMING)
        elif images.is_dir():
            unlabelled += _numbers(images, AMOS22_NAMING)
    if (root / "imagesTs").is_dir():
        unlabelled += _numbers(root / "imagesTs", AMOS22_NAMING)
    cases.sort(key=lambda case: case.case_id)

    jobs = []
    for modality, dst, is_modality in (
        ("ct", dst_ct, lambda n: int(n) <= AMOS_LAST_CT_ID),
        ("mr", dst_mr, lambda n: int(n) > AMOS_LAST_CT_ID),
    ):
        if dst is None:
            continue
        chosen = tuple(case for case in cases if is_modality(case.number))
        if not chosen:
            raise InputError(f"holds no labelled {CHANNEL_NAMES[modality]} cases", root)
        skipped = sum(1 for number in unlabelled if is_modality(number))
        source = _source("AMOS22", "https://amos22.grand-challenge.org/", root, AMOS22_NAMING, AMOS22_LABELS)
        source["subset"] = "CT, ids 0001-0500" if modality == "ct" else "MRI, ids 0501-0600"
        jobs.append(
            Job(f"AMOS22_{modality.upper()}", modality, AMOS22_LABELS, Path(dst), chosen, skipped, source)
        )
    results = iter(
        write_datasets(jobs, src, link=link, overwrite=overwrite, progress=progress, cancel=cancel)
    )
    return (next(results) if dst_ct is not None else None, next(results) if dst_mr is not None else None)


def convert_atlas2023(
    src: str | Path,
    dst: str | Path,
    *,
    link: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> ConversionResult:
    """Convert the 60 ATLAS2023 training MRIs (T1 contrast-enhanced, liver and liver tumour).

    Source layout (``atlas-train-dataset-1.0.1.zip`` from atlas-challenge.u-bourgogne.fr):
    ``src`` is the ``train/`` folder or a parent (``src/train``,
    ``src/atlas-train-dataset-1.0.1/train``, the same folder nested twice)::

        train/imagesTr/im0.nii.gz ... im59.nii.gz
        train/labelsTr/lb0.nii.gz ... lb59.nii.gz

    Labels (kept as is): 1 liver (parenchyma without the tumours), 2 liver_tumor. Case ids:
    ``atlas_0000`` ... (the number of ``imN``). Errors as :func:`convert_flare22`.
    """
    src = _source_folder(src)
    root = _find_root(
        src,
        (
            "",
            "train",
            "atlas-train-dataset-1.0.1/train",
            "atlas-train-dataset-1.0.1/atlas-train-dataset-1.0.1/train",
        ),
        ("imagesTr", "labelsTr"),
        "ATLAS2023 train folder",
    )
    cases = _pair_cases(root / "imagesTr", root / "labelsTr", ATLAS2023_NAMING)
    source = _source(
        "ATLAS2023", "https://atlas-challenge.u-bourgogne.fr/", root, ATLAS2023_NAMING, ATLAS2023_LABELS
    )
    job = Job("ATLAS2023", "mr", ATLAS2023_LABELS, Path(dst), cases, 0, source)
    return write_datasets([job], src, link=link, overwrite=overwrite, progress=progress, cancel=cancel)[0]


def _source_folder(src: str | Path) -> Path:
    src = Path(src)
    if not src.is_dir():
        raise InputError("is not a folder", src)
    return src


def _find_root(src: Path, candidates: Iterable[str], needed: Sequence[str], what: str) -> Path:
    """The first of ``src/candidate`` that holds every folder in ``needed``."""
    candidates = tuple(candidates)
    for candidate in candidates:
        root = src / candidate if candidate else src
        if all((root / name).is_dir() for name in needed):
            return root
    places = ", ".join(f"./{c}" if c else "." for c in candidates)
    raise InputError(f"no {what}: expected {' and '.join(f'{n}/' for n in needed)} in {places}", src)


def _listing(folder: Path, naming: _Naming, template: str) -> dict[str, Path]:
    """Case number -> file for the .nii.gz files of ``folder`` (hidden files are ignored)."""
    pattern = naming.regex(template)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.name.endswith(FILE_ENDING):
            continue
        match = pattern.fullmatch(path.name)
        if match is None:
            raise InputError(f"unexpected file name; expected {template.replace('{id}', 'N')}", path)
        found[match[1]] = path
    return found


def _numbers(folder: Path, naming: _Naming) -> list[str]:
    return list(_listing(folder, naming, naming.image))


def _count_images(folder: Path) -> int:
    return sum(1 for path in folder.rglob(f"*{FILE_ENDING}") if not path.name.startswith("."))


def _pair_cases(images: Path, labels: Path, naming: _Naming) -> tuple[Case, ...]:
    """Image-label pairs; an image without its label (or the reverse) is an error naming the missing file."""
    image_files = _listing(images, naming, naming.image)
    label_files = _listing(labels, naming, naming.label)
    for number, image in image_files.items():
        if number not in label_files:
            expected = labels / naming.label.format(id=number)
            raise InputError(f"missing: no label for image {image.name}", expected)
    for number, label in label_files.items():
        if number not in image_files:
            expected = images / naming.image.format(id=number)
            raise InputError(f"missing: no image for label {label.name}", expected)
    if not image_files:
        raise InputError(f"holds no images named {naming.image.replace('{id}', 'N')}", images)
    cases = [Case(naming.case(n), n, image_files[n], label_files[n]) for n in image_files]
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(f"has the same case number as {seen[case.case_id].name}", case.image)
        seen[case.case_id] = case.image
    return tuple(sorted(cases, key=lambda case: case.case_id))


def _normalised(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


def _check_amos_dataset_json(root: Path) -> None:
    """The release's dataset.json, if any, must number labels as AMOS22 does and list no missing file."""
    path = root / "dataset.json"
    if not path.is_file():
        return
    data = load_json(path)
    labels = data.get("labels")
    expected = {str(s.value): s for s in AMOS22_LABELS}
    if not isinstance(labels, dict) or set(labels) != {"0", *expected}:
        raise InputError("'labels' is not the AMOS22 table of values 0-15", path)
    for value, structure in expected.items():
        accepted = {_normalised(structure.original), _normalised(structure.name)}
        if structure.term is not None:
            accepted.add(_normalised(TERMS[structure.term].name))
        if _normalised(str(labels[value])) not in accepted:
            raise InputError(f"label {value} is {labels[value]!r}; AMOS22 has {structure.original!r}", path)
    for split in ("training", "validation"):
        for entry in data.get(split) or ():
            for key in ("image", "label"):
                listed = entry.get(key) if isinstance(entry, dict) else None
                if not isinstance(listed, str):
                    continue
                file = root / listed.removeprefix("./")
                if file.parent.is_dir() and not file.exists():
                    raise InputError(f"missing, though listed in {split} of {path}", file)


def _source(dataset: str, reference: str, root: Path, naming: _Naming, table: Sequence[Structure]) -> dict:
    return {
        "dataset": dataset,
        "reference": reference,
        "folder": str(root.resolve()),
        "layout": {"image": naming.image, "label": naming.label},
        "original_labels": {str(s.value): s.original for s in table},
    }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m m4oe_training.converters",
        description="Convert FLARE22, AMOS22, ATLAS2023, CHAOS, BTCV or TotalSegmentator outputs into "
        "nnU-Net v2 dataset folders, or check one.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("flare22", "FLARE22 labelled CTs"), ("atlas2023", "ATLAS2023 liver/tumour MRIs")):
        command = commands.add_parser(name, help=text)
        command.add_argument("src", type=Path, help="the folder as distributed (see training/DATASETS.md)")
        command.add_argument("dst", type=Path, help="output dataset folder")
    amos = commands.add_parser("amos22", help="AMOS22, split into a CT and an MRI dataset")
    amos.add_argument("src", type=Path, help="the amos22/ folder (see training/DATASETS.md)")
    amos.add_argument("dst_ct", type=Path, help="output CT dataset folder")
    amos.add_argument("dst_mr", type=Path, help="output MRI dataset folder")
    for command in (commands.choices["flare22"], commands.choices["atlas2023"], amos):
        command.add_argument("--link", action="store_true", help="hard-link files instead of copying them")
        command.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    totalsegmentator = commands.add_parser(
        "totalsegmentator", help="scans with TotalSegmentator labels, mapped to the project's nine organs"
    )
    add_totalsegmentator_arguments(totalsegmentator)
    chaos = commands.add_parser(
        "chaos", help="CHAOS abdominal MRI (liver, kidneys, spleen): the DICOM/PNG release or NIfTI pairs"
    )
    add_chaos_arguments(chaos)
    btcv = commands.add_parser(
        "btcv", help="BTCV abdominal CT (13 organs), few-shot label volumes + PNG slices"
    )
    add_btcv_arguments(btcv)
    verify = commands.add_parser("verify", help="check an nnU-Net dataset folder")
    verify.add_argument("folder", type=Path)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "totalsegmentator":
        return run_from_arguments(args)
    progress = print_progress if sys.stderr.isatty() else None
    try:
        if args.command == "verify":
            summary = verify_dataset(args.folder, progress=progress)
            spacing = " x ".join(f"{s:.3g}" for s in summary.median_spacing)
            print(
                f"{summary.folder}: {len(summary.cases)} cases, channels {summary.channel_names}, "
                f"{len(summary.labels) - 1} labels, median spacing {spacing} mm"
            )
            return 0
        if args.command == "chaos":
            options = {"sequence": args.sequence, "overwrite": args.overwrite, "progress": progress}
            results = [convert_chaos(args.src, args.dst, **options)]
        elif args.command == "btcv":
            options = {"cases": args.cases, "overwrite": args.overwrite, "progress": progress}
            results = [convert_btcv(args.labels, args.slices, args.dst, **options)]
        elif args.command == "flare22":
            options = {"link": args.link, "overwrite": args.overwrite, "progress": progress}
            results = [convert_flare22(args.src, args.dst, **options)]
        elif args.command == "amos22":
            options = {"link": args.link, "overwrite": args.overwrite, "progress": progress}
            results = list(convert_amos22(args.src, args.dst_ct, args.dst_mr, **options))
        else:
            options = {"link": args.link, "overwrite": args.overwrite, "progress": progress}
            results = [convert_atlas2023(args.src, args.dst, **options)]
    except M4oEError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    for result in results:
        print(
            f"{result.dataset}: {len(result.cases)} cases -> {result.folder} "
            f"({result.unlabelled_skipped} unlabelled skipped)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
