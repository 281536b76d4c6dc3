"""Reading hostile or damaged inputs (issue 23, points 4, 5, 6 and 9).

Every file here is built by the test from raw header bytes (NIfTI-1), header text (NRRD,
MetaImage) or SimpleITK and pydicom (DICOM series), so each one holds exactly the defect under
test: a header claiming a huge volume over a few bytes of data, sheared or singular direction
cosines, a zero spacing, a NIfTI pixdim of 0, two acquisitions under one blank SeriesInstanceUID,
slice positions a few 1e-6 mm off an even grid.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from packaging.requirements import Requirement
from tiny_models import save_tiny_model

import m4oe
from m4oe import cli
from m4oe.checkpoint import load_checkpoint
from m4oe.errors import InputError
from m4oe.hub import sha256_file
from m4oe.io import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV, _itk_warnings, read_image

ROOT = Path(__file__).resolve().parents[1]

RAW_ITK = ("WARNING: In", ".cxx", ".hxx", "0x")


def assert_refused(path: Path, *phrases: str, **kwargs) -> str:
    """read_image refuses ``path`` with one line naming it and holding every phrase; the message."""
    with pytest.raises(InputError) as info:
        read_image(path, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert info.value.exit_code == 2
    return message


def values(shape_xyz) -> bytes:
    """int16 voxels, little-endian, x fastest, for a volume of ``shape_xyz`` voxels."""
    return (np.arange(int(np.prod(shape_xyz))) % 1000 - 500).astype("<i2").tobytes()


def nrrd(path: Path, sizes, directions="(1,0,0) (0,1,0) (0,0,1)", *, data: bytes | None = None) -> Path:
    """A gzip-encoded int16 NRRD with these sizes (x y z) and space directions (mm, LPS)."""
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {' '.join(map(str, sizes))}\nspace directions: {directions}\nspace origin: (0,0,0)\n"
        "encoding: gzip\nendian: little\n\n"
    )
    path.write_bytes(header.encode() + gzip.compress(values(sizes) if data is None else data))
    return path


def mha(path: Path, sizes, matrix="1 0 0 0 1 0 0 0 1", spacing="1 1 1", *, data: bytes | None = None) -> Path:
    """A MetaImage with this TransformMatrix (columns = axis directions) and ElementSpacing."""
    compressed = data is not None
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = {compressed}\nTransformMatrix = {matrix}\nOffset = 0 0 0\n"
        f"ElementSpacing = {spacing}\nDimSize = {' '.join(map(str, sizes))}\nElementType = MET_SHORT\n"
        "ElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + (values(sizes) if data is None else data))
    return path


def nifti(
    path: Path,
    sizes=(6, 7, 8),
    pixdim=(0.8, 0.8, 2.5),
    *,
    qform_code=0,
    sform_code=0,
    srow=((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)),
    data: bytes | None = None,
) -> Path:
    """A single-file int16 NIfTI-1 (gzip-compressed for ``.nii.gz``) written byte by byte.

    ``srow``: the sform's three rows (RAS, mm); the qform is the identity rotation (quaternion
    b = c = d = 0) at the origin.
    """
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *sizes, 1, 1, 1, 1)
    struct.pack_into("<2h", header, 70, 4, 16)  # DT_INT16, 16 bits
    struct.pack_into("<8f", header, 76, 1.0, *pixdim, 0, 0, 0, 0)
    struct.pack_into("<f", header, 108, 352.0)
    header[123] = 2  # millimetres
    struct.pack_into("<2h", header, 252, qform_code, sform_code)
    for row, numbers in enumerate(srow):
        struct.pack_into("<4f", header, 280 + 16 * row, *numbers)
    header[344:348] = b"n+1\0"
    content = bytes(header) + bytes(4) + (values(sizes) if data is None else data)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path


def dicom_series(folder: Path, positions_z, *, series_uid="1.2.826.0.1.3680043.2.1125.50", acquisition=1):
    """One int16 CT file per slice position (mm, LPS z), 10x9 pixels, identity orientation.

    ``positions_z`` are written as given (strings keep their exact decimals). The files name the
    acquisition; ``series_uid`` may be blank.
    """
    pydicom = pytest.importorskip("pydicom")
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, z in enumerate(positions_z):
        slice_ = sitk.GetImageFromArray(np.full((1, 9, 10), 100 * acquisition + k, np.int16))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"1.2.826.0.1.3680043.2.1125.{60 + acquisition}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid or "1.2.826.0.1.3680043.2.1125.99",
            "0020|0012": str(acquisition),
            "0020|0013": str(k + 1),
            "0020|0032": f"-120.5\\-130.25\\{z}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        file = folder / f"acq{acquisition}_{k:03d}.dcm"
        writer.SetFileName(str(file))
        writer.Execute(slice_)
        if not series_uid:
            ds = pydicom.dcmread(file)
            ds.SeriesInstanceUID = ""
            ds.save_as(file)
    return folder


# Point 4: volumes whose header claims more voxels than a limit are refused before any allocation.


def test_a_tiny_gzip_nrrd_claiming_1_6_billion_voxels_is_refused_without_allocating_them(tmp_path):
    bomb = nrrd(tmp_path / "bomb.nrrd", (4000, 4000, 100), data=bytes(1000))
    assert bomb.stat().st_size < 1000
    script = (
        "import re\n"
        "from m4oe.io import read_image\n"
        "try:\n"
        f"    read_image({str(bomb)!r})\n"
        "except ValueError as error:\n"
        "    print(error)\n"
        # The peak resident memory of this process (ru_maxrss would include the forked pytest's).
        "print(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1))\n"
    )
    package_root = str(Path(m4oe.__file__).parents[1])  # the m4oe under test, in the child too
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_root, *sys.path]))
    env.pop(MAX_VOXELS_ENV, None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    message, peak_kib = run.stdout.strip().splitlines()
    assert "4000x4000x100" in message and "1,600,000,000 voxels" in message, message
    assert f"{DEFAULT_MAX_VOXELS:,}" in message and "--max-voxels" in message and MAX_VOXELS_ENV in message
    assert int(peak_kib) < 600_000, f"peak {int(peak_kib) / 1e6:.2f} GB while refusing the header"


def huge_nrrd(path):
    return nrrd(path, (2000, 2000, 50), data=bytes(100))


def huge_nhdr(path):
    data = path.with_suffix(".raw.gz")
    data.write_bytes(gzip.compress(bytes(100)))
    path.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nsizes: 2000 2000 50\nspacings: 1 1 1\n"
        f"encoding: gzip\nendian: little\ndata file: {data.name}\n"
    )
    return path


def huge_mha(path):
    return mha(path, (2000, 2000, 50), data=gzip.compress(bytes(100)))


def huge_nifti(path):
    return nifti(path, (2000, 2000, 50), data=bytes(100))


@pytest.mark.parametrize(
    "name, make",
    [("v.nrrd", huge_nrrd), ("v.nhdr", huge_nhdr), ("v.mha", huge_mha), ("v.nii.gz", huge_nifti)],
)
def test_every_format_is_refused_from_its_header_above_the_limit(tmp_path, monkeypatch, name, make):
    # 200 million voxels claimed (400 MB as int16) over a few bytes; the environment lowers the limit.
    monkeypatch.setenv(MAX_VOXELS_ENV, "10000000")
    message = assert_refused(make(tmp_path / name), "2000x2000x50", "200,000,000 voxels", "10,000,000")
    assert "0.4 GB" in message and "truncated" not in message


def test_a_dicom_series_is_refused_from_slices_times_rows_times_columns(tmp_path):
    folder = dicom_series(tmp_path / "series", ["0", "2", "4"])
    assert_refused(folder, "10x9x3", "270 voxels", "limit of 200", max_voxels=200)
    assert read_image(folder, max_voxels=270).image.GetSize() == (10, 9, 3)


def test_the_limit_is_overridable_and_checked(tmp_path, monkeypatch):
    path = nrrd(tmp_path / "v.nrrd", (6, 7, 8))
    assert_refused(path, "336 voxels", "limit of 300", max_voxels=300)
    monkeypatch.setenv(MAX_VOXELS_ENV, "300")
    assert_refused(path, "limit of 300")
    assert read_image(path, max_voxels=336).image.GetSize() == (6, 7, 8)  # the argument wins
    for bad in ("lots", "0"):
        monkeypatch.setenv(MAX_VOXELS_ENV, bad)
        with pytest.raises(InputError, match=f"{MAX_VOXELS_ENV} must be a positive number of voxels"):
            read_image(path)


def test_a_volume_larger_than_the_memory_is_refused_even_with_the_limit_raised(tmp_path):
    path = nrrd(tmp_path / "v.nrrd", (100000, 100000, 1000), data=bytes(100))
    assert_refused(path, "20000.0 GB to read", "of memory", max_voxels=10**15)


def test_cli_max_voxels_refuses_with_exit_code_2_and_writes_nothing(tmp_path, capsys):
    path = nrrd(tmp_path / "v.nrrd", (6, 7, 8))
    out = tmp_path / "out.nii.gz"
    code = cli.main(["segment", str(path), "-o", str(out), "--max-voxels", "100", "--progress", "json"])
    captured = capsys.readouterr()
    assert code == 2 and not out.exists()
    error = json.loads(captured.out.strip().splitlines()[-1])
    assert error["exit_code"] == 2 and "336 voxels" in error["message"] and "limit of 100" in error["message"]
    code = cli.main(["evaluate", str(path), str(path), "--max-voxels", "100"])
    assert code == 2 and "limit of 100" in capsys.readouterr().err


# Point 5: geometry that ITK would refuse with a cryptic message, change, or guess.


@pytest.mark.parametrize("kind", ["nrrd", "mha"])
def test_sheared_direction_cosines_are_refused_not_coerced(tmp_path, kind):
    path = (
        nrrd(tmp_path / "v.nrrd", (6, 7, 8), "(1,0,0) (0.5,1,0) (0,0,1)")
        if kind == "nrrd"
        else mha(tmp_path / "v.mha", (6, 7, 8), "1 0 0 0.5 1 0 0 0 1")
    )
    assert_refused(path, "not orthonormal", "axes x and y are 63.43 degrees apart, expected 90")


@pytest.mark.parametrize("qform_code", [0, 1])
def test_a_sheared_nifti_sform_is_refused_whether_or_not_a_qform_could_replace_it(tmp_path, qform_code):
    path = nifti(
        tmp_path / "v.nii",
        pixdim=(1, 1, 1),
        qform_code=qform_code,
        sform_code=1,
        srow=((1, 0.5, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0)),
    )
    assert_refused(path, "sheared NIfTI sform", "63.43 degrees apart")


def test_direction_cosines_a_rounding_error_off_orthonormal_are_accepted(tmp_path):
    path = nrrd(tmp_path / "v.nrrd", (6, 7, 8), "(1,0,0) (0.00001,1,0) (0,0,1)")
    assert read_image(path).warnings == []


@pytest.mark.parametrize("kind", ["nrrd", "mha"])
def test_a_singular_direction_says_so(tmp_path, kind):
    path = (
        nrrd(tmp_path / "v.nrrd", (6, 7, 8), "(1,0,0) (1,0,0) (0,0,1)")
        if kind == "nrrd"
        else mha(tmp_path / "v.mha", (6, 7, 8), "1 0 0 1 0 0 0 0 1")
    )
    message = assert_refused(path, "singular direction matrix", "x (1 0 0), y (1 0 0)")
    assert not message.endswith("(0 0 1)")


@pytest.mark.parametrize("kind", ["nrrd", "mha"])
def test_a_zero_spacing_says_so(tmp_path, kind):
    path = (
        nrrd(tmp_path / "v.nrrd", (6, 7, 8), "(1,0,0) (0,0,0) (0,0,1)")
        if kind == "nrrd"
        else mha(tmp_path / "v.mha", (6, 7, 8), spacing="1 0 1")
    )
    message = assert_refused(path, "spacing 1 x 0 x 1 mm", "along y")
    assert "corrupt or truncated" not in message


@pytest.mark.parametrize("qform_code", [0, 1])
def test_a_nifti_pixdim_of_zero_is_read_as_1_mm_with_a_warning(tmp_path, qform_code):
    loaded = read_image(nifti(tmp_path / "v.nii.gz", pixdim=(0.8, 0.0, 2.5), qform_code=qform_code))
    assert loaded.image.GetSpacing()[1] == 1.0
    assert len(loaded.warnings) == 1
    assert "pixdim gives voxel size 0 along y; read as 1 mm" in loaded.warnings[0]


def test_a_nifti_sform_itk_sets_aside_is_warned_in_one_line_without_raw_itk_text(tmp_path, capfd):
    path = nifti(
        tmp_path / "v.nii", pixdim=(1, 1, 1), sform_code=1, srow=((2, 0, 0, 0), (0, 2, 0, 0), (0, 0, 3, 0))
    )
    loaded = read_image(path)
    assert loaded.image.GetSpacing() == (1.0, 1.0, 1.0)
    assert [w for w in loaded.warnings if "sform (voxel size 2 x 2 x 3 mm)" in w] == loaded.warnings
    assert len(loaded.warnings) == 1
    err = capfd.readouterr().err
    assert not any(raw in err for raw in RAW_ITK), err


def test_a_plain_nifti_gets_no_warning(tmp_path):
    path = nifti(tmp_path / "v.nii.gz", pixdim=(0.8, 0.8, 2.5), qform_code=1, sform_code=1,
                 srow=((-0.8, 0, 0, 10), (0, -0.8, 0, 20), (0, 0, 2.5, 30)))  # fmt: skip
    loaded = read_image(path)
    assert loaded.warnings == []
    assert loaded.image.GetSpacing() == pytest.approx((0.8, 0.8, 2.5))


# Point 6: DICOM series.


def test_two_acquisitions_under_one_blank_series_uid_are_split_and_warned(tmp_path, capfd):
    folder = tmp_path / "series"
    dicom_series(folder, ["0", "2", "4", "6", "8"], series_uid="", acquisition=1)
    dicom_series(folder, ["0", "2", "4", "6"], series_uid="", acquisition=2)
    loaded = read_image(folder)
    assert loaded.image.GetSize() == (10, 9, 5)
    assert loaded.image.GetSpacing()[2] == pytest.approx(2.0)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(loaded.image)[:, 0, 0], [100, 101, 102, 103, 104]
    )
    assert len(loaded.warnings) == 1
    warning = loaded.warnings[0]
    assert "blank SeriesInstanceUID" in warning and "2 acquisitions" in warning
    assert "acquisition number 1, 5 files" in warning
    assert not any(raw in capfd.readouterr().err for raw in RAW_ITK)


def test_slices_at_the_same_positions_that_nothing_separates_are_refused(tmp_path):
    folder = tmp_path / "series"
    dicom_series(folder, ["0", "2", "4"], series_uid="", acquisition=1)
    for file in folder.iterdir():
        file.rename(file.with_name("copy_" + file.name))
    dicom_series(folder, ["0", "2", "4"], series_uid="", acquisition=1)
    assert_refused(folder, "6 slices at only 3 distinct positions", "folder of its own")


def test_an_evenly_spaced_series_with_rounded_positions_is_not_warned(tmp_path):
    # The positions of the dcmqi 3-slice CT (data/segmentations/ct-3slice): 1 mm apart exactly, as
    # printed; their float differences are not, and ITK marks the series non-uniform.
    folder = dicom_series(tmp_path / "series", ["-126.690002", "-127.690002", "-128.690002"])
    loaded = read_image(folder)
    assert loaded.image.GetSpacing()[2] == pytest.approx(1.0)
    assert loaded.warnings == []


def test_a_missing_slice_is_warned_once_in_our_words_and_itk_prints_nothing(tmp_path, capfd):
    folder = dicom_series(tmp_path / "series", ["0", "2", "4", "8", "10"])
    loaded = read_image(folder)
    assert len(loaded.warnings) == 1
    assert "unevenly spaced or some are missing (gaps of 2 to 4 mm)" in loaded.warnings[0]
    err = capfd.readouterr().err
    assert not any(raw in err for raw in RAW_ITK), err


def test_itk_console_warnings_become_one_line_each_and_other_text_passes_through(tmp_path, capfd):
    warnings: list[str] = []
    with _itk_warnings(tmp_path, warnings):
        os.write(2, b"WARNING: In /build/ITK/itkSomething.cxx, line 12\n")
        os.write(2, b"ImageIO (0x55d0c0ffee00): first line\n  second line\n\n")
        os.write(2, b"something else\n")
    assert warnings == [f"{tmp_path}: ITK: first line second line"]
    assert capfd.readouterr().err == "something else\n"


def test_what_a_failing_reader_printed_goes_into_its_error_not_onto_stderr(tmp_path, capfd):
    """MetaIO prints two lines before a truncated .mha fails; the error quotes them instead."""
    warnings: list[str] = []
    with pytest.raises(RuntimeError), _itk_warnings(tmp_path, warnings) as console:
        os.write(2, b"MetaImage: M_ReadElementsData: data not read completely\n   ideal = 10 : actual = 5\n")
        raise RuntimeError("File cannot be read")
    assert console == ["MetaImage: M_ReadElementsData: data not read completely ideal = 10 : actual = 5"]
    assert warnings == [] and capfd.readouterr().err == ""


def test_a_compressed_metaimage_without_its_compressed_size_is_refused_not_read_as_garbage(tmp_path, capfd):
    """Without CompressedDataSize in the header MetaIO prints "Uncompress failed" and returns
    garbage voxels (-492..31587 here, from values -500..-165), raising no error; whole or cut."""
    stream = zlib.compress(values((6, 7, 8)))
    for name, data in (("whole.mha", stream), ("cut.mha", stream[:-100])):
        path = mha(tmp_path / name, (6, 7, 8), data=data)
        assert_refused(path, "cannot be read, corrupt or truncated (Uncompress failed)")
        assert capfd.readouterr().err == ""
    sized = tmp_path / "sized.mha"
    sized.write_bytes((tmp_path / "whole.mha").read_bytes().replace(
        b"CompressedData = True\n", f"CompressedData = True\nCompressedDataSize = {len(stream)}\n".encode()
    ))  # fmt: skip
    array = sitk.GetArrayFromImage(read_image(sized).image)
    assert (array.min(), array.max()) == (-500, -165)


# Point 9: one exit code for bad arguments, the torch floor, an unverified model warned.


@pytest.fixture
def ct(tmp_path) -> Path:
    array = np.random.default_rng(0).integers(-1000, 400, (4, 64, 64)).astype(np.int16)
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize(
    "arguments, says",
    [(["--task", "bogus"], "unknown task 'bogus'"), (["--sha256", "zz"], "is not 64 hex digits")],
)
def test_bad_arguments_exit_with_code_2(tmp_path, tiny_model_dir, ct, capsys, arguments, says):
    out = tmp_path / "out.nii.gz"
    argv = ["segment", ct, "-o", out, "--model", tiny_model_dir, "--threads", "1", "--tta", "1", *arguments]
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert not out.exists()


def test_torch_floor_excludes_the_weights_only_bypass():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert not torch.specifier.contains("2.5.1") and torch.specifier.contains("2.6.0")


def test_a_card_without_weights_sha256_loads_with_a_warning(tmp_path, caplog):
    folder = save_tiny_model(tmp_path / "model")
    card = json.loads((folder / "model.json").read_text())
    card["weights_sha256"] = ""
    (folder / "model.json").write_text(json.dumps(card))
    with caplog.at_level(logging.WARNING, logger="m4oe.checkpoint"):
        load_checkpoint(folder)
    assert [r.getMessage() for r in caplog.records if "unverified" in r.getMessage()], caplog.text
    assert "no weights_sha256" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m4oe.checkpoint"):
        load_checkpoint(folder, sha256=sha256_file(folder / "model.safetensors"))
    assert "unverified" not in caplog.text
