"""``m4oe segment`` on the real CT/MRI volumes of ../shared/data (skipped when absent).

The tiny untrained model keeps this fast; what is checked is the pipeline around it: reading a
DICOM series and NIfTI files, modality detection (DICOM tag, intensities), the output on the
input's exact grid, and the gate outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from m4oe import cli
from m4oe.io import read_image

pytestmark = pytest.mark.realdata

CASES = [
    # (input, output file name, expected modality, expected modality source)
    ("example_ct_dicom", "dicom.seg.nrrd", "ct", "dicom"),
    ("example_mr_sm.nii.gz", "mr.nii.gz", "mr", "intensity"),
    ("example_ct_sm.nii.gz", "ct.nii.gz", "ct", "intensity"),
]


@pytest.mark.parametrize(("name", "output", "modality", "source"), CASES, ids=[c[0] for c in CASES])
def test_segment_real_volume(shared_data, tiny_model_dir, tmp_path, capsys, name, output, modality, source):
    image_path = shared_data / name
    out, gates = tmp_path / output, tmp_path / "gates"
    argv = ["segment", image_path, "-o", out, "--model", tiny_model_dir, "--gates", gates]
    code = cli.main([str(a) for a in [*argv, "--batch-size", "10", "--progress", "json"]])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    done = json.loads(captured.out.splitlines()[-1])
    assert done["stage"] == "done"
    assert (done["modality"], done["modality_source"]) == (modality, source)

    reference = read_image(image_path).image  # a DICOM folder has no header to read but the series
    labelmap = sitk.ReadImage(str(out))
    assert labelmap.GetSize() == reference.GetSize()
    if out.name.endswith(".nii.gz"):
        # NIfTI in, NIfTI out: the geometry is written back bit for bit.
        assert labelmap.GetSpacing() == reference.GetSpacing()
        assert labelmap.GetOrigin() == reference.GetOrigin()
        assert labelmap.GetDirection() == reference.GetDirection()
    else:
        # NRRD stores spacing x direction as vectors: reading back may differ by 1 ulp.
        for get in (sitk.Image.GetSpacing, sitk.Image.GetOrigin, sitk.Image.GetDirection):
            np.testing.assert_allclose(get(labelmap), get(reference), rtol=1e-12, atol=1e-9)
    assert set(np.unique(sitk.GetArrayViewFromImage(labelmap)).tolist()) <= {0, 1, 2, 3}

    assert set(done["outputs"]) == {"segmentation", "gate_map", "dominant_expert", "gate_summary"}
    summary = json.loads((gates / "gate_summary.json").read_text())
    assert summary["input_modality"] == modality
    assert summary["source"] == str(image_path)
    assert len(summary["per_slice"]) == reference.GetSize()[2]  # all three are stored axially
    weights = sitk.GetArrayFromImage(sitk.ReadImage(str(gates / "gate_map.nrrd")))
    assert weights.shape[0] == reference.GetSize()[2] and weights.shape[-1] == 3
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-4)
    assert Path(done["outputs"]["dominant_expert"]).is_file()
