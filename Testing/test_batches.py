"""Training batches drawn ahead by worker processes are the batches the training process would draw."""

from __future__ import annotations

import multiprocessing
import signal
import time

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.cli import _sigterm_as_interrupt
from m4oe.phantom import write_dataset
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe_training.augment import build_augmentation
from m4oe_training.batches import MIM_BLOCK, BatchPlan, BatchSource, _worker_init, draw_batch
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig
from m4oe_training.data import DatasetInfo, SliceData, class_slices


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("batches") / "ct", "ct", 2, seed=5, max_size=48)
    info = DatasetInfo.read(root)
    datasets = [
        DatasetConfig(str(root), "ct", "abdomen", val_cases=0),
        DatasetConfig(str(root), "mr-t1", "abdomen", val_cases=0, synth="t1"),
    ]
    params = {"ct": DEFAULT_PARAMS["ct"], "mr": DEFAULT_PARAMS["mr"]}
    data = SliceData(datasets, [info, info], params, 48, "resize", None, None)
    return BatchPlan(data, build_augmentation(0.5), batch_size=4, foreground_fraction=0.8, seed=7, rank=0)


def assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x.dtype == y.dtype and x.shape == y.shape
            assert bool((x == y).all())


def test_workers_draw_exactly_the_batches_of_the_training_process(plan):
    # Steps in the order a run asks for them: a mim stage, then a joint stage, then a resumed run
    # that starts again at an earlier step (what was drawn ahead is dropped).
    requests = [(s, "mim", 0.5, 3) for s in range(3)] + [(s, "joint", 0.75, 8) for s in range(3, 8)]
    requests += [(s, "joint", 0.75, 8) for s in (5, 6, 7)]
    with BatchSource(plan, workers=2) as ahead:
        drawn = [ahead.get(step, kind, ratio, last_step=last) for step, kind, ratio, last in requests]
    for (step, kind, ratio, _), batch in zip(requests, drawn, strict=True):
        assert_same(batch, draw_batch(plan, step, kind, ratio))
    images, labels, datasets, mask = drawn[0]
    assert images.shape == (4, 1, 48, 48) and labels.shape == (4, 48, 48) and datasets.shape == (4,)
    # a mim batch hides blocks of MIM_BLOCK pixels, about the asked ratio of them
    assert mask.shape == (4, 1, 48, 48) and 0.3 < float(mask.mean()) < 0.7
    assert bool(
        (
            mask[:, :, ::MIM_BLOCK, ::MIM_BLOCK]
            .repeat_interleave(MIM_BLOCK, 2)
            .repeat_interleave(MIM_BLOCK, 3)
            == mask
        ).all()
    )
    assert drawn[3][3] is None  # joint stages have no mask
    # different steps give different batches (the seed is the step's)
    assert not bool((drawn[3][0] == drawn[4][0]).all())


def test_without_workers_each_batch_is_drawn_on_request(plan):
    with BatchSource(plan, workers=0) as here:
        assert here.pool is None
        assert_same(here.get(4, "joint", 0.75, last_step=10), draw_batch(plan, 4, "joint", 0.75))


def test_loader_workers_must_not_be_negative(tmp_path):
    stage = StageConfig(kind="joint", epochs=1, lr=1e-3)
    dataset = DatasetConfig(str(tmp_path), "ct", "abdomen")
    with pytest.raises(ConfigError, match="loader_workers"):
        TrainConfig(name="x", datasets=(dataset,), stages=(stage,), loader_workers=-1)
    assert TrainConfig(name="x", datasets=(dataset,), stages=(stage,), loader_workers=3).loader_workers == 3


def test_worker_batches_use_the_step_seed_not_the_order_of_requests(plan):
    with BatchSource(plan, workers=1) as ahead:
        late = ahead.get(6, "joint", 0.75, last_step=7)
        early = ahead.get(2, "joint", 0.75, last_step=7)
    assert_same(late, draw_batch(plan, 6, "joint", 0.75))
    assert_same(early, draw_batch(plan, 2, "joint", 0.75))
    assert not np.array_equal(late[0].numpy(), early[0].numpy())


def test_class_slices_lists_each_structures_slices_and_leaves_out_what_the_task_drops():
    label = np.zeros((6, 4, 4), np.uint8)
    label[0:5, 1, 1] = 1  # a large structure on slices 0-4
    label[3, 2, 2] = 4  # a small one on slice 3 only
    label[5, 0, 0] = 2  # one the task does not have
    by_class = class_slices(label)
    assert [s.tolist() for s in by_class] == [[0, 1, 2, 3, 4], [5], [3]]
    lookup = np.arange(256, dtype=np.uint8)
    lookup[2] = 0
    assert [s.tolist() for s in class_slices(label, lookup)] == [[0, 1, 2, 3, 4], [3]]
    assert class_slices(np.zeros((3, 4, 4), np.uint8)) == ()


def test_class_sampling_draws_a_small_structure_as_often_as_the_others(tmp_path):
    """With ``foreground_fraction`` 1, "slice" draws the pancreas only on the share of foreground
    slices holding it; "class" draws a structure first, so a slice holding the pancreas comes at
    least once in every 9 draws (9 structures), more than the "slice" share; every draw holds
    foreground either way."""
    root = write_dataset(tmp_path / "ct", "ct", 1, seed=3, max_size=48)
    info = DatasetInfo.read(root)
    data = SliceData(
        [DatasetConfig(str(root), "ct", "abdomen", val_cases=0)],
        [info],
        {"ct": DEFAULT_PARAMS["ct"]},
        48,
        "resize",
        None,
        None,
    )
    case = data.cases[0]
    assert len(case.class_slices) == 9
    pancreas = info.labels["pancreas"]
    holds = case.label.reshape(case.label.shape[0], -1) == pancreas
    share_by_slice = holds.any(axis=1)[case.foreground_slices].mean()

    def pancreas_share(sampling: str) -> float:
        _, labels, _ = data.sample(np.random.default_rng(0), 900, 1.0, sampling)
        flat = labels.reshape(labels.shape[0], -1).numpy()
        assert (flat > 0).any(axis=1).all()
        return float((flat == pancreas).any(axis=1).mean())

    by_slice, by_class = pancreas_share("slice"), pancreas_share("class")
    assert abs(by_slice - share_by_slice) < 0.06
    assert by_class > max(1 / 9, by_slice + 0.05)


def test_foreground_sampling_is_a_config_key_that_reaches_the_batch_plan(tmp_path, plan):
    stage = StageConfig(kind="joint", epochs=1, lr=1e-3)
    dataset = DatasetConfig(str(tmp_path), "ct", "abdomen")
    with pytest.raises(ConfigError, match="foreground_sampling"):
        TrainConfig(name="x", datasets=(dataset,), stages=(stage,), foreground_sampling="organ")
    cfg = TrainConfig(name="x", datasets=(dataset,), stages=(stage,), foreground_sampling="class")
    assert TrainConfig(name="x", datasets=(dataset,), stages=(stage,)).foreground_sampling == "slice"
    from_cfg = BatchPlan.from_config(cfg, plan.data, None, rank=1)
    assert (from_cfg.foreground_sampling, from_cfg.rank, from_cfg.batch_size) == ("class", 1, cfg.batch_size)
    assert from_cfg.foreground_fraction == cfg.foreground_fraction


def test_a_dataset_s_own_foreground_fraction_replaces_the_run_s_for_its_samples(tmp_path):
    """Two copies of one phantom set whose label map is cleared on its first and last third of
    slices (as a scan reaching the chest and pelvis beyond the labelled organs): the first copy
    keeps the run's fraction (1: only slices holding a label), the second sets its own 0 (any
    slice), so it draws the unlabelled slices about as often as they occur; the first never does.
    A fraction outside [0, 1] is refused."""
    root = write_dataset(tmp_path / "ct", "ct", 1, seed=3, max_size=48)
    (label_file,) = (root / "labelsTr").glob("*.nii.gz")
    label = sitk.ReadImage(str(label_file))
    array = sitk.GetArrayFromImage(label)
    third = array.shape[0] // 3
    array[:third] = 0
    array[-third:] = 0
    cleared = sitk.GetImageFromArray(array)
    cleared.CopyInformation(label)
    sitk.WriteImage(cleared, str(label_file))
    info = DatasetInfo.read(root)
    datasets = [
        DatasetConfig(str(root), "ct", "abdomen", val_cases=0),
        DatasetConfig(str(root), "ct", "abdomen", val_cases=0, foreground_fraction=0.0),
    ]
    data = SliceData(datasets, [info, info], {"ct": DEFAULT_PARAMS["ct"]}, 48, "resize", None, None)
    case = data.cases[0]
    empty_share = 1 - case.foreground_slices.size / case.label.shape[0]
    assert empty_share > 0.1
    _, labels, index = data.sample(np.random.default_rng(0), 1200, 1.0)
    empty = (labels.reshape(labels.shape[0], -1) == 0).all(dim=1).numpy()
    index = index.numpy()
    assert not empty[index == 0].any()
    assert abs(empty[index == 1].mean() - empty_share) < 0.06
    stage = StageConfig(kind="joint", epochs=1, lr=1e-3)
    bad = DatasetConfig(str(root), "ct", "abdomen", foreground_fraction=1.5)
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.foreground_fraction"):
        TrainConfig(name="x", datasets=(bad,), stages=(stage,))


def test_workers_end_quietly_when_the_pool_ends_them_during_a_draw(capfd):
    """Under the CLI, SIGTERM raises in the training process (m4oe.cli); its forked workers must not
    inherit that: the pool ends them with SIGTERM, and a worker busy drawing printed a traceback."""
    with _sigterm_as_interrupt():
        pool = multiprocessing.get_context("fork").Pool(1, initializer=_worker_init)
        (worker,) = pool._pool
        pool.apply_async(time.sleep, (30,))  # a draw that is still running when the pool ends
        time.sleep(1.0)
        pool.terminate()
        pool.join()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Terminated" not in err, err
    assert worker.exitcode == -signal.SIGTERM  # ended by the signal, not by an exception


def test_workers_leave_ctrl_c_to_the_training_process(plan):
    with BatchSource(plan, workers=1) as ahead:
        dispositions = ahead.pool.apply(_signal_dispositions)
    assert dispositions == (signal.SIG_DFL, signal.SIG_IGN)


def _signal_dispositions():
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
