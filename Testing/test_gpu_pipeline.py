"""The device-agnostic post-processing and top-k dispatch (issue #25, point 3), checked on the CPU.

The same torch code runs on a GPU; what differs there (CuPy's labelling, the dense dispatch chosen
by "auto") is compared with these CPU paths by ``benchmarks/gpu_pipeline.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from m4oe.model.moe import MoEFeedForward
from m4oe.predictor import Predictor, class_argmax, keep_largest_components, labels_to_host

CUBE = np.ones((3, 3, 3), bool)


def whole_volume_cleanup(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """The clean-up's definition: each listed value labelled over the whole volume, largest kept."""
    out = labels.copy()
    for value in values:
        components, count = ndimage.label(out == value, structure=CUBE)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        out[(out == value) & (components != sizes.argmax())] = 0
    return out


def random_labels(seed: int) -> np.ndarray:
    """Label maps from compact blobs to salt-and-pepper, of random shape: sizes, ties and gaps vary."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 40, 3))
    labels = rng.integers(0, 6, shape).astype(np.uint8)
    blur = ndimage.uniform_filter(rng.random(shape), size=int(rng.integers(1, 5)))
    labels[blur < rng.uniform(0.2, 0.7)] = 0
    return labels


# --- argmax ---------------------------------------------------------------------------------------


def test_class_argmax_is_argmax_with_the_first_class_on_ties():
    torch.manual_seed(0)
    maps = torch.randint(0, 3, (3, 14, 37, 41)).float()  # many ties among 14 classes
    assert torch.equal(class_argmax(maps), maps.argmax(dim=1))
    maps = torch.randn(2, 5, 20, 30).contiguous(memory_format=torch.channels_last)
    assert torch.equal(class_argmax(maps), maps.argmax(dim=1))
    tie = torch.zeros(1, 4, 1, 1)
    tie[0, 1:3] = 1.0
    assert class_argmax(tie).item() == 1


# --- largest-component clean-up -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_bounding_box_cleanup_equals_whole_volume_labelling(seed):
    labels = random_labels(seed)
    values = [1, 2, 3, 5]
    expected = whole_volume_cleanup(labels, values)
    np.testing.assert_array_equal(keep_largest_components(labels.copy(), values), expected)


def test_cleanup_of_a_fragmented_label_past_uint16_equals_whole_volume_labelling():
    """More runs than a uint16 map counts: the int32 map is taken at once, with the same result."""
    rng = np.random.default_rng(3)
    labels = np.zeros((60, 120, 120), np.uint8)
    # Isolated voxels (every other one along each axis): about 86,000 of value 1, 22,000 of 2.
    labels[::2, ::2, ::2] = np.where(rng.random((30, 60, 60)) < 0.8, 1, 2)
    labels[:, 90:, 90:][rng.random((60, 30, 30)) < 0.5] = 1  # and a denser patch that joins up
    _, count = ndimage.label(labels == 1, structure=CUBE)
    assert count > 1 << 16
    np.testing.assert_array_equal(
        keep_largest_components(labels.copy(), [1, 2]), whole_volume_cleanup(labels, [1, 2])
    )


@pytest.mark.parametrize("seed", range(3))
def test_labels_to_host_cleans_a_tensor_like_the_numpy_path(seed):
    labels = random_labels(seed)
    tensor = torch.from_numpy(labels.astype(np.int32))  # K > 256 keeps int32 on the device
    host = labels_to_host(tensor, [1, 4], np.uint16)
    assert isinstance(host, np.ndarray) and host.dtype == np.uint16
    np.testing.assert_array_equal(host, whole_volume_cleanup(labels, [1, 4]))
    untouched = labels_to_host(torch.from_numpy(labels.copy()), [])
    assert untouched.dtype == np.uint8
    np.testing.assert_array_equal(untouched, labels)


def test_predict_on_a_real_ct_cleans_up_as_the_whole_volume_labelling(shared_data):
    """The labels kept on the device, argmax and clean-up there: the pipeline's result by definition."""
    image = sitk.ReadImage(str(shared_data / "example_ct_sm.nii.gz"))
    predictor = Predictor.from_pretrained(None, device="cpu", threads=1)
    cleaned = predictor.predict(image, modality="ct", test_time_passes=1)
    raw = predictor.predict(image, modality="ct", test_time_passes=1, cleanup=False)
    values = cleaned.largest_component
    assert values
    raw_labels = sitk.GetArrayFromImage(raw.labelmap)
    expected = whole_volume_cleanup(raw_labels, values)
    assert not np.array_equal(expected, raw_labels), "nothing to clean: the test would prove nothing"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cleaned.labelmap), expected)


# --- top-k dispatch -------------------------------------------------------------------------------


def token_by_token(ffn: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    expected = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for n in range(x.shape[1]):
            p = F.softmax(ffn.gate(x[b, n]), dim=-1).tolist()
            best = sorted(range(ffn.num_experts), key=lambda e: -p[e])[: ffn.top_k]
            total = sum(p[e] for e in best)
            for e in best:
                expected[b, n] += p[e] / total * ffn.experts[e](x[b, n])
    return expected


@pytest.mark.parametrize(("num_experts", "k"), [(3, 1), (4, 1), (4, 2)])
def test_dense_dispatch_equals_sorted_dispatch_and_the_reference(num_experts, k):
    torch.manual_seed(2)
    ffn = MoEFeedForward(8, num_experts, mlp_ratio=2.0, top_k=k)
    x = torch.randn(3, 7, 8)
    rows = []
    for expert in ffn.experts:
        expert.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[0]))
    outputs = {}
    with torch.no_grad():
        for dispatch in ("sort", "dense", "auto"):
            ffn.dispatch = dispatch
            rows.clear()
            outputs[dispatch], probs = ffn(x)
            assert sum(rows) == (num_experts if dispatch == "dense" else k) * 3 * 7, dispatch
        expected = token_by_token(ffn, x)
    for out in outputs.values():
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    assert torch.equal(outputs["auto"], outputs["sort"])  # on the CPU "auto" sorts
    torch.testing.assert_close(probs, F.softmax(ffn.gate(x), dim=-1).detach())


def test_dense_dispatch_under_autocast_keeps_the_token_dtype():
    torch.manual_seed(0)
    ffn = MoEFeedForward(16, 3, top_k=1)
    ffn.dispatch = "dense"
    x = torch.randn(2, 9, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = ffn(x)
    assert out.dtype == torch.float32
    ffn.dispatch = "sort"
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference, _ = ffn(x)
    assert torch.equal(out, reference)


def test_training_always_sorts_and_unknown_dispatch_is_refused():
    torch.manual_seed(0)
    ffn = MoEFeedForward(8, 3, top_k=1)
    ffn.dispatch = "dense"
    rows = []
    for expert in ffn.experts:
        expert.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[0]))
    out, _ = ffn(torch.randn(2, 5, 8))
    assert out.requires_grad and sum(rows) == 10
    ffn.dispatch = "scatter"
    with pytest.raises(ValueError, match="dispatch must be one of"), torch.no_grad():
        ffn(torch.randn(2, 5, 8))
