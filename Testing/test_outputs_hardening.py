"""Outputs of ``m4oe segment`` under failure (issue 23, points 1, 2 and 7).

- A full disk: every output is synced and checked to hold all its header announces before it gets
  its name, else exit 3 with the file system's error and nothing under any output name. Tested on
  a real 256 KiB tmpfs (needs root; skipped where mounting is not allowed) and, anywhere, on files
  cut short after their writer returned.
- SIGTERM ends a run as Ctrl-C does: exit 143, a JSON ``error`` line, no output and no temporary
  file, whether it comes during inference or while the outputs are being written. Temporary files
  a killed run left (SIGKILL) are removed by the next write into the folder once older than
  ``STALE_TEMPORARY_S``.
- Every output path is checked before the model is loaded: a report that is not ``.png``, two
  outputs on one file, an output that another output's folder would have to be, an output that is
  a folder. These runs name a model that does not exist, so reaching the model would exit 4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.figure import Figure

from m4oe import cli
from m4oe.demo import synthetic_ct
from m4oe.errors import OutputError
from m4oe.io import STALE_TEMPORARY_S, sweep_temporaries, write_atomic

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
PHANTOM_CT = ROOT / "Testing" / "data" / "embedded_phantom_ct.nii.gz"  # 128 x 128 x 57 voxels
ENOSPC = os.strerror(28)  # "No space left on device"


def run_cli(argv: list, capsys) -> tuple[int, str, str]:
    """Run ``m4oe`` in this process; (exit code, stdout, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def listing(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, hidden ones included, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory) -> Path:
    """A synthetic CT of 48 x 40 x 6 voxels (x, y, z), as in test_cli."""
    path = tmp_path_factory.mktemp("input") / "ct.nii.gz"
    sitk.WriteImage(synthetic_ct((6, 40, 48), (6.0, 6.0, 8.0)), str(path))
    return path


@pytest.fixture()
def small_disk(tmp_path):
    """A real 256 KiB tmpfs mounted on a fresh folder, unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs Linux and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of ``folder`` with one file ``filler`` until ``leave_bytes`` stay free."""
    stats = os.statvfs(folder)
    (folder / "filler").write_bytes(bytes(stats.f_bavail * stats.f_frsize - leave_bytes))
    stats = os.statvfs(folder)
    assert stats.f_bavail * stats.f_frsize <= leave_bytes


# --- point 1: a full disk -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha"])
def test_segment_on_a_full_disk_exits_3_with_the_disks_error_and_writes_nothing(
    tiny_model_dir, small_ct, small_disk, capsys, suffix
):
    fill(small_disk, 0)
    output = small_disk / f"seg{suffix}"
    code, out, err = run_cli(["segment", small_ct, "-o", output, "--model", tiny_model_dir], capsys)
    assert code == 3, (out, err)
    assert "wrote segmentation" not in out
    errors = [line for line in err.splitlines() if line.startswith("m4oe: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"m4oe: error: {output}: cannot be written ({ENOSPC}")
    assert listing(small_disk) == ["filler"]


def test_segment_running_out_of_space_midway_removes_every_output(
    tiny_model_dir, small_ct, small_disk, capsys
):
    fill(small_disk, 24 * 1024)  # room for the label map, not for the probabilities and gate maps
    argv = ["segment", small_ct, "-o", small_disk / "seg.nii.gz", "--model", tiny_model_dir]
    argv += ["--probabilities", "float16", "--gates", small_disk / "gates", "--report", small_disk / "r.png"]
    code, out, _ = run_cli([*argv, "--progress", "json"], capsys)
    assert code == 3
    error = json.loads(out.splitlines()[-1])
    assert error["stage"] == "error" and error["exit_code"] == 3 and ENOSPC in error["message"]
    assert listing(small_disk) == ["filler"]  # the label map written first is gone, and the gates folder


def test_segment_with_room_to_spare_on_the_same_disk_writes_every_output(
    tiny_model_dir, small_ct, small_disk, capsys
):
    """The check does not refuse complete files: the 256 KiB disk, empty, takes the outputs."""
    argv = ["segment", small_ct, "-o", small_disk / "seg.nii", "--model", tiny_model_dir]
    code, _, err = run_cli([*argv, "--probabilities", "--gates", small_disk / "gates"], capsys)
    assert code == 0, err
    assert listing(small_disk) == [
        "gates",
        "gates/dominant_expert.nrrd",
        "gates/gate_map.nrrd",
        "gates/gate_summary.json",
        "seg.nii",
        "seg_probabilities.nrrd",
    ]
    assert sitk.ReadImage(str(small_disk / "seg.nii")).GetSize() == (48, 40, 6)


def write_with_sitk(compress: bool, vector: bool = False):
    values = np.arange(6 * 40 * 48 * (3 if vector else 1), dtype=np.float32).reshape(6, 40, 48, -1)
    image = sitk.GetImageFromArray(values if vector else values[..., 0].astype(np.int16), isVector=vector)
    return lambda path: sitk.WriteImage(image, str(path), useCompression=compress)


def write_png(path: Path) -> None:
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().imshow(np.eye(8))
    figure.savefig(path, format="png")


WRITERS = {
    "out.nii.gz": write_with_sitk(True),
    "out.nii": write_with_sitk(False),
    "out.nrrd": write_with_sitk(True),
    "raw.nrrd": write_with_sitk(False),
    "vector.nrrd": write_with_sitk(True, vector=True),
    "out.seg.nrrd": write_with_sitk(True),
    "out.mha": write_with_sitk(True),
    "raw.mha": write_with_sitk(False, vector=True),
    "report.png": write_png,
}


@pytest.mark.parametrize("name", list(WRITERS))
@pytest.mark.parametrize("kept", [0.0, 0.5, 0.99])
def test_write_atomic_refuses_a_file_its_writer_left_short(tmp_path, name, kept):
    """What ITK's NIfTI writer does on a full disk: return normally, leaving a short file."""

    def short_writer(temporary: Path) -> None:
        WRITERS[name](temporary)
        data = temporary.read_bytes()
        temporary.write_bytes(data[: int(len(data) * kept)])

    with pytest.raises(OutputError, match=rf"{name}: cannot be written \(incomplete file: "):
        write_atomic(tmp_path / name, short_writer)
    assert listing(tmp_path) == []
    write_atomic(tmp_path / name, WRITERS[name])  # the whole file is accepted
    assert listing(tmp_path) == [name]


# --- point 2: SIGTERM, and what SIGKILL leaves --------------------------------------------------


def start_segment(argv: list, cwd: Path) -> subprocess.Popen:
    """``python -m m4oe.cli segment ... --progress json`` as a real process (stdout, stderr piped)."""
    return subprocess.Popen(
        [sys.executable, "-m", "m4oe.cli", "segment", *map(str, argv), "--progress", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT / "M4oESegmentation")},
    )


def assert_terminated(process: subprocess.Popen, stdout_before: str, folder: Path) -> None:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    error = json.loads((stdout_before + out).splitlines()[-1])
    assert error == {"stage": "error", "message": "terminated (SIGTERM)", "exit_code": 143}
    assert err.splitlines()[-1] == "m4oe: error: terminated (SIGTERM)"
    assert listing(folder) == []  # no output, no temporary file, no gates folder


def test_sigterm_during_inference_ends_the_run_like_ctrl_c(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    process = start_segment([PHANTOM_CT, "-o", out / "seg.nii.gz", "--model", tiny_model_dir], tmp_path)
    seen = ""
    while '"stage": "inference"' not in seen:  # 15 batches of 4 slices: the first one of them
        line = process.stdout.readline()
        assert line, process.communicate()[1]
        seen += line
    process.send_signal(signal.SIGTERM)
    assert_terminated(process, seen, out)


def test_sigterm_while_the_outputs_are_written_leaves_no_file(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    argv = [PHANTOM_CT, "-o", out / "seg.seg.nrrd", "--model", tiny_model_dir, "--probabilities", "float16"]
    process = start_segment([*argv, "--gates", out / "gates", "--report", out / "r.png"], tmp_path)
    # The label map, probabilities and gate maps wait under temporary names while the report is
    # drawn (about a second); SIGTERM comes as soon as the first temporary file shows.
    deadline = time.monotonic() + 300
    while not any(".tmp" in p.name for p in out.rglob(".*")):
        assert process.poll() is None, "the run ended before any temporary file was seen"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGTERM)
    assert_terminated(process, "", out)


def test_sigterm_handler_is_restored_after_main(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(["segment", "missing.nii.gz", "-o", "x.nii.gz", "--model", "none"], capsys)[0] != 0
    assert signal.getsignal(signal.SIGTERM) is before


def aged(path: Path, seconds: float) -> Path:
    """Create ``path`` as an empty file unless it exists; set its modification time ``seconds`` ago."""
    if not path.exists():
        path.touch()
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


STALE = STALE_TEMPORARY_S + 3600


def test_the_next_run_sweeps_temporary_files_a_killed_run_left(tiny_model_dir, small_ct, tmp_path, capsys):
    for name in (".seg.0123456789ab.tmp.nii.gz", ".gate_map.fedcba987654.tmp.nrrd", ".x.00000000aaaa.tmp"):
        aged(tmp_path / name, STALE)
    kept = [
        ".seg.0123456789ab.tmp.nii.gz.keep",  # a name write_atomic does not make
        "seg.0123456789ab.tmp.nii.gz",  # not hidden
        ".seg.0123456789AB.tmp.nii.gz",  # upper-case hex
        ".seg.0123456789a.tmp.nii.gz",  # 11 hex digits
        ".seg.nii.gz",
        "notes.txt",
    ]
    for name in kept:
        aged(tmp_path / name, STALE)
    aged(tmp_path / ".fresh.0123456789ab.tmp.nii.gz", 60)  # maybe a run writing now: too young
    (tmp_path / ".dir.0123456789ab.tmp.nrrd").mkdir()  # a folder is never removed
    aged(tmp_path / ".dir.0123456789ab.tmp.nrrd", STALE)
    argv = ["segment", small_ct, "-o", tmp_path / "seg.nii.gz", "--model", tiny_model_dir]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    expected = [*kept, ".fresh.0123456789ab.tmp.nii.gz", ".dir.0123456789ab.tmp.nrrd", "seg.nii.gz"]
    assert listing(tmp_path) == sorted(expected)


def test_sweep_temporaries_honours_the_age(tmp_path):
    old = aged(tmp_path / ".seg.0123456789ab.tmp.nrrd", 120)
    assert sweep_temporaries(tmp_path, older_than_s=300) == []
    assert sweep_temporaries(tmp_path, older_than_s=60) == [old]
    assert listing(tmp_path) == []


# --- point 7: output paths checked before the work ----------------------------------------------


def test_a_report_that_is_not_png_is_refused_before_the_model_loads(small_ct, tmp_path, capsys):
    argv = ["segment", small_ct, "-o", tmp_path / "seg.nii.gz", "--model", tmp_path / "no-model"]
    code, _, err = run_cli([*argv, "--report", tmp_path / "out.txt"], capsys)
    assert (code, err) == (3, f"m4oe: error: {tmp_path / 'out.txt'}: a report must be written as .png\n")
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("output", "gates", "problem"),
    [
        ("g/gate_map.nrrd", "g", "would be written twice, as the segmentation and as the gate map"),
        (
            "g/dominant_expert.nrrd",
            "g",
            "would be written twice, as the segmentation and as the dominant expert",
        ),
        ("link/gate_map.nrrd", "g", "would be written twice, as the segmentation and as the gate map"),
        ("seg.nii.gz", "seg.nii.gz", "is the segmentation output and also a folder of the gate map output"),
    ],
)
def test_outputs_that_collide_are_refused_before_the_model_loads(
    small_ct, tmp_path, capsys, output, gates, problem
):
    (tmp_path / "g").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "g")
    argv = ["segment", small_ct, "-o", tmp_path / output, "--gates", tmp_path / gates]
    code, _, err = run_cli([*argv, "--model", tmp_path / "no-model", "--overwrite"], capsys)
    assert (code, err) == (3, f"m4oe: error: {tmp_path / output}: {problem}\n")
    assert listing(tmp_path) == ["g", "link"]


def test_an_output_that_is_a_folder_is_refused_before_the_model_loads(small_ct, tmp_path, capsys):
    (tmp_path / "seg.nii.gz").mkdir()
    argv = ["segment", small_ct, "-o", tmp_path / "seg.nii.gz", "--model", tmp_path / "no-model"]
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert (code, err) == (3, f"m4oe: error: {tmp_path / 'seg.nii.gz'}: is a folder; expected a file name\n")
