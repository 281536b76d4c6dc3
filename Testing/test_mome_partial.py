"""benchmarks/mome_partial.py prepare (issue #26, point 4): the configs it writes, with and without
``--cross-modal`` (T1/T2 renders of each CT partial set's own label maps, or its CT images made
MR-like, for the MR expert), read back by the training's own config parser and dataset checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from m4oe.phantom import PHANTOM_LABELS
from m4oe_training.config import load_config
from m4oe_training.data import DatasetInfo, check_synth
from m4oe_training.mome import write_partial_phantoms
from m4oe_training.train import run as train_run

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("mome_partial", ROOT / "benchmarks" / "mome_partial.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


@pytest.fixture(scope="module")
def real_anatomy(tmp_path_factory):
    """A CT data set labelling all nine phantom organs, standing in for data/real/example_ct."""
    out = tmp_path_factory.mktemp("anatomy") / "example_ct"
    return write_partial_phantoms(out, "ct", 1, 5, list(PHANTOM_LABELS), max_size=32)


def datasets(config_path: Path, folder: Path) -> list[tuple]:
    """(path relative to folder, expert, task, val_cases, synth, synth_fraction) per dataset, as the
    training reads the config; every data set also passes the training's synthesis check."""
    cfg, _ = load_config(config_path)
    rows = []
    for d in cfg.datasets:
        check_synth(d, DatasetInfo.read(d.path))  # refuses wrong-modality renders with validation cases
        path = Path(d.path).relative_to(folder.resolve()).as_posix()
        rows.append((path, d.expert, d.task, d.val_cases, d.synth, d.synth_fraction))
    return rows


# The datasets of each run's config without --cross-modal (before the option existed): the three
# phantom sets, and with --real-anatomy each one's real sibling right after it.
def plain_rows(run: str, real: bool) -> list[tuple]:
    heads = {"ct_organs": "organs", "ct_vessels": "vessels", "mr_liver": "liver_mr"}
    rows = []
    for name, expert in (("ct_organs", "ct"), ("ct_vessels", "ct"), ("mr_liver", "mr")):
        task = "organs" if run in ("mome-partial", "m4oe-onehead") else heads[name]
        rows.append((f"data/{name}", expert, task, 1, "off", 1.0))
        if real:
            family, fraction = ("ct", 0.5) if expert == "ct" else ("t1", 1.0)
            rows.append((f"data/{name}_real", expert, task, 0, family, fraction))
    return rows


def cross_rows(run: str, real: bool, families=("t1", "t2")) -> list[tuple]:
    """plain_rows with, after each CT set (and its real sibling), one MR-expert data set per family
    of it (and of its sibling): same task, no validation cases, synthetic images only."""
    rows = []
    for row in plain_rows(run, real):
        rows.append(row)
        path, expert, task = row[:3]
        if expert == "ct" and (path.endswith("_real") or not real):
            base = path.removesuffix("_real")
            for source in [base] + ([f"{base}_real"] if real else []):
                rows += [(source, "mr", task, 0, family, 1.0) for family in families]
    return rows


@pytest.mark.parametrize("real", [False, True], ids=["phantoms", "real-anatomy"])
def test_cross_modal_configs_add_mr_renders_of_each_ct_set(bench, real_anatomy, tmp_path, real):
    plain, cross = tmp_path / "plain", tmp_path / "cross"
    anatomy = real_anatomy if real else None
    bench.prepare(plain, 2, 32, 100, 30, 8, anatomy)
    bench.prepare(cross, 2, 32, 100, 30, 8, anatomy, cross_modal=("t1", "t2"))
    for run in bench.MODELS:
        got = datasets(cross / f"{run}.toml", cross)
        assert got == cross_rows(run, real), run
        assert datasets(plain / f"{run}.toml", plain) == plain_rows(run, real), run
        # Renders for the MR expert of every structure, not only the MR set's liver.
        mr = [row for row in got if row[1] == "mr"]
        assert len(mr) == (10 if real else 5)  # 4 or 8 renders, the MR set (and its sibling)
        cfg, _ = load_config(cross / f"{run}.toml")
        assert cfg.experts == ("ct", "mr")
        # Everything else in the config is as without the option.
        text = {
            name: (folder / f"{run}.toml").read_text().replace(str(folder.resolve()), "OUT")
            for name, folder in (("plain", plain), ("cross", cross))
        }
        assert text["cross"] != text["plain"]
        assert text["cross"].split("[[datasets]]")[0] == text["plain"].split("[[datasets]]")[0]
        assert text["cross"].split("[[stages]]", 1)[1] == text["plain"].split("[[stages]]", 1)[1]


@pytest.mark.parametrize("real", [False, True], ids=["phantoms", "real-anatomy"])
def test_cross_modal_ct_to_mr_trains_the_mr_expert_on_each_ct_set(bench, real_anatomy, tmp_path, real):
    """``--cross-modal ct-to-mr``: each CT set's (and real sibling's) CT images, made MR-like, train
    the MR expert; the training's synthesis check accepts them (CT data sets, no validation cases)."""
    anatomy = real_anatomy if real else None
    bench.prepare(tmp_path, 2, 32, 100, 30, 8, anatomy, cross_modal=("ct-to-mr",))
    for run in bench.MODELS:
        got = datasets(tmp_path / f"{run}.toml", tmp_path)
        assert got == cross_rows(run, real, ("ct-to-mr",)), run
        assert [row[0] for row in got if row[4] == "ct-to-mr"] == (
            ["data/ct_organs", "data/ct_organs_real", "data/ct_vessels", "data/ct_vessels_real"]
            if real
            else ["data/ct_organs", "data/ct_vessels"]
        )
    assert (
        bench.main(
            ["prepare", str(tmp_path), "--cases", "2", "--max-size", "32", "--cross-modal", "t2,ct-to-mr"]
        )
        == 0
    )
    families = [row[4] for row in datasets(tmp_path / "dense-partial.toml", tmp_path) if row[1] == "mr"]
    assert families == ["t2", "ct-to-mr", "t2", "ct-to-mr", "off"]
    for bad in ("t3", "t1,t1", "ct"):
        with pytest.raises(SystemExit):
            bench.main(["prepare", str(tmp_path), "--cases", "2", "--max-size", "32", "--cross-modal", bad])
    with pytest.raises(ValueError, match="t3"):
        bench.prepare(tmp_path, 2, 32, 100, 30, 8, cross_modal=("t3",))


def test_configs_without_cross_modal_are_unchanged(bench, tmp_path):
    """The m4oe-partial config exactly as the script wrote it before --cross-modal existed."""
    bench.prepare(tmp_path, 2, 32, 100, 30, 8)
    blocks = "".join(
        f'\n[[datasets]]\npath = "data/{name}"\nexpert = "{expert}"\ntask = "{task}"\nval_cases = 1\n'
        for name, expert, task in (
            ("ct_organs", "ct", "organs"),
            ("ct_vessels", "ct", "vessels"),
            ("mr_liver", "mr", "liver_mr"),
        )
    )
    expected = (
        'name = "m4oe-partial"\nmodel = "m4oe-tiny"\n'
        f'output_dir = "{tmp_path.resolve()}/runs/{{name}}"\n'
        'batch_size = 8\niterations_per_epoch = 100\noptimizer = "adamw"\nforeground_fraction = 0.8\n'
        'val_every = 1000\nexport_epoch = "last"\nseed = 0\n'
        + blocks
        + '\n[[stages]]\nkind = "experts"\nepochs = 30\nlr = 0.003\nwarmup_iterations = 100\n'
        '\n[[stages]]\nkind = "joint"\nepochs = 30\nlr = 0.001\nwarmup_iterations = 0\n'
    )
    assert (tmp_path / "m4oe-partial.toml").read_text() == expected


def test_cross_modal_flag_reaches_prepare(bench, tmp_path):
    assert bench.main(["prepare", str(tmp_path), "--cases", "2", "--max-size", "32", "--cross-modal"]) == 0
    rows = datasets(tmp_path / "mome-partial.toml", tmp_path)
    assert ("data/ct_vessels", "mr", "organs", 0, "t2", 1.0) in rows
    assert bench.main(["prepare", str(tmp_path), "--cases", "2", "--max-size", "32"]) == 0
    assert all(
        row[1] == "ct" or row[0] == "data/mr_liver"
        for row in datasets(tmp_path / "mome-partial.toml", tmp_path)
    )


def test_render_weight_sets_the_sampling_weight_of_the_renders_only(bench, tmp_path):
    """``--render-weight 0.25``: each cross-modal render data set is drawn a quarter as often as
    the others, so the two CT sets keep half of all samples; the other data sets keep weight 1."""
    assert bench.main(["prepare", str(tmp_path), "--cases", "2", "--max-size", "32", "--cross-modal"]) == 0
    cfg, _ = load_config(tmp_path / "m4oe-partial.toml")
    assert {d.weight for d in cfg.datasets} == {1.0}
    args = ["prepare", str(tmp_path), "--cases", "2", "--max-size", "32", "--cross-modal"]
    assert bench.main([*args, "--render-weight", "0.25"]) == 0
    cfg, _ = load_config(tmp_path / "m4oe-partial.toml")
    weights = {(Path(d.path).name, d.synth): d.weight for d in cfg.datasets}
    assert weights == {
        ("ct_organs", "off"): 1.0,
        ("ct_organs", "t1"): 0.25,
        ("ct_organs", "t2"): 0.25,
        ("ct_vessels", "off"): 1.0,
        ("ct_vessels", "t1"): 0.25,
        ("ct_vessels", "t2"): 0.25,
        ("mr_liver", "off"): 1.0,
    }
    ct = sum(d.weight for d in cfg.datasets if d.expert == "ct")
    assert ct / sum(d.weight for d in cfg.datasets) == 0.5
    with pytest.raises(SystemExit):
        bench.main([*args, "--render-weight", "0"])


def test_one_head_m4oe_trains_the_union_and_is_scored_alone(bench, tmp_path, capsys):
    """``m4oe-onehead``: the three partial sets share the task ``organs``, so the run exports one
    head with the 8 structures (the first set's 4, then the second's 4; the MR set's liver is the
    same class), answers for all 8 with one argmax, and is scored while the other runs are absent."""
    bench.prepare(tmp_path, 2, 32, 2, 1, 2)
    cfg, _ = load_config(tmp_path / "m4oe-onehead.toml")
    assert {d.task for d in cfg.datasets} == {"organs"}
    out = train_run(cfg, base_dir=tmp_path, command=["test"])
    from m4oe.checkpoint import load_checkpoint
    from m4oe.phantom import generate_case
    from m4oe.predictor import Predictor
    from m4oe.terminology import structure_key

    model, card = load_checkpoint(out / "model")
    assert [task.name for task in card.tasks] == ["organs"]
    assert [(label.value, structure_key(label)) for label in card.tasks[0].labels] == list(
        enumerate(bench.UNION, start=1)
    )
    image, _ = generate_case("t1", 7, max_size=32)
    answer, _ = bench.union_prediction(Predictor(model, card, device="cpu", threads=1), image, "mr")
    assert answer.shape == image.GetSize()[::-1]
    assert set(np.unique(answer)) <= set(range(len(bench.UNION) + 1))
    assert bench.trained_rows(tmp_path) == [("m4oe-onehead", "m4oe-onehead", False)]
    assert "mome-partial holds no trained model" in capsys.readouterr().err
    assert bench.trained_rows(tmp_path, notes=False) == [("m4oe-onehead", "m4oe-onehead", False)]
    assert capsys.readouterr().err == ""
    results = tmp_path / "results.json"
    assert (
        bench.main(["evaluate", str(tmp_path), "--cases", "1", "--max-size", "32", "--json", str(results)])
        == 0
    )
    table = capsys.readouterr().out
    assert table.count("| m4oe-onehead |") == 3 and "| m4oe-partial |" not in table
    scores = json.loads(results.read_text())["models"]["m4oe-onehead"]
    assert all(0.0 <= scores[seq]["mean_dice"] <= 1.0 for seq in bench.SEQUENCES)
    with pytest.raises(SystemExit, match="no trained model"):
        bench.trained_rows(tmp_path / "empty")


def test_img_size_sets_every_models_input(bench, tmp_path):
    """``--img-size 96``: each of the four configs builds its network for 96 x 96 slices (the
    tiny models' default is 64); a size the four stages cannot halve is refused before writing."""
    from m4oe.model import get_config

    args = ["prepare", str(tmp_path), "--cases", "2", "--max-size", "32"]
    assert bench.main([*args, "--img-size", "96"]) == 0
    for run in bench.MODELS:
        cfg, _ = load_config(tmp_path / f"{run}.toml")
        assert cfg.model_overrides == {"img_size": 96}
        assert get_config(cfg.model, **cfg.model_overrides).img_size == 96
    assert bench.main(args) == 0
    assert load_config(tmp_path / "mome-partial.toml")[0].model_overrides == {}
    with pytest.raises(SystemExit):
        bench.main([*args, "--img-size", "100"])
    with pytest.raises(ValueError, match="multiple of 32"):
        bench.prepare(tmp_path, 2, 32, 100, 30, 8, img_size=48)


def test_experts_lr_sets_the_experts_stage_of_every_config(bench, tmp_path):
    """``--experts-lr 1e-3``: every config's experts stage peaks at that rate, the joint stage
    keeps 1e-3; the default stays 3e-3; a rate outside (0, 1) is refused before writing."""
    args = ["prepare", str(tmp_path), "--cases", "2", "--max-size", "32"]
    assert bench.main([*args, "--experts-lr", "0.0005"]) == 0
    for run in bench.MODELS:
        cfg, _ = load_config(tmp_path / f"{run}.toml")
        assert [(s.kind, s.lr) for s in cfg.stages] == [("experts", 0.0005), ("joint", 0.001)]
    assert bench.main(args) == 0
    assert load_config(tmp_path / "mome-partial.toml")[0].stages[0].lr == 0.003
    for bad in ("0", "-1e-3", "2"):
        with pytest.raises(SystemExit):
            bench.main([*args, "--experts-lr", bad])
    with pytest.raises(ValueError, match="experts_lr"):
        bench.prepare(tmp_path / "other", 2, 32, 100, 30, 8, experts_lr=0.0)
    assert not (tmp_path / "other").exists(), "refused before anything is written"


def test_foreground_sampling_reaches_every_config(bench, tmp_path):
    """``--foreground-sampling class`` is written into every config; the default writes nothing (the
    training default, "slice"); an unknown mode is refused before writing."""
    args = ["prepare", str(tmp_path), "--cases", "2", "--max-size", "32"]
    assert bench.main([*args, "--foreground-sampling", "class"]) == 0
    for run in bench.MODELS:
        assert load_config(tmp_path / f"{run}.toml")[0].foreground_sampling == "class"
    assert bench.main(args) == 0
    assert "\nforeground_sampling =" not in (tmp_path / "mome-partial.toml").read_text()
    assert load_config(tmp_path / "mome-partial.toml")[0].foreground_sampling == "slice"
    with pytest.raises(SystemExit):
        bench.main([*args, "--foreground-sampling", "organ"])
    with pytest.raises(ValueError, match="foreground_sampling"):
        bench.prepare(tmp_path / "other", 2, 32, 100, 30, 8, foreground_sampling="organ")
    assert not (tmp_path / "other").exists(), "refused before anything is written"


def test_continue_trains_a_prepared_runs_model_further_on_the_same_data(bench, tmp_path, capsys):
    """``continue SOURCE FOLDER``: for each of SOURCE's runs with a trained model, a config in FOLDER
    whose ``init`` is that model, with the same data sets (SOURCE's data, read from FOLDER, and the
    source run's ``--set`` of them, as of its top-level keys), one joint
    stage as asked, and its own output folder; the continued run trains from those weights. A
    source without a trained run, and continuing into the source itself, are refused unwritten."""
    from m4oe.checkpoint import read_model_card

    source, folder = tmp_path / "first", tmp_path / "second"
    bench.prepare(source, 2, 32, 2, 1, 2)
    first_cfg, _ = load_config(source / "m4oe-onehead.toml")
    # Trained as `m4oe train ... --set foreground_sampling=class --set ema_decay=0.5 --set threads=1
    # --set datasets.1.weight=2`: the config file holds none of these, the model card all of them.
    given = dataclasses.replace(
        first_cfg,
        foreground_sampling="class",
        ema_decay=0.5,
        threads=1,
        datasets=[
            first_cfg.datasets[0],
            dataclasses.replace(first_cfg.datasets[1], weight=2.0),
            *first_cfg.datasets[2:],
        ],
    )
    train_run(given, base_dir=source, command=["test"])
    args = ["continue", str(source), str(folder), "--epochs", "2", "--lr", "2e-4", "--seed", "9"]
    assert bench.main([*args, "--warmup", "0", "--val-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    carried = printed.split("carried over from its model card: ")[1].split("\n")[0].split(", ")
    assert sorted(carried) == ["datasets.1.weight = 2.0", "ema_decay = 0.5", 'foreground_sampling = "class"']
    assert "give again" not in printed
    assert sorted(p.name for p in folder.glob("*.toml")) == ["m4oe-onehead.toml"], "only trained runs"

    cfg, _ = load_config(folder / "m4oe-onehead.toml")
    trained = (source / "runs" / "m4oe-onehead" / "model").resolve()
    assert Path(cfg.init).resolve() == trained and cfg.model_overrides == {}
    assert [Path(d.path).resolve() for d in cfg.datasets] == [
        Path(d.path).resolve() for d in first_cfg.datasets
    ]
    assert [(d.expert, d.task, d.val_cases) for d in cfg.datasets] == [
        (d.expert, d.task, d.val_cases) for d in first_cfg.datasets
    ]
    assert [(s.kind, s.epochs, s.lr, s.warmup_iterations) for s in cfg.stages] == [("joint", 2, 2e-4, 0)]
    assert (cfg.seed, cfg.val_every, cfg.batch_size) == (9, 1, first_cfg.batch_size)
    assert (cfg.foreground_sampling, cfg.ema_decay) == ("class", 0.5)  # the source run's --set
    assert cfg.threads == first_cfg.threads  # how it was launched: not carried
    assert [d.weight for d in cfg.datasets] == [2.0 if i == 1 else 1.0 for i in range(len(cfg.datasets))]
    assert (
        Path(cfg.output_dir.format(name=cfg.name)).resolve() == (folder / "runs" / "m4oe-onehead").resolve()
    )

    out = train_run(cfg, base_dir=folder, command=["test"])
    card = read_model_card(out / "model")
    assert card.provenance["init_weights_sha256"] == read_model_card(trained).weights_sha256
    assert bench.trained_rows(folder) == [("m4oe-onehead", "m4oe-onehead", False)]

    for bad in ([str(tmp_path / "empty"), str(tmp_path / "x")], [str(source), str(source)]):
        with pytest.raises(SystemExit):
            bench.main(["continue", *bad])
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="lr"):
        bench.continue_runs(source, tmp_path / "y", bench.MODELS, 2, 0.0, 0, 1, 1)
    assert not (tmp_path / "y").exists()
