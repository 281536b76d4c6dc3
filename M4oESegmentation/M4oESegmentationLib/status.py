"""What the panel says about a segmentation: the progress bar's fraction, the status line while it
runs and when it is done, and the modality a result was made with and any warning about its scan
or the accuracy of its structures.

The engine (``m4oe segment --progress json``) reports each stage on its own scale: a record
``{"stage", "done", "total", "fraction", "elapsed_s", "eta_s"}`` per step (see
``M4oESegmentationLib.process``). These functions map the records onto one bar for the whole run
and into a line of text with the stage, its count and the time left.

Imports only the standard library (and Slicer's translation function where it exists), so the
module file may import it when Slicer loads the module.
"""

from __future__ import annotations

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core and plain Python have no translations: English text

    def _(text: str) -> str:
        return text


RESULT_ATTRIBUTE = "M4oESegmentation."
"""Prefix of the attributes a result segmentation carries (see ``M4oESegmentationLib.segmenter``)."""
CANCELLED = "cancelled"
"""The error a run reports when the user cancelled it (not shown as an error)."""

STAGE_SPANS = {
    "load": (0.0, 0.1),
    "preprocess": (0.1, 0.15),
    "inference": (0.15, 0.95),
    "postprocess": (0.95, 1.0),
}
"""Share of the whole run (start, end) each engine stage covers on the progress bar; inference,
the slow stage, gets most of it."""


def overall_fraction(record: dict) -> float | None:
    """Fraction (0..1) of the whole run done after a progress record, or None when unknown.

    A stage's own fraction is clipped to [0, 1] and placed in its :data:`STAGE_SPANS` share;
    the ``done`` record is 1.0; a log line or an unknown stage is None (the bar stays put). A
    record of a batch of volumes (``case`` i of ``cases`` n, see ``M4oESegmentationLib.batch``)
    gives the fraction of the whole batch: ``(i - 1 + fraction of volume i) / n``.
    """
    if record.get("stage") == "done":
        run = 1.0
    else:
        span = STAGE_SPANS.get(record.get("stage"))
        fraction = record.get("fraction")
        if span is None or fraction is None:
            return None
        run = span[0] + (span[1] - span[0]) * min(max(float(fraction), 0.0), 1.0)
    cases = record.get("cases")
    if not cases:
        return run
    return (min(max(int(record.get("case", 1)), 1), cases) - 1 + run) / cases


def done_text(result) -> str:
    """The status line after a run: its duration, then where to look for each warning it carries.

    ``result``: a ``M4oESegmentationLib.segmenter.SegmentationResult`` (``seconds["total"]``, and
    ``scan_warning``, ``accuracy_warning``, ``warning`` (routing), each a text or None).
    """
    text = _("Done in {duration}.").format(duration=human_duration(result.seconds.get("total", 0.0)))
    if result.scan_warning:
        text += " " + _("The scan may not be one the model knows: see Outputs.")
    if result.accuracy_warning:
        text += " " + _("Some structures need a close check: see Outputs.")
    if result.warning:
        text += " " + _("The gate's routing needs a look: see Gate review.")
    return text


def human_duration(seconds: float) -> str:
    """A duration for people: ``"less than 1 s"``, ``"42 s"``, ``"3 min 05 s"``."""
    if seconds < 1:
        return _("less than 1 s")
    seconds = round(seconds)
    if seconds < 60:
        return _("{s} s").format(s=seconds)
    return _("{m} min {s:02d} s").format(m=seconds // 60, s=seconds % 60)


def progress_text(record: dict) -> str:
    """Status line for a progress record: stage, units done of the stage, estimated time left.

    E.g. ``"Segmenting 12/40, about 1 min 10 s left"``; an unknown stage is shown by its name. A
    record of a batch of volumes starts with the volume: ``"Volume 2/5 (liver CT): Segmenting..."``.
    """
    names = {
        "load": _("Loading the model"),
        "preprocess": _("Preparing slices"),
        "inference": _("Segmenting"),
        "postprocess": _("Assembling the result"),
        "export": _("Preparing the ONNX Runtime graph (once per model)"),
    }
    stage = str(record.get("stage", ""))
    text = names.get(stage, stage.replace("_", " ").capitalize())
    if record.get("total"):
        text += f" {record.get('done', 0)}/{record['total']}"
    if record.get("eta_s"):
        text += ", " + _("about {duration} left").format(duration=human_duration(float(record["eta_s"])))
    if record.get("cases"):
        volume = _("Volume {case}/{cases} ({name})").format(
            case=record.get("case", 1), cases=record["cases"], name=record.get("volume", "")
        )
        text = f"{volume}: {text}"
    return text


def detected_modality_text(segmentation) -> str:
    """What the panel shows next to the modality choice: ``"CT (DICOM Modality tag)"``, or "".

    Read from a result segmentation's attributes; "" for None or a segmentation M4oE did not make.
    """
    if segmentation is None:
        return ""
    modality = segmentation.GetAttribute(RESULT_ATTRIBUTE + "Modality")
    if not modality:
        return ""
    source = segmentation.GetAttribute(RESULT_ATTRIBUTE + "ModalitySource")
    return f"{modality.upper()} ({source})" if source else modality.upper()


def scan_warning_text(segmentation) -> str:
    """The engine's warning that a result's scan may not show an abdomen the model knows, or "".

    Read from a result segmentation's ``ScanWarning`` attribute (see ``m4oe.ood``); "" for None,
    a segmentation M4oE did not make, or a scan that passed the check.
    """
    if segmentation is None:
        return ""
    warning = segmentation.GetAttribute(RESULT_ATTRIBUTE + "ScanWarning")
    return _("Warning: {text}").format(text=warning) if warning else ""


def accuracy_warning_text(segmentation) -> str:
    """Which structures of a result to check closely: those its model scored low on, or never
    measured on, real scans of the result's modality (the model card's real-scan figures), or "".

    Read from a result segmentation's ``AccuracyWarning`` attribute (see
    ``m4oe.card_summary.real_accuracy_warning``); "" for None, a segmentation M4oE did not make, a
    result made before the attribute existed, or a model whose card gives no cause.
    """
    if segmentation is None:
        return ""
    warning = segmentation.GetAttribute(RESULT_ATTRIBUTE + "AccuracyWarning")
    return _("Check closely: {text}").format(text=warning) if warning else ""
