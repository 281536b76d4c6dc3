"""The ``m4oe`` command line: segment, info, evaluate, models.

One argparse builder; every user error ends in one line on stderr and a non-zero exit code
(2 bad input or bad argument, 3 output not writable or already there, 4 model missing, corrupt or
not matching its checksum, 130 cancelled or interrupted, 143 terminated by SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path

from . import __version__
from .batch import add_batch_parser
from .errors import InputError, M4oEError, OutputError
from .phantom import add_phantom_parser, run_phantom

SEGMENTATION_SUFFIX = ".seg.nrrd"
DICOM_SEG_SUFFIX = ".dcm"  # a DICOM Segmentation object, written by m4oe.dicom_seg
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
REPORT_SUFFIX = ".png"  # what m4oe.report.write_report writes
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
    ev.add_argument("--label-map", default=None, help='JSON {"pred value": ref value} when numbering differs')
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


def add_region_arguments(parser: argparse.ArgumentParser) -> None:
    """--structures, --roi-mm / --roi-ijk and --body-crop of ``m4oe segment``."""
    from .region import parse_bounds

    def bounds(integer: bool):
        def parse(text: str):
            try:
                return parse_bounds(text, integer)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None

        return parse

    parser.add_argument(
        "--structures",
        metavar="NAMES",
        default=None,
        help="segment only these structures of the task, comma-separated (e.g. liver,spleen,kidney_right; "
        "display names also work, any case); default: all",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--roi-mm",
        metavar="X0,Y0,Z0,X1,Y1,Z1",
        type=bounds(False),
        default=None,
        help="segment only this box, in mm in the LPS frame (x towards the patient's left, y posterior, "
        "z superior; Slicer's RAS negates x and y): the voxels whose centres lie inside it; write "
        "--roi-mm=-50,... when the first number is negative",
    )
    where.add_argument(
        "--roi-ijk",
        metavar="I0,J0,K0,I1,J1,K1",
        type=bounds(True),
        default=None,
        help="segment only these voxels: indices i, j, k of the input (as Slicer's IJK), start "
        "inclusive, stop exclusive (0,0,0,10,10,5 is 10x10x5 voxels)",
    )
    parser.add_argument(
        "--body-crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="segment only the box around the patient's body (CT above -500 HU, MR above the Otsu "
        "threshold, 10 mm margin), so the air around it costs nothing (default: on)",
    )


def add_max_voxels_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-voxels",
        type=int,
        metavar="N",
        default=None,
        help="refuse input volumes of more voxels, from their header before reading them (default: "
        "$M4OE_MAX_VOXELS, else 2^30 = 1,073,741,824, a 512x512x4096 CT)",
    )


class ProgressPrinter:
    """Turns progress events into a terminal bar (stderr) or JSON lines (stdout).

    ``sink``: where JSON records go instead of stdout (``m4oe serve`` tags them with the request id).
    """

    def __init__(self, mode: str, sink=None):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "none"
        self.mode = mode
        self.sink = sink

    def __call__(self, event) -> None:
        if self.mode == "json":
            self.emit(event.to_dict())
        elif self.mode == "bar":
            width = 30
            filled = int(width * event.fraction)
            eta = "" if event.eta_s is None else f" ~{event.eta_s:.0f}s left"
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(
                f"\r{event.stage:<12} [{bar}] {event.fraction:5.0%} {event.elapsed_s:6.1f}s{eta}   "
            )
            if event.fraction >= 1.0 and event.stage != "inference":
                sys.stderr.write("\n")
            sys.stderr.flush()

    def emit(self, record: dict) -> None:
        if self.mode == "json" and self.sink is not None:
            self.sink(record)
        elif self.mode == "json":
            print(json.dumps(record), flush=True)


def _segment_outputs(args) -> dict[str, Path]:
    """Every file the segment command will write, checked before any work is done."""
    output = Path(args.output)
    name = output.name.lower()
    suffixes = (SEGMENTATION_SUFFIX, DICOM_SEG_SUFFIX, *LABELMAP_SUFFIXES)
    if not name.endswith(suffixes):
        raise OutputError(
            f"unsupported output format; use {SEGMENTATION_SUFFIX}, {DICOM_SEG_SUFFIX} (DICOM SEG) or one "
            f"of {', '.join(LABELMAP_SUFFIXES)}",
            output,
        )
    outputs = {"segmentation": output}
    if args.probabilities:
        stem = output.name[: -len(next(s for s in suffixes if name.endswith(s)))]
        outputs["probabilities"] = output.with_name(f"{stem}_probabilities.nrrd")
    if args.dicom_seg:
        outputs["dicom_seg"] = Path(args.dicom_seg)
        if not outputs["dicom_seg"].name.lower().endswith(DICOM_SEG_SUFFIX):
            raise OutputError(f"a DICOM SEG must be written as {DICOM_SEG_SUFFIX}", outputs["dicom_seg"])
    if args.gates:
        gates = Path(args.gates)
        outputs["gate_map"] = gates / "gate_map.nrrd"
        outputs["dominant_expert"] = gates / "dominant_expert.nrrd"
        outputs["gate_summary"] = gates / "gate_summary.json"
    if args.report:
        outputs["report"] = Path(args.report)
        if outputs["report"].suffix.lower() != REPORT_SUFFIX:
            raise OutputError(f"a report must be written as {REPORT_SUFFIX}", outputs["report"])
    _check_distinct(outputs)
    for path in outputs.values():
        if path.is_dir():
            raise OutputError("is a folder; expected a file name", path)
        if path.exists() and not args.overwrite:
            raise OutputError("exists; pass --overwrite to replace it", path)
        folder = path.parent
        if args.gates and folder == Path(args.gates):
            # The gates folder is created on write, so its nearest existing ancestor must be a
            # writable folder (not a file), or the gate maps would fail after the label map is written.
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
        if not folder.is_dir():
            raise OutputError("is not a folder" if folder.exists() else "folder does not exist", folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError("folder is not writable", folder)
    return outputs


def _check_distinct(outputs: dict[str, Path]) -> None:
    """Refuse two outputs with the same file (one would silently replace the other), or an output
    file that another output's folder would have to be (``-o DIR/gate_map.nrrd --gates DIR``,
    ``-o OUT --gates OUT``). Paths are compared after resolving symbolic links."""
    resolved = {kind: path.resolve() for kind, path in outputs.items()}
    for kind, other in itertools.permutations(resolved, 2):
        path, names = outputs[kind], (kind.replace("_", " "), other.replace("_", " "))
        if resolved[kind] == resolved[other]:
            raise OutputError("would be written twice, as the {} and as the {}".format(*names), path)
        if resolved[kind] in resolved[other].parents:
            raise OutputError("is the {} output and also a folder of the {} output".format(*names), path)


def load_predictor(args):
    """The :class:`~m4oe.predictor.Predictor` the ``segment`` arguments ask for, freshly loaded."""
    from .predictor import Predictor

    return Predictor.from_pretrained(
        args.model,
        sha256=args.sha256,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        batch_size=args.batch_size,
        backend=args.backend,
    )


def cmd_segment(args) -> int:
    return run_segment(args, ProgressPrinter(args.progress))


def run_segment(args, printer: ProgressPrinter, *, predictors=None, cancel=None) -> int:
    """``m4oe segment`` with parsed ``args``, reporting through ``printer``; returns the exit code 0.

    ``predictors(args) -> (predictor, reused)``: where the model comes from (default: loaded for
    this run; ``m4oe serve`` passes its cache, see :mod:`m4oe.serve`). ``cancel() -> bool``:
    checked between slice batches and before the outputs are written; True raises
    :class:`~m4oe.errors.CancelledError` and nothing is written. Errors are raised, as ``main``
    reports them.
    """
    import numpy as np
    import SimpleITK as sitk

    from . import dicom_seg
    from .errors import CancelledError
    from .io import all_or_nothing, read_image, write_atomic, write_image, write_segmentation
    from .region import box_from_ijk, box_from_lps_mm

    outputs = _segment_outputs(args)
    dicom_segs = [k for k, path in outputs.items() if path.name.lower().endswith(DICOM_SEG_SUFFIX)]
    t0 = time.perf_counter()
    # Before the model: a bad input is refused at once.
    if dicom_segs:
        dicom_seg.check_dicom_input(args.input)
    loaded = read_image(args.input, max_voxels=args.max_voxels)
    source = dicom_seg.read_source_series(loaded) if dicom_segs else None
    roi = None
    if args.roi_mm is not None:
        roi = box_from_lps_mm(args.roi_mm, loaded.image, loaded.path)
    elif args.roi_ijk is not None:
        roi = box_from_ijk(args.roi_ijk, loaded.image, loaded.path)
    structures = None if args.structures is None else [n for n in args.structures.split(",") if n.strip()]
    predictor, reused = (load_predictor(args), False) if predictors is None else predictors(args)
    load_s = time.perf_counter() - t0
    load_record = {"stage": "load", "fraction": 1.0, "elapsed_s": round(load_s, 3), "eta_s": None}
    printer.emit(dict(load_record, model_reused=True) if reused else load_record)
    prediction = predictor.predict(
        loaded.image,
        modality=args.modality,
        dicom_modality=loaded.dicom_modality,
        task=args.task,
        force_expert=args.force_expert,
        probabilities=args.probabilities,
        gates=bool(args.gates),
        gate_layer=args.gate_layer,
        cleanup=not args.no_cleanup,
        through_plane_sigma_mm=args.through_plane_sigma,
        test_time_passes=args.tta,
        structures=structures,
        roi=roi,
        body_crop=args.body_crop,
        progress=printer,
        cancel=cancel,
        source=loaded.path,
    )
    if cancel is not None and cancel():
        raise CancelledError("cancelled by the user", loaded.path)
    written = {}
    gate_folder = outputs["gate_map"].parent if args.gates else None
    made_gate_folder = gate_folder is not None and not gate_folder.exists()
    try:
        with all_or_nothing():  # every output, or none (an error in a later one removes the rest)
            out = outputs["segmentation"]
            if out.name.lower().endswith(SEGMENTATION_SUFFIX):
                written["segmentation"] = write_segmentation(
                    prediction.labelmap, prediction.labels, out, overwrite=args.overwrite
                )
            elif "segmentation" not in dicom_segs:
                written["segmentation"] = write_image(prediction.labelmap, out, overwrite=args.overwrite)
            for kind in dicom_segs:
                written[kind] = dicom_seg.write_dicom_seg(
                    prediction.labelmap,
                    prediction.labels,
                    source,
                    outputs[kind],
                    model=predictor.card.name,
                    task=prediction.task,
                    model_sha256=predictor.card.weights_sha256,
                    overwrite=args.overwrite,
                )
            if prediction.probabilities is not None:
                written["probabilities"] = write_image(
                    prediction.probabilities, outputs["probabilities"], overwrite=args.overwrite
                )
            if args.gates:
                gate_folder.mkdir(parents=True, exist_ok=True)
                gate_map = prediction.gate_map
                written["gate_map"] = write_image(gate_map, outputs["gate_map"], overwrite=args.overwrite)
                weights = sitk.GetArrayViewFromImage(gate_map)
                dominant = sitk.GetImageFromArray((np.argmax(weights, axis=-1) + 1).astype(np.uint8))
                dominant.CopyInformation(gate_map)
                written["dominant_expert"] = write_image(
                    dominant, outputs["dominant_expert"], overwrite=args.overwrite
                )
                summary = dict(prediction.gate_summary)
                summary["dominant_expert_values"] = {
                    e["name"]: i + 1 for i, e in enumerate(summary["experts"])
                }
                summary["source"] = str(loaded.path)

                def dump(tmp: Path) -> None:
                    tmp.write_text(json.dumps(summary, indent=1) + "\n")

                written["gate_summary"] = write_atomic(
                    outputs["gate_summary"], dump, overwrite=args.overwrite
                )
            if args.report:
                from .report import write_report

                written["report"] = write_report(
                    loaded.image, prediction, outputs["report"], overwrite=args.overwrite
                )
    except BaseException:
        if made_gate_folder:
            shutil.rmtree(gate_folder, ignore_errors=True)
        raise
    seconds = dict(prediction.seconds, load=round(load_s, 3), total=round(time.perf_counter() - t0, 3))
    # A DICOM SEG has no empty segments (a label map and .seg.nrrd keep every label): say which are left out.
    found_labels = dicom_seg.present_labels(prediction.labelmap, prediction.labels) if dicom_segs else []
    left_out = [label.name for label in prediction.labels if dicom_segs and label not in found_labels]
    found = prediction.modality
    if printer.mode == "json":
        printer.emit(
            {
                "stage": "done",
                "fraction": 1.0,
                "elapsed_s": seconds["total"],
                "eta_s": 0.0,
                "modality": found.modality,
                "modality_source": found.source,
                "modality_evidence": found.evidence,
                "task": prediction.task,
                "outputs": {k: str(v) for k, v in written.items()},
                "warning": prediction.warning,
                "warnings": prediction.warnings,
                "scan_check": None if prediction.scan_check is None else prediction.scan_check.to_dict(),
                "dicom_seg_left_out": left_out,
                "seconds": seconds,
                "backend": prediction.backend,
                "through_plane_sigma_mm": prediction.through_plane_sigma_mm,
                "test_time_passes": prediction.test_time_passes,
                "largest_component": [
                    label.name for label in prediction.labels if label.value in prediction.largest_component
                ],
                "structures": [label.name for label in prediction.labels],
                "region": dict(prediction.region.to_dict(), body_crop=args.body_crop, roi=roi is not None),
            }
        )
    else:
        size = "x".join(str(s) for s in prediction.labelmap.GetSize())
        spacing = "x".join(f"{s:.3g}" for s in prediction.labelmap.GetSpacing())
        print(f"modality: {found.modality} ({found.source}: {found.evidence})")
        print(f"task: {prediction.task}; output grid {size} voxels of {spacing} mm, same as the input")
        print("structures: " + ", ".join(label.name for label in prediction.labels))
        box = prediction.region
        if box.size != prediction.labelmap.GetSize():
            print(
                f"segmented voxels {list(box.start)} to {list(box.stop)} (i, j, k; stop exclusive), 0 outside"
            )
        for kind, path in written.items():
            print(f"wrote {kind}: {path}")
        if left_out:
            print(f"DICOM SEG: no segment for {', '.join(left_out)} (none found in the image)")
        for warning in prediction.warnings.values():
            print(f"WARNING: {warning}", file=sys.stderr)
        print(
            f"done in {seconds['total']:.1f} s (model and image load {seconds['load']:.1f} s; "
            f"network on {'ONNX Runtime' if prediction.backend == 'onnx' else 'PyTorch'})"
        )
    return 0


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
    from .evaluate import evaluate, format_table, load_label_map, segment_names
    from .io import read_image

    label_map = load_label_map(args.label_map) if args.label_map else None
    # Names keyed by reference value: the prediction's (a model's card or its segments) go through
    # the label map when there is one.
    if args.model is not None:
        from .checkpoint import read_model_card
        from .hub import resolve_model

        card = read_model_card(resolve_model(args.model))
        pred_names = {label.value: label.name for label in card.task(args.task).labels}
    else:
        pred_names = segment_names(args.prediction)
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
        labels = sorted({(label_map or {}).get(value, value) for value in pred_names} - {0})
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
