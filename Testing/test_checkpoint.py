"""Checkpoints: safetensors + JSON card round trip, and every refusal of the loader."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import safetensors.torch
import torch

from m4oe import checkpoint
from m4oe.checkpoint import load_checkpoint, read_model_card, save_checkpoint, sha256_file
from m4oe.errors import InputError, ModelError, OutputError
from m4oe.model import SwinUNet, build_model
from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
from m4oe.terminology import LEFT, RIGHT, SOURCES, STANDARD_KEYS, TERMS, standard_label


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model("m4oe-tiny")
    with torch.no_grad():  # make the gates far from uniform so that routing matters
        for name, p in net.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 1.0)
    return net.eval()


@pytest.fixture(scope="module")
def card(model):
    return ModelCard(
        name="m4oe-tiny-test",
        description="tiny M4oE for tests",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr"), ExpertInfo("mr-t2", "mr", "T2-weighted")],
        tasks=[
            TaskInfo(
                "abdomen",
                [standard_label("liver", 1), standard_label("kidney_right", 2), standard_label("spleen", 3)],
                largest_component=[1, 3],
            ),
            TaskInfo("liver", [standard_label("liver", 1)]),
        ],
        preprocessing=Preprocessing(
            in_plane="spacing",
            target_spacing_mm=(1.5, 1.5),
            intensity={"ct": {"window": [-175.0, 250.0]}, "mr": {"percentiles": [0.5, 99.5]}},
        ),
        provenance={"data": "synthetic phantoms", "seeds": [0], "command": "pytest"},
        metrics={"dice": {"liver": 0.5}},
        notes="demonstration model trained on synthetic phantoms; not for clinical use",
    )


@pytest.fixture()
def saved(model, card, tmp_path):
    return save_checkpoint(model, card, tmp_path / "ckpt")


def _edit_card(folder, edit):
    path = folder / "model.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return path


def test_round_trip_gives_bit_identical_outputs(model, card, saved):
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, ref_gates = model(x, task="abdomen", return_gates=True)
    assert read_model_card(saved / "model.json") == read_model_card(saved / "model.safetensors")
    for path in (saved, saved / "model.safetensors"):
        loaded, loaded_card = load_checkpoint(path)
        assert not loaded.training
        assert loaded_card.architecture == model.cfg
        assert loaded_card.weights_sha256 == sha256_file(saved / "model.safetensors")
        with torch.no_grad():
            out, gates = loaded(x, task="abdomen", return_gates=True)
        assert torch.equal(out, ref)
        assert gates.keys() == ref_gates.keys()
        assert all(torch.equal(gates[k], ref_gates[k]) for k in gates)
    assert sorted(p.name for p in saved.iterdir()) == ["model.json", "model.safetensors"]


def test_card_json_round_trip(card, saved):
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    written = read_model_card(saved)
    assert dataclasses.replace(written, weights_sha256="") == card
    assert re.fullmatch(r"[0-9a-f]{64}", written.weights_sha256)
    assert written.task().name == "abdomen" and written.task("liver").labels[0].name == "liver"
    assert written.expert_index("mr") == [1, 2] and written.expert_index("ct") == [0]
    with pytest.raises(InputError, match="unknown task 'lungs'"):  # a bad --task: exit code 2
        written.task("lungs")


def test_save_refuses_existing_checkpoint_unless_overwrite(model, card, saved):
    with pytest.raises(OutputError, match=r"already holds model\.safetensors, model\.json"):
        save_checkpoint(model, card, saved)
    save_checkpoint(model, card, saved, overwrite=True)
    assert sorted(p.name for p in saved.iterdir()) == ["model.json", "model.safetensors"]


def test_refuses_pickle_files(model, card, saved, tmp_path):
    pth = tmp_path / "model.pth"
    torch.save(model.state_dict(), pth)
    for call in (load_checkpoint, read_model_card):
        with pytest.raises(ModelError, match="refusing a pickle-based PyTorch file") as info:
            call(pth)
        assert str(pth) in str(info.value) and "\n" not in str(info.value)
    # A torch.save file disguised as safetensors, next to a valid card.
    torch.save(model.state_dict(), saved / "model.safetensors")
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(saved)
    odd = tmp_path / "weights.dat"
    odd.write_bytes(pth.read_bytes())
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(odd)


def test_loading_never_calls_torch_load(monkeypatch, saved, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load called")

    pth = tmp_path / "model.pth"
    torch.save({"x": torch.zeros(1)}, pth)
    monkeypatch.setattr(torch, "load", forbidden)
    load_checkpoint(saved)
    with pytest.raises(ModelError, match="pickle"):
        load_checkpoint(pth)


def test_refuses_unknown_format_version(saved):
    path = _edit_card(saved, lambda d: d.update(format_version=2))
    with pytest.raises(
        ModelError, match=r"format_version 2 is not supported; .* reads format_version 1"
    ) as info:
        load_checkpoint(saved)
    assert str(path) in str(info.value)


def test_refuses_checksum_mismatch(saved):
    expected = "0" * 64
    actual = sha256_file(saved / "model.safetensors")
    with pytest.raises(ModelError, match="SHA-256 mismatch") as info:
        load_checkpoint(saved, sha256=expected)
    assert expected in str(info.value) and actual in str(info.value)
    load_checkpoint(saved, sha256=actual.upper())


def test_refuses_tampered_weights(saved):
    weights = saved / "model.safetensors"
    recorded = read_model_card(saved).weights_sha256
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 mismatch") as info:
        load_checkpoint(saved)
    assert recorded in str(info.value) and sha256_file(weights) in str(info.value)


def test_refuses_missing_card(saved):
    (saved / "model.json").unlink()
    for path in (saved, saved / "model.safetensors"):
        with pytest.raises(ModelError, match="model card not found"):
            load_checkpoint(path)


def test_refuses_unknown_card_keys(saved):
    path = _edit_card(saved, lambda d: d.update(colour="red"))
    with pytest.raises(ModelError, match="unknown model card key 'colour'") as info:
        read_model_card(saved)
    assert str(path) in str(info.value)
    _edit_card(saved, lambda d: (d.pop("colour"), d["tasks"][0]["labels"][1].update(organ="kidney")))
    with pytest.raises(ModelError, match=r"unknown model card key 'tasks\[0\].labels\[1\].organ'"):
        read_model_card(saved)


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d["architecture"].update(embed_dim="24"), "architecture.embed_dim"),
        (lambda d: d["architecture"].update(qkv_bias=1), "architecture.qkv_bias"),
        (lambda d: d["tasks"][0]["labels"][0].update(value=True), "tasks[0].labels[0].value"),
        (lambda d: d["preprocessing"].update(slice_batch=2.5), "preprocessing.slice_batch"),
        (lambda d: d.update(notes=None), "notes"),
        (lambda d: d["architecture"].pop("window_size"), "architecture.window_size"),
        (lambda d: d["architecture"].update(gate_context=None), "architecture.gate_context"),
        (lambda d: d["tasks"][0].update(through_plane_sigma_mm="3"), "tasks[0].through_plane_sigma_mm"),
        (lambda d: d["tasks"][0].update(test_time_passes=3.0), "tasks[0].test_time_passes"),
        (lambda d: d["tasks"][0].update(test_time_passes=True), "tasks[0].test_time_passes"),
    ],
)
def test_refuses_wrong_types_and_missing_keys(saved, edit, key):
    path = _edit_card(saved, edit)
    with pytest.raises(ModelError, match=re.escape(repr(key))) as info:
        read_model_card(saved)
    assert str(path) in str(info.value)


def test_gate_context_is_optional_in_a_card_and_travels_with_the_weights(model, card, saved, tmp_path):
    """Cards written before ``gate_context`` existed load as "none"; a model with a slice context
    saves and loads with it (its context weights included) and gives the same outputs."""
    path = _edit_card(saved, lambda d: d["architecture"].pop("gate_context"))
    assert "gate_context" not in json.loads(path.read_text())["architecture"]
    assert load_checkpoint(saved)[1].architecture.gate_context == "none"

    torch.manual_seed(0)
    net = build_model(model.cfg.replace(gate_context="slice")).eval()
    with torch.no_grad():
        for layer in net.modules():
            if getattr(layer, "context", None) is not None:
                layer.context.weight.normal_(0.0, 1.0)
    folder = save_checkpoint(net, dataclasses.replace(card, architecture=net.cfg), tmp_path / "context")
    loaded, loaded_card = load_checkpoint(folder)
    assert loaded_card.architecture.gate_context == "slice"
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, ref_gates = net(x, return_gates=True)
        out, gates = loaded(x, return_gates=True)
        for layer in loaded.modules():
            if getattr(layer, "context", None) is not None:
                layer.reset_context()
        without_context = loaded(x, return_gates=True)[1]
    assert torch.equal(out, ref) and all(torch.equal(gates[k], ref_gates[k]) for k in gates)
    assert not torch.allclose(gates["encoder.0.0"], without_context["encoder.0.0"])  # it was in use


def test_through_plane_sigma_is_optional_and_travels_with_the_card(card, saved, tmp_path):
    """Cards without the key load with no smoothing and are written without it (older engines can
    still read them); a task with a sigma keeps it; a negative one is refused, naming the file."""
    data = json.loads((saved / "model.json").read_text())
    assert all("through_plane_sigma_mm" not in t for t in data["tasks"])
    assert [t.through_plane_sigma_mm for t in read_model_card(saved).tasks] == [0.0, 0.0]

    tasks = [dataclasses.replace(card.tasks[0], through_plane_sigma_mm=2.5), card.tasks[1]]
    smoothed = dataclasses.replace(card, tasks=tasks)
    assert ModelCard.from_dict(smoothed.to_dict()).tasks[0].through_plane_sigma_mm == 2.5
    path = _edit_card(saved, lambda d: d["tasks"][0].update(through_plane_sigma_mm=2))
    assert read_model_card(saved).tasks[0].through_plane_sigma_mm == 2.0
    assert isinstance(read_model_card(saved).tasks[0].through_plane_sigma_mm, float)
    _edit_card(saved, lambda d: d["tasks"][0].update(through_plane_sigma_mm=-1.0))
    with pytest.raises(ModelError, match="through_plane_sigma_mm must be a number of mm >= 0") as info:
        read_model_card(saved)
    assert str(path) in str(info.value)


def test_test_time_passes_are_optional_and_travel_with_the_card(card, saved):
    """Cards without the key load with one pass and are written without it; a count is kept; one
    outside 1-5 is refused, naming the file."""
    data = json.loads((saved / "model.json").read_text())
    assert all("test_time_passes" not in t for t in data["tasks"])
    assert [t.test_time_passes for t in read_model_card(saved).tasks] == [1, 1]
    tasks = [dataclasses.replace(card.tasks[0], test_time_passes=3), card.tasks[1]]
    shifted = dataclasses.replace(card, tasks=tasks).to_dict()
    assert [t.get("test_time_passes") for t in shifted["tasks"]] == [3, None]
    assert [t.test_time_passes for t in ModelCard.from_dict(shifted).tasks] == [3, 1]
    for bad in (0, 6):
        path = _edit_card(saved, lambda d, bad=bad: d["tasks"][0].update(test_time_passes=bad))
        with pytest.raises(ModelError, match="test_time_passes must be an integer 1-5") as info:
            read_model_card(saved)
        assert str(path) in str(info.value)


def test_refuses_cards_that_contradict_the_architecture(card, saved):
    with pytest.raises(ModelError, match="do not match the architecture's experts"):
        dataclasses.replace(card, experts=card.experts[:2])
    path = _edit_card(saved, lambda d: d["experts"].reverse())
    with pytest.raises(ModelError, match="do not match the architecture's experts") as info:
        load_checkpoint(saved)
    assert str(path) in str(info.value)
    with pytest.raises(ModelError, match=r"labels must have values 1\.\.3"):
        dataclasses.replace(card, tasks=[TaskInfo("abdomen", [standard_label("liver", 1)]), card.tasks[1]])
    with pytest.raises(ModelError, match="largest_component"):
        TaskInfo("liver", [standard_label("liver", 1)], largest_component=[2])


def test_refuses_weights_that_do_not_fit_the_card(saved):
    _edit_card(saved, lambda d: d["architecture"].update(embed_dim=32))
    with pytest.raises(ModelError, match="do not fit the card's architecture; wrong shape"):
        load_checkpoint(saved)


def test_refuses_missing_and_unexpected_weights(saved):
    weights = saved / "model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["heads.liver.weight"]
    tensors["extra.weight"] = torch.zeros(3)
    safetensors.torch.save_file(tensors, str(weights))
    _edit_card(saved, lambda d: d.update(weights_sha256=sha256_file(weights)))
    with pytest.raises(ModelError, match=r"missing 1: heads\.liver\.weight; unexpected 1: extra\.weight"):
        load_checkpoint(saved)


def test_loading_skips_the_random_initialisation_and_equals_the_initialised_build(model, saved, monkeypatch):
    """Built on the meta device, then materialised: the same weights, computed buffers and outputs
    as a network randomly initialised on the CPU before the weights were loaded into it."""
    built = []

    def spy(cfg):
        net = SwinUNet(cfg)
        built.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(checkpoint, "SwinUNet", spy)
    loaded, _ = load_checkpoint(saved)
    assert built == ["meta"]
    reference = SwinUNet(model.cfg)
    reference.load_state_dict(safetensors.torch.load_file(saved / "model.safetensors"), strict=True)
    reference.eval()
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    actual = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert actual.keys() == expected.keys()
    computed = [k for k, v in expected.items() if k.endswith(("attn_mask", "relative_position_index"))]
    assert len(computed) > 10 and all(k not in reference.state_dict() for k in computed)
    for key, value in expected.items():
        if value is None:  # the attention mask of an unshifted block
            assert actual[key] is None, key
        else:
            assert actual[key].device.type == "cpu" and actual[key].dtype == value.dtype, key
            assert torch.equal(actual[key], value), key
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for task, expert in (("abdomen", None), ("liver", 1)):
            ref, ref_gates = reference(x, task=task, force_expert=expert, return_gates=True)
            out, gates = loaded(x, task=task, force_expert=expert, return_gates=True)
            assert torch.equal(out, ref) and all(torch.equal(gates[k], ref_gates[k]) for k in ref_gates)


def test_half_precision_weights_load_into_float32_parameters(model, card, tmp_path):
    folder = save_checkpoint(model, card, tmp_path / "half", dtype=torch.float16)
    loaded, _ = load_checkpoint(folder)
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, dict(model.named_parameters())[name].half().float()), name


def test_terminology_entries_are_well_formed():
    assert len(STANDARD_KEYS) >= 20
    for key, term in TERMS.items():
        label = standard_label(key, 7)
        assert label.value == 7 and label.name
        assert all(0 <= c <= 255 for c in term.rgb) and all(0.0 <= c <= 1.0 for c in label.color)
        for code in (label.category, label.type, label.modifier):
            if code is not None:
                assert code.scheme == "SCT" and code.value.isdigit() and code.meaning
        assert label.category.value in ("123037004", "85756007", "49755003")
        assert term.source in SOURCES
        assert (label.modifier is not None) == key.endswith(("_right", "_left"))
        if label.modifier is not None:
            assert label.modifier == (RIGHT if key.endswith("_right") else LEFT)
    assert standard_label("spleen", 1).type.value == "78961009"
    assert standard_label("kidney_left", 3).modifier.value == "7771000"
    assert standard_label("liver_tumor", 2).category.meaning == "Morphologically Altered Structure"
    with pytest.raises(ValueError, match="unknown structure 'kidneys'"):
        standard_label("kidneys", 1)
