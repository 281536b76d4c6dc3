"""``m4oe train``: registered into the ``m4oe`` command through the ``m4oe.commands`` entry point,
so the engine never imports the training package."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .families import FAMILIES, IMAGE_FAMILIES


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train or fine-tune a model from a TOML config")
    train.add_argument("config", type=Path, help="the run's TOML config (see training/configs/)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set batch_size=8 --set stages.0.epochs=2",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the run folder's last saved state"
    )
    train.add_argument(
        "--stop-after-epochs", type=int, default=None, help="end after this many epochs (a budget)"
    )
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from m4oe.checkpoint import CARD_NAME, WEIGHTS_NAME

    from .config import load_config
    from .train import run

    cfg, _ = load_config(args.config, args.overrides)
    out = run(
        cfg,
        base_dir=Path.cwd(),
        resume=args.resume,
        stop_after_epochs=args.stop_after_epochs,
        command=["m4oe", *sys.argv[1:]],
    )
    model = out / "model"
    if (model / CARD_NAME).is_file() and (model / WEIGHTS_NAME).is_file():
        print(f"run folder: {out}; exported model: {model}")
    else:  # e.g. --stop-after-epochs before the first export
        print(f"run folder: {out}; no model exported yet (--resume continues the run)")
    return 0


def _share(text: str) -> float:
    """A command-line share: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share from 0 to 1, got {text!r}")
    return value


def _positive(text: str) -> int:
    """A command-line count: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def register_synth(subparsers) -> None:
    synth = subparsers.add_parser(
        "synth", help="render training slices from a dataset's label maps (domain randomisation) to look at"
    )
    synth.add_argument(
        "dataset", type=Path, help="an nnU-Net dataset folder (dataset.json, imagesTr, labelsTr)"
    )
    synth.add_argument("out", type=Path, help="folder for examples.png, images.nii.gz and labels.nii.gz")
    synth.add_argument(
        "--family",
        required=True,
        choices=(*FAMILIES, *IMAGE_FAMILIES),
        help="contrast family; ct-phase: a contrast phase simulated on the dataset's own CT slices; "
        "ct-to-mr: its CT slices made MR-like by a random intensity network; mr-to-mr: its MR slices "
        "given another, random contrast by such a network",
    )
    synth.add_argument("--count", type=_positive, default=16, help="slices to render (default 16)")
    synth.add_argument(
        "--seed", type=int, default=0, help="random seed (the same seed renders the same slices)"
    )
    synth.add_argument(
        "--model", default=None, help="model whose preprocessing (grid, CT window) to use (default: embedded)"
    )
    synth.add_argument(
        "--fat-layer",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of renders (0-1) whose subcutaneous fat layer is grown or thinned, as the config "
        "key synth_fat_layer draws it (default 0)",
    )
    synth.add_argument(
        "--organ-interior",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of renders (0-1) whose kidneys and stomach show an interior (sinus fat, urine, "
        "gas, fluid, food), as the config key synth_organ_interior draws it (default 0)",
    )
    synth.add_argument(
        "--opposed-phase",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of ct-to-mr images (0-1) drawn as opposed-phase T1, fat and tissue cancelling at "
        "their borders, as the config key synth_opposed_phase draws it (default 0)",
    )
    synth.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    synth.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from m4oe.checkpoint import read_model_card
    from m4oe.hub import resolve_model

    from .examples import write_examples
    from .synth import SynthSettings

    card = read_model_card(resolve_model(args.model))
    paths = write_examples(
        args.dataset,
        args.out,
        args.family,
        args.count,
        args.seed,
        card,
        overwrite=args.overwrite,
        settings=SynthSettings(
            p_fat_layer=args.fat_layer,
            p_organ_interior=args.organ_interior,
            p_ct_opposed_phase=args.opposed_phase,
        ),
    )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


# merge.STATEMENTS, named here so that building the parser imports no torch (a test keeps them equal).
MERGE_STATEMENTS = ("description", "notes", "license", "intended_use", "training_data")


def register_merge(subparsers) -> None:
    merge = subparsers.add_parser(
        "merge-experts",
        help='one model from experts trained in separate runs (trainable = "experts") on one base model',
    )
    merge.add_argument("base", help="the model the runs started from (name, folder or file)")
    merge.add_argument("out", type=Path, help="folder for the merged model.json and model.safetensors")
    merge.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="NAME=MODEL",
        type=_expert_source,
        help="take expert NAME (e.g. ct, mr-t1) from MODEL, a run's exported model; repeat per expert",
    )
    merge.add_argument("--name", default=None, help="the merged model's name (default: the base's)")
    merge.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="stored weight type (default float16)",
    )
    merge.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    for statement in MERGE_STATEMENTS:
        merge.add_argument(
            f"--{statement.replace('_', '-')}",
            dest=statement,
            default=None,
            metavar="TEXT",
            help=f"the merged card's {statement.replace('_', ' ')} (default: the base's; required "
            "where a source's card says otherwise)",
        )
    merge.set_defaults(handler=run_merge)


def _expert_source(text: str) -> tuple[str, str]:
    """``NAME=MODEL`` of ``--expert``."""
    name, sep, model = text.partition("=")
    if not sep or not name or not model:
        raise argparse.ArgumentTypeError(f"must be NAME=MODEL, got {text!r}")
    return name, model


def run_merge(args: argparse.Namespace) -> int:
    import torch

    from m4oe.hub import resolve_model

    from .config import ConfigError
    from .merge import merge_experts

    sources = dict(args.expert)
    if len(sources) < len(args.expert):
        raise ConfigError("--expert names an expert twice")
    out = merge_experts(
        resolve_model(args.base),
        {name: resolve_model(model) for name, model in sources.items()},
        args.out,
        name=args.name,
        dtype=getattr(torch, args.dtype),
        overwrite=args.overwrite,
        facts={key: getattr(args, key) for key in MERGE_STATEMENTS if getattr(args, key) is not None},
        command=["m4oe", *sys.argv[1:]],
    )
    print(f"wrote {out / 'model.json'} and {out / 'model.safetensors'}")
    return 0
