"""kronify.mri data: demo files in fastMRI format, the loader on fastmri.data.SliceDataset, masks, split, bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as etree
from pathlib import Path

import fastmri
import h5py
import numpy as np
import pytest
import torch
from fastmri.data import SliceDataset
from fastmri.data import transforms as T
from fastmri.data.mri_data import et_query
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri.complex import fft2c, from_fastmri, ifft2c, ifft2c_crop, magnitude, to_fastmri
from kronify.mri.data.datasets import SingleCoilSliceDataset, build_datasets
from kronify.mri.data.transforms import MRISample, MRITransform
from kronify.mri.data.volumes import central_slices, load_or_make_split, make_split, scan_volumes
from kronify.mri.errors import DataError
from kronify.mri.data.demo import NOTICE, build_demo_dataset, main
from kronify.mri.data.masks import effective_acceleration, make_mask_func

CROP = 32  # the crop of the conftest demo dataset (checked in test_demo_files_load_through_fastmri_slicedataset)


def h5_files(root: Path) -> list[Path]:
    return sorted(root.glob("singlecoil_*/*.h5"))


def acquisition(path: Path) -> str:
    with h5py.File(path, "r") as hf:
        return hf.attrs["acquisition"]


@pytest.fixture(scope="module")
def datasets(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """The fastmri protocol (the default)."""
    return build_datasets(demo_root, tmp_path_factory.mktemp("run") / "split.json", crop=CROP, num_slices=4)


@pytest.fixture(scope="module")
def paper_datasets(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    return build_datasets(demo_root, tmp_path_factory.mktemp("paper") / "split.json", crop=CROP, num_slices=4,
                          protocol="paper")


@pytest.fixture
def demo_copy(demo_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session demo dataset that a test may damage."""
    return Path(shutil.copytree(demo_root, tmp_path / "demo"))


# ----------------------------------------------------------------------------------------------- demo files


def test_demo_files_load_through_fastmri_slicedataset(demo_root: Path, demo_kw: dict, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo_kw["crop"] == CROP
    total = 0
    for folder in ("singlecoil_train", "singlecoil_val"):
        ds = SliceDataset(demo_root / folder, challenge="singlecoil")
        kspace, mask, target, attrs, fname, slice_num = ds[0]
        assert kspace.dtype == np.complex64 and kspace.shape == tuple(demo_kw["matrix"])
        assert target.dtype == np.float32 and target.shape == (CROP, CROP)
        assert mask is None
        assert attrs["encoding_size"] == (*demo_kw["matrix"], 1)
        assert attrs["recon_size"] == (CROP, CROP, 1)
        assert (attrs["padding_left"], attrs["padding_right"]) == (0, demo_kw["matrix"][1])
        assert attrs["acquisition"] in ("CORPD_FBK", "CORPDFS_FBK") and attrs["patient_id"]
        total += len(ds)
    assert total == demo_kw["cases"] * demo_kw["slices"]
    acquisitions = [acquisition(p) for p in h5_files(demo_root)]
    assert acquisitions.count("CORPDFS_FBK") >= 1 and acquisitions.count("CORPD_FBK") >= 3
    build_datasets(demo_root, tmp_path / "results" / "split.json", crop=CROP)["train"][0]
    assert list(tmp_path.iterdir()) == [tmp_path / "results"], "no dataset_cache.pkl in the working directory"


def test_reconstruction_esc_is_magnitude_of_cropped_ifft(demo_root: Path) -> None:
    for path in h5_files(demo_root):
        with h5py.File(path, "r") as hf:
            kspace, recon, attrs = hf["kspace"][()], hf["reconstruction_esc"][()], dict(hf.attrs)
            header = etree.fromstring(hf["ismrmrd_header"][()])
        expected = fastmri.complex_abs(T.complex_center_crop(fastmri.ifft2c(T.to_tensor(kspace)), (CROP, CROP)))
        assert np.array_equal(recon, expected.numpy()), path.name
        assert attrs["max"] == pytest.approx(float(recon.max()), rel=1e-6)
        assert attrs["norm"] == pytest.approx(float(np.linalg.norm(recon)), rel=1e-5)
        assert int(et_query(header, ["encoding", "encodingLimits", "kspace_encoding_step_1", "center"])) == 20
        assert float(et_query(header, ["encoding", "reconSpace", "fieldOfView_mm", "x"])) == 200.0
        assert "not knee" in et_query(header, ["measurementInformation", "protocolName"]).lower()
        assert sorted(attrs) == ["acquisition", "max", "norm", "patient_id"]  # as in fastMRI's files
        # realistic complex data: the phase varies over the object, and the background is noise, not zero
        image = T.tensor_to_complex_np(fastmri.ifft2c(T.to_tensor(kspace[len(kspace) // 2])))
        body = np.abs(image) > 0.3 * np.abs(image).max()
        assert np.std(np.angle(image[body] * np.conj(image[body].mean()))) > 0.1
        assert np.abs(image[:4]).min() > 0


def test_demo_cases_never_share_slices(demo_root: Path) -> None:
    manifest = json.loads((demo_root / "kronify_demo.json").read_text())
    assert manifest["notice"] == NOTICE and "not knee" in (demo_root / "README.txt").read_text().lower()
    slabs = [(c["orientation"], *c["source_slices"]) for c in manifest["cases"]]
    for i, (orient_a, lo_a, hi_a) in enumerate(slabs):
        for orient_b, lo_b, hi_b in slabs[i + 1 :]:
            assert orient_a != orient_b or hi_a <= lo_b or hi_b <= lo_a, (slabs[i], (orient_b, lo_b, hi_b))


def test_same_seed_gives_identical_files_and_a_build_is_reused(make_demo, demo_root: Path, demo_kw: dict, tmp_path: Path):
    def digests(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in h5_files(root)}

    again = make_demo(tmp_path / "again")
    assert digests(again) == digests(demo_root)
    other = make_demo(tmp_path / "other", seed=1)
    assert set(digests(other).values()).isdisjoint(digests(demo_root).values())
    before = {p: p.stat().st_mtime_ns for p in h5_files(again)}
    build = build_demo_dataset(again, **demo_kw)
    assert build.reused and {p: p.stat().st_mtime_ns for p in h5_files(again)} == before


def test_demo_command_line_and_custom_nifti(tmp_path: Path, capsys) -> None:
    import nibabel as nib

    grid = np.mgrid[:48, :56, :40].astype(np.float32)
    centre, radii = np.array([24, 28, 20])[:, None, None, None], np.array([18, 22, 15])[:, None, None, None]
    ellipsoid = (((grid - centre) / radii) ** 2).sum(0)
    volume = np.where(ellipsoid < 1, 100 + 50 * np.cos(grid[0] / 3), 0).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "phantom.nii.gz")
    out = tmp_path / "cli"
    args = ["--out", str(out), "--nifti", str(tmp_path / "phantom.nii.gz"), "--cases", "3", "--slices", "4",
            "--crop", "24", "--fov-mm", "120"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "NOT knee" in printed and "3 files" in printed
    ds = SliceDataset(out / "singlecoil_train", challenge="singlecoil")
    assert ds[0][0].shape == (48, 28) and ds[0][2].shape == (24, 24)
    assert main(args[:-2] + ["--cases", "400"]) == 2
    assert "room for" in capsys.readouterr().err
    assert (out / "kronify_demo.json").is_file() and len(h5_files(out)) == 3  # the failed rebuild left it intact


# ------------------------------------------------------------------------------------------------- loader


def test_loader_sample_contract(demo_root: Path, datasets) -> None:
    pd_files = {p.name for p in h5_files(demo_root) if acquisition(p) == "CORPD_FBK"}
    assert set().union(*(set(ds.files) for ds in datasets.values())) == pd_files
    assert all(isinstance(d, SliceDataset) for ds in datasets.values() for d in ds.datasets)
    folder = demo_root / "singlecoil_train"
    plain = SingleCoilSliceDataset(folder, [p.name for p in folder.glob("*.h5")], num_slices=None)
    assert plain[0][2].shape == (CROP, CROP)  # fastMRI's raw tuple with the target; the split datasets skip it
    sample = datasets["val"][0]
    assert isinstance(sample, MRISample)
    for name in ("input", "target", "kspace"):
        assert getattr(sample, name).shape == (2, CROP, CROP) and getattr(sample, name).dtype == torch.float32
    assert sample.mask.shape == (1, 1, CROP) and sample.mask.dtype == torch.float32
    assert sample.scale.shape == () and sample.max_value.shape == () and sample.scale.dtype == torch.float32
    assert magnitude(sample.input).max() == pytest.approx(1.0)  # scale = max |zero-filled|
    path = next(p for p in h5_files(demo_root) if p.name == sample.fname)
    with h5py.File(path, "r") as hf:
        recon = hf["reconstruction_esc"][sample.slice_num]
        scored = hf["reconstruction_esc"][1:5]  # the 4 central slices the dataset scores
    assert sample.max_value.item() == pytest.approx(float(scored.max()), rel=1e-4)  # fastmri: the scored volume's max
    torch.testing.assert_close(
        magnitude(sample.target * sample.scale), torch.from_numpy(recon), rtol=1e-4, atol=1e-4 * float(recon.max())
    )
    # central slices only: 4 of 6 -> indices 1..4 of every volume
    assert {s.slice_ind for s in datasets["train"].raw_samples} == set(central_slices(6, 4)) == {1, 2, 3, 4}
    assert len(datasets["train"]) == 4 * len(datasets["train"].files)
    batch = next(iter(torch.utils.data.DataLoader(datasets["train"], batch_size=3)))
    assert batch.input.shape == (3, 2, CROP, CROP) and batch.mask.shape == (3, 1, 1, CROP) and len(batch.fname) == 3


def test_paper_zero_filled_kspace_matches_target_on_sampled_columns(paper_datasets) -> None:
    datasets = paper_datasets  # the paper protocol masks the crop's own k-space
    for ds in (datasets["train"], datasets["test"]):
        for i in (0, len(ds) - 1):
            s = ds[i]
            sampled = s.mask.reshape(-1).bool()
            assert 0 < sampled.sum() < CROP
            k_target, k_input = fft2c(s.target), fft2c(s.input)
            tol = 2e-6 * float(k_target.abs().max())  # float32 round trip through two FFTs
            torch.testing.assert_close(k_input[..., sampled], k_target[..., sampled], rtol=0, atol=tol)
            torch.testing.assert_close(s.kspace[..., sampled], k_target[..., sampled], rtol=0, atol=tol)
            assert torch.count_nonzero(s.kspace[..., ~sampled]) == 0
            assert float(k_input[..., ~sampled].abs().max()) < tol
            torch.testing.assert_close(ifft2c(s.kspace), s.input, rtol=0, atol=2e-6)


def test_val_test_masks_repeat_and_training_masks_vary(datasets) -> None:
    for name in ("val", "test"):
        ds = datasets[name]
        first = [ds[i].mask for i in range(len(ds))]
        second = [ds[i].mask for i in range(len(ds))]
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        by_file: dict[str, torch.Tensor] = {}
        for i, raw in enumerate(ds.raw_samples):  # fastMRI semantics: one mask per volume
            assert torch.equal(by_file.setdefault(raw.fname.name, first[i]), first[i])
    train = datasets["train"]
    torch.manual_seed(0)
    masks = [train[0].mask for _ in range(6)]
    assert len({tuple(m.reshape(-1).tolist()) for m in masks}) > 1
    # two DataLoader workers do not repeat each other's masks (the mask generator is seeded per process)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(train, [0] * 8), batch_size=1, num_workers=2)
    masks = [b.mask.reshape(-1) for b in loader]  # workers alternate: 0, 1, 0, 1, ...
    assert not all(torch.equal(masks[i], masks[i + 1]) for i in range(0, 8, 2))


@pytest.mark.parametrize("mask_type", ["random", "equispaced_fraction"])
@pytest.mark.parametrize("acceleration", [4, 8])
@pytest.mark.parametrize("width", [128, 320, 368])
def test_effective_acceleration_within_5_percent(mask_type: str, acceleration: int, width: int) -> None:
    mask_func = make_mask_func(acceleration, mask_type=mask_type)
    masks = torch.cat([mask_func((1, width, 1), seed=i)[0].reshape(1, -1) for i in range(200)])
    assert effective_acceleration(masks) == pytest.approx(acceleration, rel=0.05)
    centre = round(width * {4: 0.08, 8: 0.04}[acceleration])
    lo = (width - centre + 1) // 2
    assert masks[:, lo : lo + centre].all()  # fastMRI's fully sampled centre


def test_fastmri_transform_masks_the_raw_kspace_width(demo_root: Path, datasets) -> None:
    s = datasets["val"][0]
    path = next(p for p in h5_files(demo_root) if p.name == s.fname)
    with h5py.File(path, "r") as hf:
        kspace = hf["kspace"][s.slice_num]
    assert kspace.shape[-1] == 40 > CROP
    masked, mask, _ = T.apply_mask(T.to_tensor(kspace), make_mask_func(4), seed=tuple(map(ord, s.fname)))
    assert mask.numel() == 40  # the mask covers the raw width, as fastMRI's transforms do
    zero_filled = from_fastmri(T.complex_center_crop(fastmri.ifft2c(masked), (CROP, CROP)))
    torch.testing.assert_close(s.input * s.scale, zero_filled, rtol=0, atol=2e-6 * float(zero_filled.abs().max()))


def fastmri_reference(kspace: np.ndarray, crop: tuple[int, int], mask_func, seed, protocol: str
                      ) -> dict[str, torch.Tensor]:
    """Each protocol's chain written with fastmri's own functions, in fastmri's (H, W, 2) layout."""
    full = T.to_tensor(kspace)
    target = T.complex_center_crop(fastmri.ifft2c(full), crop)
    if protocol == "paper":  # mask the crop's k-space; normalise by the target's max magnitude
        masked, mask, _ = T.apply_mask(fastmri.fft2c(target), mask_func, seed=seed)
        zero_filled = fastmri.ifft2c(masked)
        scale = fastmri.complex_abs(target).max()
    else:  # mask the raw k-space, then crop; normalise by the zero-filled image's max magnitude
        raw_masked, mask, _ = T.apply_mask(full, mask_func, seed=seed)
        zero_filled = T.complex_center_crop(fastmri.ifft2c(raw_masked), crop)
        masked = None
        scale = fastmri.complex_abs(zero_filled).max()
    ref = {"input": zero_filled / scale, "target": target / scale, "mask": mask, "scale": scale}
    if masked is not None:
        ref["kspace"] = masked / scale
    return ref


@pytest.mark.parametrize("protocol", ["paper", "fastmri"])
@pytest.mark.parametrize("crop", [(32, 32), (31, 30), (24, 33)])  # even (chequerboard path), odd (shift path)
def test_transform_equals_fastmri_reference_chain(demo_root: Path, crop, protocol: str) -> None:
    path = sorted((demo_root / "singlecoil_train").glob("*.h5"))[0]
    with h5py.File(path, "r") as hf:
        kspace, attrs = hf["kspace"][3], dict(hf.attrs)
    transform = MRITransform(crop, accelerations=8, fixed_mask=True, protocol=protocol)
    sample = transform(kspace, None, None, attrs, path.name, 3)
    ref = fastmri_reference(kspace, crop, make_mask_func(8), tuple(map(ord, path.name)), protocol)
    if protocol == "paper":
        assert torch.equal(sample.mask.reshape(-1), ref["mask"].reshape(-1))
    torch.testing.assert_close(sample.scale, ref["scale"], rtol=1e-5, atol=0)
    for name in ("input", "target", "kspace"):
        if name in ref:
            expected = from_fastmri(ref[name])
            torch.testing.assert_close(getattr(sample, name), expected, rtol=0,
                                       atol=2e-6 * float(expected.abs().max()))


def test_fast_crop_equals_fastmri_ifft_and_crop() -> None:
    torch.manual_seed(0)
    cases = [((64, 40), (32, 32)), ((65, 41), (31, 30)), ((2, 48, 48), (48, 20)), ((64, 41), (33, 21)), ((63, 40), (33, 21)),
             ((64, 40), (64, 40)), ((64, 40), (1, 2))]
    for shape, crop in cases:
        k = torch.randn(*shape, dtype=torch.complex64)
        reference = T.complex_center_crop(fastmri.ifft2c(torch.view_as_real(k)), crop)
        torch.testing.assert_close(torch.view_as_real(ifft2c_crop(k, crop)), reference, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 2, 8, 6)
    assert torch.equal(from_fastmri(to_fastmri(x)), x) and to_fastmri(x).shape == (3, 8, 6, 2)


# -------------------------------------------------------------------------------------------------- split


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(3, 900),
    ratios=st.sampled_from([(0.6, 0.1, 0.3), (0.8, 0.1, 0.1), (1 / 3, 1 / 3, 1 / 3), (420, 64, 200)]),
    seed=st.integers(0, 2**31),
)
def test_split_puts_each_volume_in_exactly_one_split(n: int, ratios, seed: int) -> None:
    names = [f"file{i:04d}.h5" for i in range(n)]
    if isinstance(ratios[0], int) and n < sum(ratios):
        with pytest.raises(DataError, match="684 volumes"):
            make_split(names, ratios, seed)
        return
    parts = make_split(names, ratios, seed)
    listed = [f for part in parts.values() for f in part]
    assert sorted(listed) == names  # a partition: nothing lost, nothing twice
    if isinstance(ratios[0], int):
        assert [len(parts[s]) for s in ("train", "val", "test")] == list(ratios)
    else:
        assert all(len(parts[s]) >= 1 for s in ("train", "val", "test")) and not parts["unused"]
        assert abs(len(parts["test"]) - ratios[2] * n) <= 1
    assert make_split(list(reversed(names)), ratios, seed) == parts


def test_split_file_is_written_then_reused(demo_root: Path, tmp_path: Path) -> None:
    split_file = tmp_path / "results" / "split.json"
    index = scan_volumes(demo_root)
    first = load_or_make_split(split_file, index, (0.6, 0.1, 0.3), seed=3)
    saved = json.loads(split_file.read_text())
    assert {k: saved[k] for k in ("train", "val", "test")} == {k: first[k] for k in ("train", "val", "test")}
    assert load_or_make_split(split_file, index, (0.6, 0.1, 0.3), seed=3) == first
    with pytest.raises(DataError, match="was made with"):
        load_or_make_split(split_file, index, (0.6, 0.1, 0.3), seed=4)
    saved["test"].append("file1000000.h5")
    split_file.write_text(json.dumps(saved))
    with pytest.raises(DataError, match="file1000000.h5"):
        load_or_make_split(split_file, index, (0.6, 0.1, 0.3), seed=3)
    saved["test"][-1] = saved["train"][0]
    split_file.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=f"{saved['train'][0]} in both"):
        load_or_make_split(split_file, index, (0.6, 0.1, 0.3), seed=3)


def test_demo_root_defaults_to_ratio_split_and_fastmri_counts_need_enough_volumes(demo_root: Path, tmp_path: Path):
    ds = build_datasets(demo_root, tmp_path / "a.json", splits=("test",), crop=CROP)
    assert json.loads((tmp_path / "a.json").read_text())["split"] == [0.6, 0.1, 0.3] and len(ds["test"])
    with pytest.raises(DataError, match=r"asks for 684 volumes but only 5"):
        build_datasets(demo_root, tmp_path / "b.json", split=(420, 64, 200), crop=CROP)


# ---------------------------------------------------------------------------------------------- bad input


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_datasets(tmp_path / "nowhere", tmp_path / "split.json")


def test_empty_selection(demo_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty selection.*AXT2"):
        build_datasets(demo_root, tmp_path / "split.json", acquisitions=("AXT2",), crop=CROP)
    with pytest.raises(DataError, match="no .h5 files"):
        scan_volumes(tmp_path)


def test_corrupt_file_raises_or_is_skipped_by_name(demo_copy: Path, tmp_path: Path) -> None:
    bad = demo_copy / "singlecoil_train" / "broken.h5"
    bad.write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(DataError, match="broken.h5"):
        build_datasets(demo_copy, tmp_path / "s1.json", crop=CROP)
    with pytest.warns(UserWarning, match="broken.h5"):
        ds = build_datasets(demo_copy, tmp_path / "s2.json", crop=CROP, on_corrupt="skip")
    assert [p.name for p, _ in ds["train"].skipped] == ["broken.h5"] and len(ds["train"])
    with pytest.raises(ValueError, match="on_corrupt"):
        scan_volumes(demo_copy, on_corrupt="ignore")


def test_truncated_file_is_reported_by_name(demo_copy: Path, tmp_path: Path) -> None:
    path = next(p for p in h5_files(demo_copy) if acquisition(p) == "CORPD_FBK")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"truncated.*{path.name}|{path.name}.*truncated"):
        scan_volumes(demo_copy)


def test_file_read_error_during_training_names_the_file(demo_copy: Path, tmp_path: Path) -> None:
    ds = build_datasets(demo_copy, tmp_path / "split.json", splits=("train",), crop=CROP)["train"]
    victim = ds.raw_samples[0].fname
    victim.write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match=victim.name):
        ds[0]


def test_file_without_targets(demo_copy: Path, tmp_path: Path) -> None:
    path = next(p for p in h5_files(demo_copy) if acquisition(p) == "CORPD_FBK")
    with h5py.File(path, "a") as hf:
        del hf["reconstruction_esc"]
    with pytest.raises(DataError, match=f"{path.name}.*reconstruction_esc"):
        build_datasets(demo_copy, tmp_path / "split.json", crop=CROP, on_corrupt="skip")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(accelerations=6), "unknown acceleration 6"),
        (dict(accelerations=1), "unknown acceleration 1"),
        (dict(accelerations=(4, 8), center_fractions=(0.08,)), "one value per acceleration"),
        (dict(mask_type="spiral"), "unknown mask_type 'spiral'"),
        (dict(crop=48), r"crop \(48, 48\) is larger than the image 64x40 of .*demo_s0_\d+\.h5"),
    ],
)
def test_bad_parameters_name_the_value(demo_root: Path, tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_datasets(demo_root, tmp_path / "split.json", **{"crop": CROP, **kwargs})
    assert not (tmp_path / "split.json").exists() or "crop" in kwargs


def test_other_accelerations_work_with_an_explicit_centre_fraction() -> None:
    masks = torch.cat([make_mask_func(6, 0.05)((1, 320, 1), seed=i)[0].reshape(1, -1) for i in range(200)])
    assert effective_acceleration(masks) == pytest.approx(6, rel=0.05)


def test_package_import_is_light() -> None:
    heavy = "{'fastmri', 'h5py', 'nilearn', 'scipy'}"
    code = f"import sys, kronify.mri; assert not {heavy} & set(sys.modules), sorted({heavy} & set(sys.modules))"
    subprocess.run([sys.executable, "-c", code], check=True)
