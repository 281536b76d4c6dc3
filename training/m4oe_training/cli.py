"""``m4oe train``: registered into the ``m4oe`` command through the ``m4oe.commands`` entry point,
so the engine never imports the training package."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
