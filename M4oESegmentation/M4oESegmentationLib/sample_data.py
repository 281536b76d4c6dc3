"""Phantom CT and MR sample volumes, generated on this computer by the engine (no download).

The module registers :data:`PHANTOM_SAMPLES` with Slicer's Sample Data module; choosing one calls
:func:`write_phantom_sample` (once: the file stays in Sample Data's cache folder) and loads the
file. :func:`create_phantom_volume` makes a volume node directly, for tests and scripts.

The module file imports this when Slicer starts, to register the samples
(:func:`register_samples`) before the engine's packages are installed; so the generator
(SimpleITK, scipy, ``m4oe.io``), Slicer's ``SampleData`` module and ``slicer`` itself are imported
only by the functions that use them.
"""

from __future__ import annotations

import os
from pathlib import Path

PHANTOM_SAMPLES = {"M4oEPhantomCT": ("ct", 11), "M4oEPhantomMR": ("t1", 11)}
"""Sample name -> (``m4oe.phantom`` sequence, ``generate_case`` seed). Training sets written by
``m4oe phantom`` draw their case seeds through ``m4oe.phantom.case_seed`` (large hashed integers),
so these small seeds are not training cases of the embedded model."""
CT_WINDOW = (400.0, 40.0)
"""Abdomen soft-tissue window (width, level) in HU."""
SAMPLE_CATEGORY = "M4oE Segmentation"
"""The samples' category in the Sample Data module."""


def sample_sequence(sample_name: str) -> tuple[str, int]:
    """(sequence, seed) of a sample; ValueError naming the samples for an unknown name."""
    if sample_name not in PHANTOM_SAMPLES:
        raise ValueError(f"no phantom sample {sample_name!r}; there are {sorted(PHANTOM_SAMPLES)}")
    return PHANTOM_SAMPLES[sample_name]


def phantom_sample_path(sample_name: str) -> Path:
    """The file of a sample in Sample Data's cache folder (``slicer.mrmlScene``'s remote cache
    directory), where Sample Data looks for it before downloading."""
    import slicer

    return Path(slicer.mrmlScene.GetCacheManager().GetRemoteCacheDirectory()) / f"{sample_name}.nrrd"


def register_samples(icon: str | Path, load_sample) -> None:
    """Register :data:`PHANTOM_SAMPLES` with Slicer's Sample Data module (at Slicer's start-up).

    ``icon``: the thumbnail shown for each sample. ``load_sample(source)``: Sample Data's custom
    downloader, called with the chosen sample's ``SampleDataSource`` (``source.sampleName``); it
    generates the file (:func:`write_phantom_sample`) and returns the loaded volume node.
    """
    import SampleData

    for sample_name in PHANTOM_SAMPLES:
        # SampleData's own loader reuses a file already in its cache folder, so once generated
        # the sample also loads through SampleData.downloadSample(); the file:// URI is never fetched.
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=sample_name,
            uris=phantom_sample_path(sample_name).as_uri(),
            fileNames=f"{sample_name}.nrrd",
            nodeNames=sample_name,
            thumbnailFileName=str(icon),
            loadFileType="VolumeFile",
            customDownloader=load_sample,
        )


def write_phantom_sample(sample_name: str, path: str | Path, *, max_size: int | None = None) -> Path:
    """Generate a sample's phantom volume into ``path`` (NRRD) unless it is there; return the path.

    The file is written under a temporary name and renamed when complete, so a generation that
    fails or is interrupted never leaves a half-written file that a later load would reuse.
    """
    import SimpleITK as sitk

    from m4oe.phantom import generate_case

    sequence, seed = sample_sequence(sample_name)
    path = Path(path)
    if path.exists():
        return path
    image, _labels = generate_case(sequence, seed, max_size=max_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial.nrrd")
    try:
        sitk.WriteImage(image, str(partial), True)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def create_phantom_volume(
    sequence: str = "ct", seed: int = 0, *, max_size: int | None = None, name: str | None = None, scene=None
):
    """A synthetic abdomen from ``m4oe.phantom`` as a scalar volume node.

    ``sequence``: "ct" (HU), "t1" or "t2" (MR). ``max_size``: at most this many voxels along any
    axis (smaller and faster; same anatomy). Added to ``scene`` (default ``slicer.mrmlScene``) with
    the phantom's geometry (LPS image, RAS node) and a soft-tissue window for CT.
    """
    from m4oe.phantom import generate_case

    from .volumes import sitk_to_volume_node

    image, _labels = generate_case(sequence, seed, max_size=max_size)
    node = sitk_to_volume_node(image, name or f"M4oEPhantom{sequence.upper()}", scene=scene)
    set_default_window(node, sequence)
    return node


def set_default_window(volume_node, sequence: str) -> None:
    """Show a CT phantom with the abdomen soft-tissue window; MR keeps Slicer's automatic window."""
    display = volume_node.GetDisplayNode()
    if display is not None and sequence.lower() == "ct":
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(*CT_WINDOW)
