"""The M4oE network: config, registry of named variants, and the builder."""

from __future__ import annotations

from collections.abc import Callable

from .config import ModelConfig
from .imagenet import InitReport, imagenet_filter_fn, load_imagenet_weights
from .moe import DenseFeedForward, MoEFeedForward, load_balancing_loss
from .mome import MoME
from .swin_unet import SwinUNet

__all__ = [
    "MODEL_ALIASES",
    "MODEL_REGISTRY",
    "DenseFeedForward",
    "InitReport",
    "MoEFeedForward",
    "MoME",
    "ModelConfig",
    "SwinUNet",
    "build_model",
    "build_network",
    "get_config",
    "imagenet_filter_fn",
    "load_balancing_loss",
    "load_imagenet_weights",
]

_TINY = dict(img_size=64, embed_dim=24, num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.1)


def _swin_unet() -> ModelConfig:
    return ModelConfig()


def _m4oe() -> ModelConfig:
    return ModelConfig(experts=("ct", "mr"))


def _m4oe_paper_released() -> ModelConfig:
    # The released code (csyfjiang/M4oE): one expert per training dataset (FLARE22 CT, ATLAS2023 MR,
    # AMOS22 MR, as in its mkcsv.py), a head per dataset, RGB input and its channel gate, whose
    # expert weights are a constant 1/E: this variant's gate cannot prefer an expert.
    return ModelConfig(
        in_chans=3,
        experts=("flare22", "atlas2023", "amos22"),
        tasks=(("flare22", 14), ("atlas2023", 3), ("amos22", 16)),
        gate="channel",
    )


def _m4oe_paper_described() -> ModelConfig:
    # The paper's description: one expert per modality, a Linear(C, E) softmax gate per token that
    # weighs each expert, the same heads and input as the released code.
    return ModelConfig(
        in_chans=3,
        experts=("ct", "mr"),
        tasks=(("flare22", 14), ("atlas2023", 3), ("amos22", 16)),
        gate="softmax",
    )


def _swin_unet_tiny() -> ModelConfig:
    return ModelConfig(**_TINY, tasks=(("abdomen", 4),))


def _m4oe_tiny() -> ModelConfig:
    return ModelConfig(**_TINY, tasks=(("abdomen", 4), ("liver", 2)), experts=("ct", "mr", "mr-t2"))


# MoME's default label space: the phantom organs by display name (what the text encoder reads).
# Training replaces it with the union of its datasets' labels.
_MOME_CLASSES = (
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "aorta",
    "inferior vena cava",
    "vertebrae",
    "stomach",
    "pancreas",
)
_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _mome() -> ModelConfig:
    return ModelConfig(
        arch="mome",
        experts=("ct", "mr"),
        tasks=(("organs", len(_MOME_CLASSES) + 1),),
        class_names=_MOME_CLASSES,
        text_dim=384,
        text_encoder=_MINILM,
    )


def _mome_tiny() -> ModelConfig:
    return _mome().replace(**_TINY)


MODEL_REGISTRY: dict[str, Callable[[], ModelConfig]] = {
    "swin-unet": _swin_unet,
    "m4oe": _m4oe,
    "m4oe-paper-released": _m4oe_paper_released,
    "m4oe-paper-described": _m4oe_paper_described,
    "swin-unet-tiny": _swin_unet_tiny,
    "m4oe-tiny": _m4oe_tiny,
    "mome": _mome,
    "mome-tiny": _mome_tiny,
}


MODEL_ALIASES: dict[str, str] = {"m4oe-paper": "m4oe-paper-released"}
"""Former names, kept so that code naming them builds what it built before."""


def get_config(name: str, **overrides) -> ModelConfig:
    """The config of a registered variant, with fields overridden (unknown fields are errors)."""
    name = MODEL_ALIASES.get(name, name)
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name]().replace(**overrides)


def build_network(cfg: ModelConfig) -> SwinUNet:
    """The network class a config's ``arch`` names (:class:`SwinUNet` or :class:`MoME`), built."""
    return MoME(cfg) if cfg.arch == "mome" else SwinUNet(cfg)


def build_model(name: str | ModelConfig, **overrides) -> SwinUNet:
    """Build a randomly initialised network from a registered name or a config."""
    cfg = name.replace(**overrides) if isinstance(name, ModelConfig) else get_config(name, **overrides)
    return build_network(cfg)
