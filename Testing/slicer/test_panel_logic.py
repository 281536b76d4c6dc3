"""What the panel shows and sets up, without its widgets: progress text, model lists, package checks,
slice-view overlay and shared nodes, sample data (``M4oESegmentationLib`` status, models,
dependencies, views, sample_data) on a real MRML scene from slicer-core."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

try:
    import slicer
except ImportError as error:
    pytest.skip(f"slicer-core cannot be imported ({error})", allow_module_level=True)
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

from M4oESegmentationLib import dependencies, models, sample_data, status, views, volumes

from m4oe.hub import DEFAULT_MODEL, EMBEDDED_DIR
from m4oe.phantom import generate_case

# --- status ------------------------------------------------------------------------------------


def test_overall_fraction_places_each_stage_in_its_share():
    assert status.overall_fraction({"stage": "load", "fraction": 0.0}) == 0.0
    assert status.overall_fraction({"stage": "load", "fraction": 1.0}) == pytest.approx(0.1)
    assert status.overall_fraction({"stage": "inference", "fraction": 0.5}) == pytest.approx(0.55)
    assert status.overall_fraction({"stage": "postprocess", "fraction": 1.0}) == pytest.approx(1.0)
    assert status.overall_fraction({"stage": "inference", "fraction": 7.0}) == pytest.approx(0.95)
    assert status.overall_fraction({"stage": "done"}) == 1.0
    assert status.overall_fraction({"stage": "log", "message": "x"}) is None
    assert status.overall_fraction({"stage": "inference"}) is None
    spans = list(status.STAGE_SPANS.values())
    assert spans[0][0] == 0.0 and spans[-1][1] == 1.0
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), "the spans tile the bar"


def test_progress_text_and_durations():
    record = {"stage": "inference", "done": 12, "total": 40, "fraction": 0.3, "eta_s": 70.4}
    assert status.progress_text(record) == "Segmenting 12/40, about 1 min 10 s left"
    assert status.progress_text({"stage": "load", "fraction": 1.0}) == "Loading the model"
    assert status.progress_text({"stage": "gate_maps"}) == "Gate maps"
    assert status.human_duration(0.2) == "less than 1 s"
    assert status.human_duration(42.4) == "42 s"
    assert status.human_duration(185) == "3 min 05 s"


def test_detected_modality_text(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    assert status.detected_modality_text(None) == ""
    assert status.detected_modality_text(node) == ""
    node.SetAttribute(status.RESULT_ATTRIBUTE + "Modality", "mr")
    assert status.detected_modality_text(node) == "MR"
    node.SetAttribute(status.RESULT_ATTRIBUTE + "ModalitySource", "intensity statistics")
    assert status.detected_modality_text(node) == "MR (intensity statistics)"


def test_scan_warning_text(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    assert status.scan_warning_text(None) == ""
    assert status.scan_warning_text(node) == ""
    node.SetAttribute(status.RESULT_ATTRIBUTE + "ScanWarning", "")
    assert status.scan_warning_text(node) == ""
    node.SetAttribute(status.RESULT_ATTRIBUTE + "ScanWarning", "no vertebrae were found (0 mL)")
    assert status.scan_warning_text(node) == "Warning: no vertebrae were found (0 mL)"


def test_accuracy_warning_text(scene):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
    assert status.accuracy_warning_text(None) == ""
    assert status.accuracy_warning_text(node) == "", "a result made before the attribute existed"
    node.SetAttribute(status.RESULT_ATTRIBUTE + "AccuracyWarning", "")
    assert status.accuracy_warning_text(node) == ""
    node.SetAttribute(status.RESULT_ATTRIBUTE + "AccuracyWarning", "no real CT scan measured right kidney")
    assert status.accuracy_warning_text(node) == "Check closely: no real CT scan measured right kidney"


def test_done_text_points_to_each_warning():
    from M4oESegmentationLib.segmenter import SegmentationResult

    def result(**warnings):
        return SegmentationResult(None, "ct", "", "abdomen", {"total": 75.0}, **warnings)

    assert status.done_text(result()) == "Done in 1 min 15 s."
    text = status.done_text(result(warning="w", scan_warning="s", accuracy_warning="a"))
    assert text == (
        "Done in 1 min 15 s. The scan may not be one the model knows: see Outputs. Some structures need a"
        " close check: see Outputs. The gate's routing needs a look: see Gate review."
    )
    assert status.done_text(result(accuracy_warning="a")).endswith("need a close check: see Outputs.")


# --- models ------------------------------------------------------------------------------------


def test_model_card_of_the_embedded_model_and_of_paths(tiny_model_dir):
    embedded = models.model_card(None)
    assert embedded["name"] == DEFAULT_MODEL == models.default_model()
    assert models.model_card("") == embedded == models.model_card(DEFAULT_MODEL)
    assert (EMBEDDED_DIR / DEFAULT_MODEL / "model.json").is_file()
    tiny = json.loads((tiny_model_dir / "model.json").read_text())
    for given in (tiny_model_dir, tiny_model_dir / "model.json", tiny_model_dir / "model.safetensors"):
        assert models.model_card(str(given)) == tiny
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        models.model_card("no-such-model")
    with pytest.raises(ValueError, match="no such model"):
        models.model_card(str(tiny_model_dir / "other.json"))


def test_model_card_refuses_an_unreadable_card(tiny_model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the model card"):
        models.model_card(str(broken))


def test_task_labels_and_choices(tiny_model_dir):
    card = models.model_card(str(tiny_model_dir))
    name, labels = models.task_labels(card, None)
    assert name == "abdomen" and [lab.name for lab in labels] == ["liver", "spleen", "right kidney"]
    assert [lab.value for lab in labels] == [1, 2, 3]
    assert labels[0].terminology_entry().count("~") > 3, "a Slicer terminology entry"
    name, labels = models.task_labels(card, "liver")
    assert name == "liver" and len(labels) == 1
    with pytest.raises(ValueError, match="no task 'brain'; it has: abdomen, liver"):
        models.task_labels(card, "brain")
    with pytest.raises(ValueError, match="lists no tasks"):
        models.task_labels({"name": "empty"}, None)
    assert models.task_choices(card) == [("abdomen", "abdomen"), ("liver", "liver")]
    assert models.expert_choices(card) == [("ct", "ct (CT)"), ("mr", "mr (MR)"), ("mr-t2", "mr-t2 (MR)")]
    assert models.expert_names(card) == ["ct", "mr", "mr-t2"]
    assert models.task_choices(None) == models.expert_choices(None) == []


def test_model_choices_list_models_and_a_chosen_card(tiny_model_dir):
    entries = models.available_models()
    assert DEFAULT_MODEL in [e.name for e in entries]
    items = models.model_choices(entries)
    assert (DEFAULT_MODEL, DEFAULT_MODEL) in items
    for entry in entries:
        if not entry.downloaded:
            assert (entry.name, f"{entry.name} (downloads when used)") in items
    card = str(tiny_model_dir / "model.json")
    assert models.model_choices(entries, card)[-1] == (card, tiny_model_dir.name)
    assert models.model_choices(entries, DEFAULT_MODEL) == items, "a listed model is not added twice"


def test_model_info_text(tiny_model_dir):
    card = models.model_card(str(tiny_model_dir))
    assert models.model_info(card).startswith(
        "untrained tiny model for tests<br><b>Licence:</b> not stated<br>"
    )
    assert "<br><b>demo only</b><br>" in models.model_info(dict(card, notes="demo only"))
    assert models.model_info(None, "cannot read") == "cannot read"
    assert "downloaded" in models.model_info(None)


def test_model_facts_of_the_embedded_model():
    """What the panel shows a reviewer under the model list: licence, training data, real scans."""
    lines = models.model_facts(models.model_card(None)).split("<br>")
    assert lines[0] == "<b>Licence:</b> CC-BY-NC-SA-4.0"
    assert lines[1].startswith("<b>Intended use:</b> Research and demonstration")
    assert lines[2].startswith("<b>Training data:</b> Synthetic phantoms") and "CC-BY-4.0" in lines[2]
    assert "65 training cases" in lines[2] and "CHAOS" in lines[2]
    assert lines[3] == "<b>Real-scan validation:</b>"
    assert lines[4].startswith("example_ct_dicom (CT): mean Dice 0.66, mean HD95 15.2 mm; liver 0.94")
    assert lines[5].startswith("example_mr_sm (MR): mean Dice 0.49")
    assert lines[6].startswith("reference labels: TotalSegmentator outputs (pseudo-labels)")
    # The held-out CHAOS studies and BTCV CTs, manually labelled, never trained on
    # (real_accuracy.py --held-out).
    assert lines[7] == "<b>Held-out real scans of its training datasets:</b>"
    assert lines[8].startswith(
        "chaos_t2 (4 held out) (MR; CHAOS MR T2, CC-BY-NC-SA-4.0; 4 cases): mean Dice 0.66, mean HD95 53.5 mm"
    )
    assert (
        lines[9].startswith("btcv (4 held out) (CT; BTCV abdomen CT, CC-BY-4.0")
        and "mean Dice 0.75" in lines[9]
    )
    assert lines[10].startswith("reference labels: each dataset&#x27;s own reference labels")
    # What those figures say to check closely in a segmentation, per modality: the lowest of the
    # CT scan and the BTCV cases for each structure below 0.50 on either.
    assert lines[11] == "<b>Check closely on real scans:</b>"
    assert lines[12].startswith(
        "CT: Dice below 0.50 on a real scan: inferior vena cava 0.41/0.52, pancreas 0.13/0.63"
    )
    assert lines[13].startswith("MR: Dice below 0.50 on a real scan: right kidney 0.37/0.67")
    assert len(lines) == 14
    bare = models.model_facts({"name": "x"})
    assert bare.endswith("<b>Real-scan validation:</b> none recorded") and "Licence:</b> not stated" in bare


# --- dependencies --------------------------------------------------------------------------------


def test_missing_requirements_reads_the_installed_versions():
    psutil_version = importlib.metadata.version("psutil")
    assert dependencies.missing_requirements([f"psutil=={psutil_version}"]) == []
    assert dependencies.missing_requirements(["psutil>=999"]) == ["psutil>=999"]
    assert dependencies.missing_requirements(["m4oe-no-such-package>=1"]) == ["m4oe-no-such-package>=1"]
    assert dependencies.missing_requirements(['psutil>=999; sys_platform == "no-such-os"']) == []
    # This environment has what the engine needs, as Slicer has after the first-use install.
    assert [str(r) for r in dependencies.requirements()] == [
        "timm<2,>=1.0",
        "safetensors>=0.4",
        "slicerio>=1.1",
        "psutil>=5.9",
    ]
    assert dependencies.missing_requirements() == []
    dependencies.ensure_packages(confirm=True)  # nothing missing: no question, no install


class FakeSlicerPackaging:
    """The three functions of Slicer's ``slicer.packaging`` (Slicer >= 5.11) the module calls, which
    slicer-core lacks: ``load_requirements`` and ``pip_check`` as Slicer's (the same parsing and
    version test, extras left out), ``pip_ensure`` recording its call and installing nothing, as
    Slicer's does in testing mode."""

    def __init__(self):
        self.ensured = []

    @staticmethod
    def load_requirements(path):
        from packaging.requirements import Requirement

        lines = (line.strip() for line in open(path, encoding="utf-8"))
        return [Requirement(line) for line in lines if line and not line.startswith(("#", "-"))]

    @staticmethod
    def pip_check(requirement):
        if requirement.marker is not None and not requirement.marker.evaluate():
            return True
        try:
            return importlib.metadata.version(requirement.name) in requirement.specifier
        except importlib.metadata.PackageNotFoundError:
            return False

    def pip_ensure(self, requirements, **options):
        self.ensured.append(([str(r) for r in requirements], options))


def test_packages_are_ensured_with_slicer_packaging(monkeypatch, tmp_path):
    fake = FakeSlicerPackaging()
    monkeypatch.setitem(__import__("sys").modules, "slicer.packaging", fake)
    assert dependencies.slicer_packaging() is fake
    dependencies.ensure_packages(confirm=True)  # all installed: pip_ensure is not called
    assert fake.ensured == []
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("# a comment\npsutil>=5.9\nm4oe-no-such-package>=1\n--index-url x\n", encoding="utf-8")
    monkeypatch.setattr(dependencies, "REQUIREMENTS_FILE", wanted)
    assert dependencies.missing_requirements() == ["m4oe-no-such-package>=1"]
    # pip_ensure installed nothing (Slicer's testing mode): the module says what is missing.
    with pytest.raises(RuntimeError, match="not installed: m4oe-no-such-package>=1"):
        dependencies.ensure_packages(confirm=False)
    ((requested, options),) = fake.ensured
    assert requested == ["psutil>=5.9", "m4oe-no-such-package>=1"]
    assert options == {"prompt_install": False, "requester": "M4oE Segmentation"}


def test_torch_version_problem():
    assert dependencies.torch_version_problem("2.6.0+cu124") is None
    assert "2.5.1 is installed" in dependencies.torch_version_problem("2.5.1")  # weights_only bypass
    assert "2.0.1 is installed" in dependencies.torch_version_problem("2.0.1")
    assert "not installed" in dependencies.torch_version_problem(None)
    assert "unreadable" in dependencies.torch_version_problem("banana")
    assert dependencies.torch_version_problem(importlib.metadata.version("torch")) is None


def test_pytorch_comes_only_from_the_pytorch_extension():
    names = {requirement.name for requirement in dependencies.requirements()}
    assert not names & {"torch", "torchvision", "SimpleITK"}, "pip is never asked for torch or SimpleITK"
    with pytest.raises(RuntimeError, match="PyTorch extension"):  # no PyTorchUtils outside Slicer
        dependencies.ensure_torch(confirm=False)


# --- views ---------------------------------------------------------------------------------------


def slice_composites(scene, names=("Red", "Yellow", "Green", "Slice4")):
    composites = {}
    for name in names:
        node = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        node.SetLayoutName(name)
        composites[name] = node
    return composites


def test_gate_overlay_shows_in_the_three_views_and_hides_only_gate_maps(scene):
    composites = slice_composites(scene)
    image, _ = generate_case("ct", 0, max_size=16)
    overlay = volumes.sitk_to_volume_node(sitk.Cast(image > 0, sitk.sitkUInt8), "gate map", labelmap=True)
    views.mark_gate_map(overlay)
    other = volumes.sitk_to_volume_node(image, "another volume")

    assert views.show_gate_overlay(overlay, True) == ["Red", "Yellow", "Green"]
    for name in views.SLICE_VIEWS:
        assert composites[name].GetForegroundVolumeID() == overlay.GetID()
        assert composites[name].GetForegroundOpacity() == pytest.approx(views.OVERLAY_OPACITY)
    assert composites["Slice4"].GetForegroundVolumeID() is None

    composites["Green"].SetForegroundVolumeID(other.GetID())  # the user put something else there
    assert views.show_gate_overlay(overlay, False) == ["Red", "Yellow"]
    assert composites["Red"].GetForegroundVolumeID() is None
    assert composites["Green"].GetForegroundVolumeID() == other.GetID()
    assert views.show_gate_overlay(None, True) == []


def test_shared_nodes_are_singletons(scene):
    # Slicer's Segmentations module registers the editor node class at start-up.
    scene.RegisterNodeClass(slicer.vtkMRMLSegmentEditorNode())
    editor = views.segment_editor_node()
    assert editor.IsA("vtkMRMLSegmentEditorNode") and editor.GetSingletonTag() == "SegmentEditor"
    assert views.segment_editor_node() is editor
    plot_view = views.gate_plot_view_node()
    assert plot_view.IsA("vtkMRMLPlotViewNode") and views.gate_plot_view_node() is plot_view
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotViewNode") == 1
    other = slicer.vtkMRMLScene()
    try:
        assert views.gate_plot_view_node(scene=other) is not plot_view
    finally:
        other.Clear(1)


def test_show_segmentation_in_2d_and_3d(scene):
    image, truth = generate_case("ct", 0, max_size=24)
    volume = volumes.sitk_to_volume_node(image, "phantom")
    node = volumes.labelmap_to_segmentation(truth, sample_labels(truth), volume)
    node.GetDisplayNode().SetVisibility(False)
    views.show_segmentation(node)
    display = node.GetDisplayNode()
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    assert display.GetVisibility() and display.GetVisibility3D() and display.GetVisibility2DFill()
    views.show_segmentation(node, outlines_only=True)
    assert not display.GetVisibility2DFill() and display.GetVisibility2DOutline()


def sample_labels(truth):
    from m4oe.phantom import phantom_labels

    present = set(np.unique(sitk.GetArrayViewFromImage(truth)).tolist())
    return [label for label in phantom_labels() if label.value in present]


# --- sample data ---------------------------------------------------------------------------------


def test_phantom_volume_node_keeps_the_generator_geometry(scene):
    node = sample_data.create_phantom_volume("ct", seed=5, max_size=32)
    image, _ = generate_case("ct", 5, max_size=32)
    back = volumes.volume_node_to_sitk(node)
    assert node.GetName() == "M4oEPhantomCT" and node.GetScene() is scene
    assert back.GetSize() == image.GetSize()
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    display = node.GetDisplayNode()
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindow(), display.GetLevel()) == sample_data.CT_WINDOW
    mr = sample_data.create_phantom_volume("t2", seed=5, max_size=16, name="MR")
    assert mr.GetName() == "MR" and mr.GetDisplayNode().GetAutoWindowLevel()


def test_phantom_sample_path_is_in_sample_datas_cache_folder(scene, tmp_path):
    """Sample Data reuses a file already in the scene's remote cache folder, so a sample is generated
    there (Slicer's application gives the scene this cache manager)."""
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(tmp_path))
    scene.SetCacheManager(cache)
    assert sample_data.phantom_sample_path("M4oEPhantomCT") == tmp_path / "M4oEPhantomCT.nrrd"
    assert sample_data.SAMPLE_CATEGORY == "M4oE Segmentation"


def test_phantom_sample_is_written_once_and_completely(tmp_path):
    path = tmp_path / "cache" / "M4oEPhantomMR.nrrd"
    assert sample_data.write_phantom_sample("M4oEPhantomMR", path, max_size=16) == path
    sequence, seed = sample_data.PHANTOM_SAMPLES["M4oEPhantomMR"]
    expected, _ = generate_case(sequence, seed, max_size=16)
    written = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written), sitk.GetArrayViewFromImage(expected))
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "no partial file left"
    stamp = path.stat().st_mtime_ns
    sample_data.write_phantom_sample("M4oEPhantomMR", path, max_size=16)
    assert path.stat().st_mtime_ns == stamp, "an existing sample is reused, not regenerated"
    with pytest.raises(ValueError, match="no phantom sample 'Brain'"):
        sample_data.write_phantom_sample("Brain", tmp_path / "x.nrrd")
    assert set(sample_data.PHANTOM_SAMPLES) == {"M4oEPhantomCT", "M4oEPhantomMR"}
