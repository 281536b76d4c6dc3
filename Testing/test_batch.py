"""``m4oe batch``: cases found in files, folders, DICOM series, globs and manifests; one bad case
recorded while the rest are done; resume without rewriting; the summary's volumes against the label
maps; a run killed mid-way (SIGKILL, SIGTERM) leaving no partial output; and the same run on a Dask
cluster of two processes, one killed mid-case.

Phantom CT volumes (64 voxels a side) and the tiny untrained model keep each case under a second;
every output is read back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_io import write_dicom_series

from m4oe import cli
from m4oe.batch import BatchSettings, run_batch
from m4oe.batch_summary import Summary, label_counts
from m4oe.cases import collect_cases
from m4oe.errors import InputError
from m4oe.io import read_image
from m4oe.phantom import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TEMPORARY = ".tmp"  # in the name of every file m4oe.io.write_atomic has not renamed yet


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """Four phantom CT volumes (int16 HU, 64x64x64 voxels)."""
    folder = write_dataset(tmp_path_factory.mktemp("phantoms"), "ct", 4, 0, max_size=64)
    return sorted((folder / "imagesTr").glob("*.nii.gz"))


def cohort(folder: Path, phantoms: list[Path], names: list[str]) -> Path:
    """``folder/<name>.nii.gz`` copies of the first phantoms, one per name."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in zip(names, phantoms, strict=False):
        shutil.copy(source, folder / f"{name}.nii.gz")
    return folder


def settings(out: Path, model: Path, **kwargs) -> BatchSettings:
    return BatchSettings(out_dir=out, model=str(model), threads=1, **kwargs)


def rows(out: Path) -> dict[str, dict]:
    return {row["case_id"]: row for row in json.loads((out / "summary.json").read_text())["cases"]}


def label_maps(folder: Path) -> list[Path]:
    """The label maps renamed into place (pathlib's glob also matches hidden temporary files)."""
    return sorted(p for p in folder.glob("*.seg.nrrd") if not p.name.startswith("."))


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if TEMPORARY in p.name]


# ------------------------------------------------------------------------------------------- inputs


def test_inputs_from_folders_dicom_series_globs_and_files(tmp_path, phantoms):
    root = tmp_path / "cohort"
    cohort(root / "p01", phantoms, ["ct"])
    (root / "p02").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(phantoms[1])), str(root / "p02" / "scan.nrrd"))
    image = sitk.Cast(sitk.ReadImage(str(phantoms[2])), sitk.sitkInt16)
    write_dicom_series(root / "p03" / "study" / "series", image, "CT", "1.2.826.0.1.3680043.2.1125.9")
    (root / "p03" / "notes.txt").write_text("not a volume")
    cohort(root / ".hidden", phantoms, ["skipped"])
    cohort(root / "out", phantoms, ["earlier_output"])  # the output folder is never searched

    cases = collect_cases([str(root)], exclude=root / "out")
    assert [c.case_id for c in cases] == ["p01__ct", "p02__scan", "p03__study__series"]
    assert cases[2].input == root / "p03" / "study" / "series"
    assert read_image(cases[2].input).dicom_modality == "CT"

    by_glob = collect_cases([str(root / "*" / "ct.nii.gz"), str(root / "p02" / "scan.nrrd")])
    assert [(c.case_id, c.input) for c in by_glob] == [
        ("p01__ct", root / "p01" / "ct.nii.gz"),
        ("scan", root / "p02" / "scan.nrrd"),
    ]
    # A DICOM folder given itself is one case named after it; a repeated input is one case.
    series = root / "p03" / "study" / "series"
    assert [c.case_id for c in collect_cases([str(series), str(series)])] == ["series"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: [str(d / "missing.nii.gz")], "no such file or folder"),
        (lambda d: [str(d / "*.nrrd")], "matches no volume"),
        (
            lambda d: [str(d / "a" / "ct.nii.gz"), str(d / "b" / "ct.nii.gz")],
            "two inputs would have the case id",
        ),
        (lambda d: [str(d / "empty")], "holds no volume"),
    ],
    ids=["missing", "glob-without-match", "same-case-id", "empty-folder"],
)
def test_bad_inputs_are_refused_before_any_work(tmp_path, phantoms, make, message):
    cohort(tmp_path / "a", phantoms, ["ct"])
    cohort(tmp_path / "b", phantoms[1:], ["ct"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=message):
        collect_cases(make(tmp_path))


def test_manifest_rows_carry_their_options(tmp_path, phantoms, tiny_model_dir):
    images = cohort(tmp_path / "images", phantoms, ["a", "b", "c"])
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(
        "input,output_name,modality,task,tta\n"
        "images/a.nii.gz,alpha,mr,,\n"
        f"{images / 'b.nii.gz'},,,liver,\n"
        "images/c.nii.gz,gamma,,,2\n"
    )
    out = tmp_path / "out"
    summary = run_batch([str(manifest)], settings(out, tiny_model_dir, modality="ct"), progress="none")
    assert summary.counts()["ok"] == 3
    found = rows(out)
    assert list(found) == ["alpha", "b", "gamma"]
    assert (found["alpha"]["modality"], found["alpha"]["modality_source"]) == ("mr", "user")
    assert (found["b"]["modality"], found["b"]["task"]) == ("ct", "liver")
    assert list(found["b"]["volumes_ml"]) == ["liver"]
    assert list(found["gamma"]["volumes_ml"]) == ["liver", "spleen", "right kidney"]
    assert {p.name for p in label_maps(out)} == {"alpha.seg.nrrd", "b.seg.nrrd", "gamma.seg.nrrd"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("input,colour\na.nii.gz,red\n", "unknown manifest column"),
        ("output_name\nx\n", "no 'input' column"),
        ("input,modality\na.nii.gz,pet\n", r"cohort.csv:2: modality 'pet' is not one of"),
        ("input,tta\na.nii.gz,two\n", r"cohort.csv:2: bad number"),
        ("input,output_name\na.nii.gz,../escape\n", "not a safe file name"),
    ],
    ids=["unknown-column", "no-input", "bad-modality", "bad-number", "unsafe-name"],
)
def test_bad_manifests_are_refused_naming_file_and_line(tmp_path, text, message):
    manifest = tmp_path / "cohort.csv"
    manifest.write_text(text)
    with pytest.raises(InputError, match=message):
        collect_cases([str(manifest)])


# ------------------------------------------------------------------------------------ runs, resume


def test_a_bad_case_is_recorded_and_the_rest_are_done(tmp_path, phantoms, tiny_model_dir, capsys):
    images = cohort(tmp_path / "images", phantoms, ["a", "b"])
    (images / "broken.nii.gz").write_bytes(b"not a NIfTI file at all")
    (images / "empty.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    code = cli.main(["batch", str(images), "-o", str(out), "--model", str(tiny_model_dir), "--threads", "1"])
    assert code == 1
    found = rows(out)
    assert [found[k]["status"] for k in ("a", "b", "broken", "empty")] == ["ok", "ok", "failed", "failed"]
    assert str(images / "broken.nii.gz") in found["broken"]["error"]
    assert sorted(p.name for p in label_maps(out)) == ["a.seg.nrrd", "b.seg.nrrd"]
    assert not temporaries(out)
    err = capsys.readouterr().err
    assert "failed: broken:" in err and "failed: empty:" in err
    # Both failures are tried again (and fail again) by the next run; the finished cases are skipped.
    assert cli.main(["batch", str(images), "-o", str(out), "--model", str(tiny_model_dir)]) == 1
    found = rows(out)
    assert [found[k]["status"] for k in ("a", "b", "broken", "empty")] == [
        "skipped",
        "skipped",
        "failed",
        "failed",
    ]


def test_the_accuracy_warning_is_given_once_per_modality_not_in_every_row(tmp_path, phantoms, capsys):
    """The embedded model's card reports weak structures on real CT, so every CT case gets the same
    accuracy warning: summary.json holds it once, each row in its own field (not among the case's
    warnings), the CSV leaves it out and the end of the run prints it once."""
    images = cohort(tmp_path / "images", phantoms, ["a", "b"])
    out = tmp_path / "out"
    args = ["batch", str(images), "-o", str(out), "--threads", "1", "--tta", "1", "--modality", "ct"]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["model_warnings"]) == ["ct"]
    warning = summary["model_warnings"]["ct"]
    assert warning.startswith("on the real CT scans its card reports")
    for row in summary["cases"]:
        assert row["accuracy_warning"] == warning and warning not in row["warnings"]
    assert warning not in (out / "summary.csv").read_text()
    assert json.loads((out / "cases" / "a.json").read_text())["accuracy_warning"] == warning
    assert capsys.readouterr().err.count(warning) == 1


def test_rerun_skips_finished_cases_without_rewriting_them(tmp_path, phantoms, tiny_model_dir):
    images = cohort(tmp_path / "images", phantoms, ["a", "b", "c"])
    out = tmp_path / "out"
    run_batch([str(images)], settings(out, tiny_model_dir, gates=True), progress="none")
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.startswith("summary"))
    assert len(files) == 3 * 5  # label map, record, gate map, dominant expert, gate summary
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    # An unfinished case: its label map never renamed into place (a run killed in between).
    (out / "b.seg.nrrd").unlink()
    summary = run_batch([str(images)], settings(out, tiny_model_dir, gates=True), progress="none")
    assert [r["status"] for r in summary.rows.values()] == ["skipped", "ok", "skipped"]
    for path, stamp in stamps.items():
        if not path.name.startswith("b"):
            assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{path} was written again"
    assert (out / "b.seg.nrrd").is_file()
    assert (out / "b_gate_map.nrrd").stat().st_ino != stamps[out / "b_gate_map.nrrd"][0]  # replaced
    # A label map this batch did not write is not replaced without --overwrite.
    (out / "cases" / "c.json").unlink()
    summary = run_batch([str(images)], settings(out, tiny_model_dir, gates=True), progress="none")
    assert summary.rows["c"]["status"] == "failed"
    assert "pass --overwrite" in summary.rows["c"]["error"]
    summary = run_batch([str(images)], settings(out, tiny_model_dir, overwrite=True), progress="none")
    assert summary.counts()["ok"] == 3


def test_summary_volumes_and_routing_match_the_outputs(tmp_path, phantoms, tiny_model_dir):
    images = cohort(tmp_path / "images", phantoms, ["a", "b"])
    out = tmp_path / "out"
    run_batch([str(images)], settings(out, tiny_model_dir, out_format="nii.gz"), progress="none")
    table = (out / "summary.csv").read_text().splitlines()
    header = table[0].split(",")
    assert header[:6] == ["case_id", "status", "seconds", "modality", "modality_source", "task"]
    assert {"gate_ct", "gate_mr", "gate_mr-t2", "liver_ml", "spleen_ml", "right kidney_ml"} <= set(header)
    for line, (case_id, row) in zip(table[1:], rows(out).items(), strict=True):
        labels = sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
        assert row["output"] == str(out / f"{case_id}.nii.gz")
        counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=4)
        voxel_ml = np.prod(labels.GetSpacing()) / 1000
        expected = {"liver": counts[1], "spleen": counts[2], "right kidney": counts[3]}
        assert row["volumes_ml"] == {k: pytest.approx(v * voxel_ml, abs=1e-3) for k, v in expected.items()}
        assert sum(row["volumes_ml"].values()) > 0
        cells = dict(zip(header, line.split(","), strict=True))
        assert float(cells["liver_ml"]) == pytest.approx(row["volumes_ml"]["liver"])
        weights = row["routing"]["mean_weights"]
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-4)
        assert row["routing"]["dominant_expert"] == max(weights, key=weights.get)
        assert row["status"] == "ok" and row["seconds"] > 0 and row["modality"] == "ct"


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_label_counts_are_those_of_the_whole_volume(dtype):
    # The summary's volumes count labels plane by plane: the same counts as one bincount of the
    # whole volume, with labels present in some planes only, the largest one (300 for uint16) in
    # the last plane but one, and an empty last plane.
    rng = np.random.default_rng(0)
    labels = np.zeros((6, 7, 9), dtype)
    labels[1:3] = rng.integers(0, 4, (2, 7, 9))
    top = 300 if dtype == np.uint16 else 255
    labels[4, 2, 3] = top
    counts = label_counts(labels)
    np.testing.assert_array_equal(counts, np.bincount(labels.ravel()))
    assert counts.size == top + 1 and counts[top] == 1 and counts.sum() == labels.size
    np.testing.assert_array_equal(label_counts(np.zeros((3, 4, 5), dtype)), [60])


def test_summary_rewrites_are_skipped_while_they_would_cost_more_than_their_share(tmp_path, phantoms):
    # Each summary write rewrites every row; refresh() writes only when the time since the last
    # write is at least that write's duration over write_share, write() always.
    cases = collect_cases([str(cohort(tmp_path / "images", phantoms, ["a", "b"]))])
    out = tmp_path / "out"
    out.mkdir()
    summary = Summary(cases, out, "run", None, write_share=1e-9)  # a write is never due again
    summary.write()
    first = (out / "summary.json").read_text()
    summary.set(dict(summary.rows["a"], status="ok"))
    assert summary.refresh() is False
    assert (out / "summary.json").read_text() == first and rows(out)["a"]["status"] == "pending"
    summary.write()
    assert rows(out)["a"]["status"] == "ok"
    cheap = Summary(cases, out, "run", None, write_share=0.5)  # due after twice the last write
    cheap.write()
    cheap.set(dict(cheap.rows["b"], status="ok"))
    time.sleep(2.5 * cheap.last_write_s + 0.01)
    assert cheap.refresh() is True and rows(out)["b"]["status"] == "ok"


# ------------------------------------------------------------------------------------------- kills


def _start(images: Path, out: Path, model: Path) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "M4oESegmentation"), str(ROOT / "training")])
    )
    command = [sys.executable, "-m", "m4oe.cli", "batch", str(images), "-o", str(out), "--model", str(model)]
    return subprocess.Popen(
        [*command, "--threads", "1", "--progress", "json"], stdout=subprocess.PIPE, text=True, env=env
    )


def _check_finished_outputs(out: Path, images: Path) -> set[str]:
    """Every label map present is complete (all its voxels, the input's grid) and recorded; returns
    the case ids that have one."""
    finished = set()
    for path in label_maps(out):
        case_id = path.name[: -len(".seg.nrrd")]
        assert (out / "cases" / f"{case_id}.json").is_file(), f"{path} has no record"
        size = sitk.ReadImage(str(images / f"{case_id}.nii.gz")).GetSize()
        assert read_image(path).image.GetSize() == size
        finished.add(case_id)
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_killed_run_leaves_no_partial_output_and_resumes(tmp_path, phantoms, tiny_model_dir, kill):
    images = cohort(tmp_path / "images", phantoms * 2, [f"case{i}" for i in range(6)])
    out = tmp_path / "out"
    process = _start(images, out, tiny_model_dir)
    for line in process.stdout:  # the first case finished: the next ones are being read and segmented
        if json.loads(line)["stage"] == "case":
            break
    process.send_signal(kill)
    process.communicate(timeout=60)
    assert process.returncode == (-signal.SIGKILL if kill == signal.SIGKILL else 143)
    finished = _check_finished_outputs(out, images)
    assert 1 <= len(finished) < 6
    summary = json.loads((out / "summary.json").read_text())  # whole: written atomically
    assert {r["case_id"] for r in summary["cases"] if r["status"] == "ok"} <= finished
    if kill == signal.SIGTERM:  # a clean stop: no temporary file, every finished case in the summary
        assert not temporaries(out)
        assert {r["case_id"] for r in summary["cases"] if r["status"] == "ok"} == finished
        assert {r["status"] for r in summary["cases"]} == {"ok", "pending"}
    resumed = run_batch([str(images)], settings(out, tiny_model_dir), progress="none")
    statuses = {k: r["status"] for k, r in resumed.rows.items()}
    assert {k for k, s in statuses.items() if s == "skipped"} == finished
    assert {k for k, s in statuses.items() if s == "ok"} == set(statuses) - finished
    assert _check_finished_outputs(out, images) == set(statuses)


@pytest.mark.slow
def test_dask_cluster_redoes_the_cases_of_a_killed_worker(tmp_path, tiny_model_dir):
    distributed = pytest.importorskip("distributed")
    folder = write_dataset(tmp_path / "phantoms", "ct", 4, 1, max_size=112)
    images = folder / "imagesTr"
    out = tmp_path / "out"
    cluster = distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None, memory_limit=0
    )
    client = distributed.Client(cluster)
    seen: dict[Path, tuple[int, int]] = {}  # each label map as first seen: inode, mtime
    result: dict = {}

    def run() -> None:
        result["summary"] = run_batch(
            [str(images)], settings(out, tiny_model_dir), scheduler=cluster.scheduler_address, progress="none"
        )

    runner = threading.Thread(target=run)
    killed = None
    try:
        runner.start()
        deadline = time.monotonic() + 120
        while runner.is_alive() and time.monotonic() < deadline:
            for path in label_maps(out):
                seen.setdefault(path, (path.stat().st_ino, path.stat().st_mtime_ns))
            if killed is None and seen:
                executing = client.run(lambda dask_worker: [str(t.key) for t in dask_worker.state.executing])
                busy = [address for address, keys in executing.items() if keys]
                if busy:
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    killed = executing[busy[0]][0]
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        runner.join(timeout=60)
    finally:
        client.close()
        cluster.close()
    assert killed is not None, "no worker was caught running a case"
    summary = result["summary"]
    assert [r["status"] for r in summary.rows.values()] == ["ok"] * 4
    killed_case = killed.split("-", 2)[2]
    assert killed_case in summary.rows, killed
    assert {r["worker"] for r in summary.rows.values()} <= {"0", "1"}
    for path in label_maps(out):
        seen.setdefault(path, (path.stat().st_ino, path.stat().st_mtime_ns))
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == seen[path], f"{path} was written twice"
    assert len(seen) == 4
    assert all(read_image(p).image.GetSize()[0] > 0 for p in seen)


def test_bad_batch_arguments_exit_2(tmp_path, phantoms, capsys):
    images = cohort(tmp_path / "images", phantoms, ["a"])
    out = tmp_path / "out"
    assert cli.main(["batch", str(images), "-o", str(out), "--workers", "0"]) == 2
    assert "--workers must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["batch", str(images), "-o", str(out), "--workers", "2", "--scheduler", "tcp://x:1"])
    assert exit_info.value.code == 2
    assert cli.main(["batch", str(tmp_path / "nothing-here"), "-o", str(out)]) == 2
    assert "nothing-here: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_structures_and_body_crop_as_segment_gives_them(tmp_path, phantoms, tiny_model_dir, capsys):
    # A cohort keeps segment's defaults (body crop on) and its --structures: the labels of one case
    # equal `m4oe segment`'s with the same options; an unknown name stops the run before any case.
    images = cohort(tmp_path / "images", phantoms, ["a"])
    out, seg = tmp_path / "out", tmp_path / "seg.nii.gz"
    common = ["--model", str(tiny_model_dir), "--threads", "1", "--tta", "1", "--progress", "none"]
    argv = ["batch", str(images), "-o", str(out), "--format", "nii.gz", "--structures", "liver,spleen"]
    assert cli.main([*argv, *common]) == 0
    assert (
        cli.main(
            ["segment", str(images / "a.nii.gz"), "-o", str(seg), "--structures", "liver,spleen", *common]
        )
        == 0
    )
    batch_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a.nii.gz")))
    np.testing.assert_array_equal(batch_labels, sitk.GetArrayFromImage(sitk.ReadImage(str(seg))))
    assert set(np.unique(batch_labels)) <= {0, 1, 2} and set(rows(out)["a"]["volumes_ml"]) == {
        "liver",
        "spleen",
    }
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli.main(["batch", str(images), "-o", str(bad), "--structures", "liver,heart", *common]) == 2
    assert "unknown structure 'heart'" in capsys.readouterr().err
    assert not bad.exists()
