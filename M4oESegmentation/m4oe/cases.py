"""The cases of a batch run: input files, folders searched for volumes and DICOM series, globs, and
CSV manifests with per-case options.

Every case has an id that names its outputs (``OUT_DIR/<case_id>.seg.nrrd``): unique within the
run and stable across runs, made from the input's path relative to the folder (or the fixed part of
the glob) it was found under, so that a re-run finds the outputs of an earlier one. Only the
paths are looked at here; the volumes are read when their case runs (:func:`m4oe.io.read_image`).
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .io import READ_EXTENSIONS

# Columns a manifest may have; every one but ``input`` may be left empty (the command line's value).
MANIFEST_COLUMNS = ("input", "output_name", "modality", "task", "force_expert", "tta", "through_plane_sigma")
MODALITIES = ("auto", "ct", "mr")
# Files that are certainly not DICOM: a folder holding only these (and volumes) is not asked for series.
_NOT_DICOM = (".json", ".csv", ".txt", ".md", ".png", ".jpg", ".jpeg", ".pdf", ".xml", ".html", ".py")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_WILDCARD = re.compile(r"[*?[]")


@dataclass(frozen=True)
class Case:
    """One volume to segment.

    ``input``: a volume file or a DICOM series folder. ``options``: the settings this case overrides
    (manifest cells), keyed as :data:`MANIFEST_COLUMNS` (``tta`` an int, ``through_plane_sigma`` a
    float in mm, the others strings). ``source``: where the case was listed (an argument, or
    ``manifest.csv:LINE``), named in errors.
    """

    case_id: str
    input: Path
    options: dict = field(default_factory=dict)
    source: str = ""


def collect_cases(inputs: list[str], exclude: Path | None = None) -> list[Case]:
    """The cases of ``inputs``, in the order given (folders and globs sorted by path).

    Each input is a CSV manifest (``.csv``), a volume file (any name: :func:`m4oe.io.read_image`
    judges it when its case runs), a folder (searched recursively for files ending in
    :data:`m4oe.io.READ_EXTENSIONS` and for folders holding a DICOM series, one case per folder),
    or a glob pattern (``*``, ``?``, ``[...]``, ``**`` for any depth) whose matches are taken as
    files and folders are. Hidden files and folders and the ``exclude`` folder (the output folder)
    are skipped. The same input reached twice is one case (the first).

    Case ids: a manifest's ``output_name``, else the path relative to the folder, or to the glob's
    part before its first wildcard, without the volume extension, folders joined by ``__`` and any
    character outside ``A-Za-z0-9._-`` replaced by ``_`` (``cohort/p01/ct.nii.gz`` given as
    ``cohort`` is ``p01__ct``); a file given by name is its name without extension; a folder given
    that itself holds a DICOM series is its name.

    Raises InputError: a path that does not exist, a glob that matches nothing, a folder with no
    volume, a malformed manifest, or two cases with the same id (the message names both inputs).
    """
    cases: list[Case] = []
    for text in inputs:
        path = Path(text)
        if path.suffix.lower() == ".csv" and path.is_file():
            cases += manifest_cases(path)
        elif path.exists():
            found = _path_cases(path, None, text, exclude)
            if not found:
                raise InputError("holds no volume (NIfTI, NRRD, MetaImage) and no DICOM series", path)
            cases += found
        elif _WILDCARD.search(text):
            base = Path(*_fixed_parts(text))  # Path() is the current folder
            matches = sorted(glob.glob(text, recursive=True))
            found = [c for m in matches for c in _path_cases(Path(m), base, text, exclude)]
            if not found:
                raise InputError(f"the pattern {text!r} matches no volume and no DICOM series")
            cases += found
        else:
            raise InputError("no such file or folder", path)
    return _unique(cases)


def manifest_cases(path: Path) -> list[Case]:
    """The cases of a CSV manifest: a header row, then one case per row.

    Columns (:data:`MANIFEST_COLUMNS`, any order, only ``input`` required): ``input`` (a volume
    file or DICOM folder, relative to the manifest's folder unless absolute), ``output_name`` (the
    case id; default: the input's name without extension), ``modality`` (auto, ct or mr),
    ``task``, ``force_expert`` (index or name), ``tta`` (passes, 1-5) and
    ``through_plane_sigma`` (mm). An empty cell takes the command line's value. A missing input
    file is not an error here: its case fails when it runs, and the others go on.

    Raises InputError naming the manifest and line: an unknown or missing column, an empty input,
    an output name that is not a safe file name, a modality, tta or sigma that is not valid.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot be read as a CSV manifest ({error})", path) from None
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InputError("manifest is empty; expected a header row with an 'input' column", path)
    header = [cell.strip().lower() for cell in rows[0]]
    unknown = [name for name in header if name not in MANIFEST_COLUMNS]
    if unknown:
        raise InputError(f"unknown manifest column(s) {unknown}; known: {', '.join(MANIFEST_COLUMNS)}", path)
    if "input" not in header:
        raise InputError("manifest has no 'input' column", path)
    if len(set(header)) != len(header):
        raise InputError("manifest names a column twice", path)
    cases = []
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path}:{line}"
        if len(row) > len(header):
            raise InputError(f"{len(row)} cells, but the header has {len(header)} columns", where)
        cells = {name: cell.strip() for name, cell in zip(header, row, strict=False) if cell.strip()}
        text = cells.pop("input", None)
        if text is None:
            raise InputError("empty input cell", where)
        source = Path(text).expanduser()
        source = source if source.is_absolute() else path.parent / source
        name = cells.pop("output_name", None)
        if name is None:
            case_id = _safe_id(_strip_extension(source.name))
        elif _UNSAFE.search(name) or name.startswith("."):
            raise InputError(
                f"output_name {name!r} is not a safe file name (letters, digits, '.', '_', '-')", where
            )
        else:
            case_id = name
        cases.append(Case(case_id, source, _case_options(cells, where), where))
    if not cases:
        raise InputError("manifest lists no case", path)
    return cases


def _case_options(cells: dict[str, str], where: str) -> dict:
    options: dict = dict(cells)
    if "modality" in options:
        options["modality"] = options["modality"].lower()
        if options["modality"] not in MODALITIES:
            raise InputError(f"modality {cells['modality']!r} is not one of {', '.join(MODALITIES)}", where)
    try:
        if "tta" in options:
            options["tta"] = int(options["tta"])
        if "through_plane_sigma" in options:
            options["through_plane_sigma"] = float(options["through_plane_sigma"])
    except ValueError as error:
        raise InputError(f"bad number in the manifest ({error})", where) from None
    return options


def _path_cases(path: Path, base: Path | None, source: str, exclude: Path | None) -> list[Case]:
    """Cases of one existing path: a file is one case, a folder is searched recursively.

    ``base``: the folder ids are made relative to (None: a file given by name keeps its name; a
    folder given is the base of what it holds).
    """
    if path.is_file():
        relative = path.name if base is None else os.path.relpath(path, base)
        return [Case(_id_from(relative), path, source=source)]
    base = path if base is None else base
    excluded = None if exclude is None else exclude.resolve()
    cases = []
    for folder, subfolders, files in os.walk(path):
        folder = Path(folder)
        subfolders[:] = sorted(
            d for d in subfolders if not d.startswith(".") and (folder / d).resolve() != excluded
        )
        if excluded is not None and folder.resolve() == excluded:
            subfolders[:] = []
            continue
        files = sorted(f for f in files if not f.startswith("."))
        volumes = [f for f in files if f.lower().endswith(READ_EXTENSIONS)]
        others = [f for f in files if f not in volumes and not f.lower().endswith(_NOT_DICOM)]
        if others and _holds_dicom_series(folder):
            relative = os.path.relpath(folder, base)
            name = folder.resolve().name if relative == "." else relative
            cases.append(Case(_id_from(name, extension=False), folder, source=source))
        for name in volumes:
            cases.append(Case(_id_from(os.path.relpath(folder / name, base)), folder / name, source=source))
    return cases


def _holds_dicom_series(folder: Path) -> bool:
    """Whether GDCM finds a DICOM series among the files of ``folder`` (not its subfolders)."""
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def _fixed_parts(pattern: str) -> list[str]:
    """The path components of a glob before its first component holding a wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _WILDCARD.search(part):
            break
        fixed.append(part)
    return fixed


def _id_from(relative: str, extension: bool = True) -> str:
    parts = Path(relative).parts
    last = _strip_extension(parts[-1]) if extension else parts[-1]
    return _safe_id("__".join([*parts[:-1], last]))


def _strip_extension(name: str) -> str:
    lower = name.lower()
    for ending in (*READ_EXTENSIONS, ".dcm"):
        if lower.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return name


def _safe_id(text: str) -> str:
    case_id = _UNSAFE.sub("_", text).lstrip(".")
    if not case_id:
        raise InputError(f"cannot make a case id from {text!r}; list it in a manifest with output_name")
    return case_id


def _unique(cases: list[Case]) -> list[Case]:
    """Drop repeats of one input (first kept); refuse two inputs with one case id."""
    seen_inputs: set[Path] = set()
    by_id: dict[str, Case] = {}
    unique = []
    for case in cases:
        resolved = case.input.resolve()
        if resolved in seen_inputs:
            continue
        seen_inputs.add(resolved)
        other = by_id.get(case.case_id)
        if other is not None:
            raise InputError(
                f"two inputs would have the case id {case.case_id!r}: {other.input} ({other.source}) and "
                f"{case.input} ({case.source}); list them in a manifest with distinct output_name values"
            )
        by_id[case.case_id] = case
        unique.append(case)
    return unique
