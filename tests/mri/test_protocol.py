"""The two protocols against small independent references: the official fixed masks, which width a mask covers,
fixed vs per-sample masks, normalisation, training patches, and per-slice vs per-volume metrics with their data
ranges (including a file crop that differs from the evaluated crop)."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastmri.data.subsample import RandomMaskFunc
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from kronify.mri.complex import magnitude
from kronify.mri.data.datasets import SliceSubset, build_datasets
from kronify.mri.errors import DataError
from kronify.mri.data.masks import draw_fixed_mask
from kronify.mri.metrics import MetricsAccumulator
from kronify.mri.protocol import PROTOCOLS, get_protocol
from np_reference import complex_np, np_crop, np_fft2c, np_ifft2c

CROP = 32  # conftest demo data: k-space 64x40, files built with a 32x32 crop, 6 slices per volume

# The sampled columns of the official repository's masks (Whethe/HyperKron-MRI-Recon,
# mask/fastmri/random/random_af8_cf0.04_pe320.npy and random_af4_cf0.08_pe320.npy), read from the .npy files.
OFFICIAL_8X = [14, 15, 16, 34, 43, 75, 82, 97, 99, 126, *range(154, 167), 171, 173, 179, 198, 204, 205, 214, 233,
               255, 262, 268, 283, 303, 307, 309, 312]
OFFICIAL_4X = [14, 15, 16, 24, 26, 34, 43, 47, 53, 55, 60, 61, 63, 67, 69, 75, 77, 79, 82, 87, 92, 95, 97, 99, 126,
               132, *range(146, 174), 179, 180, 198, 203, 204, 205, 214, 233, 241, 243, 247, 248, 255, 261, 262,
               268, 283, 285, 291, 296, 303, 306, 307, 309, 311, 312, 313]




def read_kspace(root: Path, fname: str) -> tuple[np.ndarray, dict]:
    path = next(root.glob(f"singlecoil_*/{fname}"))
    with h5py.File(path, "r") as hf:
        return hf["kspace"][()], dict(hf.attrs)


@pytest.fixture(scope="module")
def paper(demo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("paper-run")
    return run, build_datasets(demo_root, run / "split.json", crop=CROP, num_slices=4, protocol="paper")


# ------------------------------------------------------------------------------------------------------ masks


def test_fixed_masks_are_the_official_masks() -> None:
    mask8, mask4 = draw_fixed_mask(320, 8), draw_fixed_mask(320, 4)
    assert np.flatnonzero(mask8).tolist() == OFFICIAL_8X and int(mask8.sum()) == 39
    assert np.flatnonzero(mask4).tolist() == OFFICIAL_4X and int(mask4.sum()) == 81
    assert int(draw_fixed_mask(320, 16).sum()) == 21  # the official 16x mask (centre fraction 0.02) has 21 lines


@settings(max_examples=30, deadline=None)
@given(width=st.integers(16, 400), acc=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16))
def test_fixed_mask_shape_centre_and_determinism(width: int, acc: int, seed: int) -> None:
    mask = draw_fixed_mask(width, acc, seed=seed)
    reference, _ = RandomMaskFunc([{4: 0.08, 8: 0.04, 16: 0.02}[acc]], [acc])((1, width, 1), None, seed)
    assert mask.shape == (width,) and mask.dtype == np.float32
    assert np.array_equal(mask, reference.reshape(-1).numpy())
    centre = round(width * {4: 0.08, 8: 0.04, 16: 0.02}[acc])
    lo = (width - centre + 1) // 2
    assert mask[lo : lo + centre].all()


def test_paper_uses_one_mask_for_every_sample_and_saves_it(paper, demo_root: Path, tmp_path: Path) -> None:
    run, ds = paper
    reference, _ = RandomMaskFunc([0.08], [4])((1, CROP, 1), None, 0)  # over the crop's 32 columns, seed 0
    masks = [ds[name][i].mask.reshape(-1) for name in ("train", "val", "test") for i in range(len(ds[name]))]
    masks += [ds["train"][0].mask.reshape(-1) for _ in range(3)]  # training draws no new masks
    assert all(torch.equal(m, reference.reshape(-1)) for m in masks)
    saved = list(run.glob("mask_*.npy"))
    assert len(saved) == 1 and np.array_equal(np.load(saved[0]), reference.reshape(-1).numpy())
    with pytest.raises(DataError, match=saved[0].name):  # the same run with another mask: refused by name
        build_datasets(demo_root, run / "split.json", crop=CROP, num_slices=4, protocol="paper",
                       center_fractions=0.2)


def test_fastmri_masks_vary_in_training_are_fixed_per_file_for_test_and_cover_the_raw_width(demo_root: Path,
                                                                                            tmp_path: Path) -> None:
    ds = build_datasets(demo_root, tmp_path / "split.json", crop=CROP, num_slices=4, protocol="fastmri")
    torch.manual_seed(0)
    train_inputs = {tuple(ds["train"][0].input.flatten()[:64].tolist()) for _ in range(6)}
    assert len(train_inputs) > 1  # a new mask per training sample
    test = ds["test"]
    assert all(torch.equal(test[i].input, test[i].input) for i in range(len(test)))
    fixed = build_datasets(demo_root, tmp_path / "fixed" / "split.json", crop=CROP, num_slices=4,
                           protocol="fastmri", fixed_mask=True)
    saved = np.load(next((tmp_path / "fixed").glob("mask_*.npy")))
    assert saved.shape == (40,)  # fastmri's fixed mask covers the raw k-space width, not the 32-column crop
    s = fixed["train"][0]
    kspace, _ = read_kspace(demo_root, s.fname)
    zero_filled = np_crop(np_ifft2c(kspace[s.slice_num] * saved), CROP)
    np.testing.assert_allclose(complex_np(s.input) * float(s.scale), zero_filled, rtol=0,
                               atol=1e-5 * np.abs(zero_filled).max())


# ------------------------------------------------------------------------------------------ normalisation


def test_paper_normalises_each_slice_by_its_target_max_and_simulates_kspace_from_it(paper, demo_root: Path) -> None:
    _, ds = paper
    for i in (0, len(ds["test"]) - 1):
        s = ds["test"][i]
        kspace, _ = read_kspace(demo_root, s.fname)
        target = np_crop(np_ifft2c(kspace[s.slice_num]), CROP)
        normalised = target / np.abs(target).max()
        mask = s.mask.reshape(-1).double().numpy()
        zero_filled = np_ifft2c(np_fft2c(normalised) * mask)
        np.testing.assert_allclose(complex_np(s.target), normalised, rtol=0, atol=1e-5)
        np.testing.assert_allclose(complex_np(s.input), zero_filled, rtol=0, atol=1e-5)
        assert float(s.scale) == pytest.approx(np.abs(target).max(), rel=1e-5)
        assert float(s.max_value) == pytest.approx(np.abs(target).max(), rel=1e-5)  # that slice's target max


def test_fastmri_normalises_by_the_zero_filled_max(demo_root: Path, tmp_path: Path) -> None:
    ds = build_datasets(demo_root, tmp_path / "split.json", splits=("val",), crop=CROP, protocol="fastmri")
    s = ds["val"][0]
    assert float(magnitude(s.input).max()) == pytest.approx(1.0)
    assert float(magnitude(s.target).max()) != pytest.approx(1.0, rel=1e-3)


def test_paper_patches_are_windows_of_the_whole_slice(paper) -> None:
    _, ds = paper
    train = ds["train"]
    patched = train.with_transform(train.transform.with_patch(16))
    whole, part = train[2], patched[2]
    assert part.input.shape == part.target.shape == (2, 16, 16) and whole.input.shape == (2, CROP, CROP)
    windows = whole.input.unfold(1, 16, 1).unfold(2, 16, 1)  # (2, 17, 17, 16, 16): every 16x16 window
    hits = [(r, c) for r in range(17) for c in range(17) if torch.equal(windows[:, r, c], part.input)]
    assert len(hits) == 1
    r, c = hits[0]
    assert torch.equal(whole.target[:, r : r + 16, c : c + 16], part.target)
    assert len({tuple(patched[2].input.flatten()[:8].tolist()) for _ in range(6)}) > 1  # new position per draw
    assert ds["test"].transform.patch is None
    some = SliceSubset(train, [2, 0]).with_transform(train.transform.with_patch(16))  # a by-slice training subset
    assert len(some) == 2 and some[1].input.shape == (2, 16, 16) and some.files == sorted({r.fname.name for r in
                                                                                            some.raw_samples})


# ------------------------------------------------------------------------------------------------ metrics


def _scored_volumes(ds) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Zero-filled and target magnitudes in the file's units, per volume, from the samples themselves."""
    vols: dict[str, tuple[list, list]] = {}
    for i in range(len(ds)):
        s = ds[i]
        zf, tg = vols.setdefault(s.fname, ([], []))
        zf.append((magnitude(s.input) * s.scale).double().numpy())
        tg.append((magnitude(s.target) * s.scale).double().numpy())
    return vols


def _accumulate(ds, protocol: str) -> MetricsAccumulator:
    acc = MetricsAccumulator(lpips=None, protocol=protocol)
    for batch in torch.utils.data.DataLoader(ds, batch_size=5):
        acc.update(batch.input, batch.target, batch.fname, batch.slice_num, batch.max_value, scale=batch.scale)
    return acc


def test_paper_metrics_are_per_slice_with_the_slice_target_max(paper) -> None:
    _, ds = paper
    acc = _accumulate(ds["test"], "paper")
    ssim, psnr = [], []
    for zf, tg in _scored_volumes(ds["test"]).values():
        for z, t in zip(zf, tg):
            ssim.append(structural_similarity(t, z, data_range=t.max()))
            psnr.append(peak_signal_noise_ratio(t, z, data_range=t.max()))
    summ = acc.summary()
    assert summ["metrics_over"] == "slices" and summ["n_slices"] == len(ssim)
    assert summ["ssim_mean"] == pytest.approx(np.mean(ssim), rel=1e-4)
    assert summ["psnr_mean"] == pytest.approx(np.mean(psnr), rel=1e-4)
    assert summ["psnr_std"] == pytest.approx(np.std(psnr), rel=1e-3)


def _bright_spot_outside(root: Path, inner: int) -> None:
    """Add a bright spot to slice 2 of every file inside its 32x32 crop but outside the central ``inner`` crop,
    keeping k-space, ``reconstruction_esc`` and the ``max`` attribute consistent (as fastMRI's files are)."""
    for path in root.glob("singlecoil_*/*.h5"):
        with h5py.File(path, "r+") as hf:
            kspace = hf["kspace"][()]
            image = np_ifft2c(kspace[2])
            h, w = image.shape
            image[h // 2 + inner // 2 + 2, w // 2] += 3 * np.abs(image).max()
            kspace[2] = np_fft2c(image).astype(np.complex64)
            hf["kspace"][...] = kspace
            recon = np.abs(np_crop(np_ifft2c(kspace), CROP)).astype(np.float32)
            hf["reconstruction_esc"][...] = recon
            hf.attrs["max"] = float(recon.max())


def test_fastmri_metrics_use_the_evaluated_crop_not_the_files_max(demo_root: Path, tmp_path: Path) -> None:
    """Files built with a 32x32 crop, scored at 24x24: the data range is the 24x24 target volume's max."""
    root = Path(shutil.copytree(demo_root, tmp_path / "demo"))
    _bright_spot_outside(root, 24)
    demo_root = root
    ds = build_datasets(demo_root, tmp_path / "split.json", splits=("test",), crop=24, num_slices=4,
                        protocol="fastmri")["test"]
    acc = _accumulate(ds, "fastmri")
    rows = {r["fname"]: r for r in acc.volume_rows()}
    ssim, psnr, differs = [], [], []
    for fname, (zf, tg) in _scored_volumes(ds).items():
        kspace, attrs = read_kspace(demo_root, fname)
        scored = np.abs(np_crop(np_ifft2c(kspace[1:5]), 24))  # the 4 central slices at the evaluated crop
        assert rows[fname]["max_value"] == pytest.approx(scored.max(), rel=1e-5)
        differs.append(attrs["max"] / scored.max() - 1)  # the file's attribute belongs to its 32x32 crop
        gt, pred = np.stack(tg), np.stack(zf)
        ssim.append(np.mean([structural_similarity(g, p, data_range=gt.max()) for g, p in zip(gt, pred)]))
        psnr.append(10 * np.log10(gt.max() ** 2 / np.mean((gt - pred) ** 2)))
        assert rows[fname]["psnr"] == pytest.approx(psnr[-1], rel=1e-4)
    assert min(differs) > 0.5  # the stale attribute would have been a much larger data range
    summ = acc.summary()
    assert summ["metrics_over"] == "volumes" and summ["n_volumes"] == len(psnr)
    assert summ["ssim_mean"] == pytest.approx(np.mean(ssim), rel=1e-4)
    assert summ["psnr_mean"] == pytest.approx(np.mean(psnr), rel=1e-4)


def test_get_protocol_names_the_choices() -> None:
    assert sorted(PROTOCOLS) == ["fastmri", "paper"] and get_protocol(PROTOCOLS["paper"]) is PROTOCOLS["paper"]
    with pytest.raises(ValueError, match="unknown protocol 'knee'.*fastmri.*paper"):
        get_protocol("knee")


def test_files_without_the_pd_acquisition_attribute_are_not_selected(demo_root: Path, tmp_path: Path) -> None:
    from kronify.mri.data.volumes import scan_volumes

    root = Path(shutil.copytree(demo_root, tmp_path / "demo"))
    files = sorted(root.glob("singlecoil_*/*.h5"))
    with h5py.File(files[0], "r+") as hf:
        del hf.attrs["acquisition"]
    selected = {v.name for v in scan_volumes(root).volumes}
    assert files[0].name not in selected and selected
    for path in files[1:]:
        with h5py.File(path, "r+") as hf:
            del hf.attrs["acquisition"]
    for protocol in PROTOCOLS:
        with pytest.raises(DataError, match="empty selection.*CORPD_FBK"):
            build_datasets(root, tmp_path / f"{protocol}.json", crop=CROP, protocol=protocol)


def test_paper_preset_follows_the_official_training_options() -> None:
    """options/{HyperUnet,SwinHyperIR}/train_*.json: batch 8, Adam 2e-4, EMA 0.999, MultiStepLR x0.5 at
    50k/70k/90k/100k/110k, SwinMR on 192x192 patches (H_size), U-Net on 320 (whole slices), 8x masks."""
    from kronify.mri.experiments.presets import get_preset

    paper = get_preset("paper")
    assert (paper.batch_size, paper.lr, paper.ema_decay, paper.crop) == (8, 2e-4, 0.999, 320)
    assert paper.milestones(paper.max_steps) == [50_000, 70_000, 90_000, 100_000, 110_000]
    assert paper.model("swinmr").train_patch == 192 and paper.model("unet_ddpm").train_patch is None
    assert paper.model("unet_ddpm").zoo_name == "unet_ddpm" and paper.accelerations == (8, 4)
    assert paper.protocol == "paper" and get_preset("demo").protocol == get_preset("tiny").protocol == "fastmri"


@settings(max_examples=40, deadline=None)
@given(width=st.integers(8, 400), crop=st.integers(4, 400), seed=st.integers(0, 2**16))
def test_crop_space_mask_keeps_the_sampled_frequencies(width: int, crop: int, seed: int) -> None:
    """Each crop column of the fastmri protocol's k-space mask is the raw column nearest in frequency."""
    from kronify.mri.data.transforms import crop_space_mask

    crop = min(crop, width)
    raw = torch.from_numpy(draw_fixed_mask(width, 4, seed=seed))
    mapped = crop_space_mask(raw, crop)
    assert mapped.shape == (crop,)
    raw_freq = np.fft.fftshift(np.fft.fftfreq(width))  # fastmri's centred column order
    crop_freq = np.fft.fftshift(np.fft.fftfreq(crop))
    for j, f in enumerate(crop_freq):
        nearest = np.flatnonzero(np.isclose(np.abs(raw_freq - f), np.abs(raw_freq - f).min(), atol=1e-12))
        assert float(mapped[j]) in {float(raw[i]) for i in nearest}
    if crop == width:
        assert torch.equal(mapped, raw)
