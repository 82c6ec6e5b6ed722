"""The demo's training set-up: slices augmented before masking (training only, fixed by the sample seed,
input/target/k-space consistent), the cosine schedule against its formula, the zero-filled start's gain,
MoDL's small denoiser output, training patches with full-image evaluation, test slabs disjoint from training
slabs, and a deterministic run for a given seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri.data.augment import AugmentConfig, SliceAugment
from kronify.mri.data.datasets import build_datasets
from kronify.mri.training.schedules import make_schedule
from kronify.mri.training.data_module import ReconDataModule
from kronify.mri.training.module import ReconModule
from kronify.mri.training.trainer import make_trainer
from kronify.mri.training.wrappers import ZeroFilledStart
from kronify.mri.data.transforms import MRITransform
from np_reference import complex_np, np_crop, np_fft2c, np_ifft2c

CROP = 32  # conftest demo data: k-space 64x40, files built with a 32x32 crop, 6 slices per volume




def one_slice(root: Path) -> tuple[np.ndarray, str]:
    path = sorted(root.glob("singlecoil_train/*.h5"))[0]
    with h5py.File(path, "r") as hf:
        return hf["kspace"][2], path.name


# ------------------------------------------------------------------------------------- augmentation before masking


@pytest.mark.parametrize("protocol", ["fastmri", "paper"])
def test_augmented_sample_is_the_augmented_image_masked(demo_root: Path, protocol: str) -> None:
    """The sample is what masking the augmented fully sampled image gives (numpy reference), not an augmented
    copy of the unaugmented sample: input, target and k-space stay consistent."""
    kspace, fname = one_slice(demo_root)
    cfg = AugmentConfig(noise=0.0)
    mask = None if protocol == "fastmri" else np.ones(CROP, dtype=np.float32)
    plain = MRITransform(CROP, 4, protocol=protocol, mask=mask)
    aug = plain.with_augment(cfg)
    aug.reseed(7)
    sample = aug(kspace, None, None, {}, fname, 2)
    plain.reseed(7)
    unaugmented = plain(kspace, None, None, {}, fname, 2)

    reference = SliceAugment(cfg, seed=7)  # the same draws: the transform reseeds its augmentation with the sample
    if protocol == "fastmri":
        full = reference(torch.from_numpy(np_ifft2c(kspace.astype(np.complex128))).to(torch.complex64)).numpy()
        target = np_crop(full, CROP)
        col = sample.mask.reshape(-1).numpy()  # crop-space mask; the raw-width mask is plain's draw (same seed)
        plain.reseed(7)
        raw_mask = plain._column_mask(kspace.shape[-1], fname).numpy()
        zero_filled = np_crop(np_ifft2c(np_fft2c(full) * raw_mask), CROP)
        scale = np.abs(zero_filled).max()
    else:
        target = reference(torch.from_numpy(np_crop(np_ifft2c(kspace.astype(np.complex128)), CROP))
                           .to(torch.complex64)).numpy()
        col = sample.mask.reshape(-1).numpy()
        zero_filled = np_ifft2c(np_fft2c(target) * col)
        scale = np.abs(target).max()
    np.testing.assert_allclose(complex_np(sample.target) * scale, target, atol=2e-5 * np.abs(target).max())
    np.testing.assert_allclose(complex_np(sample.input) * scale, zero_filled, atol=2e-5 * np.abs(target).max())
    np.testing.assert_allclose(complex_np(sample.kspace), np_fft2c(complex_np(sample.input)) * col, atol=1e-4)
    assert np.abs(complex_np(sample.target) - complex_np(unaugmented.target)).max() > 0.05  # it did augment


def test_augmentation_is_fixed_by_the_sample_seed_and_never_touches_evaluation(demo_root: Path) -> None:
    kspace, fname = one_slice(demo_root)
    train = MRITransform(CROP, 4).with_augment(AugmentConfig())
    samples = []
    for seed in (3, 4, 3):
        train.reseed(seed)
        samples.append(train(kspace, None, None, {}, fname, 2).target)
    assert torch.equal(samples[0], samples[2]) and not torch.allclose(samples[0], samples[1])

    plain_eval = MRITransform(CROP, 4, fixed_mask=True)
    augmented_eval = plain_eval.with_augment(AugmentConfig())
    a, b = plain_eval(kspace, None, None, {}, fname, 2), augmented_eval(kspace, None, None, {}, fname, 2)
    assert torch.equal(a.input, b.input) and torch.equal(a.target, b.target)
    assert MRITransform(CROP, 4).with_augment(AugmentConfig.off()).augment is None


def test_datamodule_augments_training_samples_only(demo_root: Path, tmp_path: Path) -> None:
    ds = build_datasets(demo_root, tmp_path / "split.json", crop=CROP, num_slices=2)
    plain = ReconDataModule(ds["train"], ds["val"], ds["test"], batch_size=2, seed=1)
    augmented = ReconDataModule(ds["train"], ds["val"], ds["test"], batch_size=2, seed=1, augment=AugmentConfig())
    again = ReconDataModule(ds["train"], ds["val"], ds["test"], batch_size=2, seed=1, augment=AugmentConfig())
    first = [next(iter(dm.make_train_loader(3))) for dm in (plain, augmented, again)]
    assert not torch.allclose(first[0].target, first[1].target)
    assert torch.equal(first[1].target, first[2].target) and torch.equal(first[1].input, first[2].input)
    assert ds["train"].transform.augment is None  # the caller's dataset is left as it was
    val = [next(iter(dm.val_dataloader())) for dm in (plain, augmented)]
    assert torch.equal(val[0].input, val[1].input) and torch.equal(val[0].target, val[1].target)
    with pytest.raises(ValueError, match="augment needs a kronify.mri training set"):
        ReconDataModule(torch.utils.data.TensorDataset(torch.zeros(2)), None, None, batch_size=1,
                        augment=AugmentConfig())


# ------------------------------------------------------------------------------------------------- schedules


@settings(max_examples=25, deadline=None)
@given(total=st.integers(2, 300), warm_frac=st.floats(0, 0.9), base=st.floats(1e-5, 1e-1))
def test_cosine_schedule_follows_its_formula(total: int, warm_frac: float, base: float) -> None:
    warmup = min(total - 1, int(warm_frac * total))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=base)
    sched = make_schedule(opt, "cosine", total=total, warmup=warmup)
    for step in range(total):
        if step < warmup:
            expected = base * (1 + step) / (warmup + 1)  # linear ramp from base / (warmup + 1) to base
        else:
            expected = base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6, abs=1e-12 * base)
        opt.step()
        sched.step()


def test_schedule_errors_name_the_setting() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=1.0)
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'linear'"):
        make_schedule(opt, "linear", total=10)
    with pytest.raises(ValueError, match="warmup 10"):
        make_schedule(opt, "cosine", total=10, warmup=10)
    with pytest.raises(ValueError, match="schedule must be one of"):
        ReconModule(torch.nn.Conv2d(2, 2, 1), schedule="step")


# ----------------------------------------------------------------------------------------- starting points


def test_zero_filled_start_gain_init() -> None:
    net = torch.nn.Conv2d(2, 2, 3, padding=1)
    x = torch.randn(2, 2, 8, 8)
    assert torch.equal(ZeroFilledStart(net)(x), x)
    one = ZeroFilledStart(net, correction=True, gain_init=1.0)
    torch.testing.assert_close(one(x), x + net(x))
    with pytest.raises(ValueError, match="gain_init"):
        ZeroFilledStart(net, gain_init=float("nan"))


def test_modl_small_denoiser_output_starts_near_zero_filling() -> None:
    import zoo

    torch.manual_seed(0)
    x = torch.randn(2, 2, 16, 16)
    mask = (torch.rand(1, 1, 1, 16) < 0.5).float()
    from kronify.mri.complex import fft2c, ifft2c

    x = ifft2c(mask * fft2c(x))  # a zero-filled image: data-consistent with its own k-space
    kspace = mask * fft2c(x)
    small = zoo.create("modl_demo", denoiser_out_init=0.01)
    default = zoo.create("modl_demo")
    def err(model: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((model(x, mask, kspace) - x).abs().max() / x.abs().max())

    assert err(small) < 0.05 < err(default)
    with pytest.raises(ValueError, match="denoiser_out_init"):
        zoo.create("modl_demo", denoiser_out_init=0.0)


# ------------------------------------------------------------------------------- slices, patches, determinism


def test_test_slabs_never_share_a_source_slice_with_training_slabs(make_demo, tmp_path: Path) -> None:
    """Every test volume's slab (orientation, source slices) is disjoint from every training slab."""
    root = make_demo(tmp_path / "demo", cases=12, slices=4)
    manifest = json.loads((root / "kronify_demo.json").read_text())
    slabs = {Path(c["file"]).name: (c["orientation"], range(*c["source_slices"])) for c in manifest["cases"]}
    for seed in (0, 1, 2):
        ds = build_datasets(root, tmp_path / f"split{seed}.json", crop=CROP, seed=seed, num_slices=None)
        used = {name: {(slabs[f][0], s) for f in ds[name].files for s in slabs[f][1]} for name in ds}
        assert used["test"] and used["train"]
        assert used["test"].isdisjoint(used["train"]) and used["val"].isdisjoint(used["train"])


def _fit(root: Path, out: Path, *, patch: int | None, augment: AugmentConfig | None, seed: int = 0):
    import zoo

    ds = build_datasets(root, out / "split.json", crop=CROP, num_slices=2)
    train = ds["train"] if patch is None else ds["train"].with_transform(ds["train"].transform.with_patch(patch))
    torch.manual_seed(seed)
    model = ZeroFilledStart(zoo.create("unet_demo", chans=4, num_pool_layers=2), correction=True)
    module = ReconModule(model, lr=1e-3, schedule="cosine", warmup=1, seed=seed, lpips=None, log_images=False)
    dm = ReconDataModule(train, ds["val"], ds["test"], batch_size=2, seed=seed, phase_augment=True, augment=augment)
    trainer = make_trainer(out, max_steps=3, val_every=3, ckpt_every=3, accelerator="cpu", progress_bar=False)
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    return module, dm


def test_patch_training_with_full_image_evaluation(demo_root: Path, tmp_path: Path) -> None:
    module, dm = _fit(demo_root, tmp_path / "run", patch=16, augment=AugmentConfig())
    batch = next(iter(dm.make_train_loader(1)))
    assert batch.input.shape[-2:] == (16, 16) and batch.target.shape[-2:] == (16, 16)
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch.input.shape[-2:] == (CROP, CROP)
    with torch.no_grad():  # the network trained on patches reconstructs whole slices
        out = module.ema.module(test_batch.input)
    assert out.shape == test_batch.target.shape
    summary = module.test_metrics.summary()
    assert math.isfinite(summary["psnr_mean"]) and summary["n_slices"] >= 1


def test_augmented_cosine_run_is_deterministic_for_a_seed(demo_root: Path, tmp_path: Path) -> None:
    runs = [_fit(demo_root, tmp_path / f"run{i}", patch=None, augment=AugmentConfig(), seed=s)[0]
            for i, s in enumerate((5, 5, 6))]
    weights = [torch.cat([p.detach().flatten() for p in m.model.parameters()]) for m in runs]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert runs[0].test_metrics.summary() == runs[1].test_metrics.summary()
