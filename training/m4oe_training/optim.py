"""Optimiser groups and learning rates of a training run.

Three parameter groups (the MoE gates and MoME routers; experts, task heads and the training
module's read-outs; the layers every modality shares), so that a stage can give the gates and the
shared layers their own rates, and the per-step rate of a stage (linear warm-up, poly decay).
"""

from __future__ import annotations

import re

from torch import nn


def stage_lr(stage, step: int, total_steps: int, poly_power: float) -> float:
    """Learning rate at ``step`` (0-based) of a stage: linear warm-up, then poly decay to 0."""
    lr = stage.lr * (1 - step / max(total_steps, 1)) ** poly_power
    if step < stage.warmup_iterations:
        lr *= (step + 1) / stage.warmup_iterations
    return lr


def is_gate_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the network or the training module) belongs to an MoE
    gate: a gate's token projection, its slice-context projection, the slice-context encoder they
    share, or the training-only read-out of that context; in a MoME network a router's pixel and
    class-query projections (``routers.N.gate``, ``routers.N.gate_query``)."""
    return (
        ".mlp.gate." in f".{name}"
        or re.search(r"(^|\.)routers\.\d+\.gate(_query)?\.", name) is not None
        or is_context_parameter(name)
    )


def is_expert_parameter(name: str, experts: set[int]) -> bool:
    """Whether a parameter (by its name in the network or the training module) belongs to the
    feed-forward expert of one of the indices ``experts`` in an MoE block (``...mlp.experts.I.``)."""
    match = re.search(r"(^|\.)mlp\.experts\.(\d+)\.", name)
    return match is not None and int(match.group(2)) in experts


def is_context_parameter(name: str) -> bool:
    """Whether a parameter exists only with ``gate_context = "slice"`` (in the network, or the
    training module's ``context_probe``)."""
    name = f".{name}"
    return ".mlp.context." in name or ".slice_context." in name or name.startswith(".context_probe.")


def is_shared_parameter(name: str) -> bool:
    """Whether a parameter of the network (by its name in the network or the training module) is
    shared by every modality and task: not an expert's, a gate's or a task head's, nor one of the
    training module's own read-outs. Patch embedding, attention, norms, down- and up-sampling; in a
    dense model its feed-forward layers too. In a MoME network the routers' experts are experts,
    and the class heads (the class-query MLP ``query``, the keys ``pixel_key`` and ``routers.N.key``,
    ``class_bias``) are its task heads. The adjacent slices' projection (``neighbour_embed``) is
    not shared either: a run adds it to a trained model at zero, and at the shared layers' lower rate
    it stayed near zero (training/README.md), so it trains with the heads."""
    name = name.removeprefix("model.") if name.startswith("model.") else f"training.{name}"
    return not (
        name.startswith(("training.", "heads.", "query.", "pixel_key.", "class_bias.", "neighbour_embed."))
        or ".mlp.experts." in f".{name}"
        or re.match(r"routers\.\d+\.(experts|key)\.", name) is not None
        or is_gate_parameter(name)
    )


def parameter_groups(module: nn.Module) -> list[dict]:
    """Three optimiser groups: "gates" (the MoE gates), "rest" (experts, task heads and the training
    read-outs) and "shared" (:func:`is_shared_parameter`), so that a stage can give the gates and
    the shared layers their own learning rates (``gate_lr_scale``, ``shared_lr_scale``). All three
    exist for every model (a dense one has no gate parameters), so a saved optimiser state always
    has the same layout."""
    named = list(module.named_parameters())
    gates = [p for name, p in named if is_gate_parameter(name)]
    shared = [p for name, p in named if is_shared_parameter(name)]
    rest = [p for name, p in named if not is_gate_parameter(name) and not is_shared_parameter(name)]
    return [
        {"params": gates, "name": "gates"},
        {"params": rest, "name": "rest"},
        {"params": shared, "name": "shared"},
    ]


def frozen_parameters(module: nn.Module, dataset_experts: set[int]) -> dict[str, list[nn.Parameter]]:
    """For each value of a stage's ``trainable``, the parameters whose gradients are dropped before
    the optimiser step: none ("all"), all but the gates ("gates"), all but the slice context
    ("context"), all but the feed-forward experts of the indices ``dataset_experts``, the experts
    the run's datasets name ("experts")."""
    named = list(module.named_parameters())
    return {
        "all": [],
        "gates": [p for name, p in named if not is_gate_parameter(name)],
        "context": [p for name, p in named if not is_context_parameter(name)],
        "experts": [p for name, p in named if not is_expert_parameter(name, dataset_experts)],
    }


def group_lr(stage, group: str, lr: float) -> float:
    """The learning rate of optimiser group ``group`` when the stage's rate is ``lr``."""
    return lr * {"gates": stage.gate_lr_scale, "shared": stage.shared_lr_scale}.get(group, 1.0)
