"""Resumable training state: weights and optimiser buffers saved and restored, versions."""

from __future__ import annotations

import json

import pytest
import torch
from training_helpers import (
    tensors_sha256,
    tiny_stage_loss,
    train_steps,
)

from m4oe_training.state import load_state, save_state

# Resumable state


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_round_trip_restores_weights_and_optimizer_buffers(tmp_path, monkeypatch, kind):
    def make(module):
        if kind == "sgd":
            return torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        return torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=1e-4)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) must not be used for training state")

    monkeypatch.setattr(torch, "load", refuse)
    module = tiny_stage_loss(seed=0)
    optimizer = make(module)
    train_steps(module, optimizer, steps=2, seed=1)
    torch.manual_seed(1234)
    save_state(tmp_path / "state", module, optimizer, {"stage": 1, "epoch": 2, "best": {"0": 0.5}})
    expected_rng = torch.get_rng_state()
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "weights.safetensors",
    ]
    assert not (tmp_path / "state.tmp").exists() and not (tmp_path / "state.old").exists()

    restored = tiny_stage_loss(seed=7)
    restored_opt = make(restored)
    assert not torch.equal(restored.model.heads["abdomen"].weight, module.model.heads["abdomen"].weight)
    torch.manual_seed(99)
    meta = load_state(tmp_path / "state", restored, restored_opt)
    assert meta["stage"] == 1 and meta["epoch"] == 2 and meta["best"] == {"0": 0.5}
    assert torch.equal(torch.get_rng_state(), expected_rng)

    for (name, a), (_, b) in zip(module.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    original_state = optimizer.state_dict()
    loaded_state = restored_opt.state_dict()
    assert original_state["param_groups"] == loaded_state["param_groups"]
    buffers = {"sgd": ("momentum_buffer",), "adamw": ("exp_avg", "exp_avg_sq", "step")}[kind]
    assert set(original_state["state"]) == set(loaded_state["state"]) and original_state["state"]
    for pid, entries in original_state["state"].items():
        for name in buffers:
            assert torch.equal(
                torch.as_tensor(entries[name]), torch.as_tensor(loaded_state["state"][pid][name])
            )

    # Continuing from the restored state gives exactly what continuing the original gives.
    train_steps(module, optimizer, steps=1, seed=2)
    train_steps(restored, restored_opt, steps=1, seed=2)
    assert tensors_sha256(module.state_dict()) == tensors_sha256(restored.state_dict())


def test_state_of_another_version_is_refused(tmp_path):
    module = tiny_stage_loss(seed=0)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    save_state(tmp_path / "state", module, optimizer, {})
    record = json.loads((tmp_path / "state" / "state.json").read_text())
    (tmp_path / "state" / "state.json").write_text(json.dumps(dict(record, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        load_state(tmp_path / "state", module, optimizer)


def test_a_state_saved_with_two_optimiser_groups_resumes_with_three(tmp_path, monkeypatch):
    """States written before the "shared" group (version 2) still resume: each parameter gets its own
    AdamW moments back."""
    from m4oe_training import state as state_module
    from m4oe_training.optim import is_gate_parameter, parameter_groups

    module = tiny_stage_loss(0)
    named = list(module.named_parameters())
    old_groups = [
        {"params": [p for n, p in named if is_gate_parameter(n)], "name": "gates"},
        {"params": [p for n, p in named if not is_gate_parameter(n)], "name": "rest"},
    ]
    old = torch.optim.AdamW(old_groups, lr=1e-3)
    train_steps(module, old, 1, seed=0)
    monkeypatch.setattr(state_module, "STATE_VERSION", 2)
    save_state(tmp_path / "state", module, old, {"stage": 0})
    monkeypatch.undo()
    new = torch.optim.AdamW(parameter_groups(module), lr=1e-3)
    assert load_state(tmp_path / "state", module, new)["version"] == 2
    assert [g["name"] for g in new.param_groups] == ["gates", "rest", "shared"]
    assert len(old.state) > len(named) // 2
    for _, p in named:  # parameters without a gradient (the MIM read-out) have no moments
        assert (p in new.state) == (p in old.state)
        for key in ("exp_avg", "exp_avg_sq") if p in old.state else ():
            torch.testing.assert_close(new.state[p][key], old.state[p][key])
    train_steps(module, new, 1, seed=1)  # and it steps on
