"""Public dataset converters (FLARE22, AMOS22, ATLAS2023, TotalSegmentator) and the nnU-Net dataset check.

The source trees are tiny fakes (8x8x4 volumes) that follow each release's real folder and file
names and label numbering, so a converter that passes here finds its files in the real download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe.errors import CancelledError, InputError, OutputError
from m4oe.terminology import TERMS
from m4oe_training.converters import (
    AMOS22_LABELS,
    ATLAS2023_LABELS,
    FLARE22_LABELS,
    convert_amos22,
    convert_atlas2023,
    convert_flare22,
    convert_totalsegmentator,
    main,
)
from m4oe_training.nnunet import verify_dataset

SHAPE = (4, 8, 8)  # (z, y, x): 8x8x4 voxels
CT_DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def write_volume(path: Path, array: np.ndarray, seed: int, direction=CT_DIRECTION) -> None:
    """Write ``array`` (z, y, x) with a per-case spacing and origin (mm, LPS)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7 + 0.01 * seed, 0.7 + 0.01 * seed, 2.5 + seed))
    image.SetOrigin((100.0 + seed, -50.5, 20.25 * seed))
    image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def write_case(image: Path, label: Path | None, seed: int, values: range, direction=CT_DIRECTION):
    """An int16 image and a uint8 label holding every value in ``values`` (background included)."""
    rng = np.random.default_rng(seed)
    write_volume(image, rng.integers(-1000, 1000, SHAPE).astype(np.int16), seed, direction)
    if label is not None:
        labels = np.resize(np.array(values, dtype=np.uint8), SHAPE)
        write_volume(label, rng.permutation(labels.ravel()).reshape(SHAPE), seed, direction)


def read_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def geometry(path: Path) -> tuple:
    image = sitk.ReadImage(str(path))
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


@pytest.fixture
def flare22(tmp_path) -> Path:
    """The challenge's FLARE2022/ tree: 3 labelled cases (0-13) and 2 unlabelled CTs."""
    root = tmp_path / "FLARE2022"
    labelled = root / "Training" / "FLARE22_LabeledCase50"
    for seed, number in enumerate(("0001", "0002", "0050")):
        write_case(
            labelled / "images" / f"FLARE22_Tr_{number}_0000.nii.gz",
            labelled / "labels" / f"FLARE22_Tr_{number}.nii.gz",
            seed,
            range(14),
        )
    for number in ("00001", "00002"):
        write_case(
            root / "Training" / "FLARE22_UnlabeledCase1-1000" / f"Case_{number}_0000.nii.gz", None, 9, []
        )
    return root


AMOS_LABELLED = {"Tr": ("0001", "0004", "0507", "0508"), "Va": ("0008", "0540")}
AMOS_TEST = ("0002", "0513")


@pytest.fixture
def amos22(tmp_path) -> Path:
    """amos22/ as in the Zenodo zip: CT and MRI ids on both sides of 500, labels 0-15, dataset.json."""
    root = tmp_path / "amos22"
    for split, numbers in AMOS_LABELLED.items():
        for seed, number in enumerate(numbers):
            mr_direction = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)
            direction = CT_DIRECTION if int(number) <= 500 else mr_direction
            name = f"amos_{number}.nii.gz"
            write_case(
                root / f"images{split}" / name, root / f"labels{split}" / name, seed, range(16), direction
            )
    for number in AMOS_TEST:
        write_case(root / "imagesTs" / f"amos_{number}.nii.gz", None, 3, [])
    names = {str(s.value): s.original for s in AMOS22_LABELS}
    entries = {
        split: [
            {"image": f"./images{s}/amos_{n}.nii.gz", "label": f"./labels{s}/amos_{n}.nii.gz"}
            for n in numbers
        ]
        for (s, numbers), split in zip(AMOS_LABELLED.items(), ("training", "validation"), strict=True)
    }
    dataset = {
        "name": "AMOS",
        "description": "MICCAI2022 Multi-Modality Abdominal Multi-Organ Segmentation Challenge",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **names},
        "numTraining": 4,
        "numValidation": 2,
        "numTest": 2,
        **entries,
        "test": [{"image": f"./imagesTs/amos_{n}.nii.gz"} for n in AMOS_TEST],
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return tmp_path


@pytest.fixture
def atlas2023(tmp_path) -> Path:
    """atlas-train-dataset-1.0.1/train/ with imN / lbN pairs, labels 0 background, 1 liver, 2 tumour."""
    train = tmp_path / "atlas-train-dataset-1.0.1" / "train"
    for seed, number in enumerate((0, 1, 12)):
        write_case(
            train / "imagesTr" / f"im{number}.nii.gz",
            train / "labelsTr" / f"lb{number}.nii.gz",
            seed,
            range(3),
            direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
        )
    return tmp_path


def assert_same_case(source_image: Path, source_label: Path, out: Path, case: str) -> None:
    image, label = out / "imagesTr" / f"{case}_0000.nii.gz", out / "labelsTr" / f"{case}.nii.gz"
    np.testing.assert_array_equal(read_array(image), read_array(source_image))
    np.testing.assert_array_equal(read_array(label), read_array(source_label))
    assert geometry(image) == geometry(source_image)
    assert geometry(label) == geometry(source_label)


def test_label_tables_use_known_terminology_keys():
    for table in (FLARE22_LABELS, AMOS22_LABELS, ATLAS2023_LABELS):
        assert [s.value for s in table] == list(range(1, len(table) + 1))
        assert all(s.term is None or s.term in TERMS for s in table)
    assert [s.term for s in AMOS22_LABELS if s.term is None] == [None]  # prostate/uterus only


def test_flare22(flare22, tmp_path):
    events = []
    result = convert_flare22(flare22, tmp_path / "out", progress=events.append)
    out = tmp_path / "out"
    assert result.cases == ("FLARE22_Tr_0001", "FLARE22_Tr_0002", "FLARE22_Tr_0050")
    assert result.unlabelled_skipped == 2 and result.modality == "ct"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in result.cases]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in result.cases]
    assert sorted(p.name for p in out.parent.iterdir()) == ["FLARE2022", "out"]  # no staging left

    data = json.loads((out / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "CT"}
    assert data["labels"]["background"] == 0 and data["labels"]["liver"] == 1
    assert data["labels"]["kidney_right"] == 2 and data["labels"]["kidney_left"] == 13
    assert len(data["labels"]) == 14
    assert data["numTraining"] == 3 and data["file_ending"] == ".nii.gz" and data["modality"] == "ct"
    assert data["terminology"]["inferior_vena_cava"] == "inferior_vena_cava"
    assert set(data["terminology"]) == set(data["labels"]) - {"background"}
    assert data["source"]["dataset"] == "FLARE22" and data["source"]["unlabelled_skipped"] == 2
    assert data["source"]["original_labels"]["2"] == "right kidney"

    labelled = flare22 / "Training" / "FLARE22_LabeledCase50"
    for case in result.cases:
        assert_same_case(
            labelled / "images" / f"{case}_0000.nii.gz", labelled / "labels" / f"{case}.nii.gz", out, case
        )
    assert [e.done for e in events] == [1, 2, 3] and events[-1].fraction == 1.0

    summary = verify_dataset(out)
    assert summary.cases == result.cases and summary.modality == "ct"
    assert summary.label_presence == {name: 3 for name in data["labels"] if name != "background"}
    assert summary.median_spacing == pytest.approx((0.71, 0.71, 3.5))


def test_amos22_splits_ct_and_mri(amos22, tmp_path):
    ct, mr = convert_amos22(amos22, tmp_path / "ct", tmp_path / "mr")
    assert ct.cases == ("amos_0001", "amos_0004", "amos_0008")
    assert mr.cases == ("amos_0507", "amos_0508", "amos_0540")
    assert (ct.unlabelled_skipped, mr.unlabelled_skipped) == (1, 1)
    for result, channel in ((ct, "CT"), (mr, "MRI")):
        data = json.loads((result.folder / "dataset.json").read_text())
        assert data["channel_names"] == {"0": channel} and data["modality"] == result.modality
        assert data["numTraining"] == 3
        assert data["labels"]["spleen"] == 1 and data["labels"]["liver"] == 6
        assert data["labels"]["prostate_or_uterus"] == 15
        assert data["terminology"]["urinary_bladder"] == "urinary_bladder"
        assert data["terminology"]["prostate_or_uterus"] is None
        assert data["source"]["original_labels"]["8"] == "arota"
        assert verify_dataset(result.folder).cases == result.cases
    root = amos22 / "amos22"
    for split, case, result in (("Va", "amos_0540", mr), ("Tr", "amos_0004", ct)):
        name = f"{case}.nii.gz"
        assert_same_case(root / f"images{split}" / name, root / f"labels{split}" / name, result.folder, case)
    assert set(np.unique(read_array(ct.folder / "labelsTr" / "amos_0001.nii.gz"))) == set(range(16))


def test_amos22_one_modality_only(amos22, tmp_path):
    ct, mr = convert_amos22(amos22 / "amos22", None, tmp_path / "mr")
    assert ct is None and len(mr.cases) == 3 and not (tmp_path / "ct").exists()


def test_amos22_validation_without_labels_counts_as_unlabelled(amos22, tmp_path):
    root = amos22 / "amos22"
    for label in (root / "labelsVa").iterdir():
        label.unlink()
    (root / "labelsVa").rmdir()
    ct, mr = convert_amos22(root, tmp_path / "ct", tmp_path / "mr")
    assert ct.cases == ("amos_0001", "amos_0004") and mr.cases == ("amos_0507", "amos_0508")
    assert (ct.unlabelled_skipped, mr.unlabelled_skipped) == (2, 2)


def test_flare22_other_distributed_layout(flare22, tmp_path):
    """The FLARE22Train/images + labels layout of other mirrors is found too."""
    (flare22 / "Training" / "FLARE22_LabeledCase50").rename(tmp_path / "FLARE22Train")
    result = convert_flare22(tmp_path, tmp_path / "out")
    assert len(result.cases) == 3 and result.unlabelled_skipped == 0


def test_amos22_dataset_json_with_other_numbering_is_refused(amos22, tmp_path):
    path = amos22 / "amos22" / "dataset.json"
    data = json.loads(path.read_text())
    data["labels"]["1"], data["labels"]["6"] = "liver", "spleen"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"dataset\.json: label 1 is 'liver'"):
        convert_amos22(amos22, tmp_path / "ct", tmp_path / "mr")


def test_atlas2023_with_links(atlas2023, tmp_path):
    result = convert_atlas2023(atlas2023, tmp_path / "atlas", link=True)
    assert result.cases == ("atlas_0000", "atlas_0001", "atlas_0012") and result.modality == "mr"
    data = json.loads((tmp_path / "atlas" / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "MRI"}
    assert data["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2}
    assert data["terminology"] == {"liver": "liver", "liver_tumor": "liver_tumor"}
    train = atlas2023 / "atlas-train-dataset-1.0.1" / "train"
    linked = tmp_path / "atlas" / "labelsTr" / "atlas_0012.nii.gz"
    assert linked.is_symlink() or os.stat(linked).st_nlink == 2
    image, label = train / "imagesTr" / "im12.nii.gz", train / "labelsTr" / "lb12.nii.gz"
    assert_same_case(image, label, tmp_path / "atlas", "atlas_0012")


def test_unknown_label_value_names_file_and_value(atlas2023, tmp_path):
    label = atlas2023 / "atlas-train-dataset-1.0.1" / "train" / "labelsTr" / "lb1.nii.gz"
    write_case(
        label.parent.parent / "imagesTr" / "im1.nii.gz",
        label,
        1,
        range(4),
        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    )
    with pytest.raises(
        InputError, match=r"lb1\.nii\.gz: label value 3 is not among the ATLAS2023 labels \(0-2\)"
    ):
        convert_atlas2023(atlas2023, tmp_path / "atlas")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas-train-dataset-1.0.1"]  # nothing partial


def test_fractional_label_value_is_refused(atlas2023, tmp_path):
    label = atlas2023 / "atlas-train-dataset-1.0.1" / "train" / "labelsTr" / "lb0.nii.gz"
    image = sitk.ReadImage(str(label), sitk.sitkFloat32) * 0.5
    sitk.WriteImage(image, str(label))
    with pytest.raises(InputError, match=r"lb0\.nii\.gz: label value 0\.5 is not an integer"):
        convert_atlas2023(atlas2023, tmp_path / "atlas")


def test_missing_label_names_the_file(flare22, tmp_path):
    label = flare22 / "Training" / "FLARE22_LabeledCase50" / "labels" / "FLARE22_Tr_0002.nii.gz"
    label.unlink()
    with pytest.raises(InputError, match=r"labels/FLARE22_Tr_0002\.nii\.gz: missing: no label for image"):
        convert_flare22(flare22, tmp_path / "out")


def test_unexpected_file_name_is_refused(atlas2023, tmp_path):
    images = atlas2023 / "atlas-train-dataset-1.0.1" / "train" / "imagesTr"
    (images / "im3_0000.nii.gz").write_bytes(b"")
    with pytest.raises(InputError, match=r"im3_0000\.nii\.gz: unexpected file name; expected imN\.nii\.gz"):
        convert_atlas2023(atlas2023, tmp_path / "atlas")


def test_existing_output_needs_overwrite(atlas2023, tmp_path):
    convert_atlas2023(atlas2023, tmp_path / "atlas")
    with pytest.raises(OutputError, match=r"atlas: exists; pass overwrite=True"):
        convert_atlas2023(atlas2023, tmp_path / "atlas")
    (tmp_path / "atlas" / "labelsTr" / "stale.nii.gz").write_bytes(b"")
    convert_atlas2023(atlas2023, tmp_path / "atlas", overwrite=True)
    assert len(list((tmp_path / "atlas" / "labelsTr").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas", "atlas-train-dataset-1.0.1"]


def test_overwrite_refuses_a_folder_that_is_not_a_dataset(atlas2023, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="is not a dataset folder"):
        convert_atlas2023(atlas2023, tmp_path / "notes", overwrite=True)
    with pytest.raises(OutputError, match="would replace the source folder"):
        convert_atlas2023(atlas2023 / "atlas-train-dataset-1.0.1" / "train", atlas2023, overwrite=True)


def test_cancel_leaves_nothing(atlas2023, tmp_path):
    with pytest.raises(CancelledError):
        convert_atlas2023(atlas2023, tmp_path / "atlas", cancel=lambda: True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas-train-dataset-1.0.1"]


def test_verify_catches_geometry_mismatch(atlas2023, tmp_path):
    out = convert_atlas2023(atlas2023, tmp_path / "atlas").folder
    label = out / "labelsTr" / "atlas_0001.nii.gz"
    image = sitk.ReadImage(str(label))
    image.SetSpacing((0.71, 0.71, 3.0))
    sitk.WriteImage(image, str(label))
    with pytest.raises(InputError, match=r"atlas_0001\.nii\.gz: geometry differs from its image .*spacing"):
        verify_dataset(out)


def test_verify_catches_label_value_outside_dataset_json(atlas2023, tmp_path):
    out = convert_atlas2023(atlas2023, tmp_path / "atlas").folder
    label = out / "labelsTr" / "atlas_0012.nii.gz"
    image = sitk.ReadImage(str(label))
    image[0, 0, 0] = 20
    sitk.WriteImage(image, str(label))
    with pytest.raises(
        InputError, match=r"atlas_0012\.nii\.gz: label value 20 is not in dataset\.json labels"
    ):
        verify_dataset(out)


def test_verify_checks_pairs_and_dataset_json(atlas2023, tmp_path):
    out = convert_atlas2023(atlas2023, tmp_path / "atlas").folder
    (out / "labelsTr" / "atlas_0000.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/atlas_0000\.nii\.gz: missing: no label for image"):
        verify_dataset(out)
    (out / "imagesTr" / "atlas_0000_0000.nii.gz").unlink()
    with pytest.raises(InputError, match=r"dataset\.json: numTraining is 3 but labelsTr holds 2 cases"):
        verify_dataset(out)
    data = json.loads((out / "dataset.json").read_text())
    data["numTraining"] = 2
    data["labels"]["liver_tumor"] = 3
    (out / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"dataset\.json: label values must be 0\.\.2 without gaps"):
        verify_dataset(out)
    data["labels"]["liver_tumor"] = 2
    data["terminology"]["liver"] = "hepar"
    (out / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"'hepar' is not a key of m4oe\.terminology\.TERMS"):
        verify_dataset(out)


def test_command_line(atlas2023, tmp_path, capsys):
    assert main(["atlas2023", str(atlas2023), str(tmp_path / "atlas")]) == 0
    assert "ATLAS2023: 3 cases" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "atlas")]) == 0
    assert "3 cases" in capsys.readouterr().out
    assert main(["atlas2023", str(atlas2023), str(tmp_path / "atlas")]) == 3
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "exists" in error


# ---------------------------------------------------------------------------------------------
# TotalSegmentator outputs (converters totalsegmentator, m4oe_training.totalsegmentator)


def ts_ids() -> np.ndarray:
    """A (4, 8, 8) TotalSegmentator ``total`` map: liver 5, aorta 52, S1 26, C1 50, sacrum 25, rib 99."""
    ids = np.zeros(SHAPE, np.uint8)
    for z, value in enumerate((5, 52, 26, 50)):
        ids[z, 1:3, 1:3] = value
    ids[0, 5:7, 5:7] = 25
    ids[1, 5:7, 5:7] = 99
    return ids


def test_totalsegmentator_folder_is_mapped_to_the_project_organs_on_the_exact_grid(tmp_path):
    from m4oe.phantom import PHANTOM_LABELS

    src = tmp_path / "ts"
    for seed, case in enumerate(("s0001", "s0002")):
        write_volume(src / "images" / f"{case}.nii.gz", np.full(SHAPE, 40, np.int16), seed)
        write_volume(src / "labels" / f"{case}.nii.gz", ts_ids(), seed)
    result = convert_totalsegmentator(tmp_path / "out", "ct", src=src)
    assert result.cases == ("s0001", "s0002") and result.modality == "ct"
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, **PHANTOM_LABELS}
    assert meta["terminology"] == {k: k for k in PHANTOM_LABELS} and meta["source"]["task"] == "total"
    label = sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / "s0002.nii.gz"))
    source = sitk.ReadImage(str(src / "labels" / "s0002.nii.gz"))
    assert (label.GetSpacing(), label.GetOrigin(), label.GetDirection()) == (
        source.GetSpacing(),
        source.GetOrigin(),
        source.GetDirection(),
    )
    mapped = sitk.GetArrayFromImage(label)
    assert mapped.dtype == np.uint8
    assert [int(mapped[z, 1, 1]) for z in range(4)] == [1, 5, 7, 7]  # liver, aorta, S1 and C1 vertebrae
    assert mapped[0, 5, 5] == 0 and mapped[1, 5, 5] == 0  # sacrum and rib are not project organs
    verify_dataset(tmp_path / "out")


def test_totalsegmentator_one_case_mr_and_refusals_leave_nothing_behind(tmp_path):
    from m4oe_training.totalsegmentator import main as ts_main

    image, labels = tmp_path / "mr.nii.gz", tmp_path / "seg.nii.gz"
    write_volume(image, np.full(SHAPE, 300, np.int16), 0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    mr_ids = np.zeros(SHAPE, np.uint8)
    mr_ids[0, :2, :2], mr_ids[1, :2, :2], mr_ids[2, :2, :2] = 23, 19, 52  # aorta, vertebrae; 52 unknown in MR
    write_volume(labels, mr_ids, 0, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert (
        ts_main(
            [
                str(tmp_path / "one"),
                "--modality",
                "mr",
                "--image",
                str(image),
                "--labels",
                str(labels),
                "--case",
                "patient1",
            ]
        )
        == 0
    )
    mapped = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "one" / "labelsTr" / "patient1.nii.gz")))
    assert [int(mapped[z, 0, 0]) for z in range(3)] == [5, 7, 0]
    assert json.loads((tmp_path / "one" / "dataset.json").read_text())["modality"] == "mr"
    with pytest.raises(OutputError, match="exists"):
        convert_totalsegmentator(tmp_path / "one", "mr", image=image, labels=labels, case="patient1")
    moved = tmp_path / "moved.nii.gz"
    write_volume(moved, mr_ids, 3, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))  # another spacing and origin
    with pytest.raises(InputError, match="geometry differs from its image"):
        convert_totalsegmentator(tmp_path / "bad", "mr", image=image, labels=moved, case="p")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "labels").mkdir()
    write_volume(tmp_path / "src" / "images" / "a.nii.gz", np.zeros(SHAPE, np.int16), 0)
    with pytest.raises(InputError, match=r"has no label map a\.nii\.gz"):
        convert_totalsegmentator(tmp_path / "out2", "ct", src=tmp_path / "src")
    with pytest.raises(InputError, match="must be letters"):
        convert_totalsegmentator(tmp_path / "out3", "ct", image=image, labels=labels, case="../x")
    assert ts_main([str(tmp_path / "out4"), "--modality", "ct", "--image", str(image)]) == 2


@pytest.mark.realdata
def test_totalsegmentator_conversion_of_the_real_training_ct(shared_data, tmp_path, capsys):
    command = ["totalsegmentator", str(tmp_path / "example_ct"), "--modality", "ct", "--case", "example_ct"]
    command += ["--image", str(shared_data / "example_ct.nii.gz")]
    assert main([*command, "--labels", str(shared_data / "example_seg_fast_force_split.nii.gz")]) == 0
    assert "TotalSegmentator_CT: 1 cases" in capsys.readouterr().out
    label = sitk.ReadImage(str(tmp_path / "example_ct" / "labelsTr" / "example_ct.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "example_ct" / "imagesTr" / "example_ct_0000.nii.gz"))
    assert label.GetSize() == image.GetSize() == (122, 101, 112)
    assert (label.GetSpacing(), label.GetOrigin(), label.GetDirection()) == (
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
    )
    ml = np.bincount(sitk.GetArrayViewFromImage(label).reshape(-1)) * np.prod(label.GetSpacing()) / 1000
    assert ml[1] == pytest.approx(1126, rel=0.02)  # liver
    assert ml[2] == pytest.approx(261, rel=0.02)  # spleen


def test_totalsegmentator_command_writes_labels_on_the_image_grid_and_refuses_what_it_cannot_read(
    tmp_path, capsys
):
    src = tmp_path / "ts"
    write_volume(src / "images" / "c1.nii.gz", np.full(SHAPE, 40, np.int16), 1)
    labels = sitk.GetImageFromArray(ts_ids())
    labels.SetSpacing((0.71 + 2e-4, 0.71, 3.5))  # within the geometry tolerance of the image's
    labels.SetOrigin((101.0 - 3e-4, -50.5, 20.25))
    labels.SetDirection(CT_DIRECTION)
    (src / "labels").mkdir()
    sitk.WriteImage(labels, str(src / "labels" / "c1.nii.gz"))
    assert main(["totalsegmentator", str(src), str(tmp_path / "out"), "--modality", "ct"]) == 0
    written = tmp_path / "out" / "labelsTr" / "c1.nii.gz"
    assert geometry(written) == geometry(src / "images" / "c1.nii.gz")  # the image's, exactly
    assert sitk.ReadImage(str(written)).GetPixelID() == sitk.sitkUInt8
    before = read_array(written)
    # An existing dataset is kept: exit 3, one line naming it.
    capsys.readouterr()
    assert main(["totalsegmentator", str(src), str(tmp_path / "out"), "--modality", "ct"]) == 3
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(tmp_path / "out") in error and "exists" in error
    assert np.array_equal(read_array(written), before)
    # --task total_mr reads the same ids as MR ones: 52 is not an MR id, 5 is still the liver.
    command = ["totalsegmentator", str(src), str(tmp_path / "out"), "--modality", "ct"]
    assert main([*command, "--task", "total_mr", "--overwrite"]) == 0
    assert [int(read_array(written)[z, 1, 1]) for z in range(4)] == [1, 0, 0, 0]
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["source"]["task"] == "total_mr"
    with pytest.raises(InputError, match="is not a folder"):
        convert_totalsegmentator(tmp_path / "out6", "ct", src=tmp_path / "absent")
    assert not (tmp_path / "out6").exists()


def write_masks(case: Path, ids: np.ndarray, task: str, seed: int = 0) -> None:
    """TotalSegmentator's default output for ``ids``: one binary mask per mapped structure."""
    from m4oe_training.totalsegmentator import TOTALSEGMENTATOR_NAMES

    for ts_id, name in TOTALSEGMENTATOR_NAMES[task].items():
        write_volume(case / "segmentations" / f"{name}.nii.gz", (ids == ts_id).astype(np.uint8), seed)


def test_totalsegmentator_per_structure_masks_give_the_same_dataset_as_the_multilabel_map(tmp_path):
    from m4oe_training.totalsegmentator import TOTALSEGMENTATOR_IDS, TOTALSEGMENTATOR_NAMES

    for task in ("total", "total_mr"):  # a mask file for every id that maps to an organ
        assert sorted(TOTALSEGMENTATOR_NAMES[task]) == sorted(
            i for v in TOTALSEGMENTATOR_IDS[task].values() for i in v
        )
    assert (
        TOTALSEGMENTATOR_NAMES["total"][27] == "vertebrae_L5"
        and TOTALSEGMENTATOR_NAMES["total"][50] == "vertebrae_C1"
    )
    ids = ts_ids()
    ids[2, 5:7, 5:7] = 31  # L1 beside S1, and the unmapped sacrum and colon stay unwritten
    multi, masks = tmp_path / "multi", tmp_path / "masks"
    write_volume(multi / "images" / "c1.nii.gz", np.full(SHAPE, 40, np.int16), 0)
    write_volume(multi / "labels" / "c1.nii.gz", ids, 0)
    write_volume(masks / "c1" / "ct.nii.gz", np.full(SHAPE, 40, np.int16), 0)
    write_masks(masks / "c1", ids, "total")
    convert_totalsegmentator(tmp_path / "from_multi", "ct", src=multi)
    assert main(["totalsegmentator", str(masks), str(tmp_path / "from_masks"), "--modality", "ct"]) == 0
    expected = read_array(tmp_path / "from_multi" / "labelsTr" / "c1.nii.gz")
    written = tmp_path / "from_masks" / "labelsTr" / "c1.nii.gz"
    assert np.array_equal(read_array(written), expected) and expected[2, 5, 5] == 7
    assert geometry(written) == geometry(masks / "c1" / "ct.nii.gz")
    verify_dataset(tmp_path / "from_masks")
    # A missing mask (a --roi_subset run) would silently turn an organ into background: refused.
    (masks / "c1" / "segmentations" / "pancreas.nii.gz").unlink()
    with pytest.raises(InputError, match=r"missing: TotalSegmentator total mask of pancreas") as error:
        convert_totalsegmentator(tmp_path / "out", "ct", src=masks)
    assert str(masks / "c1" / "segmentations" / "pancreas.nii.gz") in str(error.value)
    # A mask on another grid than its image, or a mask that is not binary: nothing written.
    write_volume(masks / "c1" / "segmentations" / "pancreas.nii.gz", np.zeros(SHAPE, np.uint8), 2)
    with pytest.raises(InputError, match=r"geometry differs from its image ct\.nii\.gz"):
        convert_totalsegmentator(tmp_path / "out", "ct", src=masks)
    write_volume(masks / "c1" / "segmentations" / "pancreas.nii.gz", np.full(SHAPE, 7, np.uint8), 0)
    with pytest.raises(InputError, match="label value 7 is not a binary mask"):
        convert_totalsegmentator(tmp_path / "out", "ct", src=masks)
    write_volume(masks / "c1" / "extra.nii.gz", np.zeros(SHAPE, np.int16), 0)
    with pytest.raises(InputError, match=r"exactly one \.nii\.gz image beside segmentations/, found 2"):
        convert_totalsegmentator(tmp_path / "out", "ct", src=masks)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
