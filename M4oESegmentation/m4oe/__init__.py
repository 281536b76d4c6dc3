"""M4oE inference engine: the network, checkpoints, preprocessing, volume inference and CLI.

This package never imports Slicer, Qt or CTK; the Slicer module runs it in a separate process.
"""

__version__ = "0.1.0"
