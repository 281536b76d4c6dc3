"""ImageNet initialisation from a local Swin-T file, in timm's and in the official layout.

The source is a randomly initialised timm Swin-T (no download): what matters is where each tensor
lands, not what it learnt.
"""

from __future__ import annotations

import re

import pytest
import safetensors.torch
import timm
import torch

from m4oe.errors import ModelError
from m4oe.model import build_model
from m4oe.model.imagenet import imagenet_filter_fn, load_imagenet_weights


@pytest.fixture(scope="module")
def source() -> dict[str, torch.Tensor]:
    """A Swin-T state dict in timm's layout (patch merging at the start of stages 1..3)."""
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict()


def _official(source: dict[str, torch.Tensor]) -> dict:
    """The same weights as the official release stores them, buffers and all."""
    renamed = {}
    for key, value in source.items():
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        renamed[key.replace("head.fc.", "head.")] = value
    renamed["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    renamed["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    return {"model": renamed}


@pytest.fixture(scope="module")
def files(source, tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("imagenet")
    paths = {
        "timm.safetensors": folder / "swin_tiny.safetensors",
        "timm.pth": folder / "swin_tiny_timm.pth",
        "official.pth": folder / "swin_tiny_patch4_window7_224.pth",
    }
    safetensors.torch.save_file(source, str(paths["timm.safetensors"]))
    torch.save(source, paths["timm.pth"])
    torch.save(_official(source), paths["official.pth"])
    return paths


@pytest.fixture(scope="module")
def m4oe():
    return build_model("m4oe")


@pytest.fixture(scope="module")
def swin_unet_rgb():
    return build_model("swin-unet", in_chans=3)


def test_m4oe_gets_swin_weights_in_every_expert_and_the_decoder(source, files, m4oe):
    report = load_imagenet_weights(m4oe, files["timm.safetensors"])
    sd = m4oe.state_dict()
    assert torch.equal(sd["layers.1.blocks.1.attn.qkv.weight"], source["layers.1.blocks.1.attn.qkv.weight"])
    table = "layers.2.blocks.0.attn.relative_position_bias_table"
    assert torch.equal(sd[table], source[table])
    for e in range(m4oe.cfg.num_experts):
        for fc in ("fc1", "fc2"):
            assert torch.equal(
                sd[f"layers.0.blocks.1.mlp.experts.{e}.{fc}.weight"],
                source[f"layers.0.blocks.1.mlp.{fc}.weight"],
            )
    grey = source["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    assert torch.allclose(sd["patch_embed.proj.weight"], grey)
    # timm's stage-2 patch merging is the official (and our) end of stage 1.
    assert torch.equal(
        sd["layers.1.downsample.reduction.weight"], source["layers.2.downsample.reduction.weight"]
    )
    # Decoder stage u mirrors encoder stage n-2-u: layers_up.0 <- layers.2, layers_up.2 <- layers.0.
    for u, i in ((0, 2), (2, 0)):
        for key in ("attn.proj.weight", "mlp.experts.1.fc1.weight", "norm1.weight"):
            src = key.replace("experts.1.", "")
            assert torch.equal(sd[f"layers_up.{u}.blocks.1.{key}"], source[f"layers.{i}.blocks.1.{src}"])
    assert "layers.0.blocks.0.mlp.gate.weight" in report.missing
    assert "heads.abdomen.weight" in report.missing and "first_up.expand.weight" in report.missing
    assert not any(
        k.startswith(("layers.0.blocks", "patch_embed", "norm.")) and "gate" not in k for k in report.missing
    )
    assert "head.fc.weight: ImageNet classifier" in report.skipped
    # Swin-T has 6 blocks in stage 2, the Swin-UNet 2: the rest is reported, not raised.
    assert any(s.startswith("layers.2.blocks.5.attn.qkv.weight: no matching") for s in report.skipped)


def test_both_layouts_and_both_file_types_give_identical_weights(files, m4oe):
    load_imagenet_weights(m4oe, files["timm.safetensors"])
    reference = {k: v.clone() for k, v in m4oe.state_dict().items()}
    for name in ("timm.pth", "official.pth"):
        with torch.no_grad():
            for p in m4oe.parameters():
                p.zero_()
        report = load_imagenet_weights(m4oe, files[name])
        sd = m4oe.state_dict()
        assert all(torch.equal(sd[k], reference[k]) for k in report.loaded)
        assert all(not sd[k].any() for k in report.missing)
    assert any("attn_mask: buffer" in s for s in report.skipped)
    assert any("relative_position_index: buffer" in s for s in report.skipped)
    assert "head.weight: ImageNet classifier" in report.skipped


def test_rgb_model_copies_the_patch_embedding(source, files, swin_unet_rgb):
    report = load_imagenet_weights(swin_unet_rgb, files["official.pth"])
    sd = swin_unet_rgb.state_dict()
    assert torch.equal(sd["patch_embed.proj.weight"], source["patch_embed.proj.weight"])
    assert torch.equal(sd["layers.3.blocks.1.mlp.fc2.weight"], source["layers.3.blocks.1.mlp.fc2.weight"])
    assert torch.equal(sd["layers_up.1.blocks.0.mlp.fc1.bias"], source["layers.1.blocks.0.mlp.fc1.bias"])
    assert torch.equal(sd["norm.weight"], source["norm.weight"])
    assert "heads.abdomen.weight" in report.missing
    assert not any("gate" in k for k in report.missing)


def test_filter_is_pure_and_decoder_optional(source, swin_unet_rgb):
    before = {k: v.clone() for k, v in swin_unet_rgb.state_dict().items()}
    weights, report = imagenet_filter_fn(source, swin_unet_rgb, decoder=False)
    assert not any(k.startswith("layers_up.") for k in weights)
    assert "layers_up.0.blocks.0.attn.qkv.weight" in report.missing
    assert all(torch.equal(v, before[k]) for k, v in swin_unet_rgb.state_dict().items())


def test_shape_mismatches_are_reported_not_raised(source):
    tiny = build_model("swin-unet-tiny")
    weights, report = imagenet_filter_fn(source, tiny)
    assert not weights
    assert any(
        "shape (288, 96) does not fit layers.0.blocks.0.attn.qkv.weight (72, 24)" in s for s in report.skipped
    )


def test_refuses_files_that_are_not_swin_t(tmp_path, m4oe):
    other = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(
        {"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, str(other)
    )
    with pytest.raises(ModelError, match="no weight in this file fits the model") as info:
        load_imagenet_weights(m4oe, other)
    assert str(other) in str(info.value)
    with pytest.raises(ModelError, match="not found"):
        load_imagenet_weights(m4oe, tmp_path / "missing.pth")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read the ImageNet checkpoint"):
        load_imagenet_weights(m4oe, broken)
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"unknown ImageNet checkpoint type '\.ckpt'"):
        load_imagenet_weights(m4oe, tmp_path / "x.ckpt")
