"""The main job on a fresh machine: segment generated CT and MR volumes end to end.

``python -m m4oe.demo OUT_DIR`` generates a held-out phantom CT and a T2 MR (``m4oe.phantom``,
an anatomy no training case used), runs ``m4oe segment`` on each with the embedded default model,
gate maps and a report, and scores the result against the phantom's ground truth with
``m4oe evaluate``. Without the embedded model (a build that does not bundle it), an UNTRAINED,
seeded M4oE model is built so the pipeline still runs; its masks are then meaningless.
``synthetic_ct`` is a simpler CT-like volume for tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import save_checkpoint
from .cli import main as cli_main
from .hub import DEFAULT_MODEL, EMBEDDED_DIR
from .model import build_model
from .model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
from .phantom import generate_case
from .preprocessing import DEFAULT_PARAMS
from .terminology import standard_label

DEMO_ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")


def synthetic_ct(shape_zyx=(24, 160, 192), spacing_xyz=(2.0, 2.0, 5.0), seed: int = 0) -> sitk.Image:
    """A synthetic abdominal CT slab in HU.

    Returns an image of size (x, y, z) = shape_zyx reversed, spacing in mm, direction
    diag(-1, -1, 1) (RAS-stored, as most CT NIfTI files), so the patient's right (liver) is at
    large array x and anterior at large array y. Organs are ellipsoids with noise.
    """
    rng = np.random.default_rng(seed)
    Z, Y, X = shape_zyx
    sx, sy, sz = spacing_xyz
    z, y, x = np.meshgrid(
        (np.arange(Z) - Z / 2) * sz, (np.arange(Y) - Y / 2) * sy, (np.arange(X) - X / 2) * sx, indexing="ij"
    )
    # Array x grows towards the patient's right, array y towards anterior (direction diag(-1,-1,1)).
    hu = np.full(shape_zyx, -1000.0, np.float32)

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    hu[ellipsoid(0, 0, 0, 170, 120, 1e9)] = -100.0  # subcutaneous fat
    hu[ellipsoid(0, 0, 0, 155, 105, 1e9)] = 40.0  # soft tissue
    hu[ellipsoid(70, 20, 10, 70, 60, 60)] = 60.0  # liver (patient right, anterior)
    hu[ellipsoid(-85, -20, 15, 30, 40, 45)] = 50.0  # spleen (left, posterior)
    hu[ellipsoid(55, -55, -20, 22, 28, 40)] = 30.0  # right kidney
    hu[ellipsoid(-55, -55, -15, 22, 28, 40)] = 30.0  # left kidney
    hu[ellipsoid(0, -75, 0, 18, 18, 1e9)] = 400.0  # vertebral bodies
    hu += rng.normal(0.0, 10.0, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(spacing_xyz)
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((X / 2 * sx, Y / 2 * sy, -Z / 2 * sz))
    return image


def untrained_model(folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised (seeded) M4oE model with a complete card; outputs are meaningless."""
    torch.manual_seed(seed)
    labels = [standard_label(key, i + 1) for i, key in enumerate(DEMO_ORGANS)]
    model = build_model("m4oe", tasks=(("abdomen", len(labels) + 1),))
    card = ModelCard(
        name="m4oe-untrained-demo",
        description="UNTRAINED M4oE (random weights) used to exercise the pipeline; its masks are noise",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr")],
        tasks=[TaskInfo("abdomen", labels, largest_component=[1, 2])],
        preprocessing=Preprocessing(
            intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}, slice_batch=8
        ),
        provenance={"training": "none: random initialisation", "seed": seed},
        notes="untrained demonstration model; not for any clinical or research use",
    )
    return save_checkpoint(model, card, folder, overwrite=True)


DEMO_SEED = 20261123  # a phantom anatomy that no training case uses (training seeds derive from 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m4oe.demo", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model_args = []
    if not (EMBEDDED_DIR / DEFAULT_MODEL / "model.json").exists():
        print("the embedded default model is not bundled: using an UNTRAINED model (meaningless masks)")
        model_args = ["--model", str(untrained_model(out / "untrained_model"))]
    for sequence in ("ct", "t2"):
        image, truth = generate_case(sequence, DEMO_SEED, max_size=192)
        volume = out / f"phantom_{sequence}.nii.gz"
        reference = out / f"phantom_{sequence}_truth.nii.gz"
        sitk.WriteImage(image, str(volume), useCompression=True)
        sitk.WriteImage(truth, str(reference), useCompression=True)
        segmentation = out / f"phantom_{sequence}.seg.nrrd"
        print(f"--- segmenting a held-out {sequence.upper()} phantom: {volume}")
        code = cli_main(
            [
                "segment",
                str(volume),
                "-o",
                str(segmentation),
                *model_args,
                "--gates",
                str(out / f"gates_{sequence}"),
                "--report",
                str(out / f"report_{sequence}.png"),
                "--overwrite",
            ]
        )
        if code:
            return code
        print(f"--- Dice and HD95 against the phantom's ground truth ({reference.name})")
        code = cli_main(["evaluate", str(segmentation), str(reference)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
