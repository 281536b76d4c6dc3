"""Initialise a Swin-UNet / M4oE network from an ImageNet Swin-T checkpoint on disk.

Two layouts of the same weights exist: the official Swin release (``swin_tiny_patch4_window7_224.pth``,
keys under ``"model"``, patch merging ``layers.{i}.downsample`` at the END of stage i, classifier
``head``) and timm's (patch merging at the START of stage i, i.e. the official ``layers.{i-1}``,
classifier ``head.fc``). :func:`imagenet_filter_fn` accepts both and maps them onto our parameter
names (which follow the official layout):

- patch embedding: copied; for a 1-channel model the RGB kernels are summed, so a grey slice
  replicated to RGB would give the same response;
- attention (qkv, proj, relative position bias table), norms, patch merging, final norm: copied;
- each block's MLP ``fc1``/``fc2`` into the dense MLP or into EVERY expert of that block;
- with ``decoder=True``, decoder blocks ``layers_up.{u}.blocks.{j}`` from encoder stage n-2-u,
  as the Swin-UNet authors initialised their decoder;
- skipped: the classifier, non-persistent buffers (relative position index, attention masks).

Gates, heads, patch expansion and skip fusion stay at their random initialisation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch

from m4oe.errors import ModelError

from .swin_unet import SwinUNet

_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_MLP = re.compile(r"^mlp\.(fc[12]\..+)$")
_BUFFERS = ("relative_position_index", "attn_mask")


@dataclass
class InitReport:
    """What an initialisation filled and what it left.

    loaded: model keys given a checkpoint value. skipped: checkpoint keys not used, or not used for
    one target, each as ``"key: reason"``. missing: model keys left at their random initialisation.
    """

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.skipped)} skipped, {len(self.missing)} left at random init"
        )


def imagenet_filter_fn(
    state_dict: dict[str, torch.Tensor], model: SwinUNet, *, decoder: bool = True
) -> tuple[dict[str, torch.Tensor], InitReport]:
    """Map a Swin-T state dict (official or timm layout) onto ``model``'s parameter names.

    Returns the state dict to load with ``strict=False`` and the report. Pure: neither the input
    nor the model is modified, but the returned tensors may be the input's own (one per expert:
    the same tensor), so load them rather than edit them in place. Shape mismatches are reported
    in ``skipped``, not raised.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    targets = model.state_dict()
    n_stages = len(model.cfg.depths)
    timm_layout = _is_timm_layout(state_dict)
    out: dict[str, torch.Tensor] = {}
    report = InitReport()
    for key, value in state_dict.items():
        if key.startswith("head."):
            report.skipped.append(f"{key}: ImageNet classifier")
            continue
        if key.endswith(_BUFFERS):
            report.skipped.append(f"{key}: buffer the model rebuilds")
            continue
        if not isinstance(value, torch.Tensor):
            report.skipped.append(f"{key}: not a tensor")
            continue
        name = _official_name(key) if timm_layout else key
        matches = _targets(name, targets, n_stages, decoder)
        if not matches:
            report.skipped.append(f"{key}: no matching parameter in this model")
        for target in matches:
            tensor = _fold_channels(name, value, targets[target])
            if tensor.shape != targets[target].shape:
                report.skipped.append(
                    f"{key}: shape {tuple(value.shape)} does not fit {target} {tuple(targets[target].shape)}"
                )
                continue
            out[target] = tensor.detach().to(dtype=targets[target].dtype)
    report.loaded = [k for k in targets if k in out]
    report.missing = [k for k in targets if k not in out]
    return out, report


def load_imagenet_weights(model: SwinUNet, path: str | Path, *, decoder: bool = True) -> InitReport:
    """Initialise ``model`` in place from a local Swin-T file (``.pth``/``.pt`` or ``.safetensors``).

    ``.pth`` files are read with ``torch.load(weights_only=True)``, which refuses pickled code;
    ``.safetensors`` (timm's hub format) with safetensors. Raises ModelError naming the file when it
    is missing or unreadable, or when nothing in it fits the model (not a Swin-T checkpoint).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError("ImageNet checkpoint not found", path)
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        raise ModelError(
            f"unknown ImageNet checkpoint type {suffix!r}; expected .pth, .pt or .safetensors", path
        )
    try:
        if suffix == ".safetensors":
            state_dict = safetensors.torch.load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and safetensors raise many types; all mean "unreadable"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"cannot read the ImageNet checkpoint: {first_line}", path) from None
    if not isinstance(state_dict, dict):
        raise ModelError(f"expected a state dict, found a {type(state_dict).__name__}", path)
    weights, report = imagenet_filter_fn(state_dict, model, decoder=decoder)
    if not report.loaded:
        raise ModelError("no weight in this file fits the model; is it a Swin-T ImageNet checkpoint?", path)
    model.load_state_dict(weights, strict=False)
    return report


def _is_timm_layout(state_dict: dict) -> bool:
    """timm has no patch merging in stage 0 and one in the last stage; the official release the reverse."""
    stages = {int(m.group(1)) for k in state_dict if (m := _DOWNSAMPLE.match(k))}
    if stages:
        return 0 not in stages
    return "head.fc.weight" in state_dict


def _official_name(key: str) -> str:
    """A timm key in the official layout: ``layers.{i}.downsample`` -> ``layers.{i-1}.downsample``."""
    match = _DOWNSAMPLE.match(key)
    if match is None:
        return key
    return f"layers.{int(match.group(1)) - 1}.downsample.{key[match.end() :]}"


def _targets(name: str, model_keys: dict, n_stages: int, decoder: bool) -> list[str]:
    """Model keys that an official-layout checkpoint key initialises (possibly none)."""
    match = _BLOCK.match(name)
    if match is None:
        return [name] if name in model_keys else []
    stage, block, rest = int(match.group(1)), match.group(2), match.group(3)
    prefixes = [f"layers.{stage}.blocks.{block}."]
    if decoder and stage <= n_stages - 2:
        prefixes.append(f"layers_up.{n_stages - 2 - stage}.blocks.{block}.")
    found = []
    for prefix in prefixes:
        mlp = _MLP.match(rest)
        if mlp is None or prefix + rest in model_keys:
            candidates = [prefix + rest]
        else:
            candidates = [
                f"{prefix}mlp.experts.{e}.{mlp.group(1)}" for e in range(_expert_count(model_keys, prefix))
            ]
        found += [c for c in candidates if c in model_keys]
    return found


def _expert_count(model_keys: dict, prefix: str) -> int:
    """Number of experts in the MoE feed-forward layer of the block at ``prefix`` (0 if dense)."""
    count = 0
    while f"{prefix}mlp.experts.{count}.fc1.weight" in model_keys:
        count += 1
    return count


def _fold_channels(name: str, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum RGB patch-embedding kernels (C, 3, p, p) into one grey channel when the model takes 1."""
    if name == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
        return value.sum(dim=1, keepdim=True)
    return value
