"""Every class of bad input or fault tried against ``m4oe segment``, ``evaluate``, ``info``,
``models`` and ``train``, in one table (issue 23): what was tried, the exit code, and the one line
it prints.

Each row of ``CASES`` builds its input in the test's folder and runs the command for real, in
this process (``m4oe.cli.main``), with the tiny untrained model of conftest.py. A row that
refuses asserts the exit code, that the error line matching ``message`` is the only line on
stderr (argparse's usage lines aside), and that nothing was added to or changed in the output
folder (unless the row lists what it ``leaves``) or in the model folder. A row that exits 0 (a
warning, or an input that is handled) asserts that one line of its output or of its logged
warnings matches ``message``, that stderr holds only warnings, and that the output it asked for
was written. Rows needing a signal from outside run ``m4oe`` as a real process; rows whose set-up
is slow (a full disk, a killed training run) name the dedicated test that runs them, and the test
here checks that test exists.

``message`` is the whole line, literal text except for ``...`` (any text: hashes, file system or
ITK wording, voxel data) and the placeholders ``{inputs}`` (the folder the bad inputs are made
in), ``{out}`` (the output folder), ``{model}`` (the tiny model's folder) and ``{pid}`` (this
process). Testing/README.md shows the same table; ``python Testing/test_input_classes.py
--write-table`` rewrites it there, and ``test_the_readme_table_is_generated_from_the_cases``
fails when the committed table differs from ``CASES``.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_inputs_hardening import dicom_series, mha, nifti, nrrd, values
from test_training_hardening import cropped_label, dataset, drop_label, write_config, wrong_count

from m4oe import cli
from m4oe.demo import synthetic_ct
from m4oe.io import MAX_VOXELS_ENV

TESTING = Path(__file__).resolve().parent
README = TESTING / "README.md"
TABLE_START = "<!-- input-classes:start: python Testing/test_input_classes.py --write-table -->"
TABLE_END = "<!-- input-classes:end -->"
PHANTOM_CT = TESTING / "data" / "embedded_phantom_ct.nii.gz"  # 128 x 128 x 57 voxels
SLICE_XYZ = (16, 16, 4)  # big enough in-plane for the tiny model's 64-pixel input (8x at most)


# --- where a case runs ---------------------------------------------------------------------------


@dataclass
class Place:
    """The folders of one case. ``inputs``: where the bad input is made; ``out``: every output the
    case asks for goes here (refused cases must leave it as it was); ``model``: the tiny model
    (shared: a case that damages a model copies it first); ``ct``: a valid 48 x 40 x 6 CT;
    ``phantoms``: a valid CT (2 cases) and T1 (1 case) nnU-Net dataset for ``train`` (shared);
    ``env``: environment variables set for the run; ``hold``: contexts held while it runs."""

    inputs: Path
    out: Path
    model: Path
    ct: Path
    phantoms: dict[str, Path]
    env: dict[str, str] = field(default_factory=dict)
    hold: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def segment(self, image, *extra, output: Path | None = None, model=None) -> list:
        """``m4oe segment`` of ``image`` into ``out/seg.nii.gz`` with the tiny model, one thread,
        one test-time pass; ``extra`` arguments last, so that they win."""
        output = self.out / "seg.nii.gz" if output is None else output
        model = self.model if model is None else model
        return ["segment", image, "-o", output, "--model", model, "--threads", "1", "--tta", "1", *extra]

    def train(self, damage: Callable[[Path], object] | None = None, **top) -> list:
        """``m4oe train`` of a tiny two-expert config into ``out/run``; ``damage`` edits a copy of the
        CT dataset first."""
        ct = self.phantoms["ct"]
        if damage is not None:
            ct = shutil.copytree(ct, self.inputs / "ct")
            damage(ct)
        datasets = [dataset(ct, "ct"), dataset(self.phantoms["t1"], "mr")]
        config = write_config(self.inputs / "cfg.toml", datasets, output_dir=str(self.out / "run"), **top)
        return ["train", config]


def image(path: Path, array: np.ndarray, **kwargs) -> Path:
    """Write ``array`` (z, y, x) as an image with unit spacing; return the path."""
    sitk.WriteImage(sitk.GetImageFromArray(array, **kwargs), str(path))
    return path


def ct_like(shape_zyx=(6, 40, 48)) -> np.ndarray:
    """Float32 CT-like values (HU) that vary across the volume."""
    return np.linspace(-1000, 400, int(np.prod(shape_zyx)), dtype=np.float32).reshape(shape_zyx)


def labels(origin=(0.0, 0.0, 0.0), value: int = 1, dtype=np.uint8) -> sitk.Image:
    """A 48 x 40 x 6 label map with one box of ``value``; unit spacing, at ``origin`` (mm)."""
    array = np.zeros((6, 40, 48), dtype)
    array[2:4, 10:20, 10:20] = value
    result = sitk.GetImageFromArray(array)
    result.SetOrigin(origin)
    return result


def label_file(path: Path, label_image: sitk.Image) -> Path:
    sitk.WriteImage(label_image, str(path))
    return path


def cut(path: Path, keep: int | None = None, drop: int | None = None) -> Path:
    """Cut ``path`` short: keep its first ``keep`` bytes, or drop its last ``drop``."""
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep is not None else data[: len(data) - drop])
    return path


def copy_model(p: Place) -> Path:
    return shutil.copytree(p.model, p.inputs / "model")


def edit_card(folder: Path, edit: Callable[[dict], object]) -> Path:
    card = json.loads((folder / "model.json").read_text())
    edit(card)
    (folder / "model.json").write_text(json.dumps(card))
    return folder


# --- builders: each makes one class of input in p.inputs and returns the command line ------------


def input_missing(p):
    return p.segment(p.inputs / "missing.nii.gz")


def input_empty(p):
    (p.inputs / "empty.nii.gz").write_bytes(b"")
    return p.segment(p.inputs / "empty.nii.gz")


def input_empty_folder(p):
    (p.inputs / "series").mkdir()
    return p.segment(p.inputs / "series")


def input_folder_without_dicom(p):
    (p.inputs / "series").mkdir()
    (p.inputs / "series" / "notes.txt").write_text("not a DICOM file")
    return p.segment(p.inputs / "series")


def input_unsupported_suffix(p):
    (p.inputs / "scan.txt").write_text("1 2 3")
    return p.segment(p.inputs / "scan.txt")


def input_photo(p):
    return p.segment(image(p.inputs / "photo.png", np.eye(16, dtype=np.uint8)))


def input_text_named_nifti(p):
    (p.inputs / "fake.nii.gz").write_text("hello")
    return p.segment(p.inputs / "fake.nii.gz")


def input_truncated_gzip(p):
    whole = shutil.copy(p.ct, p.inputs / "truncated.nii.gz")
    return p.segment(cut(Path(whole), keep=len(Path(whole).read_bytes()) // 2))


def input_short_data_in_whole_gzip(p):
    plain = image(p.inputs / "ct.nii", ct_like())
    (p.inputs / "short.nii.gz").write_bytes(gzip.compress(plain.read_bytes()[:-100]))
    return p.segment(p.inputs / "short.nii.gz")


def truncated(suffix: str):
    def build(p):
        path = p.inputs / f"truncated{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(ct_like()), str(path), useCompression=True)
        return p.segment(cut(path, drop=2000))

    return build


def input_mha_without_compressed_size(p):
    return p.segment(mha(p.inputs / "v.mha", SLICE_XYZ, data=zlib.compress(values(SLICE_XYZ))))


def input_non_finite(value: float, suffix: str, dtype=np.float32):
    def build(p):
        array = ct_like().astype(dtype)
        array[3, 20, 24] = value
        return p.segment(image(p.inputs / f"nonfinite{suffix}", array))

    return build


def input_2d(p):
    return p.segment(image(p.inputs / "slice.nii.gz", ct_like()[0]))


def input_4d(p):
    volume = sitk.GetImageFromArray(ct_like())
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(p.inputs / "frames.nii.gz"))
    return p.segment(p.inputs / "frames.nii.gz")


def input_single_slice(p):
    return p.segment(image(p.inputs / "one_slice.nii.gz", ct_like((1, 40, 48))))


def input_vector(p):
    rgb = np.zeros((6, 40, 48, 3), np.uint8)
    return p.segment(image(p.inputs / "rgb.nrrd", rgb, isVector=True))


def input_constant(p):
    return p.segment(image(p.inputs / "constant.nii.gz", np.full((6, 40, 48), -1000, np.int16)))


def input_too_small(p):
    return p.segment(image(p.inputs / "small.nii.gz", ct_like((4, 5, 5))))


def input_header_bomb(p):
    return p.segment(nrrd(p.inputs / "bomb.nrrd", (4000, 4000, 100), data=bytes(1000)))


def input_beyond_memory(p):
    bomb = nrrd(p.inputs / "bomb.nrrd", (100000, 100000, 1000), data=bytes(100))
    return p.segment(bomb, "--max-voxels", str(10**15))


def input_over_max_voxels(p):
    return p.segment(nrrd(p.inputs / "v.nrrd", SLICE_XYZ), "--max-voxels", "1000")


def input_over_env_max_voxels(p):
    p.env[MAX_VOXELS_ENV] = "1000"
    return p.segment(nrrd(p.inputs / "v.nrrd", SLICE_XYZ))


def bad_env_max_voxels(p):
    p.env[MAX_VOXELS_ENV] = "lots"
    return p.segment(p.ct)


def input_zero_spacing(p):
    return p.segment(nrrd(p.inputs / "v.nrrd", SLICE_XYZ, "(1,0,0) (0,0,0) (0,0,1)"))


def input_singular_direction(p):
    return p.segment(mha(p.inputs / "v.mha", SLICE_XYZ, "1 0 0 1 0 0 0 0 1"))


def input_sheared_direction(p):
    return p.segment(nrrd(p.inputs / "v.nrrd", SLICE_XYZ, "(1,0,0) (0.5,1,0) (0,0,1)"))


def input_sheared_sform(p):
    srow = ((1, 0.5, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0))
    return p.segment(nifti(p.inputs / "v.nii", SLICE_XYZ, (1, 1, 1), qform_code=1, sform_code=1, srow=srow))


def input_pixdim_zero(p):
    return p.segment(nifti(p.inputs / "v.nii.gz", SLICE_XYZ, (0.8, 0.0, 2.5)))


def input_sform_set_aside(p):
    srow = ((2, 0, 0, 0), (0, 2, 0, 0), (0, 0, 3, 0))
    return p.segment(nifti(p.inputs / "v.nii", SLICE_XYZ, (1, 1, 1), sform_code=1, srow=srow))


def dicom_single_file(p):
    folder = dicom_series(p.inputs / "series", ["0", "2", "4"])
    return p.segment(sorted(folder.iterdir())[0])


def dicom_two_series(p):
    folder = p.inputs / "series"
    dicom_series(folder, ["0", "2", "4", "6"], series_uid="1.2.826.0.1.3680043.2.1125.50")
    dicom_series(folder, ["0", "2", "4"], series_uid="1.2.826.0.1.3680043.2.1125.51", acquisition=2)
    return p.segment(folder)


def dicom_two_acquisitions(p):
    folder = p.inputs / "series"
    dicom_series(folder, ["0", "2", "4", "6", "8"], series_uid="", acquisition=1)
    dicom_series(folder, ["0", "2", "4", "6"], series_uid="", acquisition=2)
    return p.segment(folder)


def dicom_duplicate_positions(p):
    folder = p.inputs / "series"
    dicom_series(folder, ["0", "2", "4"], series_uid="")
    for file in folder.iterdir():
        file.rename(file.with_name("copy_" + file.name))
    dicom_series(folder, ["0", "2", "4"], series_uid="")
    return p.segment(folder)


def dicom_missing_slice(p):
    return p.segment(dicom_series(p.inputs / "series", ["0", "2", "4", "8", "10"]))


def dicom_rounded_positions(p):
    return p.segment(dicom_series(p.inputs / "series", ["-126.690002", "-127.690002", "-128.690002"]))


def unusual_path(p):
    folder = p.inputs / "scans – ü 'x' [1] $HOME"
    folder.mkdir()
    shutil.copy(p.ct, folder / "ct ü 'x'.nii.gz")
    return p.segment(folder / "ct ü 'x'.nii.gz", output=p.out / "seg ü 'x' (1).nii.gz")


def newline_in_name(p):
    return p.segment(image(p.inputs / "new\nline.nii.gz", ct_like()[0]))


# Models.


def unknown_model(p):
    return p.segment(p.ct, model="no-such-model")


def model_path_missing(p):
    return p.segment(p.ct, model=p.inputs / "no-model")


def pickle_as_safetensors(p):
    import torch

    model = copy_model(p)
    torch.save({"weight": torch.zeros(3)}, model / "model.safetensors")
    return p.segment(p.ct, model=model)


def tampered_weights(p):
    model = copy_model(p)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of some tensor, not of the header
    weights.write_bytes(bytes(data))
    return p.segment(p.ct, model=model)


def sha256_mismatch(p):
    return p.segment(p.ct, "--sha256", "0" * 64)


def sha256_malformed(p):
    return p.segment(p.ct, "--sha256", "zz")


def card_bad_json(p):
    model = copy_model(p)
    (model / "model.json").write_text("{not json")
    return ["info", model]


def card_without_sha256(p):
    return p.segment(p.ct, model=edit_card(copy_model(p), lambda card: card.update(weights_sha256="")))


def card_future_format(p):
    return ["info", edit_card(copy_model(p), lambda card: card.update(format_version=2))]


def card_without_weights(p):
    model = copy_model(p)
    (model / "model.safetensors").unlink()
    return p.segment(p.ct, model=model)


def weights_of_another_model(p):
    """The card says embed_dim 48; the weights (their checksum still the card's) are of embed_dim 24."""
    model = edit_card(copy_model(p), lambda card: card["architecture"].update(embed_dim=48))
    return p.segment(p.ct, model=model)


def registry_path_traversal(p):
    files = [
        {
            "path": "../" + name if name == "model.json" else name,
            "url": (p.model / name).as_uri(),
            "sha256": hashlib.sha256((p.model / name).read_bytes()).hexdigest(),
        }
        for name in ("model.json", "model.safetensors")
    ]
    entry = {
        "name": "evil",
        "description": "writes outside the cache",
        "files": files,
        "size_bytes": 1,
        "license": "CC0-1.0",
        "modality": ["CT"],
        "tasks": ["organs"],
    }
    registry = p.inputs / "registry.json"
    registry.write_text(json.dumps({"format_version": 1, "models": [entry]}))
    p.env["M4OE_MODEL_REGISTRY"] = str(registry)
    return ["models", "--download", "evil"]


# Arguments.


def argument(*extra):
    return lambda p: p.segment(p.ct, *extra)


def bad_gate_layer(p):
    return p.segment(p.ct, "--gates", p.out / "gates", "--gate-layer", "encoder.9.9")


# Outputs.


def output_exists(p):
    (p.out / "seg.nii.gz").write_bytes(b"a result the user wants to keep")
    return p.segment(p.ct)


def probabilities_exist(p):
    (p.out / "seg_probabilities.nrrd").write_bytes(b"kept")
    return p.segment(p.ct, "--probabilities")


def output_folder_missing(p):
    return p.segment(p.ct, output=p.out / "missing" / "seg.nii.gz")


def output_folder_is_a_file(p):
    (p.out / "blocker").write_text("a file, not a folder")
    return p.segment(p.ct, output=p.out / "blocker" / "seg.nii.gz")


def output_is_a_folder(p):
    (p.out / "seg.nii.gz").mkdir()
    return p.segment(p.ct, "--overwrite")


def output_read_only(p):
    p.out.chmod(0o500)
    p.hold.callback(p.out.chmod, 0o700)
    return p.segment(p.ct)


def output_suffix(p):
    return p.segment(p.ct, output=p.out / "seg.png")


def report_suffix(p):
    return p.segment(p.ct, "--report", p.out / "report.pdf")


def output_is_a_gate_map(p):
    return p.segment(p.ct, "--gates", p.out / "g", output=p.out / "g" / "gate_map.nrrd")


def gates_folder_is_the_output(p):
    return p.segment(p.ct, "--gates", p.out / "seg.nii.gz")


def gates_under_a_file(p):
    (p.out / "blocker").write_text("a file, not a folder")
    return p.segment(p.ct, "--gates", p.out / "blocker" / "gates")


# Evaluate.


def evaluate(p, pred: sitk.Image | Path, ref: sitk.Image | Path, *extra) -> list:
    files = []
    for name, item in (("pred.nii.gz", pred), ("ref.nii.gz", ref)):
        files.append(item if isinstance(item, Path) else label_file(p.inputs / name, item))
    return ["evaluate", *files, *extra]


def evaluate_no_overlap(p):
    return evaluate(p, labels(), labels(origin=(1000.0, 0.0, 0.0)))


def evaluate_other_grid(p):
    return evaluate(p, labels(), labels(origin=(1.0, 0.0, 0.0)))


def evaluate_fractional(p):
    return evaluate(p, labels(value=0.5, dtype=np.float32), labels())


def evaluate_negative(p):
    return evaluate(p, labels(value=-1, dtype=np.int16), labels())


def evaluate_value_not_in_task(p):
    return evaluate(p, labels(value=9), labels(), "--model", p.model, "--task", "abdomen")


def evaluate_missing_reference(p):
    return evaluate(p, labels(), p.inputs / "ref.nii.gz")


def evaluate_bad_label_map(p):
    (p.inputs / "map.json").write_text("{not json")
    return evaluate(p, labels(), labels(), "--label-map", p.inputs / "map.json")


def evaluate_dataset_names_none(p):
    dataset = p.inputs / "Dataset009"
    (dataset / "labelsTr").mkdir(parents=True)
    (dataset / "dataset.json").write_text('{"labels": {"background": 0, "gallbladder": 1}}')
    ref = label_file(dataset / "labelsTr" / "case_000.nii.gz", labels())
    return evaluate(p, labels(), ref, "--model", p.model, "--task", "abdomen")


def evaluate_bad_labels(p):
    return evaluate(p, labels(), labels(), "--labels", "liver,2")


def evaluate_label_zero(p):
    return evaluate(p, labels(), labels(), "--labels", "0")


def evaluate_header_bomb(p):
    return evaluate(p, nrrd(p.inputs / "bomb.nrrd", (4000, 4000, 100), data=bytes(1000)), labels())


# Train.


def train_config_missing(p):
    return ["train", p.inputs / "none.toml"]


def train_bad_toml(p):
    (p.inputs / "cfg.toml").write_text("name = \n")
    return ["train", p.inputs / "cfg.toml"]


def train_unknown_key(p):
    return p.train(batchsize=4)


def train_bad_override(p):
    return [*p.train(), "--set", "batch_size=two"]


def train_dataset_missing(p):
    config = write_config(
        p.inputs / "cfg.toml",
        [dataset(p.inputs / "nowhere", "ct"), dataset(p.phantoms["t1"], "mr")],
        output_dir=str(p.out / "run"),
    )
    return ["train", config]


def train_unknown_model(p):
    return p.train(model="no-such-model")


def train_folder_in_use(p):
    from m4oe_training.state import folder_lock

    p.hold.enter_context(folder_lock(p.out / "run"))  # a real flock on its own open file
    return p.train()


def train_output_is_a_file(p):
    (p.out / "run").write_text("a file, not a folder")
    return p.train()


# --- the table -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One class of input. ``build`` makes it and returns the ``m4oe`` arguments (None for a row
    ``covered_by`` a dedicated test: "test_module.py::test_function"). ``absent``: a phrase that
    must appear nowhere in the output. ``leaves``: what a refusal may leave in the output folder
    (glob patterns; nothing else may appear or change). ``signal``: sent to a real ``m4oe``
    process once inference has begun. ``not_as_root``: skipped as root, where folder permissions
    do not bind."""

    id: str
    tool: str
    input_class: str
    build: Callable[[Place], list] | None
    exit_code: int
    message: str
    covered_by: str | None = None
    absent: str | None = None
    signal: int | None = None
    not_as_root: bool = False
    leaves: tuple[str, ...] = ()


E = "m4oe: error: "
SEG = "m4oe segment: error: "
WROTE = "wrote segmentation: {out}/seg.nii.gz"
FORMATS = "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) or a DICOM series folder"
RAISE = "; if the volume is real, raise the limit with --max-voxels or M4OE_MAX_VOXELS"
LIMIT = "more than the limit of 1,073,741,824" + RAISE
LIMIT_1000 = "more than the limit of 1,000" + RAISE

# fmt: off
CASES = [
    # Input files.
    Case("input-missing", "segment", "input file missing",
        input_missing, 2, E + "{inputs}/missing.nii.gz: no such file or folder"),
    Case("input-empty-file", "segment", "empty (0-byte) file",
        input_empty, 2,
        E + "{inputs}/empty.nii.gz: cannot be read, corrupt or not an image (Unable to determine ImageIO"
        ' reader for "{inputs}/empty.nii.gz")'),
    Case("input-empty-folder", "segment", "empty folder (DICOM expected)",
        input_empty_folder, 2, E + "{inputs}/series: folder holds no DICOM series"),
    Case("input-folder-without-dicom", "segment", "folder of non-DICOM files",
        input_folder_without_dicom, 2, E + "{inputs}/series: folder holds no DICOM series"),
    Case("input-unsupported-suffix", "segment", "text file with an unsupported suffix",
        input_unsupported_suffix, 2,
        E + "{inputs}/scan.txt: is not a supported image file; expected " + FORMATS),
    Case("input-png", "segment", "a PNG picture",
        input_photo, 2, E + "{inputs}/photo.png: is not a supported image file; expected " + FORMATS),
    Case("input-text-named-nifti", "segment", "text file named .nii.gz",
        input_text_named_nifti, 2,
        E + "{inputs}/fake.nii.gz: cannot be read, corrupt or not an image (Unable to determine ImageIO"
        ' reader for "{inputs}/fake.nii.gz")'),
    Case("truncated-nii-gz", "segment", ".nii.gz cut in half",
        input_truncated_gzip, 2,
        E + "{inputs}/truncated.nii.gz: is truncated or corrupt (Compressed file ended before the"
        " end-of-stream marker was reached)"),
    Case("truncated-nii-gz-data", "segment", "whole gzip stream, NIfTI data short",
        input_short_data_in_whole_gzip, 2,
        E + "{inputs}/short.nii.gz: is truncated: 100 bytes of voxel data missing"),
    Case("truncated-nii", "segment", ".nii with its last 2000 bytes cut",
        truncated(".nii"), 2, E + "{inputs}/truncated.nii: is truncated: 2000 bytes of voxel data missing"),
    Case("truncated-nrrd", "segment", "gzip .nrrd with its last 2000 bytes cut",
        truncated(".nrrd"), 2,
        E + "{inputs}/truncated.nrrd: cannot be read, corrupt or truncated (_nrrdEncodingGzip_read:"
        " expected 46080 bytes but received ...)"),
    Case("truncated-mha", "segment", "compressed .mha with its last 2000 bytes cut",
        truncated(".mha"), 2,
        E + "{inputs}/truncated.mha: cannot be read, corrupt or truncated (MetaImage: M_ReadElementsData:"
        " data not read completely ideal = ... : actual = ...)"),
    Case("mha-without-compressed-size", "segment", "compressed .mha whose header lacks CompressedDataSize",
        input_mha_without_compressed_size, 2,
        E + "{inputs}/v.mha: cannot be read, corrupt or truncated (Uncompress failed)"),
    Case("nan-nifti", "segment", "NaN voxel in a float NIfTI",
        input_non_finite(np.nan, ".nii.gz"), 2,
        E + "{inputs}/nonfinite.nii.gz: holds 1 NaN or infinite voxels"),
    Case("inf-nrrd", "segment", "infinite voxel in a float NRRD",
        input_non_finite(np.inf, ".nrrd"), 2,
        E + "{inputs}/nonfinite.nrrd: holds 1 NaN or infinite voxels (or values beyond float32 range)"),
    Case("float64-beyond-float32", "segment", "float64 value beyond float32 range",
        input_non_finite(1e300, ".mha", np.float64), 2,
        E + "{inputs}/nonfinite.mha: holds 1 NaN or infinite voxels (or values beyond float32 range)"),
    Case("2d-image", "segment", "2D image",
        input_2d, 2, E + "{inputs}/slice.nii.gz: is a 2D image (size 48x40); expected a 3D volume"),
    Case("4d-image", "segment", "4D image (two frames)",
        input_4d, 2, E + "{inputs}/frames.nii.gz: is a 4D image (size 48x40x6x2); expected a 3D volume"),
    Case("single-slice", "segment", "3D volume of one slice",
        input_single_slice, 2,
        E + "{inputs}/one_slice.nii.gz: has size 48x40x1 (x, y, z): a single slice; expected a 3D volume with"
        " at least 2 voxels along each axis"),
    Case("vector-voxels", "segment", "RGB (vector) voxels",
        input_vector, 2,
        E + "{inputs}/rgb.nrrd: has 3 components per voxel (vector or RGB); expected a scalar volume"),
    Case("constant-volume", "segment", "every voxel the same value",
        input_constant, 2, E + "{inputs}/constant.nii.gz: is empty: every voxel has the value -1000"),
    Case("slices-too-small", "segment", "slices of 5x5 pixels",
        input_too_small, 2,
        E + "{inputs}/small.nii.gz: slices of 5x5 pixels are too small for this model's 64-pixel input (at"
        " least 8 pixels per side)"),
    Case("header-memory-bomb", "segment", "1 kB gzip NRRD whose header claims 4000x4000x100",
        input_header_bomb, 2,
        E + "{inputs}/bomb.nrrd: has size 4000x4000x100 (x, y, z) = 1,600,000,000 voxels (3.2 GB to read), "
        + LIMIT),
    Case("beyond-memory", "segment", "header claiming more than the memory, limit raised",
        input_beyond_memory, 2,
        E + "{inputs}/bomb.nrrd: has size 100000x100000x1000 (x, y, z) = 10,000,000,000,000 voxels, 20000.0"
        " GB to read: more than this computer's ... GB of memory"),
    Case("over-max-voxels", "segment", "volume above --max-voxels",
        input_over_max_voxels, 2,
        E + "{inputs}/v.nrrd: has size 16x16x4 (x, y, z) = 1,024 voxels (0.0 GB to read), " + LIMIT_1000),
    Case("over-env-max-voxels", "segment", "volume above M4OE_MAX_VOXELS",
        input_over_env_max_voxels, 2,
        E + "{inputs}/v.nrrd: has size 16x16x4 (x, y, z) = 1,024 voxels (0.0 GB to read), " + LIMIT_1000),
    Case("bad-env-max-voxels", "segment", "M4OE_MAX_VOXELS not a number",
        bad_env_max_voxels, 2, E + "M4OE_MAX_VOXELS must be a positive number of voxels, got 'lots'"),
    Case("zero-spacing", "segment", "zero spacing (NRRD space directions)",
        input_zero_spacing, 2,
        E + "{inputs}/v.nrrd: has voxel spacing 1 x 0 x 1 mm (x, y, z): zero or not a number along y;"
        " expected a positive voxel size along every axis"),
    Case("singular-direction", "segment", "singular direction matrix (MetaImage)",
        input_singular_direction, 2,
        E + "{inputs}/v.mha: has a singular direction matrix: the voxel axes x (1 0 0), y (1 0 0), z (0 0 1)"
        " do not span 3D space (two are parallel or one is zero); the header is corrupt"),
    Case("sheared-direction", "segment", "non-orthonormal (sheared) direction (NRRD)",
        input_sheared_direction, 2,
        E + "{inputs}/v.nrrd: has direction cosines that are not orthonormal (axes x and y are 63.43 degrees"
        " apart, expected 90): a sheared or scaled grid cannot be kept exactly, so the output could not have"
        " the input's direction"),
    Case("sheared-nifti-sform", "segment", "sheared NIfTI sform",
        input_sheared_sform, 2,
        E + "{inputs}/v.nii: has a sheared NIfTI sform (axes x and y are 63.43 degrees apart, expected 90):"
        " its voxels are not on a rectangular grid, which ITK would silently replace by the qform, so the"
        " output could not have the input's geometry"),
    Case("nifti-pixdim-zero", "segment", "NIfTI pixdim 0 (read as 1 mm)",
        input_pixdim_zero, 0,
        "WARNING: {inputs}/v.nii.gz: NIfTI pixdim gives voxel size 0 along y; read as 1 mm, so distances,"
        " volumes and the in-plane resampling may be wrong"),
    Case("nifti-sform-set-aside", "segment", "NIfTI sform that ITK sets aside for the qform",
        input_sform_set_aside, 0,
        "WARNING: {inputs}/v.nii: NIfTI sform (voxel size 2 x 2 x 3 mm) was set aside by ITK, which read the"
        " qform and pixdim instead (voxel size 1 x 1 x 1 mm; the sform's scales disagree with pixdim or its"
        " rotation with the qform's): check the geometry",
        absent="WARNING: In"),
    Case("input-unusual-characters", "segment", "spaces, quotes, brackets, $, non-ASCII in paths",
        unusual_path, 0, "wrote segmentation: {out}/seg ü 'x' (1).nii.gz"),
    Case("input-newline-in-name", "segment", "newline in the input's name",
        newline_in_name, 2, E + "{inputs}/new line.nii.gz: is a 2D image (size 48x40); expected a 3D volume"),
    # DICOM.
    Case("dicom-single-file", "segment", "one file of a DICOM series",
        dicom_single_file, 2,
        E + "{inputs}/series/acq1_000.dcm: is a single DICOM file; pass the folder that holds the whole"
        " series"),
    Case("dicom-two-series", "segment", "folder holding two series",
        dicom_two_series, 0,
        "WARNING: {inputs}/series: holds 2 DICOM series; read series '1.2.826.0.1.3680043.2.1125.50' (4"
        " files), the one with the most files"),
    Case("dicom-two-acquisitions", "segment", "two acquisitions under one blank SeriesInstanceUID",
        dicom_two_acquisitions, 0,
        "WARNING: {inputs}/series: DICOM series (blank SeriesInstanceUID) holds 2 acquisitions with slices"
        " at the same positions; read the one with the most slices (acquisition number 1, 5 files)"),
    Case("dicom-duplicate-positions", "segment", "two copies of a series, nothing to tell them apart",
        dicom_duplicate_positions, 2,
        E + "{inputs}/series: DICOM series (blank SeriesInstanceUID) holds 6 slices at only 3 distinct"
        " positions: several acquisitions share it and no series or acquisition number tells them apart; put"
        " each acquisition in a folder of its own"),
    Case("dicom-missing-slice", "segment", "series with a slice missing",
        dicom_missing_slice, 0,
        "WARNING: {inputs}/series: DICOM slices are unevenly spaced or some are missing (gaps of 2 to 4 mm);"
        " read on an even grid of 2.5 mm"),
    Case("dicom-rounded-positions", "segment", "evenly spaced series, positions rounded in the header",
        dicom_rounded_positions, 0, WROTE, absent="unevenly spaced"),
    # Models.
    Case("unknown-model", "segment", "unknown model name",
        unknown_model, 4, E + "unknown model 'no-such-model'; available: ..."),
    Case("model-path-missing", "segment", "model folder missing",
        model_path_missing, 4, E + "{inputs}/no-model: no such model folder or file"),
    Case("pickle-as-safetensors", "segment", "pickle (torch.save) renamed model.safetensors",
        pickle_as_safetensors, 4,
        E + "{inputs}/model/model.safetensors: refusing a pickle-based PyTorch file: unpickling can run"
        " arbitrary code, so m4oe loads only safetensors weights with a JSON model card (see"
        " m4oe.checkpoint.save_checkpoint)"),
    Case("tampered-weights", "segment", "one byte of the weights changed",
        tampered_weights, 4,
        E + "{inputs}/model/model.safetensors: SHA-256 mismatch: the file hashes to ..., its card model.json"
        " records ...; the weights changed after the card was written"),
    Case("sha256-mismatch", "segment", "--sha256 of other weights",
        sha256_mismatch, 4,
        E + "{model}/model.safetensors: SHA-256 mismatch: the file hashes to ..., expected " + "0" * 64),
    Case("sha256-malformed", "segment", "--sha256 not 64 hex digits",
        sha256_malformed, 2, E + "expected SHA-256 'zz' is not 64 hex digits"),
    Case("card-bad-json", "info", "model card that is not JSON",
        card_bad_json, 4, E + "{inputs}/model/model.json: model card is not valid JSON: ..."),
    Case("card-future-format", "info", "model card of an unknown format_version",
        card_future_format, 4,
        E + "{inputs}/model/model.json: model card format_version 2 is not supported; this engine (m4oe ...)"
        " reads format_version 1"),
    Case("card-without-sha256", "segment", "card with an empty weights_sha256 (loads unverified)",
        card_without_sha256, 0,
        "WARNING: {inputs}/model/model.safetensors: its card model.json records no weights_sha256, and no"
        " --sha256 was given: the weights are loaded unverified"),
    Case("weights-missing", "segment", "card without its weights file",
        card_without_weights, 4,
        E + "{inputs}/model/model.safetensors: weights not found (the card model.json expects them here)"),
    Case("weights-of-another-model", "segment", "weights of another architecture under the card",
        weights_of_another_model, 4,
        E + "{inputs}/model/model.safetensors: weights do not fit the card's architecture; wrong shape ...:"
        " patch_embed.proj.weight (24, 1, 4, 4) (architecture: (48, 1, 4, 4)), ..."),
    Case("registry-path-traversal", "models", "registry entry with a ../ file path",
        registry_path_traversal, 4,
        E + "{inputs}/registry.json: models[0] (evil): files[0]: path must be a relative path inside the"
        " model folder, got '../model.json'"),
    # Arguments.
    Case("bad-task", "segment", "--task bogus",
        argument("--task", "bogus"), 2, E + "unknown task 'bogus'; this model has ['abdomen', 'liver']"),
    Case("bad-force-expert-index", "segment", "--force-expert 7 (3 experts)",
        argument("--force-expert", "7"), 2,
        E + "expert index 7 out of range; this model has 3 experts ['ct', 'mr', 'mr-t2']"),
    Case("bad-force-expert-name", "segment", "--force-expert bone",
        argument("--force-expert", "bone"), 2,
        E + "unknown expert 'bone'; this model has ['ct', 'mr', 'mr-t2']"),
    Case("bad-gate-layer", "segment", "--gate-layer encoder.9.9",
        bad_gate_layer, 2, E + "unknown gate layer 'encoder.9.9'; this model has ['encoder.0.0', ...]"),
    Case("gate-layer-without-gates", "segment", "--gate-layer without --gates",
        argument("--gate-layer", "encoder.0.0"), 2,
        E + "--gate-layer chooses the layer the gate maps show; it needs --gates DIR"),
    Case("bad-threads-zero", "segment", "--threads 0",
        argument("--threads", "0"), 2, E + "threads must be at least 1, got 0"),
    Case("bad-threads-text", "segment", "--threads x",
        argument("--threads", "x"), 2, SEG + "argument --threads: invalid int value: 'x'"),
    Case("bad-tta-zero", "segment", "--tta 0",
        argument("--tta", "0"), 2, E + "test-time passes must be an integer 1-5, got 0"),
    Case("bad-tta-high", "segment", "--tta 9",
        argument("--tta", "9"), 2, E + "test-time passes must be an integer 1-5, got 9"),
    Case("bad-batch-size", "segment", "--batch-size 0",
        argument("--batch-size", "0"), 2, E + "batch size must be at least 1, got 0"),
    Case("bad-sigma", "segment", "--through-plane-sigma -1",
        argument("--through-plane-sigma", "-1"), 2,
        E + "through-plane sigma must be a number of mm >= 0, got -1.0"),
    Case("bad-modality", "segment", "--modality pet",
        argument("--modality", "pet"), 2,
        SEG + "argument --modality: invalid choice: 'pet' (choose from ...)"),
    Case("bad-device", "segment", "--device bogus",
        argument("--device", "bogus"), 2, E + "device 'bogus' is not one of auto, cpu, cuda (or cuda:N)"),
    Case("bad-max-voxels", "segment", "--max-voxels 0",
        argument("--max-voxels", "0"), 2, E + "--max-voxels must be a positive number of voxels, got 0"),
    # Outputs.
    Case("output-exists", "segment", "output exists, no --overwrite",
        output_exists, 3, E + "{out}/seg.nii.gz: exists; pass --overwrite to replace it"),
    Case("probabilities-exist", "segment", "probabilities output exists, no --overwrite",
        probabilities_exist, 3, E + "{out}/seg_probabilities.nrrd: exists; pass --overwrite to replace it"),
    Case("output-folder-missing", "segment", "output folder missing",
        output_folder_missing, 3, E + "{out}/missing: folder does not exist"),
    Case("output-folder-is-a-file", "segment", "output folder is a file",
        output_folder_is_a_file, 3, E + "{out}/blocker: is not a folder"),
    Case("output-is-a-folder", "segment", "output name is a folder",
        output_is_a_folder, 3, E + "{out}/seg.nii.gz: is a folder; expected a file name"),
    Case("output-read-only", "segment", "output folder not writable (not run as root)",
        output_read_only, 3, E + "{out}: folder is not writable", not_as_root=True),
    Case("output-suffix", "segment", "unsupported output suffix (.png)",
        output_suffix, 3,
        E + "{out}/seg.png: unsupported output format; use .seg.nrrd, .dcm (DICOM SEG) or one of"
        " .nii.gz, .nii, .nrrd, .mha"),
    Case("report-suffix", "segment", "--report not .png",
        report_suffix, 3, E + "{out}/report.pdf: a report must be written as .png"),
    Case("output-is-a-gate-map", "segment", "-o DIR/gate_map.nrrd --gates DIR",
        output_is_a_gate_map, 3,
        E + "{out}/g/gate_map.nrrd: would be written twice, as the segmentation and as the gate map"),
    Case("gates-folder-is-the-output", "segment", "--gates OUT with -o OUT",
        gates_folder_is_the_output, 3,
        E + "{out}/seg.nii.gz: is the segmentation output and also a folder of the gate map output"),
    Case("gates-under-a-file", "segment", "--gates folder below a file",
        gates_under_a_file, 3, E + "{out}/blocker: is not a folder"),
    Case("full-disk", "segment", "disk full while writing (256 KiB tmpfs)",
        None, 3, E + "{out}/seg.nii.gz: cannot be written (No space left on device...)",
        covered_by="test_outputs_hardening.py::test_segment_on_a_full_disk_exits_3_with_the_disks_error_and_writes_nothing"),
    Case("disk-full-midway", "segment", "disk full after the label map, before the gate maps",
        None, 3, E + "...: cannot be written (No space left on device...)",
        covered_by="test_outputs_hardening.py::test_segment_running_out_of_space_midway_removes_every_output"),
    Case("short-write", "segment", "writer returns but leaves a short file",
        None, 3, E + "...: cannot be written (incomplete file: ...)",
        covered_by="test_outputs_hardening.py::test_write_atomic_refuses_a_file_its_writer_left_short"),
    # Signals.
    Case("sigint", "segment", "Ctrl-C (SIGINT) during inference",
        lambda p: p.segment(PHANTOM_CT), 130, E + "interrupted", signal=signal.SIGINT),
    Case("sigterm", "segment", "SIGTERM during inference",
        None, 143, E + "terminated (SIGTERM)",
        covered_by="test_outputs_hardening.py::test_sigterm_during_inference_ends_the_run_like_ctrl_c"),
    Case("sigterm-while-writing", "segment", "SIGTERM while the outputs are written",
        None, 143, E + "terminated (SIGTERM)",
        covered_by="test_outputs_hardening.py::test_sigterm_while_the_outputs_are_written_leaves_no_file"),
    Case("sigkill-leftovers", "segment", "SIGKILL: temporary files left, removed by the next run",
        None, 0, "(stale temporary files removed)",
        covered_by="test_outputs_hardening.py::test_the_next_run_sweeps_temporary_files_a_killed_run_left"),
    # Evaluate.
    Case("evaluate-missing-reference", "evaluate", "reference file missing",
        evaluate_missing_reference, 2, E + "{inputs}/ref.nii.gz: no such file or folder"),
    Case("evaluate-no-overlap", "evaluate", "reference on a grid 1 m away",
        evaluate_no_overlap, 2,
        E + "{inputs}/ref.nii.gz: does not overlap the prediction {inputs}/pred.nii.gz in space (origin"
        " (0, 0, 0) vs (1000, 0, 0) mm)"),
    Case("evaluate-other-grid", "evaluate", "reference on a shifted grid (resampled)",
        evaluate_other_grid, 0,
        "note: reference resampled onto the prediction grid (nearest neighbour): origin (0, 0, 0) vs (1, 0,"
        " 0) mm"),
    Case("evaluate-fractional", "evaluate", "prediction of non-integer values",
        evaluate_fractional, 2, E + "{inputs}/pred.nii.gz: is not a label map: it holds non-integer values"),
    Case("evaluate-negative", "evaluate", "prediction with a negative label",
        evaluate_negative, 2, E + "{inputs}/pred.nii.gz: holds a negative label value -1"),
    Case("evaluate-value-not-in-task", "evaluate", "prediction value 9 not in the model's task",
        evaluate_value_not_in_task, 0, "...9  -  ... absent from reference"),
    Case("evaluate-bad-label-map", "evaluate", "--label-map not JSON",
        evaluate_bad_label_map, 2, E + "{inputs}/map.json: not valid JSON (...)"),
    Case("evaluate-dataset-names-none", "evaluate",
        "--model, reference in an nnU-Net data set whose dataset.json names none of its structures",
        evaluate_dataset_names_none, 2,
        E + "{inputs}/Dataset009/dataset.json: labels none of the structures to score (...); its labels: "
        "gallbladder; pass --label-map"),
    Case("evaluate-bad-labels", "evaluate", "--labels liver,2",
        evaluate_bad_labels, 2, E + "--labels must be comma-separated integers, got 'liver,2'"),
    Case("evaluate-label-zero", "evaluate", "--labels 0",
        evaluate_label_zero, 2, E + "labels: label 0 is not a positive integer"),
    Case("evaluate-header-bomb", "evaluate", "prediction whose header claims 1.6 billion voxels",
        evaluate_header_bomb, 2,
        E + "{inputs}/bomb.nrrd: has size 4000x4000x100 (x, y, z) = 1,600,000,000 voxels (3.2 GB to read), "
        + LIMIT),
    # Train.
    Case("train-config-missing", "train", "config file missing",
        train_config_missing, 2, E + "{inputs}/none.toml: no such config file"),
    Case("train-bad-toml", "train", "config not valid TOML",
        train_bad_toml, 2, E + "{inputs}/cfg.toml: not valid TOML: ..."),
    Case("train-unknown-key", "train", "config key misspelt (batchsize)",
        train_unknown_key, 2, E + "{inputs}/cfg.toml: unknown key batchsize; expected one of ..."),
    Case("train-bad-override", "train", "--set batch_size=two",
        train_bad_override, 2, E + "{inputs}/cfg.toml: batch_size: expected an integer, got 'two'"),
    Case("train-dataset-missing", "train", "dataset folder missing",
        train_dataset_missing, 2,
        E + "{inputs}/nowhere/dataset.json: missing; an nnU-Net dataset folder needs a dataset.json"),
    Case("train-missing-label", "train", "image without its label map",
        lambda p: p.train(drop_label), 2,
        E + "{inputs}/ct/labelsTr/phantomct_001.nii.gz: missing: no label for image"
        " phantomct_001_0000.nii.gz"),
    Case("train-wrong-numtraining", "train", "numTraining one more than the cases",
        lambda p: p.train(wrong_count), 2,
        E + "{inputs}/ct/dataset.json: numTraining is 3 but labelsTr holds 2 cases"),
    Case("train-shape-mismatch", "train", "label map two slices shorter than its image",
        lambda p: p.train(cropped_label), 2,
        E + "{inputs}/ct/labelsTr/phantomct_001.nii.gz: geometry differs from its image"
        " phantomct_001_0000.nii.gz: size (48, 48, 46) vs (48, 48, 48) (label vs image)"),
    Case("train-unknown-model", "train", "config naming an unknown model",
        train_unknown_model, 2,
        E + "model 'no-such-model': unknown model 'no-such-model'; registered: [...]"),
    Case("train-folder-in-use", "train", "run folder locked by another run",
        train_folder_in_use, 3, E + "{out}/run: folder in use by another training run (pid {pid})"),
    Case("train-output-is-a-file", "train", "run folder is a file",
        train_output_is_a_file, 3, E + "{out}/run: cannot hold the run's lock file train.lock (File exists)"),
    Case("train-killed-and-resumed", "train", "run stopped and resumed (bit-identical weights)",
        None, 0, "(resumed run bit-identical to an uninterrupted one)",
        covered_by="test_training.py::test_resumed_run_is_bit_identical_to_an_uninterrupted_one"),
    Case("train-killed-after-log-row", "train", "killed between the log row and the state save",
        None, 0, "(one log row per epoch after --resume)",
        covered_by="test_training_hardening.py::test_a_run_killed_between_log_row_and_state_save_resumes_without_a_duplicate_row"),
    Case("train-killed-inside-state-save", "train", "killed between the state save's renames",
        None, 0, "(resumes from the newest state)",
        covered_by="test_training_hardening.py::test_a_run_killed_inside_the_state_save_resumes_from_the_newest_state"),
]
# fmt: on


# --- running a case ------------------------------------------------------------------------------


def pattern(message: str, place: Place) -> re.Pattern:
    """The regular expression of a ``message`` template: ``...`` any text, the placeholders the
    case's paths and this process's id, the rest literal."""
    paths = {"{inputs}": place.inputs, "{out}": place.out, "{model}": place.model, "{pid}": os.getpid()}
    parts = re.split(r"(\.\.\.|\{inputs\}|\{out\}|\{model\}|\{pid\})", message)
    regex = "".join(
        ".*" if part == "..." else re.escape(str(paths[part])) if part in paths else re.escape(part)
        for part in parts
    )
    return re.compile(regex, re.DOTALL)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder below ``folder`` (hidden ones included) with a hash of each file."""
    found = {}
    for where, folders, files in os.walk(folder):
        for name in folders:
            found[os.path.relpath(os.path.join(where, name), folder)] = "<folder>"
        for name in files:
            path = os.path.join(where, name)
            found[os.path.relpath(path, folder)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def run_in_process(argv: list[str], capsys, caplog) -> tuple[int, list[str], list[str]]:
    """``m4oe ARGV`` in this process: (exit code, stdout lines, stderr lines). Logged warnings are
    added to stderr as the command line prints them, ``WARNING: message``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    captured = capsys.readouterr()
    logged = [f"{r.levelname}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    return code, captured.out.splitlines(), captured.err.splitlines() + logged


def default_sigint() -> None:
    """Run in the child before it starts (``preexec_fn``): Ctrl-C's default action. A test run
    started in the background by a script (``cmd &``) has SIGINT ignored, children inherit that,
    and Python then installs no KeyboardInterrupt handler: the child would never see the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_with_signal(argv: list[str], signum: int, cwd: Path) -> tuple[int, list[str], list[str]]:
    """``m4oe ARGV --progress json`` as a real process, sent ``signum`` once inference has begun."""
    process = subprocess.Popen(
        [sys.executable, "-m", "m4oe.cli", *argv, "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parents[1])},
        preexec_fn=default_sigint,
    )
    seen = ""
    while '"stage": "inference"' not in seen:
        line = process.stdout.readline()
        assert line, process.communicate()[1]
        seen += line
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    return process.returncode, (seen + out).splitlines(), err.splitlines()


def check(case: Case, place: Place, code: int, out: list[str], err: list[str], before: dict, argv) -> None:
    shown = "\n".join(["stdout:", *out, "stderr:", *err])
    assert code == case.exit_code, shown
    regex = pattern(case.message, place)
    assert not any("Traceback" in line for line in err), shown
    if case.absent is not None:
        assert not any(case.absent in line for line in out + err), shown
    if case.exit_code != 0:
        assert err and regex.fullmatch(err[-1]), f"expected {regex.pattern!r}\n{shown}"
        usage = err[-1].startswith(SEG)
        # One error line; argparse prints its usage lines first.
        assert [line for line in err if "error:" in line] == [err[-1]], shown
        assert usage or len(err) == 1, shown
        after = snapshot(place.out)
        changed = [k for k in after.keys() | before["out"].keys() if after.get(k) != before["out"].get(k)]
        assert all(any(fnmatch(k, leaves) for leaves in case.leaves) for k in changed), changed
        assert not any("wrote" in line for line in out), shown
    else:
        assert [line for line in out + err if regex.fullmatch(line)], f"expected {regex.pattern!r}\n{shown}"
        # Warnings in one line each, in the command's words: nothing a library printed.
        assert all(line.startswith("WARNING: ") for line in err), shown
        if "-o" in argv:
            assert Path(argv[argv.index("-o") + 1]).is_file(), "the output was not written"
    assert snapshot(place.model) == before["model"], "the shared model was changed"


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A synthetic CT of 48 x 40 x 6 voxels (x, y, z), 6 x 6 x 8 mm."""
    path = tmp_path_factory.mktemp("ct") / "ct.nii.gz"
    sitk.WriteImage(synthetic_ct((6, 40, 48), (6.0, 6.0, 8.0)), str(path))
    return path


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    from m4oe.phantom import write_dataset

    root = tmp_path_factory.mktemp("phantoms")
    return {
        "ct": write_dataset(root / "ct", "ct", 2, seed=0, max_size=48),
        "t1": write_dataset(root / "t1", "t1", 1, seed=0, max_size=48),
    }


RUN = [c for c in CASES if c.covered_by is None]


@pytest.mark.parametrize("case", RUN, ids=[c.id for c in RUN])
def test_input_class(case, tmp_path, tiny_model_dir, ct, phantoms, capsys, caplog, monkeypatch):
    if case.not_as_root and hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("folder permissions do not bind root")
    monkeypatch.setenv("M4OE_CACHE_DIR", str(tmp_path / "cache"))  # no cached or downloaded model
    monkeypatch.delenv("M4OE_MODEL_REGISTRY", raising=False)
    monkeypatch.delenv(MAX_VOXELS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    place = Place(tmp_path / "inputs", tmp_path / "out", tiny_model_dir, ct, phantoms)
    place.inputs.mkdir()
    place.out.mkdir()
    with place.hold:
        argv = [str(a) for a in case.build(place)]
        for name, value in place.env.items():
            monkeypatch.setenv(name, value)
        before = {"out": snapshot(place.out), "model": snapshot(place.model)}
        if case.signal is not None:
            code, out, err = run_with_signal(argv, case.signal, tmp_path)
        else:
            code, out, err = run_in_process(argv, capsys, caplog)
        check(case, place, code, out, err, before, argv)


def test_every_case_is_distinct_and_covered_rows_name_a_test_that_exists():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len(CASES) >= 45
    for case in CASES:
        assert case.tool in ("segment", "evaluate", "info", "models", "train"), case.id
        assert (case.build is None) == (case.covered_by is not None), case.id
        if case.covered_by:
            module, function = case.covered_by.split("::")
            tree = ast.parse((TESTING / module).read_text())
            names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
            assert function in names, f"{case.id}: {case.covered_by} does not exist"
        if case.exit_code != 0 and case.covered_by is None:
            assert case.message.startswith((E, SEG)), case.id


# --- the table in Testing/README.md ----------------------------------------------------------------


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table() -> str:
    """The README's table of ``CASES``: one row a class, in the table's order."""
    lines = [
        "| # | input class | tool | exit | message (`{inputs}`, `{out}`: the test's folders; `...`: varies) "
        "|",
        "|---|---|---|---|---|",
    ]
    for number, case in enumerate(CASES, 1):
        # A message in parentheses says what the dedicated test checks: no line to quote.
        message = cell(case.message) if case.message.startswith("(") else f"`{cell(case.message)}`"
        if case.leaves:
            message += "; leaves " + ", ".join(f"`{cell(glob)}`" for glob in case.leaves)
        if case.covered_by:
            message += f"; run by `{case.covered_by}`"
        elif case.absent:
            message += f"; never `{cell(case.absent)}`"
        what = f"{cell(case.input_class)} (`{case.id}`)"
        lines.append(f"| {number} | {what} | {case.tool} | {case.exit_code} | {message} |")
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    """``text`` (the README) with the section between the markers replaced by the table."""
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    return text[:start] + "\n" + markdown_table() + "\n" + text[end:]


def test_the_readme_table_is_generated_from_the_cases():
    text = README.read_text(encoding="utf-8")
    assert text == readme_with_table(text), (
        "Testing/README.md is out of date: run `python Testing/test_input_classes.py --write-table`"
    )


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-table"]:
        sys.exit("usage: python Testing/test_input_classes.py --write-table")
    README.write_text(readme_with_table(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote the table of {len(CASES)} input classes to {README}")
