"""The one-page PNG report: size, content, colours, gate overlay geometry, refusals."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.image import imread

from m4oe.errors import OutputError
from m4oe.geometry import from_axial_stack, to_axial_stack
from m4oe.labels import Code, Label
from m4oe.modality import ModalityResult
from m4oe.predictor import Prediction
from m4oe.report import EXPERT_COLORS, NO_GATES, dominant_expert_slice, render_report, write_report

SIZE = (64, 64, 20)  # (x, y, z) voxels
SPACING = (0.8, 0.8, 2.5)  # mm
ORIGIN = (25.0, 25.0, -20.0)  # LPS mm of voxel (0, 0, 0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS index axes, as in most NIfTI CTs
ORGAN = Code("SCT", "123037004", "Anatomical Structure")
LABELS = [
    Label(1, "liver", (0.867, 0.510, 0.396), ORGAN, Code("SCT", "10200004", "Liver")),
    Label(2, "spleen", (0.616, 0.424, 0.635), ORGAN, Code("SCT", "78961009", "Spleen")),
]
EXPERTS = [
    {"name": "ct", "modality": "ct"},
    {"name": "mr_t1", "modality": "mr"},
    {"name": "mr_t2", "modality": "mr"},
]
TOKEN = 4  # voxels per gate-map token along rows and columns


def empty_image() -> sitk.Image:
    image = sitk.Image(SIZE, sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def ball(centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """(Z, Y, X) mask in axial-stack layout of a ball at stack index ``centre`` (k, row, col)."""
    k, r, c = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    sz, sy, sx = SPACING[::-1]
    d2 = ((k - centre[0]) * sz) ** 2 + ((r - centre[1]) * sy) ** 2 + ((c - centre[2]) * sx) ** 2
    return d2 < radius_mm**2


def synthetic_case() -> tuple[sitk.Image, sitk.Image]:
    """A CT-like volume (air, a soft-tissue body, two organs) and its label map, on the same grid.

    Built in axial-stack layout (rows anterior -> posterior, columns patient right -> left) and put
    on the flipped grid with ``from_axial_stack``: the liver lies on the patient's right, anterior.
    """
    reference = to_axial_stack(empty_image())
    rng = np.random.default_rng(0)
    _, r, c = np.meshgrid(*(np.arange(n) for n in SIZE[::-1]), indexing="ij")
    body = ((r - 32) / 28) ** 2 + ((c - 32) / 30) ** 2 < 1
    liver, spleen = ball((10, 26, 18), 10.0), ball((8, 40, 46), 7.0)
    values = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, body.shape)
    values[liver], values[spleen] = 70.0, 50.0
    labels = np.zeros(body.shape, np.uint8)
    labels[liver], labels[spleen] = 1, 2
    image = from_axial_stack(values.astype(np.float32), reference)
    return image, from_axial_stack(labels, reference)


def expected_dominant(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Expert by region of a stack slice: 0 on the patient's right, 1 left-anterior, 2 left-posterior."""
    return np.where(cols < SIZE[0] // 2, 0, np.where(rows < SIZE[1] // 2, 1, 2))


def synthetic_gate_map() -> sitk.Image:
    """A 3-component token map over the volume, on an identity-direction grid like ``gate_map_image``'s."""
    Z, h, w = SIZE[2], SIZE[1] // TOKEN, SIZE[0] // TOKEN
    rows, cols = np.meshgrid(np.arange(h) * TOKEN, np.arange(w) * TOKEN, indexing="ij")
    dominant = expected_dominant(rows, cols)
    weights = np.full((Z, h, w, 3), 0.15, np.float32)
    for e in range(3):
        weights[:, dominant == e, e] = 0.7
    gate_map = sitk.GetImageFromArray(weights, isVector=True)
    sx, sy, sz = SPACING
    gate_map.SetSpacing((sx * TOKEN, sy * TOKEN, sz))
    # Stack voxel (0, 0, 0) is image voxel (63, 63, 0); token (0, 0) is centred 1.5 voxels further.
    corner = np.array(ORIGIN) - np.array([sx * (SIZE[0] - 1), sy * (SIZE[1] - 1), 0.0])
    gate_map.SetOrigin((corner + np.array([sx, sy, 0.0]) * (TOKEN - 1) / 2).tolist())
    return gate_map


def gate_summary(warning: str | None = None) -> dict:
    names = [e["name"] for e in EXPERTS]
    per_slice = []
    for k in range(SIZE[2]):
        w = np.array([0.6 - 0.02 * k, 0.25 + 0.01 * k, 0.15 + 0.01 * k])
        per_slice.append(
            {
                "index": k,
                "position_mm": ORIGIN[2] + SPACING[2] * k,
                "mean_weights": dict(zip(names, w.tolist(), strict=True)),
                "dominant_expert": names[int(np.argmax(w))],
                "entropy": 0.8,
            }
        )
    return {
        "experts": EXPERTS,
        "expected_experts": ["ct"],
        "mapped_layer": "mean",
        "overall": {
            "mean_weights": dict(zip(names, [0.5, 0.3, 0.2], strict=True)),
            "routing_confidence": 0.2,
        },
        "per_slice": per_slice,
        "per_segment": {},
        "warning": warning,
        "forced_expert": None,
    }


def prediction(gates: bool = True, warning: str | None = None) -> tuple[sitk.Image, Prediction]:
    image, labelmap = synthetic_case()
    modality = ModalityResult(
        "ct", "intensity", "60% of voxels at air (-1000 HU)", 0.95, {"suspected_hu_offset": 0.0}
    )
    return image, Prediction(
        labelmap=labelmap,
        labels=LABELS,
        task="abdomen",
        modality=modality,
        gate_map=synthetic_gate_map() if gates else None,
        gate_summary=gate_summary(warning) if gates else None,
        warnings={"routing": warning} if warning else {},
        seconds={"preprocess": 0.1, "inference": 2.4, "postprocess": 0.2, "total": 2.7},
    )


def panels(figure) -> dict[str, np.ndarray]:
    """The rendered RGB pixels (0..1) of each labelled axes of ``figure``."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    pixels = np.asarray(canvas.buffer_rgba())[..., :3] / 255.0
    height = pixels.shape[0]
    crops = {}
    for ax in figure.axes:
        box = ax.get_window_extent()
        rows = slice(int(height - box.y1), int(height - box.y0))
        crops[ax.get_label()] = pixels[rows, int(box.x0) : int(box.x1)]
    return crops


def count_color(pixels: np.ndarray, color, tolerance: float = 0.03) -> int:
    """Number of pixels within ``tolerance`` (per channel, 0..1) of an RGB ``color``."""
    return int(np.count_nonzero(np.abs(pixels[..., :3] - np.asarray(color)).max(axis=-1) < tolerance))


def test_report_png_has_page_size_content_and_colours(tmp_path):
    image, pred = prediction(warning="routing disagrees with the input modality")
    path = write_report(image, pred, tmp_path / "report.png")
    assert path == tmp_path / "report.png"
    pixels = imread(path)
    assert pixels.shape[:2] == (1000, 1600)
    assert pixels[..., :3].std() > 0.05
    assert count_color(pixels, LABELS[0].color) > 30
    for color in EXPERT_COLORS[:3]:
        assert count_color(pixels, color) > 50
    assert count_color(pixels, (0.75, 0.0, 0.0)) > 20  # the routing warning, in red
    assert not list(tmp_path.glob(".*tmp*"))


def test_outlines_in_image_panels_and_expert_colours_in_gate_panels():
    image, pred = prediction()
    crops = panels(render_report(image, pred))
    for name in ("axial", "coronal"):
        assert count_color(crops[name], LABELS[0].color) > 20, name
    assert count_color(crops["axial"], LABELS[1].color) > 5  # the coronal slice misses the spleen
    # Outlined, not filled: the liver disc (radius 10 mm, about 9 pixels per mm) would fill ~25 000 pixels.
    assert count_color(crops["axial"], LABELS[0].color) < 5000
    for color in EXPERT_COLORS[:3]:
        assert count_color(crops["gate_map"], color) > 50  # its legend
        assert count_color(crops["gate_curves"], color) > 50  # the curves


def test_dominant_expert_follows_physical_position_through_the_flipped_grid():
    image, pred = prediction()
    stack = to_axial_stack(image)
    dominant = dominant_expert_slice(pred.gate_map, image, stack, 7)
    assert dominant.shape == stack.array.shape[1:]
    rows, cols = np.meshgrid(*(np.arange(n) for n in dominant.shape), indexing="ij")
    away = (np.abs(rows - 31.5) > 2) & (np.abs(cols - 31.5) > 2)  # from region borders
    np.testing.assert_array_equal(dominant[away], expected_dominant(rows, cols)[away])


def test_gate_map_not_reaching_a_region_leaves_it_uncovered():
    image, pred = prediction()
    half = sitk.RegionOfInterest(pred.gate_map, [8, 16, SIZE[2]], [0, 0, 0])  # patient right half
    dominant = dominant_expert_slice(half, image, to_axial_stack(image), 7)
    assert (dominant[:, :28] == 0).all()
    assert (dominant[:, 36:] == -1).all()


def test_existing_report_is_refused_without_overwrite(tmp_path):
    image, pred = prediction()
    path = tmp_path / "report.png"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="exists"):
        write_report(image, pred, path)
    assert path.read_bytes() == b"keep me"
    write_report(image, pred, path, overwrite=True)
    assert imread(path).shape[:2] == (1000, 1600)


def test_dense_model_report_says_there_are_no_gate_maps(tmp_path):
    image, pred = prediction(gates=False)
    pixels = imread(write_report(image, pred, tmp_path / "dense.png", title="dense model"))
    assert pixels.shape[:2] == (1000, 1600)
    assert count_color(pixels, LABELS[0].color) > 30
    assert all(count_color(pixels, color) == 0 for color in EXPERT_COLORS[:3])
    figure = render_report(image, pred)
    for name in ("gate_map", "gate_curves"):
        ax = next(a for a in figure.axes if a.get_label() == name)
        assert [t.get_text() for t in ax.texts] == [NO_GATES]


def test_bad_arguments_are_refused(tmp_path):
    image, pred = prediction()
    with pytest.raises(OutputError, match=r"\.png"):
        write_report(image, pred, tmp_path / "report.jpg")
    pred.labelmap = sitk.RegionOfInterest(pred.labelmap, [32, 64, 20], [0, 0, 0])
    with pytest.raises(ValueError, match="grid"):
        write_report(image, pred, tmp_path / "report.png")
    assert not (tmp_path / "report.png").exists()


def test_dominant_expert_reads_the_gate_maps_the_predictor_writes():
    """``gate_map_image`` (the producer) and ``dominant_expert_slice`` agree on where a token lies."""
    from m4oe.gates import gate_map_image
    from m4oe.inplane import make_grid

    image, _ = synthetic_case()
    stack = to_axial_stack(image)
    Z, Y, X = stack.array.shape
    grid = make_grid((Y, X), stack.spacing[1:], 32, "spacing", (1.0, 1.0))  # letterboxed, 8x8 tokens
    h = grid.size // TOKEN
    rows, cols = np.meshgrid(np.arange(h), np.arange(h), indexing="ij")
    dominant_tokens = expected_dominant(rows * 8, cols * 8)  # regions at token (not voxel) level
    weights = np.full((Z, h, h, 3), 0.15, np.float32)
    for e in range(3):
        weights[:, dominant_tokens == e, e] = 0.7
    dominant = dominant_expert_slice(gate_map_image(weights, stack, grid), image, stack, 5)
    rows, cols = np.meshgrid(np.arange(Y), np.arange(X), indexing="ij")
    away = (np.abs(rows - 31.5) > 4) & (np.abs(cols - 31.5) > 4)
    np.testing.assert_array_equal(dominant[away], expected_dominant(rows, cols)[away])


def test_report_of_a_real_prediction_with_gates(tiny_model_dir, tmp_path):
    """What the predictor returns today is what the report reads (catches drift between the two)."""
    from m4oe.predictor import Predictor

    image, _ = synthetic_case()
    pred = Predictor.from_pretrained(tiny_model_dir, device="cpu").predict(image, gates=True)
    figure = render_report(image, pred)
    legend = next(a for a in figure.axes if a.get_label() == "gate_map").get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ct (CT), expected", "mr (MR)", "mr-t2 (MR)"]
    assert imread(write_report(image, pred, tmp_path / "report.png")).shape[:2] == (1000, 1600)
