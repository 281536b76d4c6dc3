"""Training data: nnU-Net-style datasets turned into cached model-grid slices, sampled per step.

Each dataset (``imagesTr/{case}_0000{ending}``, ``labelsTr/{case}{ending}``, ``dataset.json``)
belongs to one expert (its modality) and one task head (its label set). Cases are prepared once
with the engine's own preprocessing (:class:`m4oe.prepare.SlicePlan`: axial stack, intensity
normalisation, in-plane resampling), so the model sees at training exactly what it sees at
inference, and kept in memory and in an on-disk cache as float16 (Z, S, S) images and uint8
labels. Sampling is deterministic per (seed, rank, step): a resumed run draws the same batches.

A dataset with ``synth`` on also keeps each case's anatomy map on the model grid
(:func:`.anatomy.anatomy_from_image`), and its samples are rendered from it by
:func:`.synth.render_slice` (domain randomisation) instead of read from the image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from m4oe.geometry import to_axial_stack
from m4oe.inplane import labels_to_model_grid
from m4oe.io import read_image, write_atomic
from m4oe.modality import strided_subsample
from m4oe.prepare import SlicePlan, neighbour_index
from m4oe.preprocessing import DEFAULT_PARAMS, IntensityParams, ct_statistics_from_samples
from m4oe.region import body_rows_columns

from .anatomy import GENERATION_CLASSES, anatomy_from_image, structure_keys
from .config import ConfigError, DatasetConfig
from .crossmodal import image_family_slice
from .families import FAMILY_MODALITY, IMAGE_FAMILIES, IMAGE_FAMILY_SOURCE
from .nnunet import read_dataset_json, verify_dataset
from .synth import SynthSettings, render_slice

logger = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: a field of view too wide for the model input is framed on the body


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as read from its ``dataset.json``."""

    root: Path
    name: str
    modality: str
    labels: dict[str, int]
    file_ending: str
    cases: tuple[str, ...]
    terminology: dict[str, str | None]
    anatomy_classes: tuple[str, ...] = ()

    @classmethod
    def read(cls, root: str | Path) -> DatasetInfo:
        """Check the dataset folder and read its ``dataset.json``.

        The folder is checked as ``python -m m4oe_training.converters verify`` does, from the files'
        headers (:func:`.nnunet.verify_dataset` without the label values, which :func:`prepare_case`
        checks as it reads each case): dataset.json, an image for every label map and a label map
        for every image, numTraining equal to the number of cases, each label map on its image's
        grid. The first problem is an InputError naming the file. Training needs one channel per
        case; the modality is dataset.json's ``modality`` or, without it, "ct" for a channel named
        CT and "mr" otherwise. ``anatomy_classes`` (optional): the generation classes
        (:data:`.anatomy.GENERATION_CLASSES`) that the files ``anatomyTr/<case>`` draw as values
        1, 2, ... in that order, for label-map renders (:func:`prepare_case`).
        """
        root = Path(root)
        meta = read_dataset_json(root)
        meta_path = root / "dataset.json"
        if len(meta["channel_names"]) != 1:
            raise ConfigError(f"{meta_path}: M4oE reads one channel per case, got {meta['channel_names']}")
        cases = tuple(sorted(verify_dataset(root, label_values=False).cases))  # sorted by case name
        channel = meta["channel_names"]["0"]
        modality = meta.get("modality") or ("ct" if channel.upper() == "CT" else "mr")
        terminology = dict(meta.get("terminology", {}))
        generation = meta.get("anatomy_classes", [])
        if not isinstance(generation, list) or not set(generation) <= set(GENERATION_CLASSES):
            raise ConfigError(
                f"{meta_path}: anatomy_classes must be a list of {', '.join(GENERATION_CLASSES)}, "
                f"got {generation!r}"
            )
        info = cls(
            root,
            root.name,
            modality,
            dict(meta["labels"]),
            meta["file_ending"],
            cases,
            terminology,
            tuple(generation),
        )
        for case in cases if generation else ():
            if not info.anatomy_path(case).is_file():
                raise ConfigError(f"{info.anatomy_path(case)}: missing (dataset.json names anatomy_classes)")
        return info

    def image_path(self, case: str) -> Path:
        return self.root / "imagesTr" / f"{case}_0000{self.file_ending}"

    def label_path(self, case: str) -> Path:
        return self.root / "labelsTr" / f"{case}{self.file_ending}"

    def anatomy_path(self, case: str) -> Path:
        return self.root / "anatomyTr" / f"{case}{self.file_ending}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def dataset_modality(cfg: DatasetConfig, info: DatasetInfo) -> str:
    """What the dataset's samples are for its expert: the synthesis family's modality, or the images'."""
    return FAMILY_MODALITY[cfg.synth] if cfg.synth != "off" else info.modality


def check_synth(cfg: DatasetConfig, info: DatasetInfo) -> None:
    """Renders of another modality than the images' must replace them everywhere (see DatasetConfig)."""
    if cfg.synth in IMAGE_FAMILIES and info.modality != IMAGE_FAMILY_SOURCE[cfg.synth]:
        raise ConfigError(
            f"{info.root}: synth = {cfg.synth!r} works on the dataset's own "
            f"{IMAGE_FAMILY_SOURCE[cfg.synth]} images, but the dataset is {info.modality}"
        )
    if cfg.synth == "off" or dataset_modality(cfg, info) == info.modality:
        return
    if cfg.synth_fraction < 1.0 or cfg.val_cases:
        raise ConfigError(
            f"{info.root}: synth = {cfg.synth!r} renders {dataset_modality(cfg, info)} images of a "
            f"{info.modality} dataset; set synth_fraction = 1 and val_cases = 0"
        )


@dataclass
class PreparedCase:
    """One case on the model grid: ``image`` float16 (Z, S, S) normalised, ``label`` uint8 (Z, S, S),
    and for synthesis ``anatomy`` uint8 (Z, S, S) (:func:`.anatomy.anatomy_from_image`), else None.
    ``foreground_slices``: the z indices of slices holding a label; ``class_slices``: per structure
    the case holds (in label order), the z indices of slices holding it."""

    dataset: int
    case: str
    image: np.ndarray
    label: np.ndarray
    foreground_slices: np.ndarray
    anatomy: np.ndarray | None = None
    class_slices: tuple[np.ndarray, ...] = ()


def ct_intensity_params(
    datasets: list[DatasetInfo], cases: list[list[str]], cache_dir: Path | None = None
) -> IntensityParams:
    """CT normalisation statistics from the labelled voxels of the CT training cases (nnU-Net style).

    ``cases[i]`` are the training cases of ``datasets[i]`` (by position: two datasets may share a
    folder name).

    Each case contributes at most 100,000 of its labelled voxels' HU values (a strided subsample).
    With ``cache_dir`` those samples are kept on disk (keyed by the files' size and modification
    time), so a resumed or repeated run does not read every CT volume again before training.
    """
    samples = []
    for info, info_cases in zip(datasets, cases, strict=True):
        if info.modality != "ct":
            continue
        for case in info_cases:
            cached = cache_dir / f"{_sample_key(info, case)}.npy" if cache_dir else None
            if cached is not None and cached.exists():
                samples.append(np.load(cached))
                continue
            image = read_image(info.image_path(case)).image
            label = read_image(info.label_path(case)).image
            values = sitk.GetArrayViewFromImage(image)
            mask = sitk.GetArrayViewFromImage(label) > 0
            sample = strided_subsample(values[mask], 100_000).astype(np.float32)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(cached, partial(np.save, arr=sample), overwrite=True)
            samples.append(sample)
    if not samples:
        return DEFAULT_PARAMS["ct"]
    return ct_statistics_from_samples(np.concatenate(samples))


def _sample_key(info: DatasetInfo, case: str) -> str:
    files = [info.image_path(case), info.label_path(case)]
    files += [info.anatomy_path(case)] if info.anatomy_classes else []
    stats = [(str(f), f.stat()) for f in files]
    text = json.dumps([CACHE_VERSION, *[(name, st.st_size, st.st_mtime_ns) for name, st in stats]])
    return f"{info.name}_{case}_hu_{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def prepare_case(
    info: DatasetInfo,
    case: str,
    params: IntensityParams,
    size: int,
    in_plane: str,
    target_spacing,
    anatomy: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read, reorient, normalise and resample one case.

    Returns the image float16, the labels uint8 and, with ``anatomy``, the anatomy map uint8, all
    (Z, S, S) on the model grid (rows anterior -> posterior, columns right -> left); else None. The
    anatomy map holds the dataset's generation classes where it has them (``anatomyTr``).
    """
    image = to_axial_stack(read_image(info.image_path(case)).image)
    label = to_axial_stack(read_image(info.label_path(case)).image)
    if label.array.shape != image.array.shape:
        raise ConfigError(f"{info.label_path(case)}: shape {label.array.shape} differs from the image's")
    values = np.rint(label.array)
    bad = set(np.unique(values).astype(int).tolist()) - set(info.labels.values())
    if bad:
        raise ConfigError(f"{info.label_path(case)}: label values {sorted(bad)} not in dataset.json")
    # A field of view too wide for the model input is framed on the body, as at inference.
    body = body_rows_columns(image, info.modality) if in_plane == "spacing" else None
    plan = SlicePlan.for_stack(image, info.modality, params, size, in_plane, target_spacing, body)
    slices = plan.model_input(image.array).numpy()[:, 0].astype(np.float16)
    labels = labels_to_model_grid(values.astype(np.uint8), plan.grid).numpy().astype(np.uint8)
    if not anatomy:
        return slices, labels, None
    generation = None
    if info.anatomy_classes:
        path = info.anatomy_path(case)
        drawn = np.rint(to_axial_stack(read_image(path).image).array).astype(np.int64)
        if drawn.shape != image.array.shape:
            raise ConfigError(f"{path}: shape {drawn.shape} differs from the image's")
        if drawn.min() < 0 or drawn.max() > len(info.anatomy_classes):
            raise ConfigError(
                f"{path}: values {drawn.min()}..{drawn.max()}, expected 0..{len(info.anatomy_classes)} "
                "(dataset.json anatomy_classes)"
            )
        to_class = np.array([0] + [GENERATION_CLASSES.index(k) + 1 for k in info.anatomy_classes])
        generation = to_class[drawn]
    tissue = anatomy_from_image(image.array, values.astype(np.uint8), info.modality, generation)
    return slices, labels, labels_to_model_grid(tissue, plan.grid).numpy().astype(np.uint8)


class SliceData:
    """All training (or validation) cases of a run, prepared and cached.

    Args:
        datasets: the configured datasets (their order defines the dataset index).
        params: intensity parameters per modality.
        size, in_plane, target_spacing: the model's in-plane preprocessing.
        split: "train" or "val" (the last ``val_cases`` of each dataset in sorted order).
        cache_dir: where prepared arrays are kept between runs (None: memory only).
        synth_settings: the ranges of the label-map renders' draws (default
            :class:`.synth.SynthSettings`).
        label_lookups: per dataset, a 256-entry table from its label values to its task's
            (:func:`.export.label_lookups`), or None to keep them; applied to every sampled slice.
        neighbour_slices: k > 0 draws each sample as the 2k + 1 adjacent slices around the labelled
            one (the model's ``neighbour_slices``; the end slices repeated at a volume's ends, as the
            engine does), real or rendered together.
    """

    def __init__(
        self,
        datasets: list[DatasetConfig],
        infos: list[DatasetInfo],
        params: dict[str, IntensityParams],
        size: int,
        in_plane: str,
        target_spacing,
        cache_dir: Path | None = None,
        synth_settings: SynthSettings | None = None,
        label_lookups: list[np.ndarray | None] | None = None,
        neighbour_slices: int = 0,
    ):
        self.infos = infos
        self.neighbour_slices = neighbour_slices
        self.label_lookups = label_lookups or [None] * len(infos)
        self.synth_settings = synth_settings
        self.synth = [cfg.synth for cfg in datasets]
        self.synth_fraction = [cfg.synth_fraction for cfg in datasets]
        self.foreground_fraction = [cfg.foreground_fraction for cfg in datasets]
        weights = np.array([cfg.weight for cfg in datasets], dtype=np.float64)
        # Equal weights keep the uniform draw (and so every earlier run's batches) exactly.
        self.dataset_p = None if np.all(weights == weights[0]) else weights / weights.sum()
        self.structure_keys = [structure_keys(info.labels) for info in infos]
        self.ct_params = params["ct"]
        self.cases: list[PreparedCase] = []
        for d_index, (cfg, info) in enumerate(zip(datasets, infos, strict=True)):
            check_synth(cfg, info)
            with_anatomy = cfg.synth not in ("off", *IMAGE_FAMILIES)
            for case in split_cases(info, cfg.val_cases)["train"]:
                key = _cache_key(info, case, params[info.modality], size, in_plane, target_spacing)
                cached = cache_dir / f"{key}{'_anatomy' if with_anatomy else ''}.npz" if cache_dir else None
                if cached is not None and cached.exists():
                    with np.load(cached) as z:
                        image, label = z["image"], z["label"]
                        anatomy = z["anatomy"] if with_anatomy else None
                else:
                    image, label, anatomy = prepare_case(
                        info, case, params[info.modality], size, in_plane, target_spacing, with_anatomy
                    )
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        arrays = {"image": image, "label": label}
                        if anatomy is not None:
                            arrays["anatomy"] = anatomy
                        # A unique temporary name: DDP ranks prepare the same cases at the same time.
                        write_atomic(cached, partial(np.savez, **arrays), overwrite=True)
                fg = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
                by_class = class_slices(label, self.label_lookups[d_index])
                self.cases.append(PreparedCase(d_index, case, image, label, fg, anatomy, by_class))
        self.by_dataset = [[c for c in self.cases if c.dataset == d] for d in range(len(infos))]
        for d, cases in enumerate(self.by_dataset):
            if not cases:
                raise ConfigError(
                    f"{infos[d].root}: no training case left after holding out validation cases"
                )

    def sample(self, rng: np.random.Generator, batch: int, foreground_fraction: float, sampling="slice"):
        """Draw a batch: a dataset (uniformly, or by the datasets' ``weight``), then a case, then a slice.

        With probability ``foreground_fraction`` (the dataset's own where its config sets one) the
        slice is one holding foreground: any such slice
        (``sampling`` "slice"), or one holding a structure drawn uniformly from those the
        case labels ("class", so a pancreas on 10 slices is drawn as often as a liver on 60). A dataset with
        ``synth`` on renders the slice from its anatomy (or, an image family, draws it from its real
        slice: a simulated contrast phase, or an MR-like image of a CT) for a ``synth_fraction`` of
        its samples.
        Returns images (B, C, S, S) float32 (C = 2 ``neighbour_slices`` + 1, the labelled slice in
        the centre), labels (B, S, S) int64, dataset indices (B,).
        """
        n = self.neighbour_slices
        images, labels, index = [], [], []
        for _ in range(batch):
            if self.dataset_p is None:
                d = int(rng.integers(len(self.by_dataset)))
            else:
                d = int(rng.choice(len(self.by_dataset), p=self.dataset_p))
            case = self.by_dataset[d][int(rng.integers(len(self.by_dataset[d])))]
            fraction = self.foreground_fraction[d]
            fraction = foreground_fraction if fraction is None else fraction
            if case.foreground_slices.size and rng.random() < fraction:
                pool = case.foreground_slices
                if sampling == "class" and case.class_slices:
                    pool = case.class_slices[int(rng.integers(len(case.class_slices)))]
                k = int(pool[rng.integers(pool.size)])
            else:
                k = int(rng.integers(case.image.shape[0]))
            # The slice k, or the stack of its adjacent slices (the ends of the volume repeated).
            stack = k if n == 0 else neighbour_index(k, k + 1, n, case.image.shape[0])[0]
            if self.synth[d] != "off" and rng.random() < self.synth_fraction[d]:
                if self.synth[d] in IMAGE_FAMILIES:
                    image, label = image_family_slice(
                        self.synth[d],
                        case.image[stack],
                        case.label[stack],
                        self.structure_keys[d],
                        rng,
                        self.ct_params,
                        self.synth_settings,
                    )
                else:
                    around = neighbour_index(k, k + 1, n + 1, case.anatomy.shape[0])[0]
                    image, label = render_slice(
                        case.anatomy[around],
                        case.label[k],
                        self.structure_keys[d],
                        self.synth[d],
                        rng,
                        self.ct_params,
                        self.synth_settings,
                    )
            else:
                image, label = case.image[stack], case.label[k]
            lookup = self.label_lookups[d]
            images.append(image)
            labels.append(label if lookup is None else lookup[label])
            index.append(d)
        images = np.stack(images).astype(np.float32)
        return (
            torch.from_numpy(images[:, None] if n == 0 else images),
            torch.from_numpy(np.stack(labels).astype(np.int64)),
            torch.tensor(index, dtype=torch.long),
        )


def class_slices(label: np.ndarray, lookup: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per structure present in ``label`` (uint8 (Z, Y, X)), in increasing label value, the z indices
    of the slices holding it. ``lookup``: the dataset's table to its task's labels; a value it maps
    to 0 (not a structure of the task) is left out."""
    flat = label.reshape(label.shape[0], -1)
    out = []
    for value in np.unique(label):
        if value == 0 or (lookup is not None and lookup[value] == 0):
            continue
        out.append(np.flatnonzero((flat == value).any(axis=1)))
    return tuple(out)


def split_cases(info: DatasetInfo, val_cases: int) -> dict[str, list[str]]:
    """Hold out the last ``val_cases`` cases (sorted by name) for validation."""
    if val_cases >= len(info.cases):
        raise ConfigError(
            f"{info.root}: {val_cases} validation cases leave none of {len(info.cases)} to train on"
        )
    cut = len(info.cases) - val_cases
    return {"train": list(info.cases[:cut]), "val": list(info.cases[cut:])}


def _cache_key(info: DatasetInfo, case: str, params: IntensityParams, size, in_plane, target_spacing) -> str:
    """The prepared case's cache name: a changed image or label file (size or modification time),
    or other preprocessing, is prepared again."""
    files = [(str(f), f.stat()) for f in (info.image_path(case), info.label_path(case))]
    text = json.dumps(
        [
            CACHE_VERSION,
            *[(name, st.st_size, st.st_mtime_ns) for name, st in files],
            params.to_dict(),
            size,
            in_plane,
            target_spacing,
        ],
        sort_keys=True,
    )
    return f"{info.name}_{case}_{hashlib.sha256(text.encode()).hexdigest()[:16]}"
