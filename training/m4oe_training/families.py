"""The image families a training data set can draw its samples from (``synth`` in a config).

Kept apart from :mod:`.synth` (which needs torch) so that the command line can offer the same
choices as the config checks without importing PyTorch.
"""

FAMILIES = ("ct", "t1", "t2", "any")
"""Contrast families :func:`.synth.render_slice` draws from label maps; "off" in a config means real
images only."""

IMAGE_FAMILIES = ("ct-phase", "ct-to-mr", "mr-to-mr")
"""Families drawn from a dataset's own images rather than its label maps: "ct-phase"
(:func:`.synth.enhance_slice`, a contrast phase simulated on a real CT), "ct-to-mr"
(:func:`.crossmodal.mr_from_ct_slice`, a real CT slice turned MR-like by a random intensity
network) and "mr-to-mr" (:func:`.crossmodal.mr_from_mr_slice`, a real MR slice given another,
random contrast by such a network)."""

FAMILY_MODALITY = {
    "ct": "ct",
    "t1": "mr",
    "t2": "mr",
    "any": "mr",
    "ct-phase": "ct",
    "ct-to-mr": "mr",
    "mr-to-mr": "mr",
}
"""The modality of each family's images, the modality its samples train."""

IMAGE_FAMILY_SOURCE = {"ct-phase": "ct", "ct-to-mr": "ct", "mr-to-mr": "mr"}
"""The modality of the dataset images each image family starts from."""

SYNTH_CHOICES = ("off", *FAMILIES, *IMAGE_FAMILIES)
"""Every value of a data set's ``synth`` key."""
