"""The ``m4oe`` command line, end to end on generated volumes with the tiny untrained model.

Every output of ``m4oe segment`` is read back and checked against the input; bad input must give
the documented exit code, exactly one line on stderr naming the file (or the bad value), and leave
the output folder exactly as it was (no output, no temporary file). The bad-input cases, their exit
codes and an example message each (the ``case`` column is the test id, checked against
``BAD_INPUT`` by ``test_the_docstring_table_lists_every_case``):

| case | exit | message (example; /tmp/... stands for the test's folders) |
|---|---|---|
| missing-input | 2 | m4oe: error: /tmp/missing.nii.gz: no such file or folder |
| corrupt-file | 2 | m4oe: error: /tmp/corrupt.nii.gz: cannot be read, corrupt or not an image (...) |
| truncated-nifti | 2 | m4oe: error: /tmp/truncated.nii.gz: is truncated or corrupt (...) |
| 2d-image | 2 | m4oe: error: /tmp/slice.nii.gz: is a 2D image (size 48x40); expected a 3D volume |
| 4d-image | 2 | m4oe: error: /tmp/frames.nii.gz: is a 4D image (size 48x40x6x2); expected a 3D volume |
| nan-nifti | 2 | m4oe: error: /tmp/nonfinite.nii.gz: holds 1 NaN or infinite voxels |
| nan-nrrd | 2 | m4oe: error: /tmp/nonfinite.nrrd: holds 1 NaN or infinite voxels (or values beyond ...) |
| inf-nifti | 2 | m4oe: error: /tmp/nonfinite.nii.gz: holds 1 NaN or infinite voxels |
| constant-volume | 2 | m4oe: error: /tmp/constant.nii.gz: is empty: every voxel has the value -1000 |
| smaller-than-model | 2 | m4oe: error: /tmp/s.nii.gz: slices of 5x5 pixels are too small for ... |
| output-exists | 3 | m4oe: error: /tmp/out/seg.nii.gz: exists; pass --overwrite to replace it |
| unknown-task | 2 | m4oe: error: unknown task 'kidneys'; this model has ['abdomen', 'liver'] |
| unknown-model | 4 | m4oe: error: unknown model 'no-such-model'; available: (none) |
| sha256-mismatch | 4 | m4oe: error: /tmp/tiny/model.safetensors: SHA-256 mismatch: the file hashes to ... |
| tampered-weights | 4 | m4oe: error: /tmp/tampered/model.safetensors: SHA-256 mismatch: ... its card ... |
| output-parent-is-a-file | 3 | m4oe: error: /tmp/out/blocker: is not a folder |
| output-folder-missing | 3 | m4oe: error: /tmp/out/missing: folder does not exist |
| gates-under-a-file | 3 | m4oe: error: /tmp/out/blocker: is not a folder |
| unsupported-extension | 3 | m4oe: error: /tmp/out/seg.png: unsupported output format; use .seg.nrrd or ... |
| bad-modality | 2 | (usage line, then) m4oe segment: error: argument --modality: invalid choice: 'pet' ... |
| expert-out-of-range | 2 | m4oe: error: expert index 7 out of range; this model has 3 experts [...] |
| expert-unknown-name | 2 | m4oe: error: unknown expert 'bone'; this model has ['ct', 'mr', 'mr-t2'] |
| unknown-gate-layer | 2 | m4oe: error: unknown gate layer 'encoder.9.9'; this model has [...] |
| gates-with-dense-model | 2 | m4oe: error: tiny-dense-model: gate maps need a mixture-of-experts model; ... |
| negative-sigma | 2 | m4oe: error: through-plane sigma must be a number of mm >= 0, got -1.0 |
| too-many-passes | 2 | m4oe: error: test-time passes must be an integer 1-5, got 9 |
| read-only-folder | 3 | m4oe: error: /tmp/out: folder is not writable (runs only when not root) |

Running as root, chmod cannot make a folder unwritable, so "no write permission" is tested with an
output whose parent is a regular file, a missing folder, and a gates folder below a file;
``read-only-folder`` (chmod 0o500) runs only as a normal user.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from m4oe import cli
from m4oe.checkpoint import save_checkpoint
from m4oe.demo import synthetic_ct
from m4oe.model import build_model
from m4oe.model_card import ModelCard, Preprocessing, TaskInfo
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe.terminology import standard_label

ROOT = Path(__file__).resolve().parents[1]
SHAPE_ZYX = (6, 40, 48)
SPACING_XYZ = (6.0, 6.0, 8.0)
EXPERTS = [
    {"name": "ct", "modality": "ct"},
    {"name": "mr", "modality": "mr"},
    {"name": "mr-t2", "modality": "mr"},
]
# (terminology key, segment name, label value, SNOMED CT type code, type modifier code) of the
# tiny model's "abdomen" task.
ABDOMEN = [
    ("liver", "liver", 1, "10200004", None),
    ("spleen", "spleen", 2, "78961009", None),
    ("kidney_right", "right kidney", 3, "64033007", "24028007"),
]
LAYER_NAME = re.compile(r"^(encoder|decoder)\.\d+\.\d+$")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- helpers ------------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``m4oe`` in this process; (exit code, stdout, stderr). Argparse errors exit via SystemExit."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


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


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    """Same size exactly; same spacing, origin and direction to within rounding.

    NRRD stores spacing x direction as "space directions" vectors, so reading a .nrrd back can
    differ from the .nii.gz input by one unit in the last place (2e-16) for an oblique volume.
    """
    assert image.GetSize() == reference.GetSize()
    for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
        np.testing.assert_allclose(get(image), get(reference), rtol=1e-12, atol=1e-9)


def physical_box(image: sitk.Image) -> np.ndarray:
    """(2, 3) LPS bounding box (mm) of the region the voxels cover, voxel edges included."""
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint(
            [n - 0.5 if end else -0.5 for n, end in zip(size, ends, strict=True)]
        )
        for ends in itertools.product((False, True), repeat=3)
    ]
    return np.array([np.min(corners, axis=0), np.max(corners, axis=0)])


def axial_slices(image: sitk.Image) -> int:
    """Number of slices along the voxel axis closest to the patient's superior direction."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return image.GetSize()[int(np.argmax(np.abs(direction[2])))]


def segment_args(image: Path, output: Path, model: Path, *extra, gates: Path | None = None) -> list:
    args = ["segment", image, "-o", output, "--model", model]
    if gates is not None:
        args += ["--gates", gates]
    return [*args, *extra]


def write_volume(array: np.ndarray, path: Path, like: sitk.Image | None = None) -> Path:
    image = sitk.GetImageFromArray(array)
    if like is not None:
        image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """The generated CT (direction diag(-1, -1, 1)) and an oblique variant with permuted axes."""
    folder = tmp_path_factory.mktemp("volumes")
    ct = synthetic_ct(SHAPE_ZYX, SPACING_XYZ)
    sitk.WriteImage(ct, str(folder / "ct.nii.gz"))
    # Stored sagittally (voxel axes S, P, L), then tilted by 15 degrees about the LPS z axis.
    oblique = sitk.DICOMOrient(ct, "SPL")
    angle = np.deg2rad(15.0)
    tilt = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    oblique.SetDirection((tilt @ np.array(oblique.GetDirection()).reshape(3, 3)).flatten().tolist())
    sitk.WriteImage(oblique, str(folder / "oblique.nii.gz"))
    return {"flipped": folder / "ct.nii.gz", "oblique-permuted": folder / "oblique.nii.gz"}


@pytest.fixture(scope="module")
def dense_model_dir(tmp_path_factory) -> Path:
    """A saved tiny dense Swin-UNet (no experts) with the tiny model's abdomen task."""
    model = build_model("swin-unet-tiny")
    labels = [standard_label(key, i + 1) for i, key in enumerate(("liver", "spleen", "kidney_right"))]
    card = ModelCard(
        name="tiny-dense-model",
        architecture=model.cfg,
        tasks=[TaskInfo("abdomen", labels)],
        preprocessing=Preprocessing(intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}),
    )
    return save_checkpoint(model, card, tmp_path_factory.mktemp("models") / "dense")


@pytest.fixture()
def no_cached_models(tmp_path, monkeypatch) -> Path:
    """An empty model cache and no extra registry, so model lookups by name are reproducible."""
    cache = tmp_path / "model-cache"
    cache.mkdir()
    monkeypatch.setenv("M4OE_CACHE_DIR", str(cache))
    monkeypatch.delenv("M4OE_MODEL_REGISTRY", raising=False)
    return cache


# --- reading back every output ------------------------------------------------------------------


def check_segmentation_outputs(
    source: Path, seg: Path, gates: Path | None, report: Path | None, probabilities: bool
) -> np.ndarray:
    """Read back every output of one ``m4oe segment`` run and check it; return the label array."""
    reference = sitk.ReadImage(str(source))
    labelmap = sitk.ReadImage(str(seg))
    assert_same_grid(labelmap, reference)
    assert labelmap.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(labelmap)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}

    if seg.name.endswith(".seg.nrrd"):
        segmentation = slicerio.read_segmentation(str(seg))
        segments = segmentation["segments"]
        assert [(s["name"], s["labelValue"]) for s in segments] == [(n, v) for _, n, v, _, _ in ABDOMEN]
        for segment, (key, _, value, code, modifier) in zip(segments, ABDOMEN, strict=True):
            assert segment["color"] == pytest.approx(list(standard_label(key, value).color), abs=1e-4)
            terminology = segment["terminology"]
            assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
            assert terminology["type"][:2] == ["SCT", code]
            assert (terminology.get("typeModifier") or [None, None])[1] == modifier
        # slicerio's voxels are (i, j, k) = (x, y, z); SimpleITK's array is (z, y, x).
        np.testing.assert_array_equal(segmentation["voxels"].transpose(2, 1, 0), labels)

    if probabilities:
        stem = seg.name.removesuffix(".seg.nrrd").removesuffix(".nii.gz")
        probs = sitk.ReadImage(str(seg.with_name(f"{stem}_probabilities.nrrd")))
        assert_same_grid(probs, reference)
        assert probs.GetNumberOfComponentsPerPixel() == 4  # background + 3 organs
        assert probs.GetPixelID() == sitk.sitkVectorUInt8
        sums = sitk.GetArrayFromImage(probs).astype(np.int64).sum(axis=-1)
        assert np.abs(sums - 255).max() <= 2

    if gates is not None:
        gate_map = sitk.ReadImage(str(gates / "gate_map.nrrd"))
        E = len(EXPERTS)
        assert gate_map.GetNumberOfComponentsPerPixel() == E
        weights = sitk.GetArrayFromImage(gate_map)  # (slices, rows, columns, E)
        assert weights.min() >= 0.0
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-4)
        box, input_box = physical_box(gate_map), physical_box(reference)
        centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in reference.GetSize()])
        assert np.all(box[0] <= centre) and np.all(centre <= box[1])
        # The tiny model resizes whole slices, so the tokens tile exactly the input's field of view.
        np.testing.assert_allclose(box, input_box, atol=1e-3)

        dominant = sitk.ReadImage(str(gates / "dominant_expert.nrrd"))
        assert_same_grid(dominant, gate_map)
        values = sitk.GetArrayFromImage(dominant)
        assert values.min() >= 1 and values.max() <= E
        np.testing.assert_array_equal(values, weights.argmax(axis=-1) + 1)

        summary = json.loads((gates / "gate_summary.json").read_text())
        assert summary["experts"] == EXPERTS
        assert summary["dominant_expert_values"] == {"ct": 1, "mr": 2, "mr-t2": 3}
        assert summary["input_modality"] == "ct"
        assert summary["source"] == str(source)
        assert sum(summary["overall"]["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
        assert 0.0 <= summary["overall"]["routing_confidence"] <= 1.0
        slices = summary["per_slice"]
        assert [s["index"] for s in slices] == list(range(axial_slices(reference)))
        positions = [s["position_mm"] for s in slices]
        assert all(a < b for a, b in itertools.pairwise(positions))  # inferior -> superior
        for entry in slices:
            assert sum(entry["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
        assert list(summary["per_layer"]) == summary["layers"]
        assert "encoder.0.0" in summary["layers"] and all(LAYER_NAME.match(n) for n in summary["layers"])
        predicted = set(np.unique(labels).tolist()) - {0}
        per_segment = {entry["label"]: name for name, entry in summary["per_segment"].items()}
        assert predicted <= set(per_segment)
        names = {v: n for _, n, v, _, _ in ABDOMEN}
        assert all(per_segment[v] == names[v] for v in per_segment)
        assert summary["warning"] is None or isinstance(summary["warning"], str)

    if report is not None:
        assert report.read_bytes()[:8] == PNG_MAGIC
        picture = sitk.ReadImage(str(report))
        assert min(picture.GetSize()[:2]) >= 200
    return labels


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["flipped", "oblique-permuted"])
def test_segment_writes_every_output_on_the_input_grid(tiny_model_dir, volumes, tmp_path, capsys, variant):
    source = volumes[variant]
    seg, gates, report = tmp_path / "out.seg.nrrd", tmp_path / "gates", tmp_path / "r.png"
    argv = segment_args(
        source, seg, tiny_model_dir, "--probabilities", "--report", report, "--progress", "none", gates=gates
    )
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    check_segmentation_outputs(source, seg, gates, report, probabilities=True)
    assert "modality: ct (intensity:" in out
    for kind in ("segmentation", "probabilities", "gate_map", "dominant_expert", "gate_summary", "report"):
        assert f"wrote {kind}: " in out
    expected = {"out.seg.nrrd", "out_probabilities.nrrd", "r.png", "gates"}
    expected |= {f"gates/{n}" for n in ("gate_map.nrrd", "dominant_expert.nrrd", "gate_summary.json")}
    assert set(snapshot(tmp_path)) == expected  # no temporary file left behind


def test_segment_in_a_subprocess_keeps_the_stdout_stderr_contract(tiny_model_dir, volumes, tmp_path):
    """The real ``python -m m4oe.cli`` process: exit 0, only JSON lines on stdout, nothing on stderr."""
    source = volumes["flipped"]
    seg, gates, report = tmp_path / "out.seg.nrrd", tmp_path / "gates", tmp_path / "r.png"
    argv = segment_args(source, seg, tiny_model_dir, "--probabilities", "--report", report, gates=gates)
    result = subprocess.run(
        [sys.executable, "-m", "m4oe.cli", *map(str, argv), "--progress", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "M4oESegmentation")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    records = [json.loads(line) for line in result.stdout.splitlines()]
    inference = [r["fraction"] for r in records if r["stage"] == "inference"]
    assert inference and inference == sorted(inference) and inference[-1] == 1.0
    done = records[-1]
    assert done["stage"] == "done" and done["modality"] == "ct" and done["task"] == "abdomen"
    assert set(done["outputs"]) == {
        "segmentation",
        "probabilities",
        "gate_map",
        "dominant_expert",
        "gate_summary",
        "report",
    }
    assert all(Path(p).is_file() for p in done["outputs"].values())
    check_segmentation_outputs(source, seg, gates, report, probabilities=True)


def test_progress_json_lines(tiny_model_dir, volumes, tmp_path, capsys):
    argv = segment_args(
        volumes["flipped"], tmp_path / "out.nii.gz", tiny_model_dir, "--batch-size", "2", "--progress", "json"
    )
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and err == ""
    records = [json.loads(line) for line in out.splitlines()]
    for record in records[:-1]:
        assert {"stage", "fraction", "elapsed_s", "eta_s"} <= set(record)
    inference = [r for r in records if r["stage"] == "inference"]
    assert [(r["done"], r["total"]) for r in inference] == [(1, 3), (2, 3), (3, 3)]
    fractions = [r["fraction"] for r in inference]
    assert fractions == sorted(fractions)
    done = records[-1]
    assert done["stage"] == "done" and done["outputs"] == {"segmentation": str(tmp_path / "out.nii.gz")}
    assert done["modality_source"] == "intensity" and done["warning"] is None
    assert done["through_plane_sigma_mm"] == 0.0  # the tiny model's card asks for none
    assert done["test_time_passes"] == 1  # nor for test-time augmentation
    assert done["largest_component"] == ["liver"]  # the tiny card cleans up label 1 only


@pytest.mark.parametrize(
    ("option", "values", "key", "kind"),
    [
        ("--through-plane-sigma", ("0", "12"), "through_plane_sigma_mm", float),
        ("--tta", ("1", "5"), "test_time_passes", int),
    ],
)
def test_inference_option_changes_the_output_and_is_reported(
    tiny_model_dir, volumes, tmp_path, capsys, option, values, key, kind
):
    outputs = []
    for value in values:
        out = tmp_path / f"{key}{value}.nii.gz"
        argv = segment_args(volumes["flipped"], out, tiny_model_dir, "--progress", "json")
        code, stdout, err = run_cli([*argv, option, value], capsys)
        assert code == 0, err
        assert json.loads(stdout.splitlines()[-1])[key] == kind(value)
        outputs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out))))
    assert not np.array_equal(*outputs)


def test_progress_json_error_line_matches_the_exit_code(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "in" / "nan.nii.gz"
    source.parent.mkdir()
    volume = np.zeros(SHAPE_ZYX, np.float32)
    volume[0, 0, 0] = np.nan
    write_volume(volume, source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run_cli(
        segment_args(source, out_dir / "seg.nii.gz", tiny_model_dir, "--progress", "json"), capsys
    )
    assert code == 2
    records = [json.loads(line) for line in out.splitlines()]
    assert records[-1]["stage"] == "error" and records[-1]["exit_code"] == code
    assert str(source) in records[-1]["message"] and "NaN" in records[-1]["message"]
    assert err.splitlines() == [f"m4oe: error: {records[-1]['message']}"]
    assert snapshot(out_dir) == {}


def test_nifti_output_with_the_liver_task(tiny_model_dir, volumes, tmp_path, capsys):
    source, output = volumes["flipped"], tmp_path / "liver.nii.gz"
    code, out, err = run_cli(
        segment_args(source, output, tiny_model_dir, "--task", "liver", "--probabilities"), capsys
    )
    assert code == 0, err
    labelmap = sitk.ReadImage(str(output))
    reference = sitk.ReadImage(str(source))
    # NIfTI to NIfTI: the geometry survives bit for bit.
    assert labelmap.GetSize() == reference.GetSize()
    assert labelmap.GetSpacing() == reference.GetSpacing()
    assert labelmap.GetOrigin() == reference.GetOrigin()
    assert labelmap.GetDirection() == reference.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(labelmap)).tolist()) <= {0, 1}
    probs = sitk.ReadImage(str(tmp_path / "liver_probabilities.nrrd"))
    assert probs.GetNumberOfComponentsPerPixel() == 2
    assert "task: liver" in out


def test_forced_expert_routes_every_token_and_raises_no_routing_warning(
    tiny_model_dir, volumes, tmp_path, capsys
):
    """``--force-expert mr`` on a CT: every gate weight is one-hot on expert 1 ("mr").

    No routing warning: the warning says the *gate* disagreed with the modality, but a forced
    expert bypasses the gate, and the radiologist chose the mismatch on purpose (the forced-expert
    comparison of the gate review). A warning on every such comparison would be noise, and its
    wording ("the gate sent most weight to ...") untrue. The summary still records both facts
    (``forced_expert`` "mr", ``input_modality`` "ct"), so the mismatch stays visible.
    """
    gates = tmp_path / "gates"
    argv = segment_args(
        volumes["flipped"], tmp_path / "out.nii.gz", tiny_model_dir, "--force-expert", "mr", gates=gates
    )
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and "WARNING" not in err
    weights = sitk.GetArrayFromImage(sitk.ReadImage(str(gates / "gate_map.nrrd")))
    assert np.all(weights[..., 1] == 1.0) and np.all(weights[..., [0, 2]] == 0.0)
    dominant = sitk.GetArrayFromImage(sitk.ReadImage(str(gates / "dominant_expert.nrrd")))
    assert np.all(dominant == 2)
    summary = json.loads((gates / "gate_summary.json").read_text())
    assert summary["forced_expert"] == "mr"
    assert summary["input_modality"] == "ct"
    assert summary["expected_experts"] == ["mr"]
    assert summary["overall"]["mean_weights"] == {"ct": 0.0, "mr": 1.0, "mr-t2": 0.0}
    assert summary["warning"] is None


def test_dense_model_segments_without_gates(dense_model_dir, volumes, tmp_path, capsys):
    output = tmp_path / "dense.seg.nrrd"
    code, _, err = run_cli(segment_args(volumes["flipped"], output, dense_model_dir), capsys)
    assert code == 0, err
    assert_same_grid(sitk.ReadImage(str(output)), sitk.ReadImage(str(volumes["flipped"])))


def test_overwrite_replaces_an_existing_output(tiny_model_dir, volumes, tmp_path, capsys):
    output = tmp_path / "seg.nii.gz"
    output.write_bytes(b"an older result")
    code, _, err = run_cli(segment_args(volumes["flipped"], output, tiny_model_dir, "--overwrite"), capsys)
    assert code == 0, err
    assert_same_grid(sitk.ReadImage(str(output)), sitk.ReadImage(str(volumes["flipped"])))
    assert set(snapshot(tmp_path)) == {"seg.nii.gz"}


def test_a_failing_last_output_leaves_no_output_added_or_replaced(
    tiny_model_dir, volumes, tmp_path, capsys, monkeypatch
):
    """The disk fills while the report (written last) is saved: every other output is withdrawn."""
    import matplotlib.figure

    out = tmp_path / "out"
    out.mkdir()
    (out / "seg.nii.gz").write_bytes(b"an older result")
    before = snapshot(out)

    def full_disk(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full_disk)
    argv = segment_args(
        volumes["flipped"],
        out / "seg.nii.gz",
        tiny_model_dir,
        "--overwrite",
        "--probabilities",
        "--report",
        out / "report.png",
        "--progress",
        "none",
        gates=out / "gates",
    )
    code, stdout, err = run_cli(argv, capsys)
    assert code == 3, err
    assert "report.png: cannot be written (No space left on device)" in err
    assert snapshot(out) == before  # no gates folder, no probabilities, the old result unchanged
    assert "wrote" not in stdout


# --- bad input ----------------------------------------------------------------------------------


@dataclass
class Env:
    """Where a bad-input case works: ``inputs`` for inputs, ``out`` (empty) for the outputs."""

    inputs: Path
    out: Path
    model: Path
    dense_model: Path
    ct: Path

    def argv(self, image: Path, *extra, output: Path | None = None, model: Path | str | None = None) -> list:
        """Every kind of output asked for, so that none may appear."""
        return [
            *segment_args(
                image,
                output or self.out / "seg.nii.gz",
                model or self.model,
                "--probabilities",
                "--report",
                self.out / "report.png",
                "--progress",
                "none",
                gates=self.out / "gates",
            ),
            *extra,
        ]


def ct_array() -> tuple[np.ndarray, sitk.Image]:
    image = synthetic_ct(SHAPE_ZYX, SPACING_XYZ)
    return sitk.GetArrayFromImage(image).astype(np.float32), image


def missing_input(env):
    path = env.inputs / "missing.nii.gz"
    return env.argv(path), str(path)


def corrupt_file(env):
    path = env.inputs / "corrupt.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return env.argv(path), str(path)


def truncated_nifti(env):
    path = env.inputs / "truncated.nii.gz"
    whole = env.ct.read_bytes()
    assert gzip.decompress(whole)  # the uncut file is valid
    path.write_bytes(whole[: len(whole) // 2])
    return env.argv(path), str(path)


def image_2d(env):
    path = env.inputs / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(ct_array()[0][0]), str(path))
    return env.argv(path), str(path)


def image_4d(env):
    path = env.inputs / "frames.nii.gz"
    volume = sitk.ReadImage(str(env.ct))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))
    return env.argv(path), str(path)


def non_finite(value: float, suffix: str):
    def setup(env):
        array, like = ct_array()
        array[3, 20, 24] = value
        path = write_volume(array, env.inputs / f"nonfinite{suffix}", like)
        return env.argv(path), str(path)

    return setup


def constant_volume(env):
    path = write_volume(np.full(SHAPE_ZYX, -1000, np.int16), env.inputs / "constant.nii.gz")
    return env.argv(path), str(path)


def smaller_than_model(env):
    path = write_volume(
        np.linspace(-1000, 400, 4 * 5 * 5, dtype=np.float32).reshape(4, 5, 5), env.inputs / "s.nii.gz"
    )
    return env.argv(path), str(path)


def output_exists(env):
    output = env.out / "seg.nii.gz"
    output.write_bytes(b"a result the user wants to keep")
    return env.argv(env.ct), str(output)


def unknown_task(env):
    return env.argv(env.ct, "--task", "kidneys"), "'kidneys'"


def unknown_model(env):
    return env.argv(env.ct, model="no-such-model"), "'no-such-model'"


def sha256_mismatch(env):
    return env.argv(env.ct, "--sha256", "0" * 64), str(env.model / "model.safetensors")


def tampered_weights(env):
    model = shutil.copytree(env.model, env.inputs / "tampered")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a byte of some tensor, not of the header
    weights.write_bytes(bytes(data))
    return env.argv(env.ct, model=model), str(weights)


def output_parent_is_a_file(env):
    blocker = env.out / "blocker"
    blocker.write_text("a file, not a folder")
    return env.argv(env.ct, output=blocker / "seg.nii.gz"), str(blocker)


def output_folder_missing(env):
    return env.argv(env.ct, output=env.out / "missing" / "seg.nii.gz"), str(env.out / "missing")


def gates_under_a_file(env):
    blocker = env.out / "blocker"
    blocker.write_text("a file, not a folder")
    return env.argv(env.ct, "--gates", blocker / "gates"), str(blocker)


def unsupported_extension(env):
    output = env.out / "seg.png"
    return env.argv(env.ct, output=output), str(output)


def bad_modality(env):
    return env.argv(env.ct, "--modality", "pet"), "'pet'"


def expert_out_of_range(env):
    return env.argv(env.ct, "--force-expert", "7"), "index 7"


def expert_unknown_name(env):
    return env.argv(env.ct, "--force-expert", "bone"), "'bone'"


def unknown_gate_layer(env):
    return env.argv(env.ct, "--gate-layer", "encoder.9.9"), "'encoder.9.9'"


def negative_sigma(env):
    return env.argv(env.ct, "--through-plane-sigma", "-1"), "-1.0"


def too_many_passes(env):
    return env.argv(env.ct, "--tta", "9"), "9"


def gates_with_dense_model(env):
    return env.argv(env.ct, model=env.dense_model), "tiny-dense-model"


@dataclass(frozen=True)
class Bad:
    case: str
    exit_code: int
    says: str  # a phrase of the problem, besides naming the file or value
    setup: Callable[[Env], tuple[list, str]]
    argparse: bool = False


BAD_INPUT = [
    Bad("missing-input", 2, "no such file", missing_input),
    Bad("corrupt-file", 2, "cannot be read", corrupt_file),
    Bad("truncated-nifti", 2, "truncated", truncated_nifti),
    Bad("2d-image", 2, "is a 2D image", image_2d),
    Bad("4d-image", 2, "is a 4D image", image_4d),
    Bad("nan-nifti", 2, "NaN", non_finite(np.nan, ".nii.gz")),
    Bad("nan-nrrd", 2, "NaN", non_finite(np.nan, ".nrrd")),
    Bad("inf-nifti", 2, "infinite", non_finite(np.inf, ".nii.gz")),
    Bad("constant-volume", 2, "is empty", constant_volume),
    Bad("smaller-than-model", 2, "too small", smaller_than_model),
    Bad("output-exists", 3, "--overwrite", output_exists),
    Bad("unknown-task", 2, "unknown task", unknown_task),
    Bad("unknown-model", 4, "unknown model", unknown_model),
    Bad("sha256-mismatch", 4, "SHA-256 mismatch", sha256_mismatch),
    Bad("tampered-weights", 4, "SHA-256 mismatch", tampered_weights),
    Bad("output-parent-is-a-file", 3, "is not a folder", output_parent_is_a_file),
    Bad("output-folder-missing", 3, "does not exist", output_folder_missing),
    Bad("gates-under-a-file", 3, "is not a folder", gates_under_a_file),
    Bad("unsupported-extension", 3, "unsupported output format", unsupported_extension),
    Bad("bad-modality", 2, "invalid choice", bad_modality, argparse=True),
    Bad("expert-out-of-range", 2, "out of range", expert_out_of_range),
    Bad("expert-unknown-name", 2, "unknown expert", expert_unknown_name),
    Bad("unknown-gate-layer", 2, "unknown gate layer", unknown_gate_layer),
    Bad("gates-with-dense-model", 2, "dense", gates_with_dense_model),
    Bad("negative-sigma", 2, "through-plane sigma must be", negative_sigma),
    Bad("too-many-passes", 2, "test-time passes must be", too_many_passes),
]


@pytest.fixture()
def env(tiny_model_dir, dense_model_dir, volumes, tmp_path, no_cached_models) -> Env:
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    return Env(inputs, out, tiny_model_dir, dense_model_dir, volumes["flipped"])


@pytest.mark.parametrize("bad", BAD_INPUT, ids=[b.case for b in BAD_INPUT])
def test_bad_input_fails_cleanly(env, capsys, bad):
    argv, named = bad.setup(env)
    before = snapshot(env.out)
    model_before = snapshot(env.model)
    code, out, err = run_cli(argv, capsys)
    assert code == bad.exit_code, err
    lines = err.splitlines()
    if bad.argparse:
        # argparse prints its usage first; the last line is the error.
        assert lines[-1].startswith("m4oe segment: error: ")
    else:
        assert len(lines) == 1 and lines[0].startswith("m4oe: error: "), err
        assert out == ""
    assert named in lines[-1] and bad.says in lines[-1], lines[-1]
    assert snapshot(env.out) == before  # no output, no temporary file; an existing file untouched
    assert snapshot(env.model) == model_before


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod does not bind root")
def test_read_only_output_folder(env, capsys):
    env.out.chmod(0o500)
    try:
        code, _, err = run_cli(env.argv(env.ct), capsys)
    finally:
        env.out.chmod(0o700)
    assert code == 3
    assert err.splitlines() == [f"m4oe: error: {env.out}: folder is not writable"]
    assert snapshot(env.out) == {}


def test_the_docstring_table_lists_every_case():
    rows = re.findall(r"^\| ([a-z0-9-]+) \| (\d+) \|", __doc__, flags=re.MULTILINE)
    table = {case: int(code) for case, code in rows}
    assert table == {b.case: b.exit_code for b in BAD_INPUT} | {"read-only-folder": 3}


# --- start-up ----------------------------------------------------------------------------------


def test_main_sets_a_passive_omp_wait_policy_unless_the_user_chose_one(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert run_cli(["info", tiny_model_dir], capsys)[0] == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert run_cli(["info", tiny_model_dir], capsys)[0] == 0
    assert os.environ["OMP_WAIT_POLICY"] == "active"


def test_segment_start_up_imports_torch_only_after_main_and_no_scipy_matplotlib_or_monai():
    """``main`` sets OMP_WAIT_POLICY before the segment command imports torch (the OpenMP runtime
    reads it once, when torch loads); the heavy modules of other commands and of the clean-up are
    imported where they are used, not at start-up."""
    code = (
        "import json, sys; import m4oe.cli as cli; cli.build_parser(); torch = 'torch' in sys.modules; "
        "from m4oe.io import read_image; from m4oe.predictor import Predictor; "
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('scipy', 'matplotlib', 'monai')); "
        "print(json.dumps([torch, 'torch' in sys.modules, heavy]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "M4oESegmentation")},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [False, True, []]


# --- info, models, evaluate ---------------------------------------------------------------------


def test_info_names_the_through_plane_smoothing(tiny_model_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "smoothed"))
    card = json.loads((folder / "model.json").read_text())
    card["tasks"][0]["through_plane_sigma_mm"] = 2.5
    card["tasks"][0]["test_time_passes"] = 3
    (folder / "model.json").write_text(json.dumps(card))
    code, out, _ = run_cli(["info", folder], capsys)
    assert code == 0
    assert (
        "  post-processing: test-time augmentation, 3 passes averaged; through-plane smoothing "
        "sigma 2.5 mm; largest component of liver\n"
    ) in out


def test_info_prints_the_model_card(tiny_model_dir, capsys):
    code, out, _ = run_cli(["info", tiny_model_dir], capsys)
    assert code == 0
    assert out.startswith("tiny-test-model: untrained tiny model for tests")
    assert "expert mr-t2: mr" in out
    assert "task abdomen: 1 liver, 2 spleen, 3 right kidney" in out
    assert "M4oE, 3 experts (softmax gate, top_k=None)" in out  # no slice context named
    assert "  post-processing: largest component of liver\n" in out  # no smoothing named
    code, out, _ = run_cli(["info", tiny_model_dir, "--json"], capsys)
    assert code == 0
    card = json.loads(out)
    assert card["name"] == "tiny-test-model"
    assert [e["name"] for e in card["experts"]] == ["ct", "mr", "mr-t2"]
    assert [t["name"] for t in card["tasks"]] == ["abdomen", "liver"]


def test_info_on_a_missing_model(tmp_path, capsys):
    missing = tmp_path / "no-model-here"
    code, out, err = run_cli(["info", missing], capsys)
    assert code == 4 and out == ""
    assert err.splitlines() == [f"m4oe: error: {missing}: no such model folder or file"]


def test_models_json_lists_cached_models(tiny_model_dir, no_cached_models, capsys):
    code, out, _ = run_cli(["models", "--json"], capsys)
    assert code == 0
    before = json.loads(out)
    assert isinstance(before, list) and "tiny" not in [e["name"] for e in before]
    shutil.copytree(tiny_model_dir, no_cached_models / "tiny")
    code, out, _ = run_cli(["models", "--json"], capsys)
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["tiny"]["source"] == "cached" and entries["tiny"]["downloaded"] is True
    assert entries["tiny"]["path"] == str(no_cached_models / "tiny")


def test_evaluate_a_label_map_against_itself_and_renumbered(tmp_path, capsys):
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:4, 2:8, 2:8] = 1
    labels[2:5, 10:16, 11:18] = 2
    pred = write_volume(labels, tmp_path / "pred.nii.gz")
    code, out, _ = run_cli(["evaluate", pred, pred, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert [(r["label"], r["dice"]) for r in result["labels"]] == [(1, 1.0), (2, 1.0)]
    assert result["mean_dice"] == 1.0

    renumbered = np.select([labels == 1, labels == 2], [5, 6], 0).astype(np.uint8)
    ref = write_volume(renumbered, tmp_path / "ref.nii.gz")
    code, out, _ = run_cli(["evaluate", pred, ref, "--json"], capsys)
    assert code == 0 and json.loads(out)["mean_dice"] == 0.0  # without the renumbering nothing matches
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"1": 5, "2": 6}))
    code, out, _ = run_cli(["evaluate", pred, ref, "--label-map", mapping, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert [(r["label"], r["dice"]) for r in result["labels"]] == [(5, 1.0), (6, 1.0)]


def test_evaluate_names_labels_from_segments_or_a_model_card(tmp_path, capsys, tiny_model_dir):
    from m4oe.checkpoint import read_model_card
    from m4oe.io import write_segmentation
    from m4oe.terminology import standard_label

    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:4, 2:8, 2:8] = 1
    labels[2:5, 10:16, 11:18] = 2
    image = sitk.GetImageFromArray(labels)
    seg = write_segmentation(
        image, [standard_label("liver", 1), standard_label("kidney_left", 2)], tmp_path / "pred.seg.nrrd"
    )
    renumbered = np.select([labels == 1, labels == 2], [5, 6], 0).astype(np.uint8)
    ref = write_volume(renumbered, tmp_path / "ref.nii.gz")
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"1": 5, "2": 6}))
    code, out, _ = run_cli(["evaluate", seg, ref, "--label-map", mapping, "--json"], capsys)
    assert code == 0
    rows = json.loads(out)["labels"]
    assert [(r["label"], r["name"], r["dice"]) for r in rows] == [(5, "liver", 1.0), (6, "left kidney", 1.0)]
    code, out, _ = run_cli(["evaluate", seg, ref, "--label-map", mapping], capsys)
    assert code == 0
    table = out.splitlines()
    assert table[0].split()[:3] == ["label", "name", "dice"]
    assert table[2].split()[:4] == ["6", "left", "kidney", "1.0000"]

    pred = write_volume(labels, tmp_path / "pred.nii.gz")  # no names in a NIfTI: "-" / null
    code, out, _ = run_cli(["evaluate", pred, pred, "--json"], capsys)
    assert [r["name"] for r in json.loads(out)["labels"]] == [None, None]
    card_names = {lab.value: lab.name for lab in read_model_card(tiny_model_dir).task(None).labels}
    code, out, _ = run_cli(["evaluate", pred, pred, "--model", str(tiny_model_dir), "--json"], capsys)
    assert code == 0
    assert [r["name"] for r in json.loads(out)["labels"]] == [card_names[1], card_names[2]]
    code, _, err = run_cli(["evaluate", pred, pred, "--model", str(tiny_model_dir), "--task", "nope"], capsys)
    assert code == 2 and "unknown task 'nope'" in err


def test_evaluate_matches_a_reference_in_an_nnunet_data_set_by_name(tmp_path, capsys, tiny_model_dir):
    """``evaluate --model``: a reference in an nnU-Net data set's labelsTr/ is read in that data set's
    numbering, its labels matched to the model's classes (liver 1, spleen 2, right kidney 3) by
    structure key or display name, any case, or through its ``terminology``; a class the data set
    does not label is not scored."""
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:4, 2:8, 2:8] = 1
    labels[2:5, 10:16, 11:18] = 2
    labels[3:5, 15:19, 1:5] = 3
    pred = write_volume(labels, tmp_path / "pred.nii.gz")
    dataset = tmp_path / "Dataset001"
    (dataset / "labelsTr").mkdir(parents=True)
    reference = np.select([labels == 1, labels == 2, labels == 3], [7, 4, 5], 0).astype(np.uint8)
    reference[0, :3, :3] = 9  # a gallbladder the model has no class for: not scored
    ref = write_volume(reference, dataset / "labelsTr" / "case_000.nii.gz")
    manifest = {
        "labels": {"background": 0, "Spleen": 4, "liver": 7, "RK": 5, "gallbladder": 9, "organs": [4, 7]},
        "terminology": {"RK": "kidney_right"},
    }
    (dataset / "dataset.json").write_text(json.dumps(manifest))

    argv = ["evaluate", pred, ref, "--model", str(tiny_model_dir), "--json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and "matched by name" in err and "dataset.json" in err
    result = json.loads(out)
    rows = [(r["label"], r["name"], r["dice"]) for r in result["labels"]]
    assert rows == [(4, "spleen", 1.0), (5, "right kidney", 1.0), (7, "liver", 1.0)]
    assert {int(k): v for k, v in result["label_map"].items()} == {1: 7, 2: 4, 3: 5}
    code, out, _ = run_cli(["evaluate", pred, ref, "--json"], capsys)  # no model: no names to match
    assert code == 0 and json.loads(out)["mean_dice"] < 1.0

    manifest = {"labels": {"background": 0, "liver": 7, "right_kidney": 5}}  # no spleen labelled
    (dataset / "dataset.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(argv, capsys)
    result = json.loads(out)
    assert [(r["label"], r["name"]) for r in result["labels"]] == [(5, "right kidney"), (7, "liver")]
    assert result["mean_dice"] == 1.0, "the model's spleen is not held against an unlabelled reference"

    (dataset / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "gallbladder": 9}}))
    code, out, err = run_cli(argv[:-1], capsys)
    assert code == 2 and out == ""
    assert "dataset.json" in err and "none of the structures" in err and "gallbladder" in err
    (dataset / "dataset.json").write_text("{not json")
    code, _, err = run_cli(argv[:-1], capsys)
    assert code == 2 and "not a readable nnU-Net dataset.json" in err


@pytest.mark.parametrize("progress", [["--progress", "json"], ["--progress=json"], []])
def test_usage_error_is_also_a_json_line_when_json_progress_is_asked(tmp_path, capsys, progress):
    volume = write_volume(np.zeros((4, 8, 8), np.int16), tmp_path / "in.nii.gz")
    argv = ["segment", volume, "-o", tmp_path / "out.nii.gz", *progress, "--modality", "pet"]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("usage: m4oe segment") and "m4oe segment: error: argument --modality" in err
    if progress:
        (line,) = out.splitlines()
        event = json.loads(line)
        assert event["stage"] == "error" and event["exit_code"] == 2
        assert "argument --modality: invalid choice: 'pet'" in event["message"]
    else:
        assert out == ""
    assert not (tmp_path / "out.nii.gz").exists()
