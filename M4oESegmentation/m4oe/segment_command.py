"""The ``m4oe segment`` command: its outputs checked up front, the run, and its progress display.

:func:`run_segment` reads the input, runs a :class:`~m4oe.predictor.Predictor` and writes every
output (label map, ``.seg.nrrd``, DICOM SEG, probabilities, gate maps and summary, report) or none;
``m4oe serve`` calls it for each request. The argument parser stays in :mod:`m4oe.cli`, which
re-exports the names here. PyTorch, NumPy and SimpleITK are imported inside the functions, so
that building the parser stays fast.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .errors import InputError, OutputError

SEGMENTATION_SUFFIX = ".seg.nrrd"
DICOM_SEG_SUFFIX = ".dcm"  # a DICOM Segmentation object, written by m4oe.dicom_seg
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
REPORT_SUFFIX = ".png"  # what m4oe.report.write_report writes


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
        "threshold, 10 mm margin), so the air around it costs nothing, and show the model that box, "
        "centred, when the whole field of view is too wide for its input (default: on)",
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


def write_gate_files(prediction, outputs: dict[str, Path], source, overwrite: bool) -> dict[str, Path]:
    """The gate map, the dominant expert (1..E, uint8) and the gate summary of ``m4oe segment
    --gates``, to ``outputs["gate_map"]``, ``["dominant_expert"]`` and ``["gate_summary"]``;
    returns the paths written by kind. ``source``: the input file, named in the summary.

    A MoME model's router weights at each decoder scale (``prediction.scale_gate_maps``) go beside
    the gate map, named after it: ``{gate map name}_{layer}.nrrd`` (kind ``gate_map_{layer}``;
    ``gate_map_router.0.nrrd`` for the deepest scale of ``m4oe segment``,
    ``<case_id>_gate_map_router.0.nrrd`` in ``m4oe batch``), each an E-component map on its own
    token grid placed like the gate map; the summary names them in ``scale_gate_maps``
    {layer: file name}."""
    import numpy as np
    import SimpleITK as sitk

    from .io import write_atomic, write_image

    gate_map = prediction.gate_map
    written = {"gate_map": write_image(gate_map, outputs["gate_map"], overwrite=overwrite)}
    weights = sitk.GetArrayViewFromImage(gate_map)  # (z, y, x, E)
    dominant = sitk.GetImageFromArray((np.argmax(weights, axis=-1) + 1).astype(np.uint8))
    dominant.CopyInformation(gate_map)
    written["dominant_expert"] = write_image(dominant, outputs["dominant_expert"], overwrite=overwrite)
    summary = dict(prediction.gate_summary)
    if prediction.scale_gate_maps:
        stem = outputs["gate_map"].name.removesuffix(".nrrd")
        summary["scale_gate_maps"] = {}
        for layer, image in prediction.scale_gate_maps.items():
            path = outputs["gate_map"].with_name(f"{stem}_{layer}.nrrd")
            written[f"gate_map_{layer}"] = write_image(image, path, overwrite=overwrite)
            summary["scale_gate_maps"][layer] = path.name
    summary["dominant_expert_values"] = {e["name"]: i + 1 for i, e in enumerate(summary["experts"])}
    summary["source"] = str(source)
    text = json.dumps(summary, indent=1) + "\n"
    written["gate_summary"] = write_atomic(
        outputs["gate_summary"], lambda tmp: tmp.write_text(text), overwrite=overwrite
    )
    return written


def run_segment(args, printer: ProgressPrinter, *, predictors=None, cancel=None) -> int:
    """``m4oe segment`` with parsed ``args``, reporting through ``printer``; returns the exit code 0.

    ``predictors(args) -> (predictor, reused)``: where the model comes from (default: loaded for
    this run; ``m4oe serve`` passes its cache, see :mod:`m4oe.serve`). ``cancel() -> bool``:
    checked between slice batches and before the outputs are written; True raises
    :class:`~m4oe.errors.CancelledError` and nothing is written. Errors are raised, as ``main``
    reports them.
    """

    from . import dicom_seg
    from .errors import CancelledError
    from .io import all_or_nothing, read_image, write_image, write_segmentation
    from .region import box_from_ijk, box_from_lps_mm

    if args.gate_layer is not None and not args.gates:
        raise InputError("--gate-layer chooses the layer the gate maps show; it needs --gates DIR")
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
                written.update(write_gate_files(prediction, outputs, loaded.path, args.overwrite))
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
