"""The 2D Swin-UNet of M4oE, built from timm's Swin Transformer blocks.

Encoder: patch embedding, then stages of Swin blocks each ending in patch merging (except the
last). Decoder: patch expansion, and per stage a skip concatenation, a linear projection and Swin
blocks mirroring the encoder, then a 4x final expansion and one 1x1 convolution head per task.
Parameter names follow the Swin-UNet / official Swin layout (``layers.{i}.blocks.{j}``,
``layers.{i}.downsample`` at the end of a stage) so ImageNet weights map without renaming.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

from .config import ModelConfig
from .moe import DenseFeedForward, ForcedExpert, MoEFeedForward


class SwinBlock(SwinTransformerBlock):
    """timm's Swin block whose MLP is a feed-forward layer of our own (dense or mixture).

    Works on (B, H, W, C) features; returns them with the expert weights (B, H*W, E) or None.
    """

    def __init__(self, *, ffn_layer: type[nn.Module], **kwargs):
        super().__init__(**kwargs)
        self.mlp = ffn_layer(self.dim)
        # timm leaves Swin's fused attention off as "experimental"; scaled_dot_product_attention does
        # the same arithmetic (outputs within 3e-6) and made the whole network 8-17 % faster on CPU.
        self.attn.fused_attn = True

    def forward(
        self, x: torch.Tensor, force_expert: ForcedExpert = None, context: torch.Tensor | None = None
    ):
        B, H, W, C = x.shape
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        x = x.reshape(B, H * W, C)
        y, gates = self.mlp(self.norm2(x), force_expert, context)
        x = x + self.drop_path2(y)
        return x.reshape(B, H, W, C), gates


class PatchExpand(nn.Module):
    """Upsample (B, H, W, C) to (B, s*H, s*W, C*2/s) with a linear layer and pixel shuffle, then norm."""

    def __init__(self, dim: int, scale: int = 2, out_dim: int | None = None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim if out_dim is not None else dim // 2
        self.expand = nn.Linear(dim, scale * scale * self.out_dim, bias=False)
        self.norm = norm_layer(self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.shuffle(self.expand_pixels(x)))

    def expand_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, s, s, out_dim): each token's s x s new pixels, not yet in place."""
        B, H, W, _ = x.shape
        return self.expand(x).reshape(B, H, W, self.scale, self.scale, self.out_dim)

    @staticmethod
    def shuffle(pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, s, s, C) -> (B, H*s, W*s, C): every token's pixels put in place (any C)."""
        B, H, W, s, _, C = pixels.shape
        return pixels.permute(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, C)


class Stage(nn.Module):
    """A sequence of Swin blocks at one resolution (shift on every other block)."""

    def __init__(
        self, cfg: ModelConfig, dim: int, resolution: int, depth: int, heads: int, drop_path, use_moe
    ):
        super().__init__()
        if use_moe:
            ffn = partial(
                MoEFeedForward,
                num_experts=cfg.num_experts,
                mlp_ratio=cfg.mlp_ratio,
                gate=cfg.gate,
                top_k=cfg.top_k,
                drop=cfg.drop_rate,
                context_dim=cfg.embed_dim if cfg.gate_context == "slice" else None,
            )
        else:
            ffn = partial(DenseFeedForward, mlp_ratio=cfg.mlp_ratio, drop=cfg.drop_rate)
        self.resolution = resolution
        self.blocks = nn.ModuleList(
            SwinBlock(
                ffn_layer=ffn,
                dim=dim,
                input_resolution=(resolution, resolution),
                num_heads=heads,
                window_size=cfg.window_size,
                shift_size=0 if j % 2 == 0 else cfg.window_size // 2,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                proj_drop=cfg.drop_rate,
                attn_drop=cfg.attn_drop_rate,
                drop_path=drop_path[j],
            )
            for j in range(depth)
        )

    def forward(
        self, x: torch.Tensor, force_expert: ForcedExpert, gates: dict, prefix: str, context=None
    ) -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            x, g = block(x, force_expert, context)
            if g is not None:
                B, H, W, _ = x.shape
                gates[f"{prefix}.{j}"] = g.reshape(B, H, W, -1).permute(0, 3, 1, 2)
        return x


class SliceContext(nn.Module):
    """A descriptor of a whole slice for the MoE gates: (B, in_chans, S, S) -> (B, dim).

    Three strided convolutions with GELU (total stride 16, no normalisation layer, so a region's
    intensity level survives), averaged over the slice, then a linear layer. Small next to the
    network it serves (0.2 % of the embedded model's operations, 8,900 parameters); it only steers
    the gates.
    """

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 4, stride=4),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 2, stride=2),
            nn.GELU(),
            nn.Conv2d(dim, dim, 2, stride=2),
            nn.GELU(),
        )
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).mean(dim=(2, 3)))


class EncoderStage(Stage):
    def __init__(self, *args, downsample: bool, **kwargs):
        super().__init__(*args, **kwargs)
        dim = self.blocks[0].dim
        self.downsample = PatchMerging(dim) if downsample else None


class SwinUNet(nn.Module):
    """2D Swin-UNet with optional mixture-of-experts feed-forward layers.

    Input: (B, C, img_size, img_size) normalised slices, C = ``cfg.input_channels`` (with
    ``neighbour_slices`` k, slices z-k..z+k, the segmented slice z in the centre). Output: logits
    (B, K, img_size, img_size) of one task head, and on request the expert weights of every MoE layer.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.depths)
        res0 = cfg.img_size // cfg.patch_size
        moe_enc = cfg.is_moe and cfg.moe_placement in ("encoder", "both")
        moe_dec = cfg.is_moe and cfg.moe_placement in ("decoder", "both")
        # An explicit device, so that the network can be built on the meta device (load without init).
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()

        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            norm_layer=nn.LayerNorm,
            output_fmt="NHWC",
        )
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # Adjacent slices (neighbour_slices k): their own patch projection, added to the centre
        # slice's before the embedding's norm. Together the two are one convolution over the 2k + 1
        # slices; apart, a one-slice model's weights load unchanged and the new projection starts at
        # zero (the model's outputs unchanged) and trains at its own rate.
        self.neighbour_embed = None
        if cfg.neighbour_slices:
            p = cfg.patch_size
            self.neighbour_embed = nn.Conv2d(2 * cfg.neighbour_slices, cfg.embed_dim, p, stride=p, bias=False)
        self.slice_context = None
        if cfg.gate_context == "slice":
            self.slice_context = SliceContext(cfg.in_chans, cfg.embed_dim)
        self.layers = nn.ModuleList()
        for i in range(n):
            start = sum(cfg.depths[:i])
            self.layers.append(
                EncoderStage(
                    cfg,
                    cfg.embed_dim * 2**i,
                    res0 // 2**i,
                    cfg.depths[i],
                    cfg.num_heads[i],
                    dpr[start : start + cfg.depths[i]],
                    moe_enc,
                    downsample=i < n - 1,
                )
            )
        self.norm = nn.LayerNorm(cfg.embed_dim * 2 ** (n - 1))

        # Decoder: up[0] only expands the bottleneck; up[i] (i >= 1) fuses the skip of encoder
        # stage n-1-i, runs its blocks, and expands (except the last).
        self.first_up = PatchExpand(cfg.embed_dim * 2 ** (n - 1))
        self.concat_back_dim = nn.ModuleList()
        self.layers_up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in range(1, n):
            level = n - 1 - i
            dim = cfg.embed_dim * 2**level
            start = sum(cfg.depths[:level])
            self.concat_back_dim.append(nn.Linear(2 * dim, dim))
            self.layers_up.append(
                Stage(
                    cfg,
                    dim,
                    res0 // 2**level,
                    cfg.depths[level],
                    cfg.num_heads[level],
                    dpr[start : start + cfg.depths[level]],
                    moe_dec,
                )
            )
            self.upsample.append(PatchExpand(dim) if level > 0 else nn.Identity())
        self.norm_up = nn.LayerNorm(cfg.embed_dim)
        self.final_up = PatchExpand(cfg.embed_dim, scale=cfg.patch_size, out_dim=cfg.embed_dim)
        self.heads = nn.ModuleDict(
            {name: nn.Conv2d(cfg.embed_dim, k, 1, bias=False) for name, k in cfg.tasks}
        )
        self.apply(_init_weights)
        if self.neighbour_embed is not None:
            nn.init.zeros_(self.neighbour_embed.weight)
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                module.reset_context()

    def init_non_persistent_buffers(self) -> None:
        """Compute the buffers no checkpoint holds (attention masks, relative position indices).

        For a network built on the meta device and materialised with ``to_empty`` before its
        weights are loaded, which skips the random initialisation a checkpoint overwrites anyway.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "init_non_persistent_buffers"):
                module.init_non_persistent_buffers()

    def forward_features(
        self, x: torch.Tensor, force_expert: ForcedExpert = None, scales: list | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Decoder features (B, embed_dim, img_size, img_size) and the MoE gates by layer name.

        Gate tensors are (B, E, H_l, W_l), H_l = W_l the token grid of that stage; names are
        ``encoder.{stage}.{block}`` and ``decoder.{stage}.{block}`` (decoder stage 0 is the deepest).
        ``scales``, when given, receives each decoder stage's output features (B, H_l, W_l, C_l),
        deepest first (training's deep supervision reads them).
        """
        tokens, gates = self._decode(x, force_expert, scales)
        return self.final_up(self.norm_up(tokens)).permute(0, 3, 1, 2), gates

    def _decode(
        self, x: torch.Tensor, force_expert: ForcedExpert, scales: list | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Encoder and decoder up to the final expansion: tokens (B, S/p, S/p, embed_dim) and gates.

        ``scales``, when given, receives each decoder stage's output (B, H_l, W_l, C_l) before its
        upsampling, deepest first (MoME routes there).
        """
        channels = self.cfg.input_channels
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-2:] != (self.cfg.img_size,) * 2:
            raise ValueError(
                f"expected input (B, {channels}, {self.cfg.img_size}, {self.cfg.img_size}), "
                f"got {tuple(x.shape)}"
            )
        gates: dict[str, torch.Tensor] = {}
        # Forced routing bypasses the gates, so it needs no slice context.
        centre = x
        if self.neighbour_embed is not None:
            k = self.cfg.neighbour_slices
            centre = x[:, k : k + 1]
        context = (
            self.slice_context(centre) if self.slice_context is not None and force_expert is None else None
        )
        x = self.pos_drop(self._embed(x, centre))
        skips = []
        for i, stage in enumerate(self.layers):
            skips.append(x)
            x = stage(x, force_expert, gates, f"encoder.{i}", context)
            if stage.downsample is not None:
                x = stage.downsample(x)
        x = self.first_up(self.norm(x))
        for i, (fuse, stage, up) in enumerate(
            zip(self.concat_back_dim, self.layers_up, self.upsample, strict=True)
        ):
            x = fuse(torch.cat([x, skips[-2 - i]], dim=-1))
            x = stage(x, force_expert, gates, f"decoder.{i}", context)
            if scales is not None:
                scales.append(x)
            x = up(x)
        return x, gates

    def _embed(self, x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, S/p, S/p, embed_dim) of the input x (B, C, S, S); with adjacent slices,
        the centre slice's projection plus the neighbours' (``neighbour_embed``), then the norm."""
        if self.neighbour_embed is None:
            return self.patch_embed(x)
        k = self.cfg.neighbour_slices
        others = torch.cat([x[:, :k], x[:, k + 1 :]], dim=1)
        tokens = self.patch_embed.proj(centre) + self.neighbour_embed(others)
        return self.patch_embed.norm(tokens.permute(0, 2, 3, 1))

    def _logits(self, tokens: torch.Tensor, head: nn.Conv2d) -> torch.Tensor:
        """``head(forward_features(x))`` from the decoder tokens, (B, K, img_size, img_size).

        The final expansion's LayerNorm and the 1x1 convolution head act on each pixel alone, so
        they run before the pixel shuffle, which then moves K class channels instead of embed_dim
        features (the same values; a 4x smaller copy on the largest tensor of the network).
        """
        up = self.final_up
        pixels = up.norm(up.expand_pixels(self.norm_up(tokens)))
        logits = F.linear(pixels, head.weight.flatten(1), head.bias)
        return up.shuffle(logits).permute(0, 3, 1, 2)

    def forward(
        self,
        x: torch.Tensor,
        task: str | None = None,
        force_expert: ForcedExpert = None,
        return_gates: bool = False,
    ):
        """Segment a batch of slices.

        Args:
            x: (B, in_chans, img_size, img_size) float, intensity-normalised slices.
            task: head to use; None means the first task of the config.
            force_expert: route every token to this expert index (int), or one index per sample
                (LongTensor (B,)); None lets the gate decide.
            return_gates: also return {layer name: (B, E, H_l, W_l)} expert weights.
        Returns:
            logits (B, K, img_size, img_size) (in channels-last memory layout), and the gates dict
            when asked.
        """
        if force_expert is not None and not self.cfg.is_moe:
            raise ValueError(
                f"force_expert={force_expert!r} needs a mixture-of-experts model; this one is dense"
            )
        name = self.cfg.task_names[0] if task is None else task
        if name not in self.heads:
            raise ValueError(f"unknown task {name!r}; this model has {list(self.cfg.task_names)}")
        tokens, gates = self._decode(x, force_expert)
        logits = self._logits(tokens, self.heads[name])
        return (logits, gates) if return_gates else logits


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
