"""The warm engine and batches of volumes (issue #24 points 3 and 4) on a real MRML scene (slicer-core).

:class:`M4oESegmentationLib.engine.WarmEngine` keeps one ``m4oe serve`` process (here started with
this interpreter; in Slicer with ``PythonSlicer``) and the Segmenter sends it every run;
:class:`M4oESegmentationLib.batch.BatchSegmentation` runs several volumes through it. The tiny
test model, real subprocesses, nothing mocked.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

try:
    import slicer
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error})", allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from M4oESegmentationLib import batch, engine, segmenter, status, volumes

from m4oe.demo import synthetic_ct

MODULE_DIR = Path(__file__).resolve().parents[2] / "M4oESegmentation"
TIMEOUT_S = 300
pytestmark = pytest.mark.slow


@pytest.fixture
def warm():
    """A warm engine and a Segmenter that uses it; the server is stopped afterwards."""
    server = engine.WarmEngine(sys.executable, MODULE_DIR)
    yield server, segmenter.Segmenter(sys.executable, MODULE_DIR, engine=server)
    server.stop()
    assert not server.alive


def volume_in_study(scene, name: str, study_name: str, shape=(6, 48, 48), seed: int = 2):
    """A CT volume node under patient > study in the subject hierarchy; returns (volume, study item)."""
    volume = volumes.sitk_to_volume_node(synthetic_ct(shape, (5.0, 5.0, 4.0), seed=seed), name)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), f"patient of {study_name}")
    study = hierarchy.CreateStudyItem(patient, study_name)
    hierarchy.CreateItem(study, volume)
    return volume, study


def wait_for_inference(runner, records: list) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not any(r.get("stage") == "inference" for r in records):
        assert runner.poll() and time.monotonic() < deadline, "no inference record"
        time.sleep(0.05)


def options(model_dir: Path, **more) -> dict:
    return dict(modality="ct", model=str(model_dir), device="cpu", test_time_passes=1, **more)


def test_warm_engine_keeps_the_model_and_restarts_a_killed_server(scene, tiny_model_dir, temp_root, warm):
    server, runner = warm
    volume, study = volume_in_study(scene, "abdomen CT", "study")
    loads = []

    def run():
        records = []
        result = runner.run(volume, on_progress=records.append, **options(tiny_model_dir))
        loads.append(next(r for r in records if r["stage"] == "load"))
        return result

    first, second = run(), run()
    pid = server.pid
    assert server.starts == 1 and server.alive, "one server for both runs"
    assert "model_reused" not in loads[0] and loads[1]["model_reused"] is True
    assert first.segmentation is not second.segmentation
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(second.segmentation)) == study
    assert segmenter.gate_review_of(second.segmentation) is not None

    # Killed while idle: the next run starts a new server and succeeds.
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.alive:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert run().segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert server.starts == 2 and server.pid != pid

    # Killed during a run: that run fails with the reason, nothing is added; the next one works.
    big, _ = volume_in_study(scene, "big CT", "big study", shape=(48, 128, 128), seed=3)
    nodes_before = scene.GetNumberOfNodes()
    records, finished = [], []
    runner.start(
        big,
        on_progress=records.append,
        on_finished=lambda result, error: finished.append((result, error)),
        **options(tiny_model_dir, extra_args=("--batch-size", "1")),
    )
    wait_for_inference(runner, records)
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT_S
    while runner.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(finished) == 1 and finished[0][0] is None
    assert finished[0][1].startswith("the engine stopped unexpectedly (exit code -9)"), finished
    assert scene.GetNumberOfNodes() == nodes_before
    assert run().segmentation is not None and server.starts == 3
    assert list(temp_root.iterdir()) == [], "every temporary folder is removed"


def test_warm_engine_cancel_stops_the_run_and_keeps_the_server(scene, tiny_model_dir, temp_root, warm):
    server, runner = warm
    big, _ = volume_in_study(scene, "big CT", "study", shape=(48, 128, 128), seed=3)
    nodes_before = scene.GetNumberOfNodes()
    records, finished = [], []
    runner.start(
        big,
        on_progress=records.append,
        on_finished=lambda result, error: finished.append((result, error)),
        **options(tiny_model_dir, extra_args=("--batch-size", "1")),
    )
    wait_for_inference(runner, records)
    pid = server.pid

    runner.cancel(wait=True)

    assert finished == [(None, status.CANCELLED)] and not runner.running
    assert scene.GetNumberOfNodes() == nodes_before and list(temp_root.iterdir()) == []
    assert server.alive and server.pid == pid, "the server goes on after a cancel"
    small, _ = volume_in_study(scene, "small CT", "study 2")
    assert runner.run(small, **options(tiny_model_dir)).segmentation is not None
    assert server.starts == 1


def test_study_volumes_are_the_scalar_volumes_of_the_study(scene):
    first, study = volume_in_study(scene, "first", "study A")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    second = volumes.sitk_to_volume_node(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=5), "second")
    hierarchy.CreateItem(hierarchy.CreateFolderItem(study, "series folder"), second)
    labels = volumes.sitk_to_volume_node(
        synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=5) > 0, "mask", labelmap=True
    )
    hierarchy.CreateItem(study, labels)
    other, _ = volume_in_study(scene, "other", "study B")

    assert volumes.study_volumes(first) == [first, second]
    assert volumes.study_volumes(second) == [second]  # its own folder is its study
    assert volumes.study_volumes(other) == [other]
    loose = volumes.sitk_to_volume_node(synthetic_ct((6, 48, 48), (5.0, 5.0, 4.0), seed=6), "loose")
    assert volumes.study_volumes(loose) == [first, second, other, loose], "no item: the whole scene"


def test_batch_gives_each_volume_its_result_and_a_failed_one_does_not_stop_the_rest(
    scene, tiny_model_dir, temp_root, warm
):
    server, runner = warm
    first, study_a = volume_in_study(scene, "liver CT", "study A")
    tiny, _ = volume_in_study(scene, "tiny CT", "study B", shape=(3, 4, 4))  # too small for the model
    last, study_b = volume_in_study(scene, "kidney CT", "study C", seed=4)
    records, finished, reported = [], [], []

    outcomes = batch.BatchSegmentation(
        runner,
        [first, tiny, last, first],
        on_progress=records.append,
        on_volume_finished=reported.append,
        on_finished=finished.append,
        **options(tiny_model_dir),
    ).run()

    assert [o.volume for o in outcomes] == [first, tiny, last], "each volume once, in order"
    assert finished == [outcomes] and reported == outcomes
    assert outcomes[1].result is None and "too small" in outcomes[1].error
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for outcome, study in ((outcomes[0], study_a), (outcomes[2], study_b)):
        node = outcome.result.segmentation
        assert outcome.error is None and node.GetName() == f"{outcome.volume.GetName()} M4oE"
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study, "next to its volume"
        assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is outcome.volume
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    # One progress for the whole batch: case i of n, never moving back, ending at 1.
    assert {r["cases"] for r in records} == {3} and {1, 3} <= {r["case"] for r in records}
    fractions = [status.overall_fraction(r) for r in records]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert max(f for r, f in zip(records, fractions, strict=True) if r["case"] == 1) <= 1 / 3 + 1e-9
    assert status.progress_text(records[-1]).startswith("Volume 3/3 (kidney CT): ")
    assert server.starts == 1 and list(temp_root.iterdir()) == []


def test_batch_cancel_stops_the_current_volume_and_skips_the_rest(scene, tiny_model_dir, temp_root, warm):
    _, runner = warm
    big = [volume_in_study(scene, f"big {n}", f"study {n}", shape=(48, 128, 128), seed=n)[0] for n in (1, 2)]
    nodes_before = scene.GetNumberOfNodes()
    records = []
    job = batch.BatchSegmentation(
        runner, big, on_progress=records.append, **options(tiny_model_dir, extra_args=("--batch-size", "1"))
    ).start()
    wait_for_inference(job, records)

    job.cancel(wait=True)

    assert not job.running and not runner.running
    assert [(o.volume, o.result, o.error) for o in job.outcomes] == [(v, None, status.CANCELLED) for v in big]
    assert scene.GetNumberOfNodes() == nodes_before and list(temp_root.iterdir()) == []
    with pytest.raises(ValueError, match="at least one volume"):
        batch.BatchSegmentation(runner, [])
    with pytest.raises(ValueError, match="single runs"):
        batch.BatchSegmentation(runner, big, replace_existing=True)


def test_batch_progress_fraction_and_text():
    record = {"stage": "inference", "fraction": 0.5, "done": 2, "total": 4, "case": 2, "cases": 4}
    assert status.overall_fraction(record) == pytest.approx((1 + 0.15 + 0.8 * 0.5) / 4)
    assert status.overall_fraction({"stage": "done", "case": 4, "cases": 4}) == 1.0
    assert status.overall_fraction({"stage": "log", "case": 1, "cases": 2}) is None
    assert status.overall_fraction({"stage": "inference", "fraction": 0.5}) == pytest.approx(0.55)
    text = status.progress_text(dict(record, volume="liver CT"))
    assert text == "Volume 2/4 (liver CT): Segmenting 2/4"
