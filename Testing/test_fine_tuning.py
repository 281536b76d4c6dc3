"""Fine-tuning from an exported model: ``init`` by name or path, what must fit, the lineage and
the preprocessing a fine-tune inherits, and the correction loop's recipe (per-group learning
rates, the L2-SP anchor). Tiny runs on phantoms, as in ``test_training.py``."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import (
    dataset,
    read_log,
    tensors_sha256,
    tiny_stage_loss,
    training_phantoms,
    write_config,
)

from m4oe.checkpoint import load_checkpoint
from m4oe.cli import main as m4oe_main
from m4oe.model import build_model
from m4oe.phantom import PHANTOM_LABELS, write_dataset
from m4oe.terminology import standard_label
from m4oe_training.config import ConfigError, DatasetConfig, StageConfig, TrainConfig, load_config
from m4oe_training.train import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> dict[str, Path]:
    return training_phantoms(tmp_path_factory.mktemp("phantoms"))


# ---------------------------------------------------------------------------------------------
# Fine-tuning from an exported model


@pytest.mark.slow
def test_run_initialised_from_an_exported_model_starts_from_its_weights(phantoms, tmp_path):
    """``init``: the second run starts from the first run's exported weights and records their hash."""
    datasets = [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")]
    common = {"batch_size": 2, "iterations_per_epoch": 1, "optimizer": "adamw"}
    first = write_config(
        tmp_path / "first.toml",
        datasets,
        [{"kind": "experts", "epochs": 1, "lr": 1e-2}],
        output_dir="first",
        **common,
    )
    source = run(load_config(first)[0], base_dir=tmp_path, command=["test"]) / "model"
    source_weights = load_file(source / "model.safetensors")
    # A learning rate so small that the exported weights can only equal the source's if the
    # second run started from them; a run without ``init`` starts from a random initialisation.
    second = write_config(
        tmp_path / "configs" / "second.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-12, "load_balance_weight": 0.01}],
        output_dir=str(tmp_path / "second"),
        init="../first/model",
        **common,
    )
    cfg, _ = load_config(second)
    assert cfg.init == str(source.resolve())  # relative to the config file's folder
    model, card = load_checkpoint(run(cfg, base_dir=tmp_path, command=["test"]) / "model")
    tuned = model.state_dict()
    assert tuned.keys() == source_weights.keys()
    for key, value in source_weights.items():
        torch.testing.assert_close(tuned[key], value, atol=1e-6, rtol=0, msg=key)
    assert (
        card.provenance["init_weights_sha256"]
        == hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    )

    fresh = write_config(
        tmp_path / "fresh.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 1e-12}],
        output_dir="fresh",
        **common,
    )
    random_start = load_file(run(load_config(fresh)[0], base_dir=tmp_path) / "model" / "model.safetensors")
    assert any(not torch.allclose(random_start[k], v) for k, v in source_weights.items())


def test_init_from_a_model_that_does_not_fit_the_run_is_a_config_error(tmp_path):
    """Experts, labels or weight shapes that differ, and a pickled file, are refused by name."""
    from m4oe.model import build_model
    from m4oe_training.init_model import load_initial_weights

    embedded = ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"
    source, card = load_checkpoint(embedded)
    labels = {"abdomen": card.task("abdomen").labels}
    shape = {k: getattr(source.cfg, k) for k in ("img_size", "embed_dim", "num_heads", "window_size")}

    def build(experts=source.cfg.experts, **change):
        change = {"gate_context": source.cfg.gate_context, **change}
        return build_model("m4oe", experts=experts, tasks=(("abdomen", 10),), **{**shape, **change})

    model = build()
    digest = load_initial_weights(model, str(embedded), labels)
    assert digest == card.weights_sha256
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.float()), key

    renamed = {"abdomen": [dataclasses.replace(labels["abdomen"][0], name="hepar"), *labels["abdomen"][1:]]}
    cases = [
        (build(), renamed, r"task 'abdomen' labels \['liver'"),
        (build(experts=("ct", "mr-t2", "mr-t1")), labels, "experts"),
        (build(embed_dim=48), labels, "weights differ in name or shape"),
        (build(), {"organs": labels["abdomen"]}, "the run does not train"),
    ]
    for target, run_labels, message in cases:
        before = tensors_sha256(target.state_dict())
        with pytest.raises(ConfigError, match=message) as error:
            load_initial_weights(target, str(embedded), run_labels)
        assert str(embedded) in str(error.value)
        assert tensors_sha256(target.state_dict()) == before  # nothing half-loaded

    pickled = tmp_path / "model.pt"
    torch.save(source.state_dict(), pickled)
    (tmp_path / "model.json").write_text((embedded / "model.json").read_text())
    with pytest.raises(ConfigError, match=r"init: .*pickle"):
        load_initial_weights(build(), str(pickled), labels)


def test_init_may_add_a_slice_context_to_the_gates_but_not_take_it_away(tmp_path):
    """A run may give the init model's gates a slice context (starting at zero: same outputs); a
    model trained with one cannot lose it."""
    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe_training.init_model import init_overrides, load_initial_weights
    from m4oe_training.optim import is_context_parameter

    embedded = ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"
    source, card = load_checkpoint(embedded)
    # The same network without a context, whichever the embedded model has.
    plain = build_model(source.cfg.replace(gate_context="none"))
    plain.load_state_dict({k: v for k, v in source.state_dict().items() if not is_context_parameter(k)})
    folder = save_checkpoint(plain.eval(), dataclasses.replace(card), tmp_path / "plain")
    labels = {"abdomen": card.task("abdomen").labels}

    torch.manual_seed(0)
    target = build_model(source.cfg.replace(gate_context="slice"))
    added = [k for k in target.state_dict() if is_context_parameter(k)]
    assert added and all(k not in plain.state_dict() for k in added)
    load_initial_weights(target, str(folder), labels)
    size = source.cfg.img_size
    x = torch.randn(2, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, expected_gates = plain(x, return_gates=True)
        got, got_gates = target.eval()(x, return_gates=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(torch.allclose(got_gates[k], expected_gates[k], atol=1e-6) for k in expected_gates)

    def overrides(card_architecture, **model_overrides):
        run_cfg = SimpleNamespace(model_overrides=model_overrides)  # all that init_overrides reads
        return init_overrides(run_cfg, dataclasses.replace(card, architecture=card_architecture))

    assert overrides(plain.cfg, gate_context="slice") == {"gate_context": "slice"}
    assert overrides(target.cfg, gate_context="slice") == {"gate_context": "slice"}
    with pytest.raises(ConfigError, match="cannot take away"):
        overrides(target.cfg, gate_context="none")


@pytest.mark.parametrize(
    ("top", "dataset_expert", "message"),
    [
        ({"model_overrides": {"embed_dim": 48}}, "ct", "with init the architecture is the init model's"),
        ({}, "mr", r"init .*: the datasets' experts \['mr'\] are not among its \['ct', 'mr-t1', 'mr-t2'\]"),
        ({"init": "missing-model"}, "ct", "init: unknown model 'missing-model'; available: .*m4oe-phantom"),
        ({"init": "models/missing"}, "ct", "init: .*models/missing.*no such model folder or file"),
    ],
    ids=["other-width", "unknown-expert", "missing-name", "missing-path"],
)
def test_run_from_init_refuses_what_does_not_fit_before_training(
    phantoms, tmp_path, top, dataset_expert, message
):
    top = {"init": str(ROOT / "M4oESegmentation" / "m4oe" / "models" / "m4oe-phantom"), **top}
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["ct"], dataset_expert)],
        [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
        output_dir=str(tmp_path / "run"),
        **top,
    )
    cfg, _ = load_config(path)
    with pytest.raises(ConfigError, match=message):
        run(cfg, base_dir=tmp_path)
    assert not (tmp_path / "run" / "train_log.csv").exists()


def initial_tiny_weights() -> dict[str, torch.Tensor]:
    """The weights a run of the tiny two-expert model starts from (seed 0, as ``run`` seeds it)."""
    torch.manual_seed(0)
    tasks = (("abdomen", len(PHANTOM_LABELS) + 1),)
    return build_model("m4oe-tiny", experts=("ct", "mr"), tasks=tasks).state_dict()


def one_sgd_step(tmp_path: Path, name: str, datasets: list[dict], **stage) -> dict[str, torch.Tensor]:
    """The network's weights after one plain SGD step (no momentum, decay or clipping) of a joint stage."""
    path = write_config(
        tmp_path / f"{name}.toml",
        datasets,
        [{"kind": "joint", "epochs": 1, "lr": 0.01, **stage}],
        batch_size=2,
        iterations_per_epoch=1,
        momentum=0.0,
        weight_decay=0.0,
        grad_clip_norm=0.0,
        val_every=100,
        output_dir=str(tmp_path / name),
    )
    out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
    state = load_file(out / "state" / "weights.safetensors")
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.mark.slow
def test_gate_learning_rate_scale_moves_only_the_gates_faster(phantoms, tmp_path):
    """Plain SGD, one step: gate updates are ``gate_lr_scale`` times larger, every other one equal."""
    from m4oe_training.optim import is_gate_parameter

    initial = initial_tiny_weights()
    datasets = [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")]
    plain, fast = (one_sgd_step(tmp_path, f"scale{s}", datasets, gate_lr_scale=s) for s in (1.0, 8.0))
    gates = [k for k in initial if is_gate_parameter(k)]
    assert len(gates) == 28
    for key, start in initial.items():
        step, scaled = plain[key] - start, fast[key] - start
        if key in gates:
            assert step.abs().max() > 0, key
            torch.testing.assert_close(scaled, 8.0 * step, rtol=1e-3, atol=1e-7, msg=key)
        else:
            torch.testing.assert_close(scaled, step, rtol=1e-3, atol=1e-7, msg=key)


# ---------------------------------------------------------------------------------------------
# The correction loop: fine-tuning on a few corrected cases keeps what the model was


SOURCE_CT = {"modality": "ct", "clip": [-732.0, 837.0], "mean": 113.2, "std": 178.8}


def save_source_model(folder: Path, **preprocessing) -> Path:
    """A tiny CT/MR model over the phantom labels whose card differs from every training default:
    CT window [-732, 837] HU, 1st-99th percentile MR, 5 mm in-plane spacing, clean-up of the liver
    and spleen, 2.5 mm through-plane smoothing and 3 test-time passes."""
    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo

    torch.manual_seed(1)
    model = build_model("m4oe-tiny", experts=("ct", "mr"), tasks=(("abdomen", len(PHANTOM_LABELS) + 1),))
    labels = [standard_label(key, value) for key, value in PHANTOM_LABELS.items()]
    card = ModelCard(
        name="source",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr")],
        tasks=[TaskInfo("abdomen", labels, [1, 2], through_plane_sigma_mm=2.5, test_time_passes=3)],
        license="CC-BY-NC-SA-4.0",
        training_data="phantoms and a share-alike dataset",
        preprocessing=Preprocessing(
            **{
                "in_plane": "spacing",
                "target_spacing_mm": (5.0, 5.0),
                "intensity": {"ct": SOURCE_CT, "mr": {"modality": "mr", "percentiles": [1.0, 99.0]}},
                **preprocessing,
            }
        ),
    )
    return save_checkpoint(model, card, folder)


@pytest.fixture(scope="module")
def one_case(tmp_path_factory) -> Path:
    """A CT data set of a single case, as one case exported from Slicer is."""
    return write_dataset(tmp_path_factory.mktemp("one_case") / "ct", "ct", 1, seed=7, max_size=48)


def fine_tune_config(path: Path, one_case: Path, phantoms, **top) -> Path:
    """One corrected CT case (no validation) plus the T1 phantoms replayed (no validation)."""
    return write_config(
        path,
        [dataset(one_case, "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)],
        [{"kind": "joint", "epochs": 2, "lr": 1e-4, "shared_lr_scale": 0.1}],
        batch_size=2,
        iterations_per_epoch=1,
        optimizer="adamw",
        **top,
    )


def test_a_fine_tune_with_a_weight_average_exports_the_average_and_trains_as_without(
    phantoms, one_case, tmp_path
):
    """``ema_decay``: after one step from the init model the export holds decay * init + (1 - decay)
    * the step's weights, the state keeps that average beside the trained weights, and the weights
    the optimiser reaches are bit for bit those of the same run without an average."""
    source = save_source_model(tmp_path / "source")

    def tune(name: str, **top) -> Path:
        path = write_config(
            tmp_path / f"{name}.toml",
            [dataset(one_case, "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)],
            [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
            batch_size=2,
            iterations_per_epoch=1,
            optimizer="adamw",
            init=str(source),
            output_dir=str(tmp_path / name),
            **top,
        )
        return run(load_config(path)[0], base_dir=tmp_path, command=["test"])

    plain, averaged = tune("plain"), tune("averaged", ema_decay=0.25)
    assert (plain / "state" / "weights.safetensors").read_bytes() == (
        averaged / "state" / "weights.safetensors"
    ).read_bytes()
    assert not (plain / "state" / "ema.safetensors").exists()
    start = load_file(source / "model.safetensors")
    stepped = load_file(averaged / "state" / "weights.safetensors")
    kept = load_file(averaged / "state" / "ema.safetensors")
    exported = load_file(averaged / "model" / "model.safetensors")
    assert exported.keys() == start.keys() == kept.keys()
    moved = 0
    for key, value in exported.items():
        step = stepped["model." + key]
        expected = 0.25 * start[key] + 0.75 * step
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=key)
        torch.testing.assert_close(kept[key], value, atol=0, rtol=0, msg=key)
        moved += not torch.equal(step, start[key])
    assert moved > 10  # the step moved weights, so the average is neither the start nor the step
    _, card = load_checkpoint(averaged / "model")
    assert card.provenance["config"]["ema_decay"] == 0.25


def test_a_chain_of_fine_tunes_keeps_every_earlier_run_in_the_last_card(phantoms, one_case, tmp_path):
    """Each fine-tune records the run behind its starting model and that model's own lineage, so the
    last card of a chain tells every run (``provenance.lineage``, newest first; ``m4oe info``)."""
    from m4oe.card_summary import training_data_text

    source = save_source_model(tmp_path / "source")
    first = fine_tune_config(
        tmp_path / "first.toml", one_case, phantoms, init=str(source), output_dir=str(tmp_path / "first")
    )
    _, first_card = load_checkpoint(run(load_config(first)[0], base_dir=tmp_path) / "model")
    second = fine_tune_config(
        tmp_path / "second.toml",
        one_case,
        phantoms,
        init=str(tmp_path / "first" / "model"),
        output_dir=str(tmp_path / "second"),
        seed=3,
    )
    _, card = load_checkpoint(run(load_config(second)[0], base_dir=tmp_path) / "model")
    _, source_card = load_checkpoint(source)

    assert [entry["name"] for entry in first_card.provenance["lineage"]] == ["source"]
    newest, oldest = card.provenance["lineage"]
    assert newest["weights_sha256"] == first_card.weights_sha256 == card.provenance["init_weights_sha256"]
    assert newest["init_weights_sha256"] == source_card.weights_sha256 == oldest["weights_sha256"]
    assert (newest["iterations"], newest["batch_size"], newest["seed"]) == (2, 2, 0)
    assert newest["data"] == first_card.provenance["data"] and newest["data"]
    assert oldest["iterations"] is None and oldest["init_weights_sha256"] is None  # no record: None
    lineage_text = training_data_text(card.to_dict()).split("continued from ")[1]
    parent = f"{first_card.name} (weights {first_card.weights_sha256[:12]})"
    assert lineage_text.startswith(f"{parent}, the last of 2 earlier runs: ")
    assert str(one_case) in lineage_text
    assert "iterations" not in lineage_text  # the source model's run is unknown: no total is claimed


@pytest.mark.slow
def test_fine_tuning_one_case_by_model_name_keeps_the_init_models_preprocessing_and_clean_up(
    phantoms, one_case, tmp_path, monkeypatch, capsys
):
    """``init`` names a cached model; one case and no validation anywhere: the run trains, exports
    the last epoch of the stage, says so in the card, and the card normalises, resamples and cleans
    up exactly as the init model's does. ``m4oe train`` says "exported" only once a model is there."""
    cache = tmp_path / "cache"
    source = save_source_model(cache / "tiny-source")
    monkeypatch.setenv("M4OE_CACHE_DIR", str(cache))
    path = fine_tune_config(tmp_path / "configs" / "tune.toml", one_case, phantoms, init="tiny-source")
    cfg, _ = load_config(path)
    assert cfg.init == "tiny-source"  # a name: nothing of that name beside the config
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "run"

    # Mid-stage, with no validation, nothing is exported yet, and the command says so.
    assert m4oe_main(["train", str(path), "--stop-after-epochs", "1"]) == 0
    assert "no model exported yet" in capsys.readouterr().out and not (out / "model").exists()
    assert m4oe_main(["train", str(path), "--resume"]) == 0
    assert f"exported model: {out / 'model'}" in capsys.readouterr().out

    model, card = load_checkpoint(out / "model")
    _, parent = load_checkpoint(source)
    assert card.preprocessing.intensity == parent.preprocessing.intensity  # CT clip, mean, std; MR
    assert card.preprocessing.intensity["ct"]["clip"] == [-732.0, 837.0]
    assert (card.preprocessing.in_plane, card.preprocessing.target_spacing_mm) == ("spacing", (5.0, 5.0))
    task, theirs = card.task("abdomen"), parent.task("abdomen")
    assert (task.largest_component, task.through_plane_sigma_mm, task.test_time_passes) == ([1, 2], 2.5, 3)
    assert task.labels == theirs.labels
    assert card.provenance["init_weights_sha256"] == parent.weights_sha256
    assert card.provenance["config"]["init"] == "tiny-source"
    assert card.metrics["validation"] is None
    assert card.metrics["selected"] == {"stage": 0, "epoch": 2, "mean_dice": None}
    # The config states no licence or data: the init model's carry over (a share-alike licence must).
    assert (card.license, card.training_data) == ("CC-BY-NC-SA-4.0", "phantoms and a share-alike dataset")
    assert [r["val_mean_dice"] for r in read_log(out)] == ["", ""]
    assert model.cfg.experts == ("ct", "mr")

    # Clean-up the config sets, even to the defaults, replaces the inherited one.
    path = fine_tune_config(
        tmp_path / "configs" / "set.toml",
        one_case,
        phantoms,
        init="tiny-source",
        output_dir=str(tmp_path / "set"),
        largest_component=[],
        through_plane_sigma_mm=0.0,
        test_time_passes=1,
        license="CC-BY-NC-SA-4.0 AND CC-BY-4.0",
    )
    _, card = load_checkpoint(run(load_config(path)[0], base_dir=tmp_path) / "model")
    assert card.license == "CC-BY-NC-SA-4.0 AND CC-BY-4.0"  # what the config states wins
    task = card.task("abdomen")
    assert (task.largest_component, task.through_plane_sigma_mm, task.test_time_passes) == ([], 0.0, 1)
    assert card.preprocessing.intensity == parent.preprocessing.intensity


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"in_plane": "resize"}, r"in_plane = 'resize': the init model 'source' .* in_plane = 'spacing'"),
        ({"target_spacing_mm": [1.0, 1.0]}, r"target_spacing_mm = \(1.0, 1.0\): .* \(5.0, 5.0\)"),
    ],
    ids=["in-plane", "spacing"],
)
def test_fine_tuning_refuses_other_in_plane_preprocessing_than_the_init_models(
    phantoms, one_case, tmp_path, top, message
):
    source = save_source_model(tmp_path / "source")
    path = fine_tune_config(
        tmp_path / "cfg.toml", one_case, phantoms, init=str(source), output_dir=str(tmp_path / "run"), **top
    )
    with pytest.raises(ConfigError, match=message):
        run(load_config(path)[0], base_dir=tmp_path)
    assert not (tmp_path / "run" / "train_log.csv").exists()
    # Repeating the init model's own values is allowed; leaving them out takes them.
    from m4oe.checkpoint import read_model_card
    from m4oe_training.init_model import inherit_preprocessing

    card = read_model_card(source)
    for top in ({"in_plane": "spacing", "target_spacing_mm": [5.0, 5.0]}, {}):
        cfg = load_config(fine_tune_config(tmp_path / "same.toml", one_case, phantoms, **top))[0]
        resolved = inherit_preprocessing(cfg, card)
        assert (resolved.in_plane, resolved.target_spacing_mm) == ("spacing", (5.0, 5.0))
    assert inherit_preprocessing(cfg, None).in_plane == "resize"  # without init: the default
    # A deliberate change of geometry (a model retrained for another grid) says so explicitly.
    changed = load_config(
        fine_tune_config(
            tmp_path / "new.toml", one_case, phantoms, in_plane="resize", keep_init_in_plane=False
        )
    )[0]
    assert (inherit_preprocessing(changed, card).in_plane, changed.target_spacing_mm) == ("resize", None)


def test_a_one_case_dataset_with_the_default_validation_cases_says_what_to_set(one_case, tmp_path):
    path = write_config(
        tmp_path / "cfg.toml",
        [{"path": str(one_case), "expert": "ct", "task": "abdomen"}],  # val_cases left at 2
        [{"kind": "experts", "epochs": 1, "lr": 1e-3}],
        model="swin-unet-tiny",
        output_dir=str(tmp_path / "run"),
    )
    message = r"datasets\[0\] .*val_cases = 2 leaves none of its 1 case\(s\) to train on; set val_cases = 0"
    with pytest.raises(ConfigError, match=message):
        run(load_config(path)[0], base_dir=tmp_path)
    assert not (tmp_path / "run").joinpath("train_log.csv").exists()


def test_init_is_a_path_beside_the_config_or_else_a_model_name(tmp_path):
    stages = [{"kind": "joint", "epochs": 1, "lr": 1e-3}]
    datasets = [dataset("/data/ct", "ct")]
    (tmp_path / "configs" / "m4oe-phantom").mkdir(parents=True)
    beside = load_config(write_config(tmp_path / "configs" / "a.toml", datasets, stages, init="m4oe-phantom"))
    assert beside[0].init == str(tmp_path / "configs" / "m4oe-phantom")  # a folder there wins
    named = load_config(write_config(tmp_path / "b.toml", datasets, stages, init="m4oe-phantom"))
    assert named[0].init == "m4oe-phantom"
    relative = load_config(write_config(tmp_path / "c.toml", datasets, stages, init="models/x"))
    assert relative[0].init == str(tmp_path / "models" / "x")  # a path, missing or not
    from m4oe.hub import EMBEDDED_DIR
    from m4oe_training.init_model import resolve_init

    assert resolve_init("m4oe-phantom") == EMBEDDED_DIR / "m4oe-phantom"
    with pytest.raises(ConfigError, match="init: unknown model 'no-such-model'"):
        resolve_init("no-such-model")


def test_parameter_groups_split_gates_shared_layers_and_the_rest():
    from m4oe_training.optim import group_lr, parameter_groups

    module = tiny_stage_loss(0)
    groups = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(module)}
    assert list(groups) == ["gates", "rest", "shared"]
    names = {id(p): name for name, p in module.named_parameters()}
    by_group = {k: {names[i] for i in ids} for k, ids in groups.items()}
    assert sum(len(v) for v in by_group.values()) == len(names)
    assert all(".mlp.gate." in n for n in by_group["gates"])
    assert all(
        ".mlp.experts." in n or n.startswith("model.heads.") or n.startswith("reconstruct.")
        for n in by_group["rest"]
    )
    assert {"model.patch_embed.proj.weight", "model.norm_up.weight"} <= by_group["shared"]
    assert not any(".mlp." in n or "heads" in n for n in by_group["shared"])
    stage = StageConfig("joint", 1, 0.1, gate_lr_scale=4.0, shared_lr_scale=0.0)
    assert [group_lr(stage, g, 0.1) for g in groups] == [pytest.approx(0.4), 0.1, 0.0]  # 0 freezes
    with pytest.raises(ConfigError, match="shared_lr_scale must be >= 0"):
        TrainConfig(
            "x", (DatasetConfig("/d", "ct", "a"),), (StageConfig("joint", 1, 0.1, shared_lr_scale=-1.0),)
        )


@pytest.mark.slow
def test_shared_learning_rate_scale_moves_only_the_shared_layers_slower(phantoms, tmp_path):
    """Plain SGD, one step: updates of the shared layers are ``shared_lr_scale`` times the full
    rate's, experts', gates' and heads' updates the same."""
    from m4oe_training.optim import is_shared_parameter

    initial = initial_tiny_weights()
    datasets = [dataset(phantoms["ct"], "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)]
    full, slow = (one_sgd_step(tmp_path, f"shared{s}", datasets, shared_lr_scale=s) for s in (1.0, 0.25))
    shared = [k for k in initial if is_shared_parameter(f"model.{k}")]
    assert 0 < len(shared) < len(initial)
    for key, start in initial.items():
        step, scaled = full[key] - start, slow[key] - start
        if key in shared:
            torch.testing.assert_close(scaled, 0.25 * step, rtol=1e-3, atol=1e-7, msg=key)
        else:
            torch.testing.assert_close(scaled, step, rtol=1e-3, atol=1e-7, msg=key)
    assert any(full[k].ne(initial[k]).any() for k in shared)


@pytest.mark.slow
def test_anchor_weight_pulls_each_weight_back_towards_the_init_model(phantoms, one_case, tmp_path):
    """Plain SGD, two steps from an init model: with ``anchor_weight`` the second step is the plain
    second step minus ``lr * anchor_weight * (w - w_init)``, L2-SP's gradient, for every weight."""
    from m4oe_training.optim import stage_lr

    source = save_source_model(tmp_path / "source")
    start = {k: v.float() for k, v in load_checkpoint(source)[0].state_dict().items()}
    datasets = [dataset(one_case, "ct", val_cases=0), dataset(phantoms["t1"], "mr", val_cases=0)]

    def weights(name: str, steps: int, **stage) -> dict[str, torch.Tensor]:
        path = write_config(
            tmp_path / f"{name}.toml",
            datasets,
            [{"kind": "joint", "epochs": 1, "lr": 0.01, **stage}],
            batch_size=2,
            iterations_per_epoch=steps,
            momentum=0.0,
            weight_decay=0.0,
            grad_clip_norm=0.0,
            init=str(source),
            output_dir=str(tmp_path / name),
        )
        out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
        state = load_file(out / "state" / "weights.safetensors")
        return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}

    first, plain = weights("one", 1), weights("plain", 2)
    anchored = weights("anchored", 2, anchor_weight=20.0)
    lr = stage_lr(StageConfig("joint", 1, 0.01), 1, 2, TrainConfig.poly_power)  # the second step's
    assert set(anchored) == set(start)
    moved = 0
    for key, w0 in start.items():
        expected = plain[key] - lr * 20.0 * (first[key] - w0)
        torch.testing.assert_close(anchored[key], expected, rtol=1e-4, atol=1e-7, msg=key)
        moved += int((anchored[key] - plain[key]).abs().max() > 1e-6)
    assert moved > len(start) // 4  # the pull is there, not lost in rounding


def test_anchor_weight_needs_an_init_model_and_a_weight_of_zero_or_more():
    datasets = (DatasetConfig("/d", "ct", "a"),)
    with pytest.raises(ConfigError, match="anchor_weight pulls the weights towards the init model's"):
        TrainConfig("x", datasets, (StageConfig("joint", 1, 0.1, anchor_weight=1.0),))
    with pytest.raises(ConfigError, match=r"stages\[0\].anchor_weight must be >= 0"):
        TrainConfig("x", datasets, (StageConfig("joint", 1, 0.1, anchor_weight=-1.0),), init="m")
    TrainConfig("x", datasets, (StageConfig("joint", 1, 0.1, anchor_weight=1.0),), init="m")


@pytest.mark.slow
def test_experts_stage_trains_only_the_experts_its_datasets_name(phantoms, tmp_path):
    """Fine-tuning a CT/MR model with ``trainable = "experts"`` on MR data only: the exported model's
    MR expert differs from the init model's in every block; the CT expert, the gates, the shared
    layers and the task head are the init model's bit for bit (AdamW leaves them alone, weight decay
    included)."""
    from m4oe.checkpoint import load_checkpoint
    from m4oe_training.optim import is_expert_parameter

    source = save_source_model(tmp_path / "source")
    path = write_config(
        tmp_path / "cfg.toml",
        [dataset(phantoms["t1"], "mr", val_cases=0)],
        [{"kind": "joint", "epochs": 2, "lr": 1e-2, "trainable": "experts"}],
        init=str(source),
        batch_size=2,
        iterations_per_epoch=2,
        optimizer="adamw",
        weight_decay=0.1,
        output_dir=str(tmp_path / "run"),
    )
    cfg, _ = load_config(path)
    out = run(cfg, base_dir=tmp_path, command=["test"])
    before, _ = load_checkpoint(source)
    after, card = load_checkpoint(out / "model")
    assert card.experts[0].name == "ct" and card.experts[1].name == "mr"
    before, after = before.state_dict(), after.state_dict()
    assert before.keys() == after.keys()
    mr = [k for k in before if is_expert_parameter(k, {1})]
    ct = [k for k in before if is_expert_parameter(k, {0})]
    assert len(mr) == len(ct) > 0
    for key in before:
        if key in mr:
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key


def test_merge_experts_takes_each_named_expert_from_its_run_and_refuses_moved_shared_layers(tmp_path, capsys):
    """``m4oe merge-experts``: the base model's weights with each named expert taken from the
    model that trained it; a model whose weights outside the experts moved is refused, and nothing
    is written."""
    from m4oe.checkpoint import save_checkpoint
    from m4oe_training.optim import is_expert_parameter

    base = save_source_model(tmp_path / "base")
    model, card = load_checkpoint(base)

    def trained(name: str, change: str, by: float) -> Path:
        """A copy of the base with the weights whose name contains ``change`` moved by ``by``."""
        state = {k: v + by if change in k else v for k, v in model.state_dict().items()}
        other = build_model(model.cfg)
        other.load_state_dict(state)
        return save_checkpoint(other, card, tmp_path / name)

    # the MR run moved every expert; only its MR expert may be taken
    ct_run, mr_run = trained("ct_run", ".mlp.experts.0.", 0.25), trained("mr_run", ".mlp.experts.", 0.5)
    out = tmp_path / "merged"
    argv = ["merge-experts", str(base), str(out), "--expert", f"ct={ct_run}", "--expert", f"mr={mr_run}"]
    assert m4oe_main([*argv, "--name", "merged"]) == 0
    merged, merged_card = load_checkpoint(out)
    start, ct, mr = (load_checkpoint(p)[0].state_dict() for p in (base, ct_run, mr_run))
    taken = 0
    for key, value in merged.state_dict().items():
        source = ct if is_expert_parameter(key, {0}) else mr if is_expert_parameter(key, {1}) else start
        torch.testing.assert_close(value, source[key].half().float(), rtol=0, atol=0, msg=key)
        taken += source is not start
    assert taken > 0
    assert merged_card.name == "merged" and merged_card.metrics == {}
    record = merged_card.provenance["merged_experts"]
    assert record["ct"]["weights_sha256"] == load_checkpoint(ct_run)[1].weights_sha256
    assert record["base_weights_sha256"] == card.weights_sha256
    assert record["command"].split()[0] == "m4oe"  # how to make it again (this process's argv)
    moved = trained("moved", "patch_embed", 0.5)
    for bad, message in (
        ([f"ct={moved}"], "weights outside the experts differ from the base model's"),
        ([f"pet={ct_run}"], "expert 'pet' is not one of the base model's"),
    ):
        code = m4oe_main(["merge-experts", str(base), str(tmp_path / "bad"), "--expert", *bad])
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        m4oe_main(["merge-experts", str(base), str(tmp_path / "bad"), "--expert", "ct"])
    assert "must be NAME=MODEL" in capsys.readouterr().err


def test_merged_card_states_what_its_experts_learnt_from(tmp_path, capsys):
    """An expert trained on data under another licence than the base's: the merged card may not
    keep the base's licence and training data silently; the merge is refused until they are
    stated, and then the card says what was stated."""
    import dataclasses

    from m4oe.checkpoint import save_checkpoint
    from m4oe_training.cli import MERGE_STATEMENTS
    from m4oe_training.merge import STATEMENTS

    assert MERGE_STATEMENTS == STATEMENTS
    base = save_source_model(tmp_path / "base")
    model, card = load_checkpoint(base)
    card = dataclasses.replace(card, license="Apache-2.0", training_data="phantoms")
    base = save_checkpoint(model, card, tmp_path / "base_stated")
    state = {k: v + 0.5 if ".mlp.experts.1." in k else v for k, v in model.state_dict().items()}
    other = build_model(model.cfg)
    other.load_state_dict(state)
    mr_card = dataclasses.replace(card, license="CC-BY-NC-SA-4.0", training_data="phantoms and CHAOS")
    mr_run = save_checkpoint(other, mr_card, tmp_path / "mr_run")
    out = tmp_path / "merged"
    argv = ["merge-experts", str(base), str(out), "--expert", f"mr={mr_run}"]
    assert m4oe_main(argv) == 2
    err = capsys.readouterr().err
    assert "license is not the base model's" in err and "--license, --training-data" in err
    assert not out.exists()
    assert m4oe_main([*argv, "--license", "CC-BY-NC-SA-4.0"]) == 2  # the training data still unstated
    assert "--training-data" in capsys.readouterr().err and not out.exists()
    stated = ["--license", "CC-BY-NC-SA-4.0", "--training-data", "phantoms; CHAOS (CC BY-NC-SA 4.0)"]
    assert m4oe_main([*argv, *stated]) == 0
    merged = load_checkpoint(out)[1]
    assert (merged.license, merged.training_data) == ("CC-BY-NC-SA-4.0", "phantoms; CHAOS (CC BY-NC-SA 4.0)")
    assert merged.intended_use == card.intended_use  # the same in both cards: the base's
    # m4oe info and the Slicer panel say which expert came from which run, not only the base's run.
    from m4oe.card_summary import training_data_text

    text = training_data_text(merged.to_dict())
    assert text.startswith("phantoms; CHAOS (CC BY-NC-SA 4.0) Experts merged onto a base model (weights ")
    assert f"mr from {mr_card.name} (weights {mr_card.weights_sha256[:12]}" not in text  # the saved hash
    saved = load_checkpoint(mr_run)[1].weights_sha256
    assert f"mr from {mr_card.name} (weights {saved[:12]})" in text
    assert "The base model:" not in text  # this base records no run of its own (the embedded one does)
    # A source that says what the base says needs nothing stated.
    same = save_checkpoint(other, card, tmp_path / "same_run")
    assert m4oe_main(["merge-experts", str(base), str(tmp_path / "m2"), "--expert", f"mr={same}"]) == 0
    assert load_checkpoint(tmp_path / "m2")[1].license == "Apache-2.0"
