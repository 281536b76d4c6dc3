"""Slicer-side helpers of the M4oE Segmentation module: everything that is not a widget.

- :mod:`.volumes`: volume and segmentation nodes <-> SimpleITK images (RAS <-> LPS), subject
  hierarchy placement.
- :mod:`.gate_review`: the gate summary as MRML table, plot and colour-table nodes.
- :mod:`.process`: the engine's command line run in a separate process, read by a thread and
  polled by the GUI's timer; cancel kills the whole process tree. Imports neither Slicer nor Qt.
- :mod:`.feedback`: a reviewed case saved into an nnU-Net v2 training dataset. Imports no Slicer.

These modules import ``slicer``, ``vtk`` and MRML classes (through ``slicer``) but never PyTorch;
of the engine they use only its torch-free modules (``m4oe.io``, ``m4oe.labels``,
``m4oe.terminology``, ``m4oe.errors``).
"""
