"""Saving and loading M4oE checkpoints: safetensors weights plus a JSON model card.

A checkpoint is a folder holding ``model.safetensors`` and ``model.json`` (or a pair of files with
the same stem). Loading never unpickles: pickle-based files (``.pth``, ``.pt``, ``.ckpt``, ``.pkl``,
``.bin``, or anything starting with pickle or zip magic bytes) are refused, because unpickling a
downloaded file can run arbitrary code. The weights are checked against the SHA-256 recorded in
the card and, when given, against the one the caller expects (e.g. from a model list).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from m4oe.errors import InputError, ModelError, OutputError
from m4oe.hub import sha256_file
from m4oe.model.mome import MoME
from m4oe.model.swin_unet import SwinUNet
from m4oe.model_card import FORMAT_VERSION, READABLE_VERSIONS, ModelCard

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "model.json"
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".pkl", ".bin")
_SHOWN = 3
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def save_checkpoint(
    model: SwinUNet,
    card: ModelCard,
    folder: str | Path,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json``; return the folder.

    The card's architecture is replaced by ``model.cfg`` and its ``weights_sha256`` by the hash of
    the written weights. Both files are written under temporary names in the folder and moved into
    place at the end, so an interrupted save leaves no half-written file (at worst, when
    overwriting, new weights beside the old card, which loading refuses by their SHA-256). Refuses
    a folder that already holds either file unless ``overwrite``; other files in it are left alone.
    ``dtype`` (e.g. ``torch.float16``) stores floating-point weights in that type to halve the file;
    loading casts them back to the model's float32 parameters.
    """
    folder = Path(folder)
    weights, card_path = folder / WEIGHTS_NAME, folder / CARD_NAME
    if folder.exists() and not folder.is_dir():
        raise OutputError("exists and is not a folder", folder)
    existing = [p.name for p in (weights, card_path) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"already holds {', '.join(existing)}; pass overwrite=True to replace it", folder)
    # Validates the card's experts and tasks against the model before anything is written.
    card = dataclasses.replace(card, architecture=model.cfg, weights_sha256="")
    tensors = {
        k: v.detach()
        .to("cpu", dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
        .contiguous()
        for k, v in model.state_dict().items()
    }
    temporaries: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_weights = _temporary(folder, WEIGHTS_NAME, temporaries)
        safetensors.torch.save_file(
            # One metadata key only: safetensors writes several in random order, which would make
            # identical weights hash differently from one save to the next.
            tensors,
            str(tmp_weights),
            metadata={"format_version": str(FORMAT_VERSION)},
        )
        card = dataclasses.replace(card, weights_sha256=sha256_file(tmp_weights))
        tmp_card = _temporary(folder, CARD_NAME, temporaries)
        card.to_json(tmp_card)
        os.replace(tmp_weights, weights)
        os.replace(tmp_card, card_path)
    except OSError as error:
        raise OutputError(f"cannot write checkpoint: {error.strerror or error}", folder) from None
    finally:
        for tmp in temporaries:
            tmp.unlink(missing_ok=True)
    return folder


def read_model_card(path: str | Path) -> ModelCard:
    """The card of a checkpoint (folder, ``.json`` card or ``.safetensors`` weights), weights unread."""
    _, card_path = _locate(Path(path))
    return _read_card(card_path)


def load_checkpoint(
    path: str | Path, *, sha256: str | None = None, device: str | torch.device = "cpu"
) -> tuple[SwinUNet, ModelCard]:
    """Build the network a checkpoint describes and load its weights, in eval mode on ``device``.

    Args:
        path: the checkpoint folder, its ``.json`` card, or its ``.safetensors`` weights (the card is
            the ``.json`` file with the same stem, else ``model.json`` in the same folder).
        sha256: expected SHA-256 of the weights (hex); None checks only the card's record (a card
            without ``weights_sha256``, written by hand, is then not verified, with a warning).
        device: where to put the model.
    Raises:
        ModelError naming the file: pickle formats, missing card or weights, unknown card format
        version, SHA-256 mismatch, weights that do not fit the card's architecture.
    """
    weights, card_path = _locate(Path(path))
    card = _read_card(card_path)
    if not weights.is_file():
        raise ModelError(f"weights not found (the card {card_path.name} expects them here)", weights)
    # Hash and parse the same bytes, so the file cannot change between the check and the load.
    try:
        data = weights.read_bytes()
    except OSError as error:
        raise ModelError(f"cannot read the weights: {error.strerror or error}", weights) from None
    kind = _sniff(data, len(data))
    if kind in ("pickle", "zip"):
        _refuse_pickle(weights)
    if kind != "safetensors":
        raise ModelError("not a safetensors file (its header is not a safetensors header)", weights)
    actual = hashlib.sha256(data).hexdigest()
    if sha256 is not None:
        expected = sha256.strip().lower()
        if not _SHA256.match(expected):
            raise InputError(f"expected SHA-256 {sha256!r} is not 64 hex digits")
        if actual != expected:
            raise ModelError(f"SHA-256 mismatch: the file hashes to {actual}, expected {expected}", weights)
    if not card.weights_sha256 and sha256 is None:
        logger.warning(
            "%s: its card %s records no weights_sha256, and no --sha256 was given: the weights are "
            "loaded unverified",
            weights,
            card_path.name,
        )
    if card.weights_sha256 and actual != card.weights_sha256:
        raise ModelError(
            f"SHA-256 mismatch: the file hashes to {actual}, its card {card_path.name} records "
            f"{card.weights_sha256}; the weights changed after the card was written",
            weights,
        )
    state = _parse_safetensors(data, weights)
    # Built on the meta device, skipping the random initialisation the weights overwrite: 1.2 s
    # (often more under load) for a 60 M-parameter M4oE, against a fixed 0.2 s here. Shapes are
    # known on the meta device, so the fit is checked before any memory is taken.
    with torch.device("meta"):
        network = MoME if card.architecture.arch == "mome" else SwinUNet
        model = network(card.architecture)
    _check_fit(state, model, weights)
    model.to_empty(device="cpu")
    model.init_non_persistent_buffers()
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


def _locate(path: Path) -> tuple[Path, Path]:
    """(weights, card) paths of a checkpoint given as folder, card or weights; neither need exist."""
    if not path.exists():
        raise ModelError("no such file or folder", path)
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CARD_NAME
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if suffix == ".json":
        return path.with_suffix(".safetensors"), path
    if suffix == ".safetensors":
        card = path.with_suffix(".json")
        if not card.is_file() and (path.parent / CARD_NAME).is_file():
            card = path.parent / CARD_NAME
        return path, card
    if _sniff_file(path) in ("pickle", "zip"):
        _refuse_pickle(path)
    raise ModelError(
        f"unknown model file type {suffix or '(no suffix)'!r}; give a checkpoint folder, its model.json card "
        "or its .safetensors weights",
        path,
    )


def _read_card(card_path: Path) -> ModelCard:
    if not card_path.is_file():
        raise ModelError(
            "model card not found; a checkpoint needs its JSON card, since the weights alone do not say "
            "which architecture, labels and preprocessing they belong to",
            card_path,
        )
    return ModelCard.read(card_path)


def _sniff(head: bytes, size: int) -> str:
    """ "safetensors", "pickle", "zip" (torch.save's format) or "unknown", from a file's first bytes.

    A safetensors file starts with its header length (8 bytes, little endian) and the header's "{";
    a pickle (protocol 2 to 5) with 0x80 and the protocol number.
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _sniff_file(path: Path) -> str:
    with open(path, "rb") as f:
        return _sniff(f.read(9), path.stat().st_size)


def _refuse_pickle(path: Path):
    raise ModelError(
        "refusing a pickle-based PyTorch file: unpickling can run arbitrary code, so m4oe loads only "
        "safetensors weights with a JSON model card (see m4oe.checkpoint.save_checkpoint)",
        path,
    )


def _parse_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        (header_bytes,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + header_bytes]).get("__metadata__") or {}
        state = safetensors.torch.load(data)
    except (SafetensorError, ValueError, AttributeError) as error:
        raise ModelError(f"cannot read the safetensors weights: {error}", path) from None
    version = metadata.get("format_version")
    if version is not None and version not in {str(v) for v in READABLE_VERSIONS}:
        raise ModelError(
            f"weights format_version {version} is not supported; this engine reads {list(READABLE_VERSIONS)}",
            path,
        )
    return state


def _check_fit(state: dict[str, torch.Tensor], model: SwinUNet, path: Path) -> None:
    """Raise a ModelError listing the first few missing, unexpected and mis-shaped weights."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (architecture: {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [
        f"{what} {len(items)}: {', '.join(items[:_SHOWN])}{', ...' if len(items) > _SHOWN else ''}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if items
    ]
    if problems:
        raise ModelError(f"weights do not fit the card's architecture; {'; '.join(problems)}", path)


def _temporary(folder: Path, name: str, registry: list[Path]) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    # mkstemp makes the file private (0600); a checkpoint is shared like any other file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    registry.append(Path(tmp))
    return Path(tmp)
