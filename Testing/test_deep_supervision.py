"""Deep supervision (``deep_supervision``): nnU-Net's loss weights, labels at the decoder's
resolutions, the Swin-UNet's training-only heads, MoME's partial sums over its routed scales, and
whole runs that keep the heads in their state and out of the export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss
from safetensors.torch import load_file
from test_mome_training import info, minilm, mome_run_config, partial_sets, text_encoder  # noqa: F401 (fixtures)
from test_training import phantoms  # noqa: F401 (fixture)
from training_helpers import dataset, write_config

from m4oe.checkpoint import load_checkpoint
from m4oe.model import build_model
from m4oe_training.config import ConfigError, load_config
from m4oe_training.deep_supervision import AuxiliaryHeads, labels_at, scale_weights
from m4oe_training.mome import LabelSpace, MoMELoss, partial_label_loss
from m4oe_training.stage_loss import StageLoss
from m4oe_training.train import run


def test_scale_weights_halve_per_resolution_and_drop_the_coarsest():
    # Four encoder stages: three decoder stages; the coarsest has no weight, as in nnU-Net.
    assert scale_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert sum(scale_weights(4)) == pytest.approx(1.0) and len(scale_weights(4)) == 4
    assert scale_weights(1) == [1.0]


def test_labels_at_lower_resolution_keep_each_structure_in_place():
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 16:32, 8:16] = 3  # 16 x 8 pixels: 4 x 2 at a quarter of the resolution
    labels[1, 60:64, 0:4] = 1
    quarter = labels_at(labels, (16, 16))
    assert quarter.dtype == torch.long and quarter.shape == (2, 16, 16)
    expected = torch.zeros(2, 16, 16, dtype=torch.long)
    expected[0, 4:8, 2:4] = 3
    expected[1, 15, 0] = 1
    assert torch.equal(quarter, expected)
    assert labels_at(labels, (64, 64)) is labels


def test_swin_unet_deep_supervision_adds_weighted_losses_at_the_decoder_stages():
    torch.manual_seed(0)
    model = build_model("m4oe-tiny")  # tasks abdomen (4 classes) and liver (2)
    images = torch.randn(4, 1, 64, 64)
    labels = torch.randint(0, 4, (4, 64, 64))
    labels[2:] = labels[2:].clamp(max=1)
    datasets = torch.tensor([0, 0, 1, 1])
    plain = StageLoss(model, [0, 1], ["abdomen", "liver"], 0.4, 0.7)
    deep = StageLoss(model, [0, 1], ["abdomen", "liver"], 0.4, 0.7, deep_supervision=True)
    assert plain.aux_heads is None and plain.weights == [1.0]
    # Heads on the two finer decoder stages (16 and 8 px of 64), per task, none on the coarsest.
    assert [h[1].out_features for h in deep.aux_heads.heads["abdomen"]] == [4, 4]
    assert [h[1].in_features for h in deep.aux_heads.heads["liver"]] == [24, 48]
    model.eval()  # no drop path: both losses see the same network output
    with torch.no_grad():
        loss_plain, _ = plain("joint", images, labels, datasets)
        loss_deep, _ = deep("joint", images, labels, datasets)
        scales: list = []
        features, _ = model.forward_features(images, None, scales)
        assert [tuple(s.shape[1:3]) for s in scales] == [(4, 4), (8, 8), (16, 16)]
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.4, lambda_dice=0.7, batch=True)
        expected = 0.0
        for task, rows in (("abdomen", slice(0, 2)), ("liver", slice(2, 4))):
            outputs = [model.heads[task](features[rows])]
            outputs += [o[rows] for o in deep.aux_heads(task, scales)]
            assert [o.shape[-1] for o in outputs] == [64, 16, 8]
            for weight, logits in zip([4 / 7, 2 / 7, 1 / 7], outputs, strict=True):
                target = labels_at(labels[rows], logits.shape[-2:])
                expected += weight * dice_ce(logits, target[:, None]) * 0.5
    assert float(loss_deep) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(loss_deep) - float(loss_plain)) > 1e-4
    # The heads learn: every one of them takes a gradient.
    model.train()
    loss, _ = deep("experts", images, labels, datasets)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deep.aux_heads.parameters())


def test_auxiliary_heads_can_take_a_subset_of_the_batch():
    heads = AuxiliaryHeads([96, 48, 24], (("abdomen", 5),))
    scales = [torch.randn(3, r, r, d) for r, d in ((4, 96), (8, 48), (16, 24))]
    rows = torch.tensor([True, False, True])
    full, part = heads("abdomen", scales), heads("abdomen", scales, rows)
    assert [tuple(o.shape) for o in full] == [(3, 5, 16, 16), (3, 5, 8, 8)]
    assert all(torch.allclose(f[rows], p) for f, p in zip(full, part, strict=True))


def mome_with_space():
    organs = info("organs", {"background": 0, "liver": 1, "spleen": 2})
    vessels = info("vessels", {"background": 0, "aorta": 1, "liver": 2})
    space = LabelSpace.build([organs, vessels])
    torch.manual_seed(2)
    model = build_model("mome-tiny", class_names=("liver", "spleen", "aorta"), tasks=(("organs", 4),))
    model.set_class_embeddings(torch.randn(3, 384))
    return model.eval(), space


def test_mome_coarse_logits_are_the_partial_sums_of_its_routed_scales():
    model, _ = mome_with_space()
    images = torch.randn(2, 1, 64, 64)
    coarse: list = []
    with torch.no_grad():
        logits, _ = model.class_logits(images, [1, 3])
        again, _ = model.class_logits(images, [1, 3], coarse_logits=coarse)
        assert torch.equal(logits, again)  # asking for them changes nothing
        # The routers' own logits, deepest first (4, 8, 16 px).
        scales: list = []
        model._decode(images, None, scales)
        q = model.query(model.class_embeddings[torch.tensor([0, 2])])
        per_scale = [router(f, q)[0] for router, f in zip(model.routers, scales, strict=True)]
        bias = model.class_bias(q)[None, :, :, None]

    def up(x, size):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)

    at_8 = per_scale[1] + up(per_scale[0], (8, 8))
    at_16 = per_scale[2] + up(at_8, (16, 16))
    assert [tuple(c.shape) for c in coarse] == [(2, 2, 16, 16), (2, 2, 8, 8)]  # finest first
    assert torch.allclose(coarse[0], at_16 + bias, atol=1e-5)
    assert torch.allclose(coarse[1], at_8 + bias, atol=1e-5)


def test_mome_loss_with_deep_supervision_sums_the_partial_label_losses_of_every_scale():
    model, space = mome_with_space()
    with torch.no_grad():  # away from the initialisation, where every scale predicts about 0
        for p in model.routers.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    images = torch.randn(2, 1, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, 8:32, 8:32], labels[0, 40:56, 40:56] = 1, 2  # organs: liver, spleen
    labels[1, 8:32, 8:32], labels[1, 40:56, 40:56] = 2, 1  # vessels: liver, aorta
    datasets = torch.tensor([0, 1])
    with torch.no_grad():
        deep = MoMELoss(model, space, [0, 1], 1.0, 1.0, deep_supervision=True)
        loss, _ = deep("joint", images, labels, datasets)
        plain, _ = MoMELoss(model, space, [0, 1], 1.0, 1.0)("joint", images, labels, datasets)
        coarse: list = []
        logits, _ = model.class_logits(images, None, coarse_logits=coarse)
    union = torch.zeros_like(labels)
    union[:, 8:32, 8:32] = 1
    union[0, 40:56, 40:56], union[1, 40:56, 40:56] = 2, 3
    labelled = torch.tensor([[True, True, False], [True, False, True]])
    parts = [
        partial_label_loss(out, labels_at(union, out.shape[-2:]), [1, 2, 3], labelled)
        for out in (logits, *coarse)
    ]
    assert torch.allclose(plain, parts[0], atol=1e-6)
    expected = sum(w * p for w, p in zip([4 / 7, 2 / 7, 1 / 7], parts, strict=True))
    assert torch.allclose(loss, expected, atol=1e-6) and not torch.allclose(loss, plain, atol=1e-4)


def test_deep_supervision_must_be_a_boolean(phantoms, tmp_path):  # noqa: F811
    path = write_config(
        tmp_path / "c.toml",
        [dataset(phantoms["ct"], "ct")],
        [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
        deep_supervision=1,
    )
    with pytest.raises(ConfigError, match="deep_supervision"):
        load_config(path)


def aux_keys(path: Path) -> list[str]:
    return [k for k in load_file(str(path)) if "aux_heads" in k]


@pytest.mark.slow
def test_deep_supervision_heads_live_in_the_state_and_stay_out_of_the_export(
    phantoms,  # noqa: F811
    partial_sets,  # noqa: F811
    text_encoder,  # noqa: F811
    tmp_path,
):
    """An M4oE and a MoME run with deep supervision, each also without: the state keeps the M4oE
    run's heads (so a resume restores them: the resume tests run with them too), the export holds
    the same tensors as a run without it, and the card records the setting."""
    exports = {}
    for deep in (False, True):
        path = write_config(
            tmp_path / f"m4oe-{deep}.toml",
            [dataset(phantoms["ct"], "ct"), dataset(phantoms["t1"], "mr")],
            [{"kind": "joint", "epochs": 1, "lr": 1e-3}],
            batch_size=2,
            iterations_per_epoch=2,
            optimizer="adamw",
            deep_supervision=deep,
            output_dir=str(tmp_path / f"m4oe-{deep}"),
        )
        out = run(load_config(path)[0], base_dir=tmp_path, command=["test"])
        assert bool(aux_keys(out / "state" / "weights.safetensors")) == deep
        assert not aux_keys(out / "model" / "model.safetensors")
        model, card = load_checkpoint(out / "model")
        assert card.provenance["config"].get("deep_supervision", False) == deep
        exports[deep] = model.state_dict()
        cfg = mome_run_config(partial_sets, f"mome-{deep}", tmp_path / f"mome-{deep}", deep_supervision=deep)
        mome_out = run(cfg, base_dir=tmp_path, command=["test"])
        assert not aux_keys(mome_out / "state" / "weights.safetensors")  # MoME needs no heads
        mome_model, _ = load_checkpoint(mome_out / "model")
        exports[f"mome-{deep}"] = mome_model.state_dict()
    for a, b in ((False, True), ("mome-False", "mome-True")):
        assert exports[a].keys() == exports[b].keys()
        # The same tensors, trained differently.
        assert any(not torch.equal(exports[a][k], exports[b][k]) for k in exports[a])
