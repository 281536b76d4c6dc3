"""The architecture of a Swin-UNet / M4oE network as one frozen dataclass.

A config is everything needed to rebuild the network (it travels in the model card); it holds
no weights and no training settings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

MOE_PLACEMENTS = ("encoder", "decoder", "both")
GATES = ("softmax", "channel")
GATE_CONTEXTS = ("none", "slice")
ARCHITECTURES = ("swin-unet", "mome")
MAX_NEIGHBOUR_SLICES = 3
"""The most adjacent slices per side a model may read (``neighbour_slices``)."""
# Fields that only a MoME network has; a Swin-UNet / M4oE config leaves them out of its dict, so
# the cards written before MoME existed stay byte for byte what they were.
MOME_FIELDS = ("arch", "class_names", "text_dim", "text_encoder")
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a 2D Swin-UNet whose feed-forward layers may be mixtures of experts.

    Attributes:
        img_size: side of the square input slice in pixels (224 in the published model).
        patch_size: side of a patch token in pixels; the first stage works at img_size / patch_size.
        in_chans: input channels (1 for a grey slice, 3 to match ImageNet weights unchanged).
        neighbour_slices: k > 0 gives the network 2k + 1 input channels, the slice it segments
            (the centre channel) and k adjacent slices on each side in volume order (inferior to
            superior after :func:`m4oe.geometry.to_axial_stack`; at the volume's ends the end slice is
            repeated), at the volume's own slice spacing: "2.5D" input, the craniocaudal context a
            2D network lacks to tell the pancreas or the vena cava from bowel on one slice. Needs
            ``in_chans`` 1; see :attr:`input_channels`.
        embed_dim: channels of the first stage; stage i has embed_dim * 2**i.
        depths: Swin blocks per encoder stage; the decoder mirrors depths[-2::-1].
        num_heads: attention heads per encoder stage.
        window_size: attention window side in tokens (clamped to a stage's resolution).
        mlp_ratio: hidden width of every feed-forward layer (dense MLP or expert) over its input.
        qkv_bias, drop_rate, attn_drop_rate, drop_path_rate: as in Swin Transformer.
        tasks: (name, number of classes including background) for each output head.
        experts: one name per expert (usually the modality it is trained on, e.g. "ct", "mr").
            Empty means a dense Swin-UNet.
        moe_placement: which blocks use experts: "encoder", "decoder" or "both".
        gate: "softmax" (Linear(C, E), softmax over experts per token: the gate of the paper) or
            "channel" (the released code's Linear(C, C) softmax over channels times the plain sum
            of experts; kept for ablation only).
        top_k: experts evaluated per token; None evaluates all of them (dense mixture).
        gate_context: what the softmax gate sees besides its token. "none": the token alone (the
            paper's gate). "slice": also a descriptor of the whole input slice, pooled from a small
            convolutional encoder on the normalised intensities (before any LayerNorm), added to
            every MoE layer's gate logits through its own Linear(context, E). The token features a
            gate sees are layer-normalised, and in the embedded model's trunk they carried no
            T1-vs-T2 signal (linear probes at chance), so its per-token gates could not tell MR
            sequences whose organs differ mainly in brightness; the slice descriptor can. The
            projections start at zero, so a model gains the option without changing its output
            until it is trained.
        arch: "swin-unet" (the network of :class:`~m4oe.model.swin_unet.SwinUNet`, dense or M4oE)
            or "mome" (:class:`~m4oe.model.mome.MoME`: a dense Swin trunk, a router over
            ``experts`` at the decoder scales conditioned on a text embedding of each class name,
            and one logit map per class from a dot product with that class's query).
        class_names: "mome" only: the class names whose text embeddings the model holds, in label
            order (value 1 first); the single task has len(class_names) + 1 classes.
        text_dim: "mome" only: width of the stored class-name embeddings.
        text_encoder: "mome" only: which frozen text encoder made the stored embeddings (a name and
            the SHA-256 of its weights, or the stand-in featurisation's name).
    """

    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 1
    neighbour_slices: int = 0
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.2
    tasks: tuple[tuple[str, int], ...] = (("abdomen", 14),)
    experts: tuple[str, ...] = ()
    moe_placement: str = "both"
    gate: str = "softmax"
    top_k: int | None = None
    gate_context: str = "none"
    arch: str = "swin-unet"
    class_names: tuple[str, ...] = ()
    text_dim: int = 0
    text_encoder: str = ""

    def __post_init__(self):
        # Tuples arrive as lists from JSON; normalise before validating.
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        object.__setattr__(self, "tasks", tuple((str(n), int(k)) for n, k in self.tasks))
        object.__setattr__(self, "experts", tuple(str(e) for e in self.experts))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        self._validate()
        self._validate_mome()

    def _validate_mome(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.arch != "mome":
            if self.class_names or self.text_dim or self.text_encoder:
                raise ValueError("class_names, text_dim and text_encoder belong to arch 'mome' only")
            return
        if len(self.tasks) != 1:
            raise ValueError(f"a mome model has one task (its label space), got {list(self.task_names)}")
        if len(self.class_names) != self.tasks[0][1] - 1:
            raise ValueError(
                f"a mome model needs one class name per class of its task ({self.tasks[0][1] - 1}), "
                f"got {len(self.class_names)}: {list(self.class_names)}"
            )
        if len(set(self.class_names)) != len(self.class_names) or not all(self.class_names):
            raise ValueError(f"class names must be unique and non-empty, got {list(self.class_names)}")
        if self.text_dim < 1:
            raise ValueError(f"a mome model needs text_dim >= 1, got {self.text_dim}")
        plain_router = self.gate == "softmax" and self.top_k is None and self.gate_context == "none"
        if not self.experts or not plain_router:
            raise ValueError(
                "a mome model needs experts (at least 2) and the plain softmax router: no top_k, no "
                "gate_context, gate 'softmax'"
            )

    def _validate(self):
        stages = len(self.depths)
        if stages < 2:
            raise ValueError(f"depths must list at least 2 stages, got {self.depths}")
        if len(self.num_heads) != stages:
            raise ValueError(
                f"num_heads {self.num_heads} must have one entry per stage of depths {self.depths}"
            )
        if any(d < 1 for d in self.depths):
            raise ValueError(f"every stage needs at least one block, got depths {self.depths}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        if not 0 <= self.neighbour_slices <= MAX_NEIGHBOUR_SLICES:
            raise ValueError(
                f"neighbour_slices must be 0..{MAX_NEIGHBOUR_SLICES}, got {self.neighbour_slices}"
            )
        if self.neighbour_slices and self.in_chans != 1:
            raise ValueError("neighbour_slices needs in_chans 1 (each channel is one slice)")
        if self.patch_size < 1 or self.img_size % (self.patch_size * 2 ** (stages - 1)):
            raise ValueError(
                f"img_size {self.img_size} must be divisible by patch_size * 2**(stages-1) = "
                f"{self.patch_size * 2 ** (stages - 1)}"
            )
        for i, heads in enumerate(self.num_heads):
            if heads < 1 or (self.embed_dim * 2**i) % heads:
                raise ValueError(
                    f"stage {i}: width {self.embed_dim * 2**i} is not divisible by {heads} heads"
                )
        if self.window_size < 1:
            raise ValueError(f"window_size must be positive, got {self.window_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not self.tasks:
            raise ValueError("tasks must name at least one output head")
        names = [n for n, _ in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for name, classes in self.tasks:
            if not _TASK_NAME.match(name):
                raise ValueError(
                    f"task name {name!r} must start with a letter and hold only letters, digits, _ or -"
                )
            if classes < 2:
                raise ValueError(f"task {name!r} needs at least 2 classes (background + one), got {classes}")
        if len(set(self.experts)) != len(self.experts):
            raise ValueError(f"expert names must be unique, got {self.experts}")
        if self.moe_placement not in MOE_PLACEMENTS:
            raise ValueError(f"moe_placement must be one of {MOE_PLACEMENTS}, got {self.moe_placement!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.gate_context not in GATE_CONTEXTS:
            raise ValueError(f"gate_context must be one of {GATE_CONTEXTS}, got {self.gate_context!r}")
        if self.gate_context != "none" and (not self.experts or self.gate != "softmax"):
            raise ValueError(
                f"gate_context={self.gate_context!r} needs experts and the softmax gate "
                f"(experts {list(self.experts)}, gate {self.gate!r})"
            )
        if self.experts and len(self.experts) < 2:
            raise ValueError(
                f"a mixture needs at least 2 experts, got {self.experts}; use experts=() for dense"
            )
        if self.top_k is not None:
            if not self.experts:
                raise ValueError(f"top_k={self.top_k} needs experts; this config is dense")
            if not 1 <= self.top_k <= len(self.experts):
                raise ValueError(f"top_k must be in [1, {len(self.experts)}], got {self.top_k}")
            if self.gate == "channel":
                raise ValueError(
                    f"top_k={self.top_k} needs the softmax gate; the channel gate weighs no expert"
                )

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def input_channels(self) -> int:
        """Channels of the network's input: ``in_chans``, or 2 * ``neighbour_slices`` + 1 slices."""
        return 2 * self.neighbour_slices + 1 if self.neighbour_slices else self.in_chans

    @property
    def is_moe(self) -> bool:
        return bool(self.experts)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.tasks)

    def num_classes(self, task: str) -> int:
        for name, classes in self.tasks:
            if name == task:
                return classes
        raise ValueError(f"unknown task {task!r}; this model has {list(self.task_names)}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["depths"] = list(self.depths)
        data["num_heads"] = list(self.num_heads)
        data["tasks"] = [[n, k] for n, k in self.tasks]
        data["experts"] = list(self.experts)
        data["class_names"] = list(self.class_names)
        if self.arch == "swin-unet":
            for name in MOME_FIELDS:
                del data[name]
        if not self.neighbour_slices:  # a one-slice model's card reads as before the key existed
            del data["neighbour_slices"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output; an unknown key is an error, not a silent default."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)

    def replace(self, **overrides) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(known)}")
        return dataclasses.replace(self, **overrides)
