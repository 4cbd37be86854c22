"""``--method sam-net`` end to end: both presets through the CLI write the usual outputs under the method name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from regsam.cli import main as cli_main
from regsam.register.net.model import NetConfig, build_network, save_network


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["instant", "fast"])
def test_sam_net_presets_write_the_usual_outputs(shared_data, tmp_path, preset, capsys):
    ct = sitk.ReadImage(str(shared_data / "elastix_3dct_lung" / "3DCT_lung_baseline_small.mha"))
    moving = sitk.Resample(ct, ct, sitk.TranslationTransform(3, (4.0, -3.0, 5.0)), sitk.sitkLinear, -1024.0)
    for name, image in (("fixed", ct), ("moving", moving)):
        sitk.WriteImage(image, str(tmp_path / f"{name}.nii.gz"))
    cfg = NetConfig(nb_features=(4, 8))
    weights = save_network(build_network(cfg), cfg, tmp_path / "net.pt")
    out = tmp_path / "out"
    code = cli_main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "--out", str(out),
                     "--method", "sam-net", "--preset", preset, "--net-weights", str(weights), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sam-net" and summary["preset"] == preset
    stages = ["affine", "network"] + (["finish"] if preset == "fast" else [])
    assert all(s in summary["timings"] for s in stages), summary["timings"]
    assert {p.name for p in out.iterdir()} >= {"disp.nii.gz", "warped.nii.gz", "affine.tfm", "summary.json"}
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "disp.nii.gz")))
    assert np.isfinite(field).all() and field.shape[:3] == sitk.GetArrayViewFromImage(ct).shape
