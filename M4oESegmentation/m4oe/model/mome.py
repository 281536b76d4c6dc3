"""MoME: a Swin-UNet whose classes are asked for by name, routed to experts by their text embedding.

After "Mixture of Modality Experts" (arXiv 2510.26996): each class name is embedded once, offline,
by a frozen text encoder (the embeddings are a buffer of the network, so they travel in its
safetensors and nothing reads a text encoder at inference). A class query is that embedding
through a small MLP. At every decoder scale a router weighs E experts per pixel *and per class
query*: its logits are a linear function of the pixel's features plus one of the query, softmax over
experts. Each expert maps the pixel's features to a key space, and the class's logit at that scale
is the router-weighted sum of the experts' dot products with the query's key. The trunk (encoder
and decoder) is a dense Swin-UNet shared by every class; the experts live only in the routers.

Why this form and not a decoder run per class: the router's mixture and the dot product are both
linear in the expert outputs, so the experts run once per pixel (as in an M4oE layer) and each
class costs only E dot products per pixel at each scale, not a forward pass. Per class, the logit
at full resolution is the sum of (a) the dot product of the final pixel embeddings with the
query's key, (b) each routed scale's logits upsampled bilinearly, and (c) a bias from the query.

Why a sigmoid per class (and not a softmax over classes): datasets label different organs, and a
pixel a dataset calls background may be an organ it does not label. With independent per-class
logits a dataset's loss reads only the classes it labels (:func:`partial_label_loss` in training),
and asking for a subset of classes computes exactly their logits, whatever else the model knows.
At inference the background logit is 0, so a softmax over (background, classes) gives a class
where its sigmoid passes 0.5 and beats every other class (for one class it *is* the sigmoid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .swin_unet import SwinUNet, _init_weights

NOT_QUERIED = -1.0e4
"""The logit given to classes that were not asked for (finite: bilinear resampling of it stays exact)."""


class ScaleRouter(nn.Module):
    """Experts and a text-conditioned router at one decoder scale.

    ``forward(x, q)``: x (B, H, W, C) decoder features, q (Q, D) class queries ->
    logits (B, Q, H, W) and expert weights (B, Q, E, H, W) (softmax over E).
    """

    def __init__(self, dim: int, key_dim: int, num_experts: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, key_dim))
            for _ in range(num_experts)
        )
        self.gate = nn.Linear(dim, num_experts)
        self.gate_query = nn.Linear(key_dim, num_experts, bias=False)
        self.key = nn.Linear(key_dim, key_dim)

    def forward(self, x: torch.Tensor, q: torch.Tensor, force_expert=None):
        x = self.norm(x)
        feats = torch.stack([expert(x) for expert in self.experts], dim=3)  # (B, H, W, E, D)
        keys = self.key(q)  # (Q, D)
        per_expert = torch.einsum("bhwed,qd->bqehw", feats, keys) / math.sqrt(keys.shape[-1])
        B, Q, E, H, W = per_expert.shape
        if force_expert is None:
            logits = self.gate(x).permute(0, 3, 1, 2)[:, None] + self.gate_query(q)[None, :, :, None, None]
            gates = logits.softmax(dim=2)
        else:
            index = torch.as_tensor(force_expert, device=x.device).expand(B)
            gates = F.one_hot(index, E).to(per_expert.dtype)[:, None, :, None, None].expand(B, Q, E, H, W)
        return (gates * per_expert).sum(dim=2), gates


class MoME(SwinUNet):
    """Text-routed mixture of experts at the decoder scales, one logit map per class query.

    Input: (B, in_chans, img_size, img_size) normalised slices. ``forward`` returns logits
    (B, K, img_size, img_size) like :class:`SwinUNet` (K = classes + background, background 0), so
    the engine's softmax and argmax serve both; :meth:`class_logits` gives only the queried classes.
    """

    def __init__(self, cfg: ModelConfig):
        if cfg.arch != "mome":
            raise ValueError(f"MoME needs a config with arch 'mome', got {cfg.arch!r}")
        # The trunk: the same Swin-UNet, dense (the experts are in the routers).
        super().__init__(
            cfg.replace(arch="swin-unet", class_names=(), text_dim=0, text_encoder="", experts=())
        )
        del self.heads
        self.cfg = cfg
        dim = cfg.embed_dim
        n = len(cfg.depths)
        self.register_buffer("class_embeddings", torch.zeros(len(cfg.class_names), cfg.text_dim))
        self.query = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        # One router per decoder stage, deepest first (the stages ``_decode`` reports).
        self.routers = nn.ModuleList(
            ScaleRouter(cfg.embed_dim * 2**level, dim, cfg.num_experts, cfg.mlp_ratio)
            for level in range(n - 2, -1, -1)
        )
        self.pixel_key = nn.Linear(dim, dim)
        self.class_bias = nn.Linear(dim, 1)
        for module in (self.query, self.routers, self.pixel_key, self.class_bias):
            module.apply(_init_weights)

    def set_class_embeddings(self, embeddings: torch.Tensor) -> None:
        """Store the class names' text embeddings, (classes, text_dim), row i for label value i + 1."""
        expected = tuple(self.class_embeddings.shape)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"class embeddings must be {expected}, got {tuple(embeddings.shape)}")
        with torch.no_grad():
            self.class_embeddings.copy_(embeddings)

    def query_indices(self, queries: Sequence[int] | None) -> list[int]:
        """Label values (1..K-1) asked for, checked; None means every class."""
        count = len(self.cfg.class_names)
        values = list(range(1, count + 1)) if queries is None else [int(v) for v in queries]
        bad = [v for v in values if not 1 <= v <= count]
        if bad or not values:
            raise ValueError(f"class queries must be label values 1..{count}, got {values}")
        return values

    def class_logits(
        self,
        x: torch.Tensor,
        queries: Sequence[int] | None = None,
        force_expert=None,
        query_gates: bool = False,
        coarse_logits: list | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, Q, S, S) of the queried label values (in the order given; None: all) and the
        routers' expert weights {"router.{scale}": (B, E, H_l, W_l)}, averaged over the queries
        (scale 0 is the deepest decoder stage; H_l = W_l = S / (patch_size * 2**(n - 2 - scale))
        model pixels). With ``query_gates`` each is (B, Q, E, H_l, W_l) instead: the weights of
        every query, in the order of the logits. ``force_expert``: an expert index (int or (B,))
        that takes every pixel and query instead of the router. ``coarse_logits``, when given,
        receives the prediction at each routed scale but the coarsest, finest first (training's deep
        supervision): (B, Q, H_l, W_l), the class bias plus the logits of that scale and every
        coarser one, the coarser resampled bilinearly to H_l."""
        values = self.query_indices(queries)
        q = self.query(self.class_embeddings[torch.tensor(values, device=x.device) - 1])  # (Q, D)
        scales: list[torch.Tensor] = []
        tokens, _ = self._decode(x, None, scales)
        up = self.final_up
        pixels = up.norm(up.expand_pixels(self.norm_up(tokens)))  # (B, h, w, p, p, D)
        keys = self.pixel_key(q)
        logits = up.shuffle(F.linear(pixels, keys) / math.sqrt(keys.shape[-1])).permute(0, 3, 1, 2)
        size = logits.shape[-2:]
        gates = {}
        bias = self.class_bias(q)[None, :, :, None]
        partial = None
        for i, (router, feats) in enumerate(zip(self.routers, scales, strict=True)):
            scale_logits, g = router(feats, q, force_expert)
            logits = logits + F.interpolate(scale_logits, size=size, mode="bilinear", align_corners=False)
            gates[f"router.{i}"] = g if query_gates else g.mean(dim=1)
            if coarse_logits is not None:
                if partial is not None:
                    resampled = F.interpolate(
                        partial, size=scale_logits.shape[-2:], mode="bilinear", align_corners=False
                    )
                    scale_logits = scale_logits + resampled
                partial = scale_logits
                if i > 0:
                    coarse_logits.insert(0, partial + bias)
        return logits + bias, gates

    def forward(
        self,
        x: torch.Tensor,
        task: str | None = None,
        force_expert=None,
        return_gates: bool = False,
        queries: Sequence[int] | None = None,
        query_gates: bool = False,
    ):
        """Logits (B, K, S, S): channel 0 (background) is 0, a queried class its logit, a class not
        queried :data:`NOT_QUERIED`; with ``return_gates`` also the routers' expert weights, per
        query with ``query_gates`` (see :meth:`class_logits`)."""
        name = self.cfg.task_names[0]
        if task is not None and task != name:
            raise ValueError(f"unknown task {task!r}; this model has {[name]}")
        if force_expert is not None and isinstance(force_expert, int):
            if not 0 <= force_expert < self.cfg.num_experts:
                raise ValueError(f"expert index {force_expert} out of range 0..{self.cfg.num_experts - 1}")
        values = self.query_indices(queries)
        logits, gates = self.class_logits(x, values, force_expert, query_gates)
        B, _, H, W = logits.shape
        out = logits.new_full((B, len(self.cfg.class_names) + 1, H, W), NOT_QUERIED)
        out[:, 0] = 0.0
        out[:, values] = logits
        return (out, gates) if return_gates else out
