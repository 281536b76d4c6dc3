"""``m4oe synth``: training slices of a data set written out for a person to look at."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from m4oe.errors import OutputError
from m4oe.io import all_or_nothing, write_atomic
from m4oe.model_card import ModelCard
from m4oe.preprocessing import DEFAULT_PARAMS, IntensityParams

from .anatomy import structure_keys
from .crossmodal import image_family_slice
from .data import DatasetInfo, prepare_case
from .families import FAMILIES, IMAGE_FAMILIES, IMAGE_FAMILY_SOURCE
from .synth import SynthSettings, neighbours, render_slice


def write_examples(
    dataset: str | Path,
    out_dir: str | Path,
    family: str,
    count: int,
    seed: int,
    card: ModelCard,
    *,
    overwrite: bool = False,
    settings: SynthSettings | None = None,
) -> list[Path]:
    """Render ``count`` training slices of an nnU-Net dataset for a person to look at.

    The slices are prepared as a training run with ``card``'s preprocessing prepares them (in-plane
    geometry, CT window), drawn at random from slices holding an organ, and rendered with
    :func:`render_slice` and ``settings`` (default :class:`SynthSettings`; e.g. ``p_fat_layer`` to
    see the body-habitus draw a config's ``synth_fat_layer`` asks for; the image families
    "ct-phase" and "ct-to-mr" start from the real slice instead, :func:`.crossmodal.image_family_slice`,
    and draw no habitus; "ct-to-mr" draws opposed-phase images in the share ``p_ct_opposed_phase``
    of ``settings``). Writes
    ``examples.png`` (each rendered slice beside its labels), ``images.nii.gz`` (float32,
    (count, S, S): one model-grid slice per z index, normalised units) and ``labels.nii.gz``
    (uint8, same grid), each through a temporary name, and nothing when any
    of them exists and not ``overwrite``. Returns the three paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if family not in (*FAMILIES, *IMAGE_FAMILIES):
        raise ValueError(f"synthesis family must be one of {FAMILIES + IMAGE_FAMILIES}, got {family!r}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out_dir = Path(out_dir)
    paths = [out_dir / name for name in ("examples.png", "images.nii.gz", "labels.nii.gz")]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise OutputError("exists; pass --overwrite to replace it", path)
    info = DatasetInfo.read(dataset)
    if family in IMAGE_FAMILIES and info.modality != IMAGE_FAMILY_SOURCE[family]:
        raise ValueError(
            f"{dataset}: family {family!r} needs a {IMAGE_FAMILY_SOURCE[family]} dataset, got {info.modality}"
        )
    pre = card.preprocessing
    ct_params = DEFAULT_PARAMS["ct"]
    if "ct" in pre.intensity:
        ct_params = IntensityParams.from_dict(pre.intensity["ct"])
    params = ct_params if info.modality == "ct" else DEFAULT_PARAMS["mr"]
    size = card.architecture.img_size
    keys = structure_keys(info.labels)
    rng = np.random.default_rng(seed)
    prepared = {}
    images, labels = [], []
    for _ in range(count):
        case = info.cases[int(rng.integers(len(info.cases)))]
        if case not in prepared:
            prepared[case] = prepare_case(
                info, case, params, size, pre.in_plane, pre.target_spacing_mm, anatomy=True
            )
        real, label, anatomy = prepared[case]
        organ_slices = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
        k = int(rng.choice(organ_slices)) if organ_slices.size else int(rng.integers(label.shape[0]))
        if family in IMAGE_FAMILIES:
            image, target = image_family_slice(family, real[k], label[k], keys, rng, ct_params, settings)
        else:
            image, target = render_slice(
                neighbours(anatomy, k), label[k], keys, family, rng, ct_params, settings
            )
        images.append(image)
        labels.append(target)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = min(count, 8)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(2 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, target) in enumerate(zip(images, labels, strict=True)):
        r, c = divmod(i, columns)
        axes[2 * r, c].imshow(image, cmap="gray")
        axes[2 * r + 1, c].imshow(target, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    fig.suptitle(f"{info.name}: {family} renders, seed {seed}")
    fig.tight_layout()

    def volume(slices):
        return lambda p: sitk.WriteImage(sitk.GetImageFromArray(np.stack(slices)), str(p))

    with all_or_nothing():
        write_atomic(paths[0], lambda p: fig.savefig(p, dpi=80), overwrite=True)
        write_atomic(paths[1], volume(images), overwrite=True)
        write_atomic(paths[2], volume(labels), overwrite=True)
    plt.close(fig)
    return paths
