"""Training images drawn from a data set's real slices (the image families): MR-like images of
real CT through random intensity networks ("ct-to-mr"), real MR images given a random contrast by
the same networks ("mr-to-mr"), and contrast phases simulated on real CT ("ct-phase",
:func:`.synth.enhance_slice`).

A label-map render (:mod:`.synth`) draws each structure flat with a noise texture: the MR experts
never see the fat planes, vessels, bowel content, partial-volume edges and texture of a real
abdomen, only of its labels. Here a real CT slice keeps all of that and loses its CT contrast: its
intensities pass through a small convolutional network with random weights, drawn anew for every
sample, blended with the slice itself (the global intensity non-linear augmentation, GIN, of Ouyang
et al., "Causality-inspired single-source domain generalization for medical image segmentation",
IEEE TMI 2023, whose setting is ours: abdominal organs learnt on CT, segmented on MRI). The result
is then shaped as MR: air and gas carry no signal, the slice is deformed with its labels and goes
through the MR acquisition of :mod:`.synth` (blur, bias field, gamma, Rician noise, lower
resolution) and the engine's MR normalisation. A share of them (``SynthSettings.p_ct_opposed_phase``,
off by default) is drawn as an opposed-phase T1 image (:func:`opposed_phase`): where fat and
water-rich tissue share a voxel their signals cancel, the dark "India ink" line around the kidneys,
the liver and the bowel of a chemical-shift (Dixon, T1-DUAL) series.

"mr-to-mr" does the same to a real MR slice (:func:`mr_from_mr_slice`): a data set of one MR
sequence (CHAOS's T2-SPIR, say) trains an expert for any other with its real texture, bowel and fat
planes, where a label-map render of it shows only its labelled organs.

Arrays are (S, S) slices on the model grid: rows anterior -> posterior, columns patient right ->
left (:func:`m4oe.geometry.to_axial_stack`), S the model input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from m4oe.preprocessing import IntensityParams, mr_volume_statistics, normalize_slices
from m4oe.region import BODY_CT_THRESHOLD_HU

from .families import IMAGE_FAMILIES
from .synth import SynthSettings, acquire, centre, check_slices, deform_slice, enhance_slice, in_plane

SOFT_TISSUE_WINDOW_HU = (-150.0, 250.0)
"""The network's first input channel: fat, water and the organs spread over [0, 1] (in the model's
wide CT window they span a tenth of it, and a random network would keep them nearly alike)."""
FAT_BELOW_HU = -30.0
"""A model-grid pixel below this (HU) and inside the body is fat (fat about -100 HU; a pixel shared
with water-rich tissue, enhanced or not, averages above it) for :func:`opposed_phase`."""

MR_BODY_FRACTION = 0.05
"""A model-grid pixel of an MR slice brighter than this share of the slice's range (min to 99.5th
percentile) belongs to the body in :func:`mr_body_mask` (air holds noise only, a few per cent)."""


@dataclass(frozen=True)
class IntensityNetSettings:
    """Ranges of the random intensity network's draws."""

    layers: tuple[int, int] = (2, 4)  # convolutions, inclusive
    hidden_channels: int = 2
    kernel_sizes: tuple[int, ...] = (1, 3)
    negative_slope: float = 0.2  # LeakyReLU between the convolutions
    blend: tuple[float, float] = (0.0, 1.0)  # share of the network's output against channel 0


def random_intensity_net(
    x: np.ndarray, rng: np.random.Generator, settings: IntensityNetSettings | None = None
) -> np.ndarray:
    """(S, S) in [0, 1]: ``x`` (V, S, S), V views of one slice in [0, 1], through a random network;
    or (N, S, S) from ``x`` (N, V, S, S), N adjacent slices through the same network.

    Each layer is a convolution with N(0, 1) weights and biases (a kernel of 1 or 3 pixels, drawn
    per layer), LeakyReLU between layers, one output channel. The output is scaled to the
    Frobenius norm of ``x[0]`` (of the first view of all N slices), blended with ``x[0]`` at a
    random share, and min-max scaled to [0, 1] (over all N): a random, mostly non-monotonic
    remapping of intensities with a little local mixing, which keeps every edge of the slice where
    it was.
    """
    settings = settings or IntensityNetSettings()
    if x.ndim not in (3, 4):
        raise ValueError(f"random_intensity_net: (V, S, S) or (N, V, S, S) views, got shape {x.shape}")
    h = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    h = h[None] if x.ndim == 3 else h
    first = h[:, :1]
    layers = int(rng.integers(settings.layers[0], settings.layers[1] + 1))
    for i in range(layers):
        c_in = h.shape[1]
        c_out = 1 if i == layers - 1 else settings.hidden_channels
        k = int(rng.choice(settings.kernel_sizes))
        weight = torch.from_numpy(rng.standard_normal((c_out, c_in, k, k)).astype(np.float32))
        bias = torch.from_numpy(rng.standard_normal(c_out).astype(np.float32))
        h = F.conv2d(h, weight, bias, padding=k // 2)
        if i < layers - 1:
            h = F.leaky_relu(h, settings.negative_slope)
    h = h * (first.norm() / h.norm().clamp_min(1e-6))
    share = float(rng.uniform(*settings.blend))
    out = (share * h + (1.0 - share) * first)[:, 0].numpy()
    out = out[0] if x.ndim == 3 else out
    low, high = float(out.min()), float(out.max())
    return ((out - low) / max(high - low, 1e-6)).astype(np.float32)


def opposed_phase(
    signal: np.ndarray, hu: np.ndarray, sigma_px: float = 0.8, depth: float = 1.0
) -> np.ndarray:
    """(S, S) ``signal`` (or a (C, S, S) stack, slice by slice) as an opposed-phase T1 shows it:
    fat and water out of phase.

    Each pixel's fat fraction ``f`` is the share of fat (``hu`` (S, S; HU, the same grid) below
    :data:`FAT_BELOW_HU`) around it, weighted by a Gaussian of ``sigma_px`` pixels (the partial
    volume of an MR voxel). An opposed-phase voxel holds the difference of its water and fat signals,
    ``|1 - 2 f|`` of the in-phase one: pure fat and pure tissue keep their signal, a voxel half fat
    and half tissue (an organ's border with the fat around it) cancels, a dark line one to two
    pixels wide. ``depth`` in [0, 1] scales the loss (1: full cancellation)."""
    from scipy import ndimage

    fat = (np.asarray(hu) < FAT_BELOW_HU).astype(np.float32)
    if sigma_px > 0:
        fat = ndimage.gaussian_filter(fat, in_plane(fat, sigma_px))
    loss = 1.0 - np.abs(1.0 - 2.0 * fat)  # 0 for pure fat or tissue, 1 for a half-and-half voxel
    return (signal * (1.0 - depth * loss)).astype(np.float32)


def largest_region(mask: np.ndarray) -> np.ndarray:
    """(S, S) bool: the largest connected region of ``mask`` (S, S) bool (4-connected); all False
    when ``mask`` has none."""
    from scipy import ndimage

    regions, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == int(np.argmax(sizes))


def body_mask(hu: np.ndarray) -> np.ndarray:
    """(S, S) bool: the largest connected region of ``hu`` (S, S) above the engine's body threshold
    (:data:`m4oe.region.BODY_CT_THRESHOLD_HU`, -500 HU: below it air or gas, no MR signal), the
    patient's body without the table, the air around it or the gas inside it."""
    return largest_region(hu > BODY_CT_THRESHOLD_HU)


def per_slice(mask, image: np.ndarray) -> np.ndarray:
    """``mask`` (an (S, S) -> (S, S) function) of an (S, S) slice, or of each slice of a stack."""
    return mask(image) if image.ndim == 2 else np.stack([mask(x) for x in image])


def acquire_as_mr(
    signal: np.ndarray, target: np.ndarray, rng: np.random.Generator, settings: SynthSettings
) -> tuple[np.ndarray, np.ndarray]:
    """The common end of the image families that make MR images: an (S, S) ``signal`` in [0, 1]
    (0 outside the body), or a (C, S, S) stack of adjacent slices, and the (S, S) labels of its
    (centre) slice deformed together (:func:`.synth.deform_slice`), then MR acquisition
    (:func:`.synth.acquire`) and the engine's MR normalisation. Returns (image float32 of the
    signal's shape, labels uint8 (S, S))."""
    signal, labels = deform_slice(signal, target, rng, settings)
    signal = acquire(signal.astype(np.float32), "t1", rng, settings)
    return normalize_slices(signal, "mr", volume_stats=mr_volume_statistics(signal)), labels


def mr_body_mask(x: np.ndarray) -> np.ndarray:
    """(S, S) bool: the patient's body on an MR slice ``x`` (S, S) in [0, 1], air and the padding
    around it 0: the largest connected region brighter than :data:`MR_BODY_FRACTION`, closed over
    two pixels and with its holes filled (gas, flow voids and suppressed fat inside the body stay
    body: the intensity network gives them a contrast of their own)."""
    from scipy import ndimage

    body = largest_region(x > MR_BODY_FRACTION)
    body = ndimage.binary_closing(body, iterations=2, border_value=0) | body
    return ndimage.binary_fill_holes(body)


def mr_from_mr_slice(
    image: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    settings: SynthSettings | None = None,
    net_settings: IntensityNetSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A training slice of another MR contrast from one real MR slice and its labels ("mr-to-mr").

    The slice, normalised as the engine normalises MR (its darkest value the air and the padding
    around the field of view), is scaled to [0, 1] from its minimum to its 99.5th percentile
    (clipped), and two views of it, that and its square root (the dark tissues spread apart), go
    through :func:`random_intensity_net`: bright fluid may turn dark and dark fat bright, every
    edge stays where it was. Outside the body (:func:`mr_body_mask`) is set to 0; then, as for
    "ct-to-mr", the slice and its labels are deformed together, go through the MR acquisition
    (:func:`.synth.acquire`) and the engine's MR normalisation.

    Args:
        image: (S, S) float MR slice on the model grid, normalised per volume (z-score); or a
            (C, S, S) stack of adjacent slices (C odd), every draw shared by them.
        target: the integer organ labels of ``image``, the same shape.
        rng: the only source of randomness.
        settings: geometry and acquisition draws (default :class:`.synth.SynthSettings`).
        net_settings: the intensity network's draws (default :class:`IntensityNetSettings`).

    Returns:
        (image, labels): float32 of the image's shape, normalised as the engine normalises MR, and
        uint8 (S, S) labels of its (centre) slice.
    """
    check_slices("mr_from_mr_slice", image, target)
    settings = settings or SynthSettings()
    x = np.asarray(image, dtype=np.float32)
    low, high = float(x.min()), float(np.percentile(x, 99.5))
    x = np.clip((x - low) / max(high - low, 1e-6), 0.0, 1.0)
    signal = random_intensity_net(np.stack([x, np.sqrt(x)], axis=-3), rng, net_settings)
    signal[~per_slice(mr_body_mask, x)] = 0.0
    return acquire_as_mr(signal, centre(target), rng, settings)


def mr_from_ct_slice(
    image: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator,
    ct_params: IntensityParams,
    settings: SynthSettings | None = None,
    net_settings: IntensityNetSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """An MR-like training slice from one real CT slice and its labels (family "ct-to-mr").

    Two views of the slice, its HU in :data:`SOFT_TISSUE_WINDOW_HU` and in the model's CT window,
    each mapped to [0, 1], go through :func:`random_intensity_net`; outside the patient's body
    (:func:`body_mask`: the table, the air around, the gas inside) is set to 0, as MR shows no
    signal there; with probability ``settings.p_ct_opposed_phase`` fat and tissue cancel at their
    borders (:func:`opposed_phase`, partial volume of 0.6-1.2 pixels, depth 0.7-1.0); the slice and
    its labels are deformed together (the random affine and elastic field of
    :func:`.synth.render_slice`; bilinear for the image, nearest neighbour for the labels; outside
    the slice is no signal); then MR acquisition (:func:`.synth.acquire`) and the engine's
    MR normalisation (per-image percentiles and z-score, :func:`m4oe.preprocessing.normalize_slices`).

    Args:
        image: (S, S) float CT slice on the model grid, normalised with ``ct_params``; or a
            (C, S, S) stack of adjacent slices (C odd), every draw shared by them.
        target: the integer organ labels of ``image``, the same shape.
        rng: the only source of randomness.
        ct_params: the model's CT normalisation (a linear map of HU inside its window).
        settings: geometry and acquisition draws (default :class:`.synth.SynthSettings`).
        net_settings: the intensity network's draws (default :class:`IntensityNetSettings`).

    Returns:
        (image, labels): float32 of the image's shape, normalised as the engine normalises MR, and
        uint8 (S, S) labels of its (centre) slice.
    """
    check_slices("mr_from_ct_slice", image, target)
    settings = settings or SynthSettings()
    hu = np.asarray(image, dtype=np.float32) * np.float32(ct_params.std) + np.float32(ct_params.mean)
    views = [
        np.clip((hu - low) / (high - low), 0.0, 1.0) for low, high in (SOFT_TISSUE_WINDOW_HU, ct_params.clip)
    ]
    signal = random_intensity_net(np.stack(views, axis=-3), rng, net_settings)
    signal[~per_slice(body_mask, hu)] = 0.0
    # The guard keeps the draws of runs configured before the option: no extra draw when it is off.
    if settings.p_ct_opposed_phase > 0 and rng.random() < settings.p_ct_opposed_phase:
        signal = opposed_phase(signal, hu, rng.uniform(0.6, 1.2), rng.uniform(0.7, 1.0))
    return acquire_as_mr(signal, centre(target), rng, settings)


def image_family_slice(
    family: str,
    image: np.ndarray,
    target: np.ndarray,
    keys: dict[int, str],
    rng: np.random.Generator,
    ct_params: IntensityParams,
    settings: SynthSettings | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One training slice of an image family (:data:`.families.IMAGE_FAMILIES`) from a real slice.

    ``image`` (S, S) normalised with ``ct_params`` (a CT slice) or per volume (an MR slice,
    "mr-to-mr"), or a (C, S, S) stack of adjacent slices (C odd; the image is then the stack, every
    draw shared), ``target`` its labels (the same shape), ``keys`` label value -> structure key; ``settings``
    the draws of every family (geometry, acquisition, contrast; default :class:`.synth.SynthSettings`).
    "ct-phase": :func:`.synth.enhance_slice` (CT normalisation);
    "ct-to-mr": :func:`mr_from_ct_slice`, "mr-to-mr": :func:`mr_from_mr_slice` (MR normalisation).
    Returns (image float32 of the image's shape, labels uint8 (S, S) of its centre slice).
    """
    if family == "ct-phase":
        return enhance_slice(image, target, keys, rng, ct_params, settings)
    if family == "ct-to-mr":
        return mr_from_ct_slice(image, target, rng, ct_params, settings)
    if family == "mr-to-mr":
        return mr_from_mr_slice(image, target, rng, settings)
    raise ValueError(f"image family must be one of {IMAGE_FAMILIES}, got {family!r}")
