"""MoME (issue #26, point 3): classes asked for by name, a text-conditioned router at the decoder
scales, per-class logits; saved, loaded and run by the engine and the CLI like any model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.checkpoint import load_checkpoint, save_checkpoint
from m4oe.cli import main
from m4oe.errors import ModelError
from m4oe.model import MoME, build_model, get_config
from m4oe.model.mome import NOT_QUERIED
from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
from m4oe.phantom import generate_case, phantom_labels
from m4oe.predictor import Predictor
from m4oe.preprocessing import DEFAULT_PARAMS


def tiny_mome(seed: int = 0) -> MoME:
    torch.manual_seed(seed)
    model = build_model("mome-tiny")
    model.set_class_embeddings(torch.nn.functional.normalize(torch.randn(9, 384), dim=1))
    return model.eval()


def mome_card(model: MoME) -> ModelCard:
    return ModelCard(
        name="tiny-mome",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr")],
        tasks=[TaskInfo("organs", phantom_labels())],
        preprocessing=Preprocessing(intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}),
    )


@pytest.fixture(scope="module")
def mome_dir(tmp_path_factory):
    model = tiny_mome()
    return save_checkpoint(model, mome_card(model), tmp_path_factory.mktemp("mome") / "model")


def test_forward_shapes_and_router_scales():
    model = tiny_mome()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        logits, gates = model(x, return_gates=True)
    assert logits.shape == (2, 10, 64, 64)
    assert torch.equal(logits[:, 0], torch.zeros(2, 64, 64))
    # One router per decoder stage, deepest first; expert weights sum to 1 per pixel.
    assert {k: tuple(v.shape) for k, v in gates.items()} == {
        "router.0": (2, 2, 4, 4),
        "router.1": (2, 2, 8, 8),
        "router.2": (2, 2, 16, 16),
    }
    for g in gates.values():
        assert torch.allclose(g.sum(dim=1), torch.ones_like(g[:, 0]), atol=1e-5)
    # The trunk is dense: the experts are in the routers only.
    assert not any("experts" in name for name, _ in model.named_parameters() if name.startswith("layers"))


def test_query_subset_gives_the_same_logits_and_depends_on_the_text():
    model = tiny_mome()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        full = model(x)
        subset = model(x, queries=[8, 1])
        alone, _ = model.class_logits(x, [8])
    assert torch.allclose(subset[:, [1, 8]], full[:, [1, 8]], atol=1e-5)
    assert torch.allclose(alone[:, 0], full[:, 8], atol=1e-5)
    assert (subset[:, [2, 3, 4, 5, 6, 7, 9]] == NOT_QUERIED).all()
    # The router and the heads read the stored class embedding: changing it changes the logits.
    embeddings = model.class_embeddings.clone()
    embeddings[0] = -embeddings[0]
    model.set_class_embeddings(embeddings)
    with torch.no_grad():
        flipped, gates = model(x, queries=[1], return_gates=True)
        _, gates_before = tiny_mome()(x, queries=[1], return_gates=True)
    # (an untrained model's logits are small: compared relative to their size)
    assert (flipped[:, 1] - full[:, 1]).abs().max() > 0.1 * full[:, 1].abs().max()
    assert (gates["router.2"] - gates_before["router.2"]).abs().max() > 1e-6
    with pytest.raises(ValueError, match=r"label values 1\.\.9"):
        model(x, queries=[10])


def test_forced_expert_takes_every_pixel():
    model = tiny_mome()
    with torch.no_grad():
        _, gates = model(torch.randn(1, 1, 64, 64), force_expert=1, return_gates=True)
    for g in gates.values():
        assert torch.equal(g[:, 1], torch.ones_like(g[:, 1]))


def test_config_checks_and_card_round_trip(mome_dir):
    with pytest.raises(ValueError, match="one class name per class"):
        get_config("mome-tiny", class_names=("liver",))
    with pytest.raises(ValueError, match="belong to arch 'mome' only"):
        get_config("m4oe-tiny", text_dim=384)
    # A Swin-UNet card keeps its old keys only (cards stay readable by older engines).
    assert "arch" not in get_config("m4oe-tiny").to_dict()
    model, card = load_checkpoint(mome_dir)
    assert isinstance(model, MoME)
    assert card.architecture.class_names == tuple(label.name for label in phantom_labels())
    assert card.architecture.text_encoder.startswith("sentence-transformers/all-MiniLM-L6-v2")
    assert torch.equal(model.class_embeddings, tiny_mome().class_embeddings)
    stored = json.loads((mome_dir / "model.json").read_text())["architecture"]
    assert stored["arch"] == "mome" and stored["text_dim"] == 384
    # Labels must be the class names the embeddings were made from.
    renamed = [label if label.value != 1 else type(label)(**{**label.__dict__, "name": "hepar"})
               for label in phantom_labels()]  # fmt: skip
    with pytest.raises(ModelError, match="must be its architecture's class_names"):
        ModelCard(name="x", architecture=card.architecture, experts=card.experts,
                  tasks=[TaskInfo("organs", renamed)])  # fmt: skip


def test_predictor_structures_compute_only_the_chosen_queries(mome_dir):
    model, card = load_checkpoint(mome_dir)
    image, _ = generate_case("ct", 3, max_size=64)
    seen = []
    forward = model.class_logits

    def spy(x, queries=None, force_expert=None):
        seen.append(list(queries))
        return forward(x, queries, force_expert)

    model.class_logits = spy
    predictor = Predictor(model, card, device="cpu", threads=1)
    full = predictor.predict(image, modality="ct", test_time_passes=1, gates=True)
    assert seen[-1] == list(range(1, 10))
    part = predictor.predict(image, modality="ct", test_time_passes=1, structures=["liver", "left kidney"])
    assert seen[-1] == [1, 4]
    labels = sitk.GetArrayFromImage(part.labelmap)
    assert set(np.unique(labels)) <= {0, 1, 4}
    assert [label.name for label in part.labels] == ["liver", "left kidney"]
    # The gate summary reports the router's expert weights per decoder scale.
    assert set(full.gate_summary["layers"]) == {"router.0", "router.1", "router.2"}


def test_cli_segment_structures_on_a_mome_model(mome_dir, tmp_path, capsys):
    image, _ = generate_case("t1", 4, max_size=64)
    source = tmp_path / "mr.nii.gz"
    sitk.WriteImage(image, str(source))
    out = tmp_path / "seg.seg.nrrd"
    argv = ["segment", source, "-o", out, "--model", mome_dir, "--threads", "1", "--tta", "1"]
    assert main([*argv, "--modality", "mr", "--structures", "liver,spleen"]) == 0
    import slicerio

    assert [s["name"] for s in slicerio.read_segmentation(str(out))["segments"]] == ["liver", "spleen"]
    bad = tmp_path / "bad.nii.gz"
    assert main([*argv[:3], bad, *argv[4:], "--structures", "liver,gallbladder"]) == 2
    err = capsys.readouterr().err
    assert "unknown structure 'gallbladder'; this task has: liver, spleen, kidney_right" in err
    assert not bad.exists()
