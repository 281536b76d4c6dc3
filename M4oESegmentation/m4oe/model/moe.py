"""Feed-forward layers of a Swin block: the dense MLP and the mixture of modality experts.

Both take tokens (B, N, C) and return ``(tokens (B, N, C), expert weights (B, N, E) or None)``,
so a block is dense or a mixture through one constructor argument (``ffn_layer``).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from .config import GATES

ForcedExpert = int | torch.Tensor | None
DISPATCHES = ("auto", "sort", "dense")


class DenseFeedForward(Mlp):
    """The plain Swin MLP (C -> ratio*C -> C, GELU), parameter names as timm's; no expert weights."""

    def __init__(
        self, dim: int, mlp_ratio: float = 4.0, act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0
    ):
        super().__init__(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(
        self, x: torch.Tensor, force_expert: ForcedExpert = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class MoEFeedForward(nn.Module):
    """A mixture of E expert MLPs weighted per token by a gate.

    Gates:
        "softmax": ``p = softmax(Linear(C, E)(x))`` over experts; the output is ``sum_e p_e * expert_e(x)``,
            or with ``top_k`` only the k most probable experts run on each token, their weights
            renormalised to sum to 1 (no token is ever dropped).
        "channel": the released M4oE code's gate, kept for ablation: ``softmax(Linear(C, C)(x))`` over
            channels multiplies the plain sum of all experts. It weighs every expert equally, so the
            expert weights it reports are uniform (1/E).

    With ``context_dim`` the softmax gate also sees a per-sample context vector (B, context_dim),
    e.g. a descriptor of the whole slice: ``p = softmax(Linear(C, E)(x) + Linear(context_dim, E)(c))``.
    That projection (``context``) starts at zero, so the layer first routes as without it.

    ``force_expert`` (an int, or a LongTensor (B,) giving one expert per sample) bypasses the gate:
    every token of a sample goes through that expert alone, with weight 1.

    ``dispatch`` says how top-k routing reaches the experts when no gradient is taken (training
    always sorts): "sort" groups the tokens by expert and runs each expert on its own tokens only
    (the fewest operations, but the chunk sizes must reach the host: one device synchronisation
    per layer, which on a GPU stalls the queue of kernels behind it); "dense" runs every expert on
    every token and keeps each token's top k (the dense mixture's arithmetic, no synchronisation);
    "auto" sorts on the CPU and computes densely on other devices. Both give the same outputs.
    """

    dispatch = "auto"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        mlp_ratio: float = 4.0,
        gate: str = "softmax",
        top_k: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
        context_dim: int | None = None,
    ):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"num_experts must be at least 2, got {num_experts}")
        if gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if top_k is not None and gate == "channel":
            raise ValueError(f"top_k={top_k} needs the softmax gate; the channel gate weighs no expert")
        if context_dim is not None and gate == "channel":
            raise ValueError("a gate context needs the softmax gate; the channel gate weighs no expert")
        self.num_experts = num_experts
        self.gate_type = gate
        self.top_k = None if top_k == num_experts else top_k
        hidden = int(dim * mlp_ratio)
        self.experts = nn.ModuleList(
            Mlp(dim, hidden, act_layer=act_layer, drop=drop) for _ in range(num_experts)
        )
        self.gate = nn.Linear(dim, num_experts if gate == "softmax" else dim)
        self.context = nn.Linear(context_dim, num_experts) if context_dim is not None else None
        self.reset_context()

    def reset_context(self) -> None:
        """Zero the context projection: the gate then routes on the token alone until trained."""
        if self.context is not None:
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)

    def forward(
        self, x: torch.Tensor, force_expert: ForcedExpert = None, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: x (B, N, C) tokens; context (B, context_dim), required when the layer has a context
        projection and the gate runs. Returns (B, N, C) and the expert weights (B, N, E), summing to 1."""
        if force_expert is not None:
            return self._forced(x, force_expert)
        if self.gate_type == "channel":
            out = self.experts[0](x)
            for expert in self.experts[1:]:
                out = out + expert(x)
            weights = x.new_full((*x.shape[:-1], self.num_experts), 1.0 / self.num_experts)
            return out * F.softmax(self.gate(x), dim=-1), weights
        logits = self.gate(x)
        if self.context is not None:
            if context is None:
                raise ValueError("this gate needs a context vector (B, context_dim); none was given")
            logits = logits + self.context(context)[:, None, :]
        probs = F.softmax(logits, dim=-1)
        if self.top_k is None:
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out = out + probs[..., e : e + 1] * expert(x)
            return out, probs
        return self._top_k(x, probs), probs

    def _top_k(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        flat = x.reshape(-1, C)
        top_p, top_i = probs.reshape(-1, self.num_experts).topk(self.top_k, dim=-1)
        # Renormalised by a constant so the gate still gets a gradient at k=1, where the weight is 1.
        top_w = top_p / top_p.sum(dim=-1, keepdim=True).detach()
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"dispatch must be one of {DISPATCHES}, got {self.dispatch!r}")
        dense = self.dispatch == "dense" or (self.dispatch == "auto" and x.device.type != "cpu")
        if dense and not top_w.requires_grad:
            return self._top_k_dense(flat, top_i, top_w).reshape(B, N, C)
        # Group the (token, slot) pairs by expert (stable, so tokens keep their order): one gather,
        # one contiguous chunk per expert, one scatter. An expert no token picked still runs on an
        # empty chunk, so it stays in the autograd graph (a zero gradient, not a missing one, for DDP).
        expert_of = top_i.reshape(-1)
        order = expert_of.argsort(stable=True)
        token = order // self.top_k
        counts = expert_of.bincount(minlength=self.num_experts).tolist()
        chunks = flat[token].split(counts)
        # Cast: under autocast an expert returns bf16/fp16 while the output keeps the input's dtype.
        y = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, chunks, strict=True)])
        if self.top_k == 1 and not top_w.requires_grad:
            # Inference at k=1: the weight p / p is exactly 1 and each token fills one row.
            return torch.empty_like(flat).index_copy_(0, token, y.to(flat.dtype)).reshape(B, N, C)
        y = y * top_w.reshape(-1)[order, None]
        return torch.zeros_like(flat).index_add_(0, token, y.to(flat.dtype)).reshape(B, N, C)

    def _top_k_dense(self, flat: torch.Tensor, top_i: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        """Tokens (T, C) through every expert, each keeping its top-k experts' weighted outputs.

        ``top_i``, ``top_w``: (T, k) chosen experts and their renormalised weights. At k=1 the
        weight is exactly 1, so each token takes its expert's output row as it is.
        """
        if self.top_k == 1:
            choice = top_i[:, :1]
            out = self.experts[0](flat).to(flat.dtype)
            for e in range(1, self.num_experts):
                out = torch.where(choice == e, self.experts[e](flat).to(flat.dtype), out)
            return out
        weights = torch.zeros(flat.shape[0], self.num_experts, dtype=top_w.dtype, device=flat.device)
        weights.scatter_(1, top_i, top_w)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            out = out + (weights[:, e : e + 1] * expert(flat)).to(flat.dtype)
        return out

    def _forced(self, x: torch.Tensor, force_expert: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = x.shape[0]
        if not isinstance(force_expert, torch.Tensor):
            # Any integer (Python or NumPy); a bool or a float is a caller's mistake, not an index.
            if isinstance(force_expert, bool | float) or not hasattr(force_expert, "__index__"):
                raise ValueError(f"force_expert must be an integer or a LongTensor, got {force_expert!r}")
            index = operator.index(force_expert)
            if not 0 <= index < self.num_experts:
                raise ValueError(f"force_expert must be in [0, {self.num_experts - 1}], got {index}")
            chosen = torch.full((B,), index, dtype=torch.long, device=x.device)
            weights = F.one_hot(chosen, self.num_experts).to(x.dtype)[:, None, :].expand(B, x.shape[1], -1)
            return self.experts[index](x), weights  # no data-dependent branch: exportable
        else:
            chosen = force_expert.to(device=x.device, dtype=torch.long).reshape(-1)
            if chosen.numel() != B:
                raise ValueError(f"force_expert holds {chosen.numel()} entries for a batch of {B}")
            if chosen.min() < 0 or chosen.max() >= self.num_experts:
                raise ValueError(
                    f"force_expert values must be in [0, {self.num_experts - 1}], got {chosen.tolist()}"
                )
        weights = F.one_hot(chosen, self.num_experts).to(x.dtype)[:, None, :].expand(B, x.shape[1], -1)
        if bool((chosen == chosen[0]).all()):
            return self.experts[int(chosen[0])](x), weights
        out = torch.empty_like(x)
        for e, expert in enumerate(self.experts):
            rows = (chosen == e).nonzero(as_tuple=True)[0]
            if rows.numel():
                out[rows] = expert(x[rows]).to(out.dtype)
        return out, weights


def load_balancing_loss(gates: list[torch.Tensor] | dict[str, torch.Tensor]) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e``, averaged over MoE layers.

    Args:
        gates: per layer, expert probabilities (B, E, H, W) as returned by the model's forward.
    f_e is the fraction of tokens whose most probable expert is e (not differentiable) and P_e the
    mean probability of e; the loss is 1 when routing is uniform and E when one expert takes all.
    """
    layers = list(gates.values()) if isinstance(gates, dict) else list(gates)
    if not layers:
        raise ValueError("load_balancing_loss needs the gates of at least one MoE layer")
    total = layers[0].new_zeros(())
    for g in layers:
        E = g.shape[1]
        probs = g.movedim(1, -1).reshape(-1, E)
        frac = F.one_hot(probs.argmax(dim=-1), E).to(probs.dtype).mean(dim=0)
        total = total + E * (frac * probs.mean(dim=0)).sum()
    return total / len(layers)
