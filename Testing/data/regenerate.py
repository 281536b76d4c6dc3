"""Rewrite the stored outputs of the embedded model (run from the repository root after replacing it).

    python Testing/data/regenerate.py

Segments three held-out phantom volumes (CT, T1 and T2, generator seed 20261123, at most 128 voxels a
side) with the embedded default model on the CPU in float32 (PyTorch), one thread, and writes the
label maps and ``embedded_model_expected.json`` (seed, size, mean Dice against the phantom's ground
truth, dominant expert and mean gate weights) next to this file.
"""

from __future__ import annotations

import json
from pathlib import Path

import SimpleITK as sitk

from m4oe.evaluate import evaluate
from m4oe.phantom import PHANTOM_LABELS, generate_case
from m4oe.predictor import Predictor

SEED = 20261123
MAX_SIZE = 128


def main() -> None:
    folder = Path(__file__).resolve().parent
    predictor = Predictor.from_pretrained(None, device="cpu", threads=1, backend="torch")
    expected = {}
    for sequence in ("ct", "t1", "t2"):
        image, truth = generate_case(sequence, SEED, max_size=MAX_SIZE)
        prediction = predictor.predict(image, gates=True)
        name = f"embedded_phantom_{sequence}.nii.gz"
        sitk.WriteImage(prediction.labelmap, str(folder / name), True)
        scores = evaluate(prediction.labelmap, truth, labels=list(PHANTOM_LABELS.values()))
        overall = prediction.gate_summary["overall"]
        expected[sequence] = {
            "seed": SEED,
            "max_size": MAX_SIZE,
            "file": name,
            "mean_dice": round(scores["mean_dice"], 4),
            "dominant_expert": overall["dominant_expert"],
            "mean_weights": {k: round(v, 6) for k, v in overall["mean_weights"].items()},
        }
        print(sequence, expected[sequence], {e["label"]: e["dice"] for e in scores["labels"]})
    (folder / "embedded_model_expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
