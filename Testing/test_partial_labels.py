"""Partial labels for softmax heads: datasets that label some of their task's structures (CHAOS:
liver, kidneys and spleen of the nine organs) train one head with fully labelled ones, and the
CHAOS converter that writes such a dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from training_helpers import dataset, read_log, write_config

from m4oe.card_summary import info_page
from m4oe.checkpoint import read_model_card
from m4oe.errors import InputError
from m4oe.hub import resolve_model
from m4oe.model import build_model
from m4oe.model_card import ModelCard
from m4oe.phantom import write_dataset
from m4oe.predictor import Predictor
from m4oe.preprocessing import DEFAULT_PARAMS
from m4oe_training.chaos import convert_chaos
from m4oe_training.config import load_config
from m4oe_training.converters import main as converters_main
from m4oe_training.data import DatasetInfo, SliceData
from m4oe_training.export import (
    dataset_values,
    label_lookups,
    labelled_classes,
    renumber,
    task_labels,
    task_values,
)
from m4oe_training.mome import write_partial_phantoms
from m4oe_training.realval import benchmark_held_out, record
from m4oe_training.stage_loss import StageLoss, marginal
from m4oe_training.train import run

SHAPE = (4, 48, 48)  # (z, y, x)


def write_chaos_study(folder: Path, number: int, *, float_labels: bool = True) -> None:
    """A fake CHAOS study: an MR-like image and a label map with CHAOS's ids 1 liver, 2 right
    kidney, 3 left kidney, 4 spleen in four blocks (stored as float64, as the NIfTI pairs are)."""
    rng = np.random.default_rng(number)
    labels = np.zeros(SHAPE, dtype=np.float64 if float_labels else np.uint8)
    labels[:, 6:24, 4:22] = 1  # the liver on the patient's right (low x in LPS)
    labels[:, 30:40, 8:16] = 2
    labels[:, 30:40, 32:40] = 3
    labels[:, 8:20, 30:42] = 4
    image = rng.normal(200, 20, SHAPE) + 300 * (labels > 0)
    for array, name in ((image, "image"), (labels, "label")):
        volume = sitk.GetImageFromArray(array)
        volume.SetSpacing((1.25, 1.25, 7.7))
        volume.SetOrigin((-30.0, 30.0, 10.0 * number))
        volume.SetDirection((1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
        folder.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(volume, str(folder / f"{name}_{number}.nii.gz"))


@pytest.fixture
def chaos_source(tmp_path) -> Path:
    folder = tmp_path / "CHAOST2" / "chaos_MR_T2_normalized"
    for number in (1, 2, 10):
        write_chaos_study(folder, number)
    # What the few-shot repositories keep beside the pairs: ignored.
    sitk.WriteImage(sitk.Image(8, 8, 4, sitk.sitkUInt16), str(folder / "superpix-MIDDLE_1.nii.gz"))
    (folder / "classmap_1.json").write_text("{}")
    return tmp_path / "CHAOST2"


def test_chaos_converter_maps_the_ids_onto_the_project_organs(chaos_source, tmp_path):
    result = convert_chaos(chaos_source, tmp_path / "chaos")
    assert result.cases == ("chaos_t2_01", "chaos_t2_02", "chaos_t2_10")
    meta = json.loads((tmp_path / "chaos" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
    assert meta["modality"] == "mr" and meta["source"]["license"] == "CC-BY-NC-SA-4.0"
    source = sitk.ReadImage(str(chaos_source / "chaos_MR_T2_normalized" / "label_2.nii.gz"))
    written = sitk.ReadImage(str(tmp_path / "chaos" / "labelsTr" / "chaos_t2_02.nii.gz"))
    assert written.GetPixelID() == sitk.sitkUInt8
    assert written.GetOrigin() == source.GetOrigin() and written.GetDirection() == source.GetDirection()
    src, out = sitk.GetArrayFromImage(source), sitk.GetArrayFromImage(written)
    for chaos_id, value in ((0, 0), (1, 1), (2, 3), (3, 4), (4, 2)):  # spleen 4 -> 2, right kidney 2 -> 3
        assert np.all(out[src == chaos_id] == value)


def test_chaos_converter_errors_name_the_file_and_leave_nothing(chaos_source, tmp_path):
    folder = chaos_source / "chaos_MR_T2_normalized"
    (folder / "label_10.nii.gz").unlink()
    with pytest.raises(InputError, match=r"no label for image image_10\.nii\.gz") as error:
        convert_chaos(chaos_source, tmp_path / "chaos")
    assert "label_10.nii.gz" in str(error.value) and not (tmp_path / "chaos").exists()
    with pytest.raises(InputError, match=r"holds no CHAOS image_N\.nii\.gz"):
        convert_chaos(chaos_source, tmp_path / "chaos", sequence="t1")  # only T2 pairs are there
    assert not (tmp_path / "chaos").exists()
    assert converters_main(["chaos", str(tmp_path / "nowhere"), str(tmp_path / "y")]) != 0


def test_marginal_sums_the_unlabelled_classes_into_the_background():
    logits = torch.randn(2, 5, 3, 3)
    labels = torch.tensor([0, 1, 3]).repeat(6)[: 2 * 9].reshape(2, 3, 3)
    merged, target = marginal(logits, labels, (1, 3))
    p, q = logits.softmax(1), merged.softmax(1)
    assert torch.allclose(q[:, 0], p[:, 0] + p[:, 2] + p[:, 4], atol=1e-6)
    assert torch.allclose(q[:, 1], p[:, 1], atol=1e-6) and torch.allclose(q[:, 2], p[:, 3], atol=1e-6)
    assert torch.equal(target, torch.where(labels == 3, 2, labels))


def test_an_unlabelled_organ_is_not_taught_as_background():
    """Where a dataset that labels only class 1 has 0, a confident class-2 answer costs nothing
    under the marginal loss and much under the plain one."""
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 2] = 8.0  # the model sees an organ the dataset does not label
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    merged, target = marginal(logits, labels, (1,))
    assert F.cross_entropy(merged, target) < 1e-3
    assert F.cross_entropy(logits, labels) > 7.0


def test_stage_loss_uses_the_marginal_loss_for_partial_datasets_only():
    torch.manual_seed(0)
    model = build_model("m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", 4),))
    model.eval()  # no drop-path draws: both computations see the same features
    module = StageLoss(model, [0, 1], ["abdomen", "abdomen"], 0.4, 0.7, [None, (1, 3)])
    images = torch.randn(3, 1, 64, 64)
    labels = torch.randint(0, 4, (3, 64, 64))
    labels[2][labels[2] == 2] = 0  # the partial dataset labels classes 1 and 3 only
    datasets = torch.tensor([0, 0, 1])
    loss, _ = module("experts", images, labels, datasets)
    features, _ = model.forward_features(images, torch.tensor([0, 0, 1]))
    logits = model.heads["abdomen"](features).float()
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.4, lambda_dice=0.7, batch=True)
    full = dice_ce(logits[:2], labels[:2, None])
    merged, target = marginal(logits[2:], labels[2:], (1, 3))
    expected = full * 2 / 3 + dice_ce(merged, target[:, None]) / 3
    assert torch.allclose(loss, expected, atol=1e-5)
    plain = StageLoss(model, [0, 1], ["abdomen", "abdomen"], 0.4, 0.7)("experts", images, labels, datasets)[0]
    assert not torch.allclose(loss, plain, atol=1e-4)


def _info(root: Path, labels: dict[str, int]) -> Path:
    """A one-case MR dataset folder whose dataset.json holds ``labels``."""
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, **labels},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "modality": "mr",
    }
    for name, array in (
        ("imagesTr/case_0000", np.ones((2, 4, 4), np.float32)),
        ("labelsTr/case", np.zeros((2, 4, 4), np.uint8)),
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(root / f"{name}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_a_task_unites_its_datasets_labels_by_name(tmp_path):
    """The first dataset's numbering, then each new structure at the next value; a dataset that
    numbers the same structures differently is renumbered into the task's values."""
    full = _info(tmp_path / "a", {"liver": 1, "spleen": 2, "kidney_right": 3})
    part = _info(tmp_path / "b", {"spleen": 1})
    late = _info(tmp_path / "c", {"stomach": 1, "liver": 2, "kidney_right": 3})
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(full, "ct"), dataset(part, "mr"), dataset(late, "mr")],
        [{"kind": "joint", "epochs": 1, "lr": 0.01}],
    )
    cfg, _ = load_config(path)
    infos = [DatasetInfo.read(d.path) for d in cfg.datasets]
    assert task_values(cfg, infos) == {"abdomen": {"liver": 1, "spleen": 2, "kidney_right": 3, "stomach": 4}}
    names = [label.name for label in task_labels(cfg, infos)["abdomen"]]
    assert names == ["liver", "spleen", "right kidney", "stomach"]
    assert labelled_classes(cfg, infos) == [(1, 2, 3), (2,), (1, 3, 4)]  # none labels all four
    assert dataset_values(cfg, infos)[2] == {"background": 0, "stomach": 4, "liver": 1, "kidney_right": 3}
    lookups = label_lookups(cfg, infos)
    assert lookups[0] is None
    assert lookups[1][:3].tolist() == [0, 2, 0] and lookups[2][:5].tolist() == [0, 4, 1, 3, 0]
    image = sitk.GetImageFromArray(np.array([[[0, 1, 2, 3]]], dtype=np.uint8))
    image.SetOrigin((4.0, 5.0, 6.0))
    out = renumber(image, lookups[2])
    assert sitk.GetArrayFromImage(out).tolist() == [[[0, 4, 1, 3]]] and out.GetOrigin() == (4.0, 5.0, 6.0)


def test_sampled_labels_are_in_the_tasks_values(tmp_path):
    """A CHAOS-numbered partial dataset (1 liver ... 4 spleen, its own numbering here) after a
    dataset with another order: every slice it gives carries the task's values."""
    first = _info(tmp_path / "a", {"spleen": 1, "liver": 2, "kidney_left": 3, "kidney_right": 4})
    src = tmp_path / "src"
    write_chaos_study(src, 1)
    convert_chaos(src, tmp_path / "chaos")  # liver 1, spleen 2, kidney_right 3, kidney_left 4
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(first, "ct"), {**dataset(tmp_path / "chaos", "mr"), "val_cases": 0}],
        [{"kind": "joint", "epochs": 1, "lr": 0.01}],
    )
    cfg, _ = load_config(path)
    infos = [DatasetInfo.read(d.path) for d in cfg.datasets]
    data = SliceData(
        [cfg.datasets[1]],
        [infos[1]],
        DEFAULT_PARAMS,
        48,
        "resize",
        None,
        None,
        None,
        [label_lookups(cfg, infos)[1]],
    )
    _, labels, _ = data.sample(np.random.default_rng(0), 8, 1.0)
    plain = SliceData([cfg.datasets[1]], [infos[1]], DEFAULT_PARAMS, 48, "resize", None, None, None)
    _, own, _ = plain.sample(np.random.default_rng(0), 8, 1.0)
    assert own.unique().tolist() == [0, 1, 2, 3, 4]
    expected = torch.tensor([0, 2, 1, 4, 3])[own]  # liver 1 -> 2, spleen 2 -> 1, right 3 -> 4, left 4 -> 3
    assert torch.equal(labels, expected)


def ct_and_chaos_config(tmp_path: Path, extra: tuple[dict, ...] = ()) -> Path:
    """A one-epoch run's config: a 2-case phantom CT labelling the nine organs, 2 CHAOS-style MR
    studies labelling four (converted), then ``extra`` data sets."""
    ct = write_dataset(tmp_path / "ct", "ct", 2, seed=0, max_size=48)
    chaos_src = tmp_path / "src"
    for number in (1, 2):
        write_chaos_study(chaos_src, number)
    convert_chaos(chaos_src, tmp_path / "chaos")
    return write_config(
        tmp_path / "cfg.toml",
        [dataset(ct, "ct"), dataset(tmp_path / "chaos", "mr"), *extra],
        [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
        batch_size=4,
        iterations_per_epoch=2,
        optimizer="adamw",
        augment=False,
        output_dir=str(tmp_path / "run"),
    )


def test_a_full_and_a_partial_dataset_train_one_head(tmp_path):
    """A phantom CT labelling the nine organs and CHAOS-style MRIs labelling four: one run, one
    head with the nine; the partial dataset is validated on its own four organs."""
    path = ct_and_chaos_config(tmp_path)
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    card = read_model_card(out / "model")
    assert [label.value for label in card.tasks[0].labels] == list(range(1, 10))
    assert np.isfinite(float(read_log(out)[0]["seg"]))
    assert sorted(card.metrics["validation"]["1:chaos"]["dice"]) == [
        "kidney_left",
        "kidney_right",
        "liver",
        "spleen",
    ]
    assert len(card.metrics["validation"]["0:ct"]["dice"]) == 9


def test_held_out_cases_of_a_partial_dataset_are_scored_on_its_organs(tmp_path):
    """The real-accuracy benchmark's --held-out: the last cases, matched to the model's classes by
    organ key (this dataset numbers the left kidney 1 and the liver 2; the model the other way)."""
    folder = write_partial_phantoms(
        tmp_path / "t1", "t1", 3, seed=5, structures=["kidney_left", "liver"], max_size=96
    )
    predictor = Predictor.from_pretrained(None, device="cpu", threads=2)
    entry = benchmark_held_out(predictor, folder, cases=2)
    assert entry["cases"] == sorted(DatasetInfo.read(folder).cases)[-2:]
    assert sorted(entry["organs"]) == ["kidney_left", "liver"] and set(entry["per_case"]) == set(
        entry["cases"]
    )
    assert entry["dice"]["liver"] > 0.8 and entry["dice"]["kidney_left"] > 0.6, entry["dice"]
    assert entry["mean_dice"] == pytest.approx(np.mean(list(entry["dice"].values())), abs=1e-4)
    assert entry["gate_mean_weights"]["mr-t1"] > 0.5
    assert entry["dataset"] == DatasetInfo.read(folder).name and entry["source"] is None  # phantoms: none
    # --record writes the held-out figures into the card beside the two real scans', and m4oe info
    # shows them; a later --record without --held-out keeps them.
    card_path = tmp_path / "model" / "model.json"
    shutil.copytree(resolve_model(None), card_path.parent)
    record(card_path, {}, "python benchmarks/real_accuracy.py --record", {"t1 (2 held out)": entry})
    held = ModelCard.read(card_path).metrics["held_out_validation"]
    assert held["datasets"] == {"t1 (2 held out)": json.loads(json.dumps(entry))}
    assert held["command"] == "python benchmarks/real_accuracy.py --record"
    page = info_page(json.loads(card_path.read_text()))
    assert f"  real held-out t1 (2 held out) (MR; 2 cases): mean Dice {entry['mean_dice']:.2f}" in page
    record(card_path, {}, "again")
    assert ModelCard.read(card_path).metrics["held_out_validation"] == held
    with pytest.raises(InputError, match="has 3 cases; cannot hold out 4"):
        benchmark_held_out(predictor, folder, cases=4)
    with pytest.raises(InputError, match="labels none of the organs of model"):
        benchmark_held_out(predictor, _info(tmp_path / "gb", {"gallbladder": 1}), cases=1)


def test_a_folder_listed_twice_is_validated_once(tmp_path, monkeypatch):
    """The CHAOS configs list one folder for two experts (real T2 images, and T1 renders of it):
    with the gate routing, both entries read the same held-out studies the same way, so they are
    predicted once and each entry gets the same result, the second marked ``same_as`` the first."""
    path = ct_and_chaos_config(tmp_path, ({**dataset(tmp_path / "chaos", "mr"), "synth": "t1"},))
    predicted = []
    real_predict = Predictor.predict

    def counting_predict(self, image, **kwargs):
        predicted.append((kwargs["modality"], image.GetSize()))
        return real_predict(self, image, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counting_predict)
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    validation = read_model_card(out / "model").metrics["validation"]
    assert validation["2:chaos"] == {**validation["1:chaos"], "same_as": "1:chaos"}
    assert validation["1:chaos"]["cases"] == 1
    assert sorted(validation["2:chaos"]["dice"]) == ["kidney_left", "kidney_right", "liver", "spleen"]
    # One validation: one held-out CT case and one held-out CHAOS study, each predicted once.
    assert sorted(modality for modality, _ in predicted) == ["ct", "mr"]
