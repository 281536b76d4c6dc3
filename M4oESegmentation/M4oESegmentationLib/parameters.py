"""The module's state in the scene: the ``@parameterNodeWrapper`` class behind the panel.

``M4oESegmentationLogic.getParameterNode`` wraps the module's parameter node in
:class:`M4oESegmentationParameterNode`; widgets with a ``SlicerParameterName`` property in
Resources/UI/M4oESegmentation.ui are bound to its fields by name (Testing/test_packaging.py checks
every binding against the annotations here). The module file imports this when Slicer loads it,
so it imports ``slicer`` only.
"""

from typing import Annotated

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

MODALITY_CHOICES = ("Auto", "CT", "MR")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
BACKEND_CHOICES = ("torch", "onnx", "auto")
MODEL_SMOOTHING = -1.0
"""``smoothingMm`` value (the spin box's minimum, shown as its special text) for the model card's."""


@parameterNodeWrapper
class M4oESegmentationParameterNode:
    """The module's state in the scene.

    model: a model name (``m4oe models``) or a model card path; "" is the embedded default.
    task: the model's label set; "" is its first. forcedExpert: the expert that Compare uses.
    datasetPath: the training dataset folder that Export writes to. fastInference: one forward
    pass per slice instead of the model card's test-time augmentation. smoothingMm: sigma in mm of
    the Gaussian that averages class probabilities over neighbouring slices (0: off;
    MODEL_SMOOTHING: the model card's). keepAllPieces: keep every connected component of each
    segment instead of the card's clean-up. backend: the engine's network runtime. severalVolumes:
    Apply segments every volume checked in the batch list, each result next to its volume.
    skippedStructures: the task's structures left unchecked (comma-separated keys; "": all are
    segmented). roi: segment only inside this markups ROI (none: everywhere). bodyCrop: segment
    only the box around the body. gateLayer: the layer the gate review shows (a MoME model's
    decoder scale, e.g. "router.0"; "": the mean over them).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modality: Annotated[str, Choice(list(MODALITY_CHOICES))] = "Auto"
    model: str = ""
    task: str = ""
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "auto"
    fastInference: bool = False
    smoothingMm: Annotated[float, WithinRange(MODEL_SMOOTHING, 20.0)] = MODEL_SMOOTHING
    keepAllPieces: bool = False
    backend: Annotated[str, Choice(list(BACKEND_CHOICES))] = "torch"
    skippedStructures: str = ""
    roi: vtkMRMLMarkupsROINode
    bodyCrop: bool = True
    outputSegmentation: vtkMRMLSegmentationNode
    replaceExisting: bool = False
    showGateOverlay: bool = False
    gateLayer: str = ""
    forcedExpert: str = ""
    datasetPath: str = ""
    severalVolumes: bool = False
