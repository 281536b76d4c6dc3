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

    def spy(x, queries=None, force_expert=None, query_gates=False):
        seen.append(list(queries))
        return forward(x, queries, force_expert, query_gates)

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


# --- gate outputs: the router's weights per decoder scale and per class query -------------------


def test_gate_recorder_gives_each_segment_its_own_querys_weights():
    from m4oe.gates import GateRecorder

    # 2 slices, queries liver (1) and aorta (5), E = 2, scales 2x2 and 4x4 on an 8x8 model grid.
    coarse = torch.zeros(2, 2, 2, 2, 2)
    coarse[:, 0, 0], coarse[:, 0, 1] = 0.9, 0.1  # liver's query: expert 0
    coarse[:, 1, 0], coarse[:, 1, 1] = 0.2, 0.8  # aorta's query: expert 1
    fine = torch.zeros(2, 2, 2, 4, 4)
    fine[:, 0, 0], fine[:, 0, 1] = 0.6, 0.4
    fine[:, 1, 0], fine[:, 1, 1] = 0.3, 0.7
    recorder = GateRecorder(2, queries=[1, 5])
    recorder.add(0, {"router.0": coarse, "router.1": fine})
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :4] = 1
    labels[0, 6:, 6:] = 5
    recorder.add_segments(0, labels)
    names = {1: "liver", 5: "aorta"}
    summary = recorder.summary([{"name": "a", "modality": "ct"}, {"name": "b", "modality": "mr"}], [0], names,
                               [0.0, 1.0])  # fmt: skip
    liver, aorta = summary["per_segment"]["liver"], summary["per_segment"]["aorta"]
    assert liver["model_grid_pixels"] == 64 and aorta["model_grid_pixels"] == 4
    assert liver["per_layer"]["router.0"]["mean_weights"] == {"a": 0.9, "b": 0.1}
    assert liver["per_layer"]["router.1"]["mean_weights"] == {"a": 0.6, "b": 0.4}
    assert aorta["per_layer"]["router.0"]["mean_weights"] == {"a": 0.2, "b": 0.8}
    assert aorta["mean_weights"] == {"a": 0.25, "b": 0.75}  # mean over the two scales
    assert aorta["dominant_expert"] == "b"
    # The maps and per-slice figures average the queries (the chosen classes), per scale.
    assert recorder.layer_maps["router.0"].shape == (2, 2, 2, 2)
    np.testing.assert_allclose(recorder.layer_maps["router.0"][..., 0], 0.55)
    np.testing.assert_allclose(recorder.layer_maps["router.1"][..., 1], 0.55)
    assert summary["per_slice"][1]["per_layer"]["router.1"]["mean_weights"] == {"a": 0.45, "b": 0.55}
    assert summary["router"]["queries"] == ["liver", "aorta"]
    assert summary["router"]["scales"] == {
        "router.0": {"token_grid": [2, 2]},
        "router.1": {"token_grid": [4, 4]},
    }
    # The mapped layer's own-query weights when one layer is mapped.
    one = GateRecorder(2, layer="router.0", queries=[1, 5])
    one.add(0, {"router.0": coarse, "router.1": fine})
    one.add_segments(0, labels)
    assert one.summary([{"name": "a"}, {"name": "b"}], [], names, [0.0, 1.0])["per_segment"]["aorta"][
        "mean_weights"
    ] == {"a": 0.2, "b": 0.8}
    with pytest.raises(ValueError, match=r"expected gates \(B, 2, E, h, w\)"):
        GateRecorder(2, queries=[1, 5]).add(0, {"router.0": coarse[:, 0]})


def test_cli_gates_of_a_mome_model_per_decoder_scale(mome_dir, tmp_path):
    image, _ = generate_case("ct", 5, max_size=64)
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(source))
    gates = tmp_path / "gates"
    argv = [
        "segment",
        source,
        "-o",
        tmp_path / "seg.nii.gz",
        "--model",
        mome_dir,
        "--threads",
        "1",
        "--tta",
        "1",
    ]
    assert main([*argv, "--structures", "liver,spleen,aorta", "--gates", gates, "--no-body-crop"]) == 0
    summary = json.loads((gates / "gate_summary.json").read_text())
    assert summary["layers"] == ["router.0", "router.1", "router.2"]
    assert summary["router"]["queries"] == ["liver", "spleen", "aorta"]
    assert summary["scale_gate_maps"] == {f"router.{n}": f"gate_map_router.{n}.nrrd" for n in range(3)}
    mean = sitk.ReadImage(str(gates / "gate_map.nrrd"))
    nx, ny, nz = image.GetSize()
    sx, sy, sz = image.GetSpacing()
    upsampled = []
    for n, tokens in enumerate((4, 8, 16)):
        scale = sitk.ReadImage(str(gates / f"gate_map_router.{n}.nrrd"))
        assert summary["router"]["scales"][f"router.{n}"] == {"token_grid": [tokens, tokens]}
        assert scale.GetSize() == (tokens, tokens, nz) and scale.GetNumberOfComponentsPerPixel() == 2
        factor = 64 // tokens  # model pixels per token ("resize": 64 model pixels span the slice)
        np.testing.assert_allclose(scale.GetSpacing(), (factor * nx / 64 * sx, factor * ny / 64 * sy, sz))
        # Every scale's tokens tile the same patient region as the mean map's (the model input).
        for index in ((-0.5, -0.5, 0.0), (tokens - 0.5, tokens - 0.5, nz - 1.0)):
            on_mean = [(i + 0.5) * 16 / tokens - 0.5 for i in index[:2]] + [index[2]]
            np.testing.assert_allclose(
                scale.TransformContinuousIndexToPhysicalPoint(index),
                mean.TransformContinuousIndexToPhysicalPoint(on_mean),
                atol=1e-6,
            )
        np.testing.assert_allclose(scale.GetDirection(), mean.GetDirection())
        weights = sitk.GetArrayFromImage(scale)  # (z, y, x, E)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        upsampled.append(weights.repeat(16 // tokens, axis=1).repeat(16 // tokens, axis=2))
        # Per slice: each scale's mean weights are its map's mean over the slice's tokens.
        means = weights.mean(axis=(1, 2))
        listed = [[s["per_layer"][f"router.{n}"]["mean_weights"][e] for e in ("ct", "mr")]
                  for s in summary["per_slice"]]  # fmt: skip
        np.testing.assert_allclose(listed, means, atol=2e-6)
    from m4oe.report import gate_map_note

    assert gate_map_note(summary) == "MoME router, mean over 3 decoder scales, averaged over 3 classes"
    assert gate_map_note(dict(summary, mapped_layer="router.1")).startswith("MoME router, scale router.1")
    # gate_map.nrrd is the mean of the scales on the finest grid.
    np.testing.assert_allclose(sitk.GetArrayFromImage(mean), np.mean(upsampled, axis=0), atol=1e-6)
    for name, entry in summary["per_segment"].items():
        assert set(entry["per_layer"]) == set(summary["layers"]), name
        for layer in entry["per_layer"].values():
            assert sum(layer["mean_weights"].values()) == pytest.approx(1.0, abs=1e-5)
        mean_of_scales = np.mean([[v["mean_weights"]["ct"]] for v in entry["per_layer"].values()])
        assert entry["mean_weights"]["ct"] == pytest.approx(mean_of_scales, abs=2e-6)


def test_gates_of_a_mome_segment_come_from_its_own_query(mome_dir):
    """Asked for one class, the maps are that class's query alone: its segment's weights at each
    scale are then the map's own mean over the segment's model-grid pixels."""
    model, card = load_checkpoint(mome_dir)
    image, _ = generate_case("ct", 6, max_size=64)
    predictor = Predictor(model, card, device="cpu", threads=1)
    both = predictor.predict(
        image, modality="ct", test_time_passes=1, gates=True, structures=["liver", "spleen"]
    )
    alone = predictor.predict(image, modality="ct", test_time_passes=1, gates=True, structures=["liver"])
    assert alone.gate_summary["router"]["queries"] == ["liver"]
    liver_alone = alone.gate_summary["per_segment"]["liver"]["per_layer"]
    liver_both = both.gate_summary["per_segment"]["liver"]["per_layer"]
    spleen_both = both.gate_summary["per_segment"]["spleen"]["per_layer"]
    # The liver's weights over its pixels hardly move when the spleen is asked for too (its pixels
    # may change a little at the border), while the spleen's own query routes differently.
    for layer in ("router.0", "router.1", "router.2"):
        assert liver_both[layer]["mean_weights"]["ct"] == pytest.approx(
            liver_alone[layer]["mean_weights"]["ct"], abs=0.02
        )
    assert any(
        abs(spleen_both[k]["mean_weights"]["ct"] - liver_both[k]["mean_weights"]["ct"]) > 1e-3
        for k in spleen_both
    )
    assert set(alone.scale_gate_maps) == {"router.0", "router.1", "router.2"}


def test_batch_gates_of_a_mome_model_keep_each_cases_scale_maps(mome_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n, seed in enumerate((11, 12)):
        sitk.WriteImage(generate_case("ct", seed, max_size=64)[0], str(inputs / f"case{n}.nii.gz"))
    out = tmp_path / "out"
    argv = ["batch", inputs, "-o", out, "--model", mome_dir, "--gates", "--threads", "1", "--tta", "1"]
    assert main([*argv, "--modality", "ct", "--progress", "none"]) == 0
    for case in ("case0", "case1"):
        summary = json.loads((out / f"{case}_gate_summary.json").read_text())
        names = {f"router.{n}": f"{case}_gate_map_router.{n}.nrrd" for n in range(3)}
        assert summary["scale_gate_maps"] == names
        for layer, name in names.items():
            weights = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
            means = weights.mean(axis=(1, 2))[:, 0]
            listed = [s["per_layer"][layer]["mean_weights"]["ct"] for s in summary["per_slice"]]
            np.testing.assert_allclose(listed, means, atol=2e-6)  # this case's map, not the other's
