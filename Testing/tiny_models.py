"""A tiny untrained M4oE model with a full card, for tests (importable by name: Testing/ has two
conftest modules, so tests must not import from ``conftest``)."""

from __future__ import annotations

from pathlib import Path


def save_tiny_model(folder: Path, seed: int = 0, name: str = "m4oe-tiny", **overrides) -> Path:
    """Save a seeded, untrained tiny M4oE model (64-pixel input, 3 experts) with a full card."""
    import torch

    from m4oe.checkpoint import save_checkpoint
    from m4oe.model import build_model
    from m4oe.model_card import ExpertInfo, ModelCard, Preprocessing, TaskInfo
    from m4oe.preprocessing import DEFAULT_PARAMS
    from m4oe.terminology import standard_label

    torch.manual_seed(seed)
    model = build_model(name, **overrides)
    organs = ("liver", "spleen", "kidney_right")
    card = ModelCard(
        name="tiny-test-model",
        description="untrained tiny model for tests",
        architecture=model.cfg,
        experts=[ExpertInfo("ct", "ct"), ExpertInfo("mr", "mr"), ExpertInfo("mr-t2", "mr")],
        tasks=[
            TaskInfo(
                "abdomen", [standard_label(k, i + 1) for i, k in enumerate(organs)], largest_component=[1]
            ),
            TaskInfo("liver", [standard_label("liver", 1)]),
        ],
        preprocessing=Preprocessing(
            intensity={m: DEFAULT_PARAMS[m].to_dict() for m in ("ct", "mr")}, slice_batch=4
        ),
        provenance={"training": "none"},
    )
    return save_checkpoint(model, card, folder)
