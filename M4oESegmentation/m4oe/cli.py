"""The ``m4oe`` command line: segment, info, evaluate, models.

One argparse builder; every user error ends in one line on stderr and a non-zero exit code
(2 bad input or bad argument, 3 output not writable or already there, 4 model missing, corrupt or
not matching its checksum, 130 cancelled or interrupted, 143 terminated by SIGTERM).
The segment command's run and its output checks are in :mod:`m4oe.segment_command`; the names
other code imports from here (``run_segment``, ``ProgressPrinter``, ``load_predictor``) still work.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict
from importlib.metadata import entry_points

from . import __version__
from .batch import add_batch_parser
from .errors import InputError, M4oEError
from .phantom import add_phantom_parser, run_phantom
from .segment_command import DICOM_SEG_SUFFIX as DICOM_SEG_SUFFIX
from .segment_command import LABELMAP_SUFFIXES as LABELMAP_SUFFIXES
from .segment_command import REPORT_SUFFIX as REPORT_SUFFIX
from .segment_command import SEGMENTATION_SUFFIX as SEGMENTATION_SUFFIX
from .segment_command import ProgressPrinter, add_region_arguments, run_segment
from .segment_command import _check_distinct as _check_distinct
from .segment_command import _segment_outputs as _segment_outputs
from .segment_command import load_predictor as load_predictor

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds (and cleans up) exactly as Ctrl-C does."""


class UsageError(SystemExit):
    """A command-line usage error: exit code 2, as argparse, with the message kept for ``main``."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` instead of printing and exiting, so
    ``main`` can also report it as a JSON line when ``--progress json`` was asked for."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="m4oe",
        description="M4oE abdominal organ segmentation for CT and MRI (mixture of modality experts).",
    )
    parser.add_argument("--version", action="version", version=f"m4oe {__version__}")
    parser.add_argument("--debug", action="store_true", help="print full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = sub.add_parser("segment", help="segment a CT or MRI volume")
    seg.add_argument("input", help="NIfTI, NRRD or MHA file, or a DICOM series folder")
    seg.add_argument(
        "-o",
        "--output",
        required=True,
        help="label map (.nii.gz, .nii, .nrrd, .mha), Slicer segmentation (.seg.nrrd) or DICOM SEG (.dcm, "
        "for a DICOM series input)",
    )
    seg.add_argument("--modality", default="auto", choices=("auto", "ct", "mr"), help="default: detect")
    seg.add_argument("--model", default=None, help="model name or path (default: the embedded model)")
    seg.add_argument("--sha256", default=None, help="expected SHA-256 of the model weights")
    seg.add_argument("--task", default=None, help="label set of the model (default: its first task)")
    seg.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    seg.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    seg.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: one per core that other processes leave idle, measured at start, "
        "at most PyTorch's own choice: one per core, or OMP_NUM_THREADS)",
    )
    seg.add_argument("--batch-size", type=int, default=None, help="slices per forward pass")
    seg.add_argument(
        "--backend",
        default="torch",
        choices=("auto", "torch", "onnx"),
        help="network runtime: torch (default); onnx = ONNX Runtime (CPU, float32, not top-k; exports "
        "the network on first use, tens of seconds, then cached); auto = ONNX Runtime once a graph "
        "is cached, else PyTorch",
    )
    seg.add_argument(
        "--dicom-seg", metavar="FILE.dcm", default=None, help="also write the result as a DICOM SEG"
    )
    seg.add_argument("--gates", metavar="DIR", default=None, help="write gate maps and the gate summary here")
    seg.add_argument(
        "--gate-layer", default=None, help="map one MoE layer (e.g. encoder.0.1) instead of the mean"
    )
    seg.add_argument(
        "--probabilities",
        nargs="?",
        const="uint8",
        choices=("uint8", "float16"),
        default=None,
        help="also write per-class probabilities next to the output (uint8 0-255 by default)",
    )
    seg.add_argument("--force-expert", default=None, help="route every token to this expert (index or name)")
    seg.add_argument("--no-cleanup", action="store_true", help="keep every connected component")
    seg.add_argument(
        "--through-plane-sigma",
        type=float,
        metavar="MM",
        default=None,
        help="average class probabilities over neighbouring slices with a Gaussian of this sigma in mm "
        "before the argmax (0: off; default: the model card's value)",
    )
    seg.add_argument(
        "--tta",
        type=int,
        metavar="N",
        default=None,
        help="test-time augmentation: forward passes averaged per slice, 1-5: as they are, then "
        "shifted by half a patch (2, 3), then zoomed by 0.9 and 1.1 (4, 5); N times the inference "
        "time; 1: one pass; default: the model card's value",
    )
    seg.add_argument(
        "--report", metavar="FILE.png", default=None, help="write a one-page picture of the result"
    )
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_region_arguments(seg)
    add_max_voxels_argument(seg)
    seg.add_argument(
        "--progress",
        choices=("auto", "bar", "json", "none"),
        default="auto",
        help="bar on a terminal; json prints one JSON object per line on stdout for a program to read",
    )

    info = sub.add_parser(
        "info", help="what a model is: licence, intended use, training data, validation figures"
    )
    info.add_argument(
        "model", nargs="?", default=None, help="model name or path (default: the embedded model)"
    )
    info.add_argument("--json", action="store_true", help="print the full model card as JSON")

    ev = sub.add_parser("evaluate", help="Dice and HD95 (mm) of a label map against a reference")
    ev.add_argument("prediction")
    ev.add_argument("reference")
    ev.add_argument(
        "--label-map",
        default=None,
        help='JSON {"pred value": ref value} when numbering differs (with --model, a reference in '
        "an nnU-Net data set's labelsTr/ or labelsTs/ is matched by name through its dataset.json)",
    )
    ev.add_argument("--labels", default=None, help="comma-separated prediction label values to score")
    ev.add_argument(
        "--model",
        default=None,
        help="name the labels from this model's card (default: the segment names of a .seg.nrrd "
        "reference or prediction)",
    )
    ev.add_argument("--task", default=None, help="the model's task whose labels name the values")
    ev.add_argument(
        "--protocol",
        choices=("native", "released"),
        default="native",
        help="native: this grid, HD95 in mm (default); released: also the released M4oE code's test "
        "protocol (its Dice conventions, HD95 in voxels of its test grid), beside the native scores",
    )
    ev.add_argument(
        "--test-spacing",
        nargs=3,
        type=float,
        default=None,
        metavar=("X", "Y", "Z"),
        help="released protocol: the test grid's spacing in mm (nnU-Net v1's target spacing of the "
        "dataset; default: the prediction's grid)",
    )
    ev.add_argument("--json", action="store_true")
    add_max_voxels_argument(ev)

    models = sub.add_parser("models", help="list, download and delete models")
    group = models.add_mutually_exclusive_group()
    group.add_argument("--download", metavar="NAME", default=None, help="download a registered model")
    group.add_argument("--delete", metavar="NAME", default=None, help="delete a downloaded model")
    models.add_argument("--force", action="store_true", help="download again even if cached")
    models.add_argument("--json", action="store_true")
    add_phantom_parser(sub)
    from .serve import add_serve_parser  # here: m4oe.serve imports this module

    add_serve_parser(sub)
    add_batch_parser(sub)
    for entry in entry_points(group="m4oe.commands"):
        entry.load()(sub)
    return parser


def add_max_voxels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-voxels",
        type=int,
        metavar="N",
        default=None,
        help="refuse input volumes of more voxels, from their header before reading them (default: "
        "$M4OE_MAX_VOXELS, else 2^30 = 1,073,741,824, a 512x512x4096 CT)",
    )


def cmd_segment(args) -> int:
    return run_segment(args, ProgressPrinter(args.progress))


def cmd_info(args) -> int:
    from .card_summary import info_page
    from .checkpoint import WEIGHTS_NAME, read_model_card
    from .hub import resolve_model

    path = resolve_model(args.model)
    card = read_model_card(path)
    if args.json:
        print(json.dumps(card.to_dict(), indent=1))
        return 0
    weights = path / WEIGHTS_NAME if path.is_dir() else path.with_suffix(".safetensors")
    print(info_page(card.to_dict(), weights))
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import dataset_label_map, evaluate, format_table, load_label_map, segment_names
    from .io import read_image

    label_map = load_label_map(args.label_map) if args.label_map else None
    # Names keyed by reference value: the prediction's (a model's card or its segments) go through
    # the label map when there is one.
    if args.model is not None:
        from .checkpoint import read_model_card
        from .hub import resolve_model

        card = read_model_card(resolve_model(args.model))
        task_labels = card.task(args.task).labels
        pred_names = {label.value: label.name for label in task_labels}
    else:
        pred_names = segment_names(args.prediction)
    if label_map is None and args.model is not None:
        # A reference in an nnU-Net data set is read in its own numbering, matched by name.
        matched = dataset_label_map(args.reference, task_labels)
        if matched is not None:
            label_map, manifest = matched
            print(f"label values matched by name with {manifest}", file=sys.stderr)
    names = {(label_map or {}).get(value, value): name for value, name in pred_names.items()}
    if args.model is None:
        names.update(segment_names(args.reference))
    labels = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise InputError(f"--labels must be comma-separated integers, got {args.labels!r}") from None
    if args.test_spacing is not None and args.protocol != "released":
        raise InputError("--test-spacing applies to --protocol released only")
    if args.protocol == "released" and labels is None and args.model is not None:
        # The released means count every class of the task, those absent from both images too.
        mapped = {label_map[v] for v in pred_names if v in label_map} if label_map else set(pred_names)
        labels = sorted(mapped - {0})
    pred = read_image(args.prediction, max_voxels=args.max_voxels)
    ref = read_image(args.reference, max_voxels=args.max_voxels)
    result = evaluate(
        pred.image,
        ref.image,
        labels=labels,
        label_map=label_map,
        pred_path=pred.path,
        ref_path=ref.path,
        names=names,
        protocol=args.protocol,
        test_spacing_mm=args.test_spacing,
    )
    print(json.dumps(result, indent=1) if args.json else format_table(result))
    return 0


def cmd_models(args) -> int:
    from .hub import delete_model, download_model, list_models

    if args.download:
        path = download_model(args.download, force=args.force)
        print(f"downloaded {args.download} to {path}")
        return 0
    if args.delete:
        path = delete_model(args.delete)
        print(f"deleted {args.delete} from {path}")
        return 0
    entries = list_models()
    if args.json:
        rows = [dict(asdict(e), path=None if e.path is None else str(e.path)) for e in entries]
        print(json.dumps(rows, indent=1))
        return 0
    if not entries:
        print("no models found")
    for e in entries:
        state = "ready" if e.downloaded else "not downloaded"
        print(f"{e.name:<24} {e.source:<10} {state:<15} {e.description}")
    return 0


COMMANDS = {
    "segment": cmd_segment,
    "info": cmd_info,
    "evaluate": cmd_evaluate,
    "models": cmd_models,
    "phantom": run_phantom,
}


def main(argv: list[str] | None = None) -> int:
    # Before torch is imported (the sub-commands import it; OpenMP reads it once, when torch loads):
    # threads waiting at a barrier sleep instead of spinning on a core another process needs. On 2
    # cores, one kept busy, --threads 2: inference 35 -> 15 s (top-1, 40 slices); 1 thread: same.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(error.message, file=sys.stderr)
        if _wants_json(argv):  # a caller reading JSON lines (the Slicer module) gets the error too
            print(json.dumps({"stage": "error", "message": error.message, "exit_code": 2}), flush=True)
        raise
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    json_mode = getattr(args, "progress", None) == "json"
    with _sigterm_as_interrupt():
        try:
            handler = COMMANDS.get(args.command) or args.handler
            return handler(args)
        except M4oEError as error:
            return _fail(str(error), error.exit_code, json_mode, args.debug)
        except Terminated:
            return _fail("terminated (SIGTERM)", TERMINATED_EXIT_CODE, json_mode, args.debug)
        except KeyboardInterrupt:
            return _fail("interrupted", 130, json_mode, args.debug)
        except Exception as error:  # the last resort keeps the one-line contract
            return _fail(f"internal error: {type(error).__name__}: {error}", 1, json_mode, args.debug)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    KeyboardInterrupt; the previous handler is restored afterwards.

    Without this a SIGTERM ends the process at once: no error line, and a temporary output file
    left behind when it comes during a write. A second SIGTERM while the first unwinds is ignored,
    so that the clean-up is not cut short (SIGKILL still ends the process; the next write into
    the folder removes what it leaves, see :func:`m4oe.io.sweep_temporaries`). Outside the main
    thread, where Python cannot install signal handlers, nothing changes.
    """

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _wants_json(argv: list[str]) -> bool:
    """Whether ``--progress json`` (or ``--progress=json``) is among the arguments."""
    return "--progress=json" in argv or any(
        a == "--progress" and b == "json" for a, b in itertools.pairwise(argv)
    )


def _fail(message: str, code: int, json_mode: bool, debug: bool) -> int:
    if debug:
        logging.exception(message)
    message = " ".join(message.split())
    if json_mode:
        print(json.dumps({"stage": "error", "message": message, "exit_code": code}), flush=True)
    print(f"m4oe: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
