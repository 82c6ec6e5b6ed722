"""``python -m kronify.mri.data.demo --nifti PATH``: demo-format data from any 3-D NIfTI volume (another anatomy)."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as etree
from pathlib import Path

import h5py
import numpy as np
import pytest

from kronify.mri.data.datasets import build_datasets
from kronify.mri.data.demo import main

CROP, SLICES = 24, 4
ARGS = ["--slices", str(SLICES), "--crop", str(CROP), "--fov-mm", "120"]


def write_nifti(path: Path, volume: np.ndarray, voxel_mm: float = 2.0) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.diag([voxel_mm] * 3 + [1.0])), path)
    return path


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An asymmetric 3-D phantom: an ellipsoid with a bright off-centre blob and a ramp (not brain, not knee)."""
    grid = np.mgrid[:40, :48, :36].astype(np.float64)
    centre, radii = np.array([20, 24, 18])[:, None, None, None], np.array([16, 20, 14])[:, None, None, None]
    inside = (((grid - centre) / radii) ** 2).sum(0) < 1
    blob = np.exp(-(((grid[0] - 12) ** 2 + (grid[1] - 30) ** 2 + (grid[2] - 20) ** 2) / 20))
    volume = np.where(inside, 80 + 0.8 * grid[1] + 120 * blob, 0)
    return write_nifti(tmp_path_factory.mktemp("nifti") / "knee phantom.nii.gz", volume)


@pytest.fixture(scope="module")
def built(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built the way a user would: no --out, no --cases, from another working folder."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        assert main(["--nifti", str(phantom), *ARGS]) == 0
    return cwd / "demo-knee_phantom"


def h5_files(root: Path) -> list[Path]:
    return sorted(root.glob("singlecoil_*/*.h5"))


def test_default_out_folder_and_every_slab(built: Path, phantom: Path, tmp_path: Path, capsys) -> None:
    files = h5_files(built)
    manifest = json.loads((built / "kronify_demo.json").read_text())
    assert len(files) == manifest["params"]["cases"] == len(manifest["cases"]) >= 6
    assert manifest["params"]["source"] == phantom.name
    assert all(f.name.startswith("knee_phantom_s0_") for f in files)  # never mistaken for demo_s0_*.h5
    # "every slab that fits": one more case than that does not fit
    capsys.readouterr()
    assert main(["--nifti", str(phantom), "--out", str(tmp_path / "more"), *ARGS,
                 "--cases", str(len(files) + 1)]) == 2
    assert f"room for {len(files)} disjoint slabs" in capsys.readouterr().err
    slabs = [(c["orientation"], *c["source_slices"]) for c in manifest["cases"]]
    for i, (orient_a, lo_a, hi_a) in enumerate(slabs):  # no two cases share a source slice
        for orient_b, lo_b, hi_b in slabs[i + 1 :]:
            assert orient_a != orient_b or hi_a <= lo_b or hi_b <= lo_a


def test_files_have_the_fastmri_singlecoil_layout(built: Path, phantom: Path) -> None:
    width = int(np.ceil(CROP * 368 / 320))
    width += width % 2  # fastMRI's 368/320 phase-encoding ratio, even
    ids = set()
    for path in h5_files(built):
        with h5py.File(path, "r") as hf:
            kspace, recon = hf["kspace"][()], hf["reconstruction_esc"][()]
            attrs = dict(hf.attrs)
            header = etree.fromstring(hf["ismrmrd_header"][()])
        assert kspace.dtype == np.complex64 and kspace.shape == (SLICES, 2 * CROP, width)
        assert recon.dtype == np.float32 and recon.shape == (SLICES, CROP, CROP)
        # reconstruction_esc = |centre crop of the orthonormal centred inverse FFT| (numpy, not fastmri)
        image = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(kspace, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        top, left = (2 * CROP - CROP) // 2, (width - CROP) // 2
        np.testing.assert_allclose(recon, np.abs(image[:, top : top + CROP, left : left + CROP]), rtol=1e-4,
                                   atol=1e-4 * recon.max())
        assert attrs["acquisition"] in {"CORPD_FBK", "CORPDFS_FBK"}
        assert attrs["max"] == pytest.approx(float(recon.max()))
        assert attrs["norm"] == pytest.approx(float(np.linalg.norm(recon)), rel=1e-5)
        ns = {"m": "http://www.ismrm.org/ISMRMRD"}
        assert phantom.name in header.find("m:measurementInformation/m:protocolName", ns).text
        assert header.find("m:encoding/m:reconSpace/m:matrixSize/m:x", ns).text == str(CROP)
        ids.add(attrs["patient_id"])
    assert len(ids) == len(h5_files(built))
    default_ids = {hashlib.sha256(f"kronify-demo-0-{case}".encode()).hexdigest() for case in range(len(ids))}
    assert ids.isdisjoint(default_ids)  # not the template build's patients


def test_files_load_with_the_project_dataset(built: Path, tmp_path: Path) -> None:
    def acquisition(path: Path) -> str:
        with h5py.File(path, "r") as hf:
            return hf.attrs["acquisition"]

    pd_files = [p for p in h5_files(built) if acquisition(p) == "CORPD_FBK"]
    datasets = build_datasets(built, tmp_path / "split.json", crop=CROP)
    assert sum(len(ds) for ds in datasets.values()) == len(pd_files) * SLICES
    sample = next(ds for ds in datasets.values() if len(ds))[0]
    assert sample.input.shape == (2, CROP, CROP) and sample.target.shape == (2, CROP, CROP)
    assert sample.fname.startswith("knee_phantom_s0_")


def test_same_nifti_and_seed_give_identical_files(built: Path, phantom: Path, tmp_path: Path) -> None:
    assert main(["--nifti", str(phantom), "--out", str(tmp_path / "again"), "--cases", "all", *ARGS]) == 0

    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in h5_files(root)}

    assert digests(tmp_path / "again") == digests(built)


@pytest.mark.parametrize(
    ("shape", "message"),
    [((40, 48), "is a 2-D image"), ((40, 48, 1), "is a 2-D image"), ((20, 20, 20, 3), "holds 3 volumes")],
)
def test_bad_volumes_are_named_and_touch_nothing(built: Path, tmp_path: Path, capsys, monkeypatch, shape,
                                                message) -> None:
    bad = write_nifti(tmp_path / "bad.nii.gz", np.ones(shape))
    before = {p: p.stat().st_mtime_ns for p in h5_files(built)}
    assert main(["--nifti", str(bad), "--out", str(built), *ARGS]) == 2
    err = capsys.readouterr().err
    assert message in err and "bad.nii.gz" in err
    assert {p: p.stat().st_mtime_ns for p in h5_files(built)} == before  # the earlier build is intact
    monkeypatch.chdir(tmp_path)
    assert main(["--nifti", str(bad), *ARGS]) == 2
    assert not (tmp_path / "demo-bad").exists()  # no folder made for a volume that cannot be used


def test_missing_file_and_missing_out(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.nii.gz"
    assert main(["--nifti", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nope.nii.gz" in err and "does not exist" in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--cases", "3"])
    assert exit_info.value.code == 2 and "--out DIR is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--nifti", str(missing), "--cases", "some"])
    assert "expected a number or 'all'" in capsys.readouterr().err
