"""Anatomy maps: the label maps that :mod:`m4oe_training.synth` renders images from.

An anatomy map is a case's organ labels plus tissue sub-classes for what the labels leave out, on
any grid: the unlabelled body split by intensity (:func:`anatomy_from_image`), and where a dataset
has them, *generation classes* of the structures it does not segment (muscle, bowel, lung, bone,
spinal canal, fluid-filled organs, blood vessels, glands: :data:`GENERATION_CLASSES`, e.g. from
TotalSegmentator's other labels), each rendered with an intensity of its own. Two random edits of
an anatomy map change what a render shows while the target labels stay: the body's habitus
(:func:`change_fat_layer`) and the inside of hollow or layered organs (:func:`add_organ_interiors`),
SynthSeg's "generation labels" finer than the labels a network learns.
"""

from __future__ import annotations

import numpy as np

FAT, SOFT_LOW, SOFT_HIGH, DENSE, FLUID = 250, 251, 252, 253, 254
"""Anatomy-map values of the tissue sub-classes (organs keep their label values, air 0). The first
four split the unlabelled body (:func:`anatomy_from_image`); :data:`FLUID` appears only inside
organs (:func:`add_organ_interiors`)."""
TISSUE_KEYS = {
    FAT: "fat",
    SOFT_LOW: "soft_tissue_low",
    SOFT_HIGH: "soft_tissue_high",
    DENSE: "dense",
    FLUID: "fluid",
}

GENERATION_CLASSES = ("muscle", "bowel", "lung", "bone", "spinal_canal", "fluid_organ", "blood", "gland")
"""Structures a dataset may draw in its anatomy maps beyond its organ labels (``dataset.json``
``anatomy_classes``, files ``anatomyTr/<case>``): skeletal muscle; bowel and oesophagus; lung and
airway; bone other than the labelled vertebrae; spinal cord and canal; gallbladder, urinary bladder
and cysts; vessels and heart not labelled as organs; adrenal, thyroid, prostate. Each has its own
CT and MR intensity ranges (:mod:`m4oe_training.synth`)."""
GENERATION_BASE = 240
"""Anatomy-map value of the first generation class (the classes take 240..247); organ labels of a
dataset with generation classes must stay below it."""
TISSUE_KEYS.update({GENERATION_BASE + i: key for i, key in enumerate(GENERATION_CLASSES)})

# CT sub-class bounds in HU of the median-filtered image: air | fat | soft low | soft high | dense.
CT_TISSUE_BOUNDS_HU = (-400.0, -20.0, 45.0, 180.0)


def anatomy_from_image(
    image: np.ndarray, labels: np.ndarray, modality: str, generation: np.ndarray | None = None
) -> np.ndarray:
    """An anatomy map: the organ labels, and the unlabelled voxels split into tissue sub-classes.

    Args:
        image: (Z, Y, X) intensities, HU for CT, arbitrary units for MR (any axis order works; the
            labels must share it).
        labels: (Z, Y, X) integer organ labels (values 1..249; 0 unlabelled).
        modality: "ct" (sub-classes by HU: air, fat, soft tissue below and above 45 HU, dense above
            180 HU, on a 3x3 in-plane median of the image so noise does not speckle them) or "mr"
            (background below 5 % of the 99.5th percentile, the rest in three intensity tertiles,
            kept as fat / soft low / soft high for want of a better name: for MR they only carry
            random intensities, never a CT meaning).
        generation: optional (Z, Y, X) integer map of generation classes, 0 for none and ``i + 1``
            for ``GENERATION_CLASSES[i]``, on the labels' grid: where the organ labels are 0, a
            generation class replaces the intensity sub-class (organ labels then must be below
            :data:`GENERATION_BASE`).

    Returns:
        uint8 (Z, Y, X): organ label values where labelled, else 0 (air), one of :data:`FAT`,
        :data:`SOFT_LOW`, :data:`SOFT_HIGH`, :data:`DENSE`, or a generation class's value.
    """
    from scipy import ndimage

    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if image.shape != labels.shape:
        raise ValueError(f"anatomy: image shape {image.shape} differs from label shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= FAT):
        raise ValueError(
            f"anatomy: organ labels must lie in 0..{FAT - 1}, got {labels.min()}..{labels.max()}"
        )
    smooth = ndimage.median_filter(image, size=(1, 3, 3)) if image.ndim == 3 else image
    out = np.zeros(image.shape, dtype=np.uint8)
    if modality == "ct":
        bounds = CT_TISSUE_BOUNDS_HU
        classes = np.digitize(smooth, bounds)  # 0 air, 1 fat, 2 soft low, 3 soft high, 4 dense
        table = np.array([0, FAT, SOFT_LOW, SOFT_HIGH, DENSE], dtype=np.uint8)
        out[:] = table[classes]
    elif modality == "mr":
        top = float(np.percentile(smooth, 99.5)) if smooth.size else 0.0
        body = smooth > 0.05 * top
        free = body & (labels == 0)
        if free.any():
            t1, t2 = np.percentile(smooth[free], (100 / 3, 200 / 3))
            out[body] = np.where(smooth[body] < t1, SOFT_LOW, np.where(smooth[body] < t2, SOFT_HIGH, FAT))
    else:
        raise ValueError(f"anatomy: modality must be 'ct' or 'mr', got {modality!r}")
    if generation is not None:
        generation = np.asarray(generation)
        if generation.shape != labels.shape:
            raise ValueError(
                f"anatomy: generation map shape {generation.shape} differs from label shape {labels.shape}"
            )
        if generation.size and (generation.min() < 0 or generation.max() > len(GENERATION_CLASSES)):
            raise ValueError(
                f"anatomy: generation classes must lie in 0..{len(GENERATION_CLASSES)}, "
                f"got {generation.min()}..{generation.max()}"
            )
        if labels.size and labels.max() >= GENERATION_BASE:
            raise ValueError(
                f"anatomy: with generation classes, organ labels must lie in 0..{GENERATION_BASE - 1}, "
                f"got {labels.max()}"
            )
        drawn = generation > 0
        out[drawn] = (GENERATION_BASE - 1 + generation[drawn]).astype(np.uint8)
    organ = labels > 0
    out[organ] = labels[organ].astype(np.uint8)
    return out


def structure_keys(organ_labels: dict[str, int]) -> dict[int, str]:
    """Anatomy-map value -> structure key: the dataset's organs, the tissue sub-classes and air."""
    keys = {0: "air", **TISSUE_KEYS}
    keys.update({int(v): k for k, v in organ_labels.items() if int(v) > 0})
    return keys


def change_fat_layer(anatomy: np.ndarray, target: np.ndarray, pixels: float) -> np.ndarray:
    """The anatomy with its body outline moved by ``pixels``, organs untouched.

    Patients of one organ size differ a lot in subcutaneous fat, and a network that learns where the
    organs lie from the body's outline would fail on a patient bigger or slimmer than its training
    anatomy. The body is each slice's largest connected non-air part with its holes (bowel gas)
    filled; a scanner table or other parts apart from it are left alone. Growing (``pixels`` > 0):
    the air within ``pixels`` of the body becomes fat. Thinning (``pixels`` < 0): the body's fat
    pixels within ``-pixels`` of its outline become air where the target labels nothing; muscle,
    bone and organs stay.

    Args:
        anatomy: (C, S, S) anatomy slices (0 air, organ labels, :data:`TISSUE_KEYS` values), model grid.
        target: (S, S) organ labels of the middle slice.
        pixels: the change in model-grid pixels (Euclidean distance to the outline).

    Returns:
        A new (C, S, S) anatomy of the same dtype; ``anatomy`` itself is not changed.
    """
    from scipy import ndimage

    out = anatomy.copy()
    for k in range(out.shape[0]):
        parts, n = ndimage.label(out[k] != 0)
        if n == 0:
            continue
        # The body: the largest connected part, holes (bowel gas) filled; the table and stray
        # parts are left as they are.
        body = ndimage.binary_fill_holes(parts == 1 + int(np.argmax(np.bincount(parts.ravel())[1:])))
        if body.all():
            continue
        if pixels > 0:
            grown = ~body & (ndimage.distance_transform_edt(~body) <= pixels) & (out[k] == 0)
            out[k][grown] = FAT
        elif pixels < 0:
            outer = body & (ndimage.distance_transform_edt(body) <= -pixels) & (out[k] == FAT)
            out[k][outer & (target == 0)] = 0
    return out


ORGAN_INTERIORS: dict[str, tuple[str, ...]] = {
    "kidney_right": ("fat", "fluid"),
    "kidney_left": ("fat", "fluid"),
    "stomach": ("air", "fluid", "food"),
}
"""Tissues an organ's interior may show: a kidney's sinus fat around the hilum or its collecting
system (urine); a stomach's gas above an air-fluid level, its fluid content, or food: a mottled mix
of the two soft-tissue sub-classes with specks of fat and gas, which on CT is as dense as the
pancreas beside it (a real CT's food-filled stomach was labelled pancreas by a model that had only
seen stomachs of gas and fluid)."""

FOOD_SHARES = {"fat": (0.05, 0.2), "soft_tissue_high": (0.2, 0.5), "gas": (0.0, 0.05)}
"""Ranges of the shares of a food interior's pixels that are fat, dense soft tissue and gas (the rest
is the lower soft tissue), drawn once per render."""


def add_organ_interiors(
    anatomy: np.ndarray,
    keys: dict[int, str],
    rng: np.random.Generator,
    depth: tuple[float, float] = (0.3, 0.7),
) -> np.ndarray:
    """The anatomy with the inside of each organ of :data:`ORGAN_INTERIORS` drawn as another tissue.

    A label map draws every organ as one structure, but a real kidney holds bright sinus fat (T1)
    or dark urine and a real stomach gas and fluid, all inside the label a network must predict.
    For each such organ in the anatomy, one tissue of its list is drawn, and its pixels deeper than
    a random share (``depth``) of the organ's greatest depth in that slice (in-plane Euclidean
    distance to the organ's outline, at least 1.5 pixels so a rim always stays) become that tissue;
    gas only in the lumen's anterior part (rows run anterior -> posterior; a supine patient's gas
    rises), above a random level; food as blobs of :data:`FOOD_SHARES` (a smooth random field, 1-2
    pixels across, cut at its quantiles). The draws are shared by the slices, so the interior runs
    through them. The target labels are not changed: the organ is still the organ.

    Args:
        anatomy: (C, S, S) anatomy slices (0 air, organ labels, :data:`TISSUE_KEYS` values), model grid.
        keys: anatomy value -> structure key (:func:`structure_keys`).
        rng: the only source of randomness.
        depth: range of the interior's depth threshold as a share of the organ's greatest depth.

    Returns:
        A new (C, S, S) anatomy of the same dtype; ``anatomy`` itself is not changed.
    """
    from scipy import ndimage

    out = anatomy.copy()
    value_of = {key: value for value, key in keys.items()}
    tissue_value = {"air": 0, "fat": FAT, "fluid": FLUID}
    rows = np.arange(anatomy.shape[1])[:, None]
    for key, tissues in ORGAN_INTERIORS.items():
        value = value_of.get(key)
        if value is None or not (anatomy == value).any():
            continue
        tissue = tissues[int(rng.integers(len(tissues)))]
        food = food_texture(anatomy.shape[1:], rng) if tissue == "food" else None
        share = rng.uniform(*depth)
        level = rng.uniform(0.2, 0.8)
        for k in range(out.shape[0]):
            organ = anatomy[k] == value
            if not organ.any():
                continue
            distance = ndimage.distance_transform_edt(organ)
            inner = distance > max(share * float(distance.max()), 1.5)
            if tissue == "air" and inner.any():
                inner &= rows <= np.quantile(np.nonzero(inner)[0], level)
            out[k][inner] = food[inner] if tissue == "food" else tissue_value[tissue]
    return out


def food_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A (S, S) uint8 map of food's tissues (:data:`FOOD_SHARES`): blobs of fat, lower and higher soft
    tissue from a smooth random field cut at its quantiles, and specks of gas (0) from another."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.0, 2.0))
    specks = ndimage.gaussian_filter(rng.standard_normal(shape), 0.7)
    fat, high, gas = (rng.uniform(*FOOD_SHARES[key]) for key in ("fat", "soft_tissue_high", "gas"))
    out = np.full(shape, SOFT_LOW, np.uint8)
    out[field <= np.quantile(field, fat)] = FAT
    out[field > np.quantile(field, 1 - high)] = SOFT_HIGH
    if gas > 0:
        out[specks > np.quantile(specks, 1 - gas)] = 0
    return out
