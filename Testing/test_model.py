"""The Swin-UNet / M4oE network: every registered variant, routing, gates, sizes and bad arguments.

Behaviour is checked on the tiny variants (64 x 64 input); the full-size variants run one slice
through forward and backward and are counted, nothing more.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from m4oe.model import (
    MODEL_REGISTRY,
    DenseFeedForward,
    ModelConfig,
    MoEFeedForward,
    build_model,
    get_config,
    load_balancing_loss,
)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _moe_layers(model) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def _slices(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)


def _tiny(name: str = "m4oe-tiny", **overrides):
    torch.manual_seed(0)
    return build_model(name, **overrides).eval()


def _expected_gate_names(cfg: ModelConfig, placement: str) -> set[str]:
    n = len(cfg.depths)
    names = set()
    if placement in ("encoder", "both"):
        names |= {f"encoder.{i}.{j}" for i in range(n) for j in range(cfg.depths[i])}
    if placement in ("decoder", "both"):
        names |= {f"decoder.{i}.{j}" for i in range(n - 1) for j in range(cfg.depths[n - 2 - i])}
    return names


# --- every registered variant -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_registered_variant_forward_backward_finite(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    cfg = model.cfg
    batch = 2 if cfg.img_size <= 64 else 1
    logits = model(_slices(cfg, batch))
    first, *others = cfg.task_names
    assert logits.shape == (batch, cfg.num_classes(first), cfg.img_size, cfg.img_size)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        if any(pname.startswith(f"heads.{t}.") for t in others):
            assert p.grad is None, f"{pname}: the head of another task got a gradient"
        else:
            assert p.grad is not None, f"{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    for layer in _moe_layers(model):
        if layer.gate_type == "softmax":
            assert layer.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["swin-unet-tiny", "m4oe-tiny"])
def test_every_task_head_has_its_own_shape(name):
    model = _tiny(name)
    x = _slices(model.cfg, batch=3)
    with torch.no_grad():
        for task, classes in model.cfg.tasks:
            assert model(x, task=task).shape == (3, classes, 64, 64)
        assert torch.equal(model(x), model(x, task=model.cfg.task_names[0]))


# --- gates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "force"),
    [({}, None), ({"top_k": 2}, None), ({"top_k": 1}, None), ({}, 1), ({"gate": "channel"}, None)],
    ids=["softmax", "top2", "top1", "forced", "channel"],
)
def test_gates_have_stage_shapes_and_sum_to_one(overrides, force):
    model = _tiny(**overrides)
    cfg = model.cfg
    with torch.no_grad():
        _, gates = model(_slices(cfg), force_expert=force, return_gates=True)
    assert set(gates) == _expected_gate_names(cfg, "both")
    res0 = cfg.img_size // cfg.patch_size
    n = len(cfg.depths)
    for name, g in gates.items():
        part, stage, _ = name.split(".")
        level = int(stage) if part == "encoder" else n - 2 - int(stage)
        assert g.shape == (2, 3, res0 >> level, res0 >> level), name
        torch.testing.assert_close(g.sum(dim=1), torch.ones_like(g[:, 0]))
        if force is not None:
            assert torch.equal(g, F.one_hot(torch.full(g[:, 0].shape, force), 3).permute(0, 3, 1, 2).float())
        elif cfg.gate == "channel":
            assert torch.equal(g, torch.full_like(g, 1 / 3))
        else:
            assert g.std() > 0, f"{name}: a softmax gate should weigh experts unequally somewhere"


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_top1_with_a_one_hot_gate_equals_forced_routing(expert):
    model = _tiny(top_k=1)
    with torch.no_grad():
        for layer in _moe_layers(model):
            layer.gate.weight.zero_()
            layer.gate.bias.copy_(100 * F.one_hot(torch.tensor(expert), 3).float())
        x = _slices(model.cfg)
        routed = model(x)
        forced = model(x, force_expert=expert)
        other = model(x, force_expert=(expert + 1) % 3)
    torch.testing.assert_close(routed, forced, atol=1e-6, rtol=0)
    assert not torch.allclose(routed, other, atol=1e-4)


def test_top1_gate_still_gets_a_gradient():
    model = _tiny(top_k=1).train()
    model(_slices(model.cfg)).square().mean().backward()
    for layer in _moe_layers(model):
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("expert", [0, 1, 2])
def test_forced_routing_equals_a_dense_model_holding_that_expert(expert):
    moe = _tiny()
    dense = build_model("swin-unet-tiny", tasks=moe.cfg.tasks).eval()
    state = {}
    for key, value in moe.state_dict().items():
        found = re.fullmatch(r"(.*\.mlp\.)(experts\.(\d+)\.|gate\.)(.*)", key)
        if found is None:
            state[key] = value
        elif found[3] is not None and int(found[3]) == expert:
            state[found[1] + found[4]] = value
    dense.load_state_dict(state)  # strict: the dense model needs exactly these weights
    x = _slices(moe.cfg)
    with torch.no_grad():
        for task in moe.cfg.task_names:
            torch.testing.assert_close(
                moe(x, task, force_expert=expert), dense(x, task), atol=1e-5, rtol=1e-5
            )


def test_per_sample_forced_routing_equals_each_sample_alone():
    model = _tiny()
    x = _slices(model.cfg, batch=4)
    chosen = torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        together, gates = model(x, force_expert=chosen, return_gates=True)
        for i, e in enumerate(chosen.tolist()):
            alone = model(x[i : i + 1], force_expert=e)
            torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(together[0:1], model(x[0:1], force_expert=0), atol=1e-4)
    for g in gates.values():
        assert torch.equal(g.argmax(dim=1), chosen[:, None, None].expand_as(g[:, 0]))


def test_top_k_equal_to_the_number_of_experts_is_the_dense_mixture():
    mixture = _tiny()
    top3 = _tiny(top_k=3)
    top3.load_state_dict(mixture.state_dict())
    x = _slices(mixture.cfg)
    with torch.no_grad():
        torch.testing.assert_close(top3(x), mixture(x), atol=1e-6, rtol=1e-6)

    # The constructor maps k=E to the dense path; the routed path must agree with it too.
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3)
    tokens = torch.randn(2, 5, 8)
    with torch.no_grad():
        dense_out, _ = ffn(tokens)
        ffn.top_k = 3
        routed_out, _ = ffn(tokens)
    torch.testing.assert_close(routed_out, dense_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("num_experts", "k"), [(3, 1), (4, 2), (4, 3)])
def test_top_k_matches_a_token_by_token_reference(num_experts, k):
    torch.manual_seed(1)
    ffn = MoEFeedForward(8, num_experts, mlp_ratio=2.0, top_k=k)
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        out, probs = ffn(x)
        expected = torch.zeros_like(x)
        for b in range(2):
            for n in range(6):
                p = F.softmax(ffn.gate(x[b, n]), dim=-1).tolist()
                best = sorted(range(num_experts), key=lambda e: -p[e])[:k]
                total = sum(p[e] for e in best)
                for e in best:
                    expected[b, n] += p[e] / total * ffn.experts[e](x[b, n])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(probs, F.softmax(ffn.gate(x), dim=-1).detach())


def test_top1_inference_shortcut_equals_the_weighted_training_path():
    torch.manual_seed(0)
    ffn = MoEFeedForward(16, 3, top_k=1)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        inference, _ = ffn(x)
    training, _ = ffn(x)
    assert training.requires_grad
    assert torch.equal(inference, training.detach())


def test_an_expert_no_token_picks_gets_a_zero_gradient_not_none():
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3, top_k=1)
    with torch.no_grad():
        ffn.gate.bias.copy_(torch.tensor([100.0, 0.0, 0.0]))
    out, _ = ffn(torch.randn(2, 5, 8))
    out.square().sum().backward()
    assert ffn.experts[0].fc1.weight.grad.abs().sum() > 0
    for idle in ffn.experts[1:]:
        assert idle.fc1.weight.grad is not None and not idle.fc1.weight.grad.any()


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_runs_each_token_through_k_experts_only(k):
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3, top_k=k)
    rows = []
    for expert in ffn.experts:
        expert.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[0]))
    with torch.no_grad():
        ffn(torch.randn(3, 7, 8))
    assert sum(rows) == k * 3 * 7


def test_channel_gate_follows_the_released_formula():
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3, gate="channel")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out, weights = ffn(x)
        expected = F.softmax(ffn.gate(x), dim=-1) * sum(expert(x) for expert in ffn.experts)
    assert ffn.gate.out_features == 8
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(weights, torch.full((2, 5, 3), 1 / 3))


@pytest.mark.parametrize(("force", "k"), [(torch.tensor([1, 0]), None), (None, 1), (None, 2), (None, None)])
def test_moe_runs_under_autocast_with_float32_tokens(force, k):
    # Under CUDA autocast the LayerNorm before the ffn yields float32 while the experts yield
    # bfloat16; CPU autocast on float32 tokens reproduces that mix.
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3, top_k=k)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        reference, _ = ffn(x, force_expert=force)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = ffn(x, force_expert=force)
    torch.testing.assert_close(out.float(), reference, atol=5e-2, rtol=5e-2)


def test_dense_feed_forward_reports_no_gates():
    ffn = DenseFeedForward(8)
    out, gates = ffn(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 8) and gates is None
    assert ffn.fc1.out_features == 32


# --- load balancing -------------------------------------------------------------------------------


def test_load_balancing_loss_is_one_when_uniform_and_e_when_collapsed():
    # Each expert wins a third of the tokens and the mean probabilities are equal: loss 1.
    rotating = torch.eye(3).repeat(4, 1).T.reshape(1, 3, 3, 4)
    torch.testing.assert_close(load_balancing_loss({"a": rotating}), torch.tensor(1.0))
    torch.testing.assert_close(load_balancing_loss([torch.full((2, 3, 4, 4), 1 / 3)]), torch.tensor(1.0))
    collapsed = torch.zeros(2, 3, 4, 4)
    collapsed[:, 1] = 1
    torch.testing.assert_close(load_balancing_loss([collapsed, collapsed]), torch.tensor(3.0))
    # Averaged over layers, not summed.
    torch.testing.assert_close(load_balancing_loss([rotating, collapsed[:1, :, :3]]), torch.tensor(2.0))


def test_load_balancing_loss_has_a_gradient_through_the_model_gates():
    model = _tiny().train()
    _, gates = model(_slices(model.cfg), return_gates=True)
    loss = load_balancing_loss(gates)
    assert 1.0 <= loss.item() <= 3.0
    loss.backward()
    for layer in _moe_layers(model):
        assert layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0


def test_load_balancing_loss_needs_a_layer():
    with pytest.raises(ValueError, match="at least one MoE layer"):
        load_balancing_loss({})


# --- placement -------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["encoder", "decoder", "both"])
def test_moe_placement_puts_experts_only_where_asked(placement):
    model = _tiny(moe_placement=placement)
    for part, stages in (("encoder", model.layers), ("decoder", model.layers_up)):
        wanted = MoEFeedForward if placement in (part, "both") else DenseFeedForward
        for stage in stages:
            for block in stage.blocks:
                assert type(block.mlp) is wanted
    with torch.no_grad():
        _, gates = model(_slices(model.cfg), return_gates=True)
    assert set(gates) == _expected_gate_names(model.cfg, placement)


def test_dense_model_returns_no_gates():
    model = _tiny("swin-unet-tiny")
    with torch.no_grad():
        _, gates = model(_slices(model.cfg), return_gates=True)
    assert gates == {}
    assert not _moe_layers(model)


# --- sizes -----------------------------------------------------------------------------------------


def test_dense_swin_unet_has_the_published_size():
    count = _num_params(build_model("swin-unet", in_chans=3))
    assert abs(count - 27.2e6) <= 0.02 * 27.2e6, count


def test_m4oe_paper_released_sizes_with_channel_and_softmax_gates():
    channel = _num_params(build_model("m4oe-paper-released"))
    softmax = _num_params(build_model("m4oe-paper-released", gate="softmax"))
    assert abs(channel - 60.4e6) <= 0.01 * 60.4e6, channel
    assert 1.9e6 <= channel - softmax <= 2.0e6, channel - softmax


# --- slice context for the gates ------------------------------------------------------------------


def test_slice_context_starts_at_zero_so_a_model_gains_it_without_changing_its_output():
    plain = _tiny()
    torch.manual_seed(1)
    context = build_model("m4oe-tiny", gate_context="slice").eval()
    added = [k for k in context.state_dict() if k not in plain.state_dict()]
    assert added and all("context" in k for k in added)
    context.load_state_dict({**context.state_dict(), **plain.state_dict()})
    x = _slices(plain.cfg)
    with torch.no_grad():
        a, gates_a = plain(x, return_gates=True)
        b, gates_b = context(x, return_gates=True)
    assert torch.equal(a, b)
    assert all(torch.equal(gates_a[k], gates_b[k]) for k in gates_a)


def _with_trained_context(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in _moe_layers(model):
            layer.context.weight.copy_(torch.randn(layer.context.weight.shape, generator=gen))
    return model


def test_slice_context_shifts_every_token_of_a_slice_by_the_same_logits():
    model = _with_trained_context(_tiny(gate_context="slice"))
    x = _slices(model.cfg, batch=1)
    x2 = x.clone()
    x2[..., :8, :8] += 3.0  # a change in one corner
    with torch.no_grad():
        _, g1 = model(x, return_gates=True)
        _, g2 = model(x2, return_gates=True)
        c1, c2 = model.slice_context(x), model.slice_context(x2)
    assert not torch.allclose(c1, c2)
    # Far from the corner (outside the attention windows it reaches in the first layer) the token
    # features are the same, so the gate moves only through the slice context: the log-probability
    # ratios between experts change by one amount for every such token.
    layer = _moe_layers(model)[0]
    shift = layer.context(c2) - layer.context(c1)
    log1, log2 = g1["encoder.0.0"].log()[0], g2["encoder.0.0"].log()[0]  # (E, H, W)
    far = (log2 - log1)[:, 8:, 8:]
    relative = far - far[:1]
    expected = (shift - shift[:, :1])[0][:, None, None].expand_as(relative)
    assert torch.allclose(relative, expected, atol=1e-5)
    assert relative.abs().max() > 1e-3


def test_slice_context_is_one_per_sample_and_skipped_by_forced_routing():
    model = _with_trained_context(_tiny(gate_context="slice"))
    x = _slices(model.cfg, batch=3)
    with torch.no_grad():
        batch = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
        _, gates = model(x, force_expert=1, return_gates=True)
    assert torch.allclose(batch, alone, atol=1e-5)
    assert all(torch.equal(g[:, 1], torch.ones_like(g[:, 1])) for g in gates.values())
    calls = []
    hook = model.slice_context.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(x, force_expert=1)
    hook.remove()
    assert calls == []


def _bands(gen: torch.Generator, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 64, 64) noisy slices with one 16-pixel band across: even samples a bright band on a
    dark slice ("modality" 0), odd ones a dark band on a bright slice (1). Both hold the same kinds
    of tokens (bright, dark, either edge); only how much of the slice is bright tells them apart."""
    slices = []
    for i in range(n):
        start = int(torch.randint(0, 64, (1,), generator=gen))
        band = (torch.arange(64) - start) % 64 < 16
        image = torch.where(band[:, None], 1.0, -1.0).expand(64, 64) * (1 if i % 2 == 0 else -1)
        slices.append(image + 0.3 * torch.randn(64, 64, generator=gen))
    return torch.stack(slices)[:, None], torch.tensor([0, 1] * (n // 2))


def _own_expert_weight(gates: dict, expert: torch.Tensor) -> dict[str, float]:
    index = expert[:, None, None, None]
    return {k: float(g.gather(1, index.expand(-1, 1, *g.shape[2:])).mean()) for k, g in gates.items()}


@pytest.mark.parametrize("gate_context", ["none", "slice"])
def test_slice_context_lets_the_first_layers_route_by_what_only_the_slice_shows(gate_context):
    torch.manual_seed(0)
    model = build_model("m4oe-tiny", experts=("a", "b"), gate_context=gate_context).train()
    gate_params = [p for n, p in model.named_parameters() if ".gate." in n or "context" in n]
    optimizer = torch.optim.Adam(gate_params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):  # the routing loss alone, on the gates alone
        x, expert = _bands(gen)
        _, gates = model.forward_features(x)
        loss = x.new_zeros(())
        for g in gates.values():
            own = g.gather(1, expert[:, None, None, None].expand(-1, 1, *g.shape[2:]))
            loss = loss - own.log().mean() / len(gates)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, expert = _bands(torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, gates = model.eval().forward_features(x)
    own = _own_expert_weight(gates, expert)
    first = [v for k, v in own.items() if k.startswith("encoder.0.")]
    if gate_context == "slice":
        assert min(own.values()) > 0.95, own
    else:
        # A first-stage token sees a few pixels: a band's inside or an edge, the same in both.
        assert max(first) < 0.8, own


# --- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        *(get_config(name) for name in sorted(MODEL_REGISTRY)),
        get_config("m4oe-tiny", top_k=2, moe_placement="decoder", mlp_ratio=2.0, in_chans=3),
        get_config("m4oe-tiny", gate_context="slice"),
    ],
    ids=[*sorted(MODEL_REGISTRY), "m4oe-tiny-top2-decoder", "m4oe-tiny-slice-context"],
)
def test_config_round_trips_through_json(cfg):
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert isinstance(again.tasks, tuple) and isinstance(again.tasks[0], tuple)
    assert isinstance(again.depths, tuple) and isinstance(again.experts, tuple)


def test_from_dict_rejects_unknown_keys():
    data = ModelConfig().to_dict() | {"expert_count": 3}
    with pytest.raises(ValueError, match="expert_count"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"in_chans": 2}, "got 2"),
        ({"top_k": 0}, "got 0"),
        ({"top_k": 4}, "got 4"),
        ({"gate": "foo"}, "'foo'"),
        ({"moe_placement": "middle"}, "'middle'"),
        ({"num_heads": (1, 2, 4)}, "(1, 2, 4)"),
        ({"img_size": 100}, "img_size 100"),
        ({"experts": ("ct",)}, "('ct',)"),
        ({"tasks": (("liver", 2), ("liver", 3))}, "['liver', 'liver']"),
        ({"tasks": (("liver", 1),)}, "got 1"),
        ({"tasks": (("a.b", 2),)}, "'a.b'"),
        ({"gate": "channel", "top_k": 1}, "top_k=1"),
        ({"experts": (), "top_k": 1}, "top_k=1"),
        ({"drop_path_rate": 1.5}, "1.5"),
        ({"expert_count": 3}, "expert_count"),
        ({"gate_context": "volume"}, "'volume'"),
        ({"gate_context": "slice", "gate": "channel"}, "gate 'channel'"),
        ({"gate_context": "slice", "experts": ()}, "experts []"),
    ],
)
def test_bad_config_names_the_bad_value(overrides, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        build_model("m4oe-tiny", **overrides)


def test_unknown_model_name_is_an_error():
    with pytest.raises(ValueError, match="'m4oe-huge'"):
        build_model("m4oe-huge")


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"num_experts": 1}, "got 1"),
        ({"gate": "foo"}, "'foo'"),
        ({"top_k": 0}, "got 0"),
        ({"top_k": 4}, "got 4"),
        ({"gate": "channel", "top_k": 2}, "top_k=2"),
    ],
)
def test_bad_moe_arguments_name_the_bad_value(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        MoEFeedForward(8, **{"num_experts": 3, **kwargs})


# --- forward errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 64, 64), (1, 64, 64)])
def test_wrong_input_shape_is_named(shape):
    model = _tiny()
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        model(torch.zeros(shape))


def test_unknown_task_is_named():
    model = _tiny()
    with pytest.raises(ValueError, match="'spleen'"):
        model(_slices(model.cfg), task="spleen")


def test_force_expert_on_a_dense_model_is_an_error():
    model = _tiny("swin-unet-tiny")
    with pytest.raises(ValueError, match="dense"):
        model(_slices(model.cfg), force_expert=0)


@pytest.mark.parametrize(
    ("force", "named"),
    [(3, "got 3"), (-1, "got -1"), (torch.tensor([0, 5]), "[0, 5]"), (torch.tensor([0, 1, 2]), "holds 3")],
)
def test_bad_force_expert_is_named(force, named):
    model = _tiny()
    with pytest.raises(ValueError, match=re.escape(named)):
        model(_slices(model.cfg), force_expert=force)


# --- modes ----------------------------------------------------------------------------------------


def test_eval_is_deterministic_and_train_is_stochastic():
    model = _tiny()
    x = _slices(model.cfg)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()  # drop-path 0.1 in the tiny variants
        assert not torch.equal(model(x), model(x))


def test_forced_expert_accepts_any_integer_type_and_refuses_other_values():
    """A NumPy integer (e.g. from ``np.argmax``) routes like the same Python int; bools, floats and
    out-of-range indices are errors naming the value."""
    import numpy as np

    model = _tiny()
    x = _slices(model.cfg)
    with torch.no_grad():
        reference = model(x, force_expert=2)
        torch.testing.assert_close(model(x, force_expert=np.int64(2)), reference, atol=0, rtol=0)
        torch.testing.assert_close(model(x, force_expert=torch.tensor([2, 2])), reference)
        for bad, message in ((True, "True"), (1.0, "1.0"), ("ct", "'ct'"), (np.int64(3), "got 3")):
            with pytest.raises(ValueError, match=message):
                model(x, force_expert=bad)
