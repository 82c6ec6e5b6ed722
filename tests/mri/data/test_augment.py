"""kronify.mri.data.augment: determinism per seed, shapes and dtypes kept, and each lever doing what it says
(checked against analytic images and exact references, not against the module's own helpers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri.data.augment import AugmentConfig, AugmentParams, SliceAugment, apply_params, draw_params

NONE = dict(flip=0.0, rotation_deg=0.0, zoom=0.0, elastic=0.0, gamma=0.0, bias=0.0, phase=0.0, noise=0.0)


def only(**levers) -> AugmentConfig:
    """A config with every lever off except ``levers``."""
    return AugmentConfig(**{**NONE, **levers})


def pixel_offsets(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(column, row) offsets of pixel centres from the image centre."""
    rows = np.arange(height) + 0.5 - height / 2
    cols = np.arange(width) + 0.5 - width / 2
    y, x = np.meshgrid(rows, cols, indexing="ij")
    return x, y


def gaussian(x: np.ndarray, y: np.ndarray, sx: float = 6.0, sy: float = 3.0) -> np.ndarray:
    return np.exp(-0.5 * ((x / sx) ** 2 + (y / sy) ** 2))


def phantom(height: int = 48, width: int = 40, seed: int = 0) -> torch.Tensor:
    """A complex test slice: an anisotropic Gaussian with a linear phase and a little texture."""
    x, y = pixel_offsets(height, width)
    rng = np.random.default_rng(seed)
    mag = gaussian(x, y, 9.0, 6.0) * (1 + 0.1 * rng.standard_normal((height, width)))
    return torch.from_numpy(mag * np.exp(1j * (0.05 * x + 0.3))).to(torch.complex64)


def test_same_seed_same_augmentation_and_other_seeds_differ() -> None:
    image = phantom()
    a, b, c = SliceAugment(seed=5), SliceAugment(seed=5), SliceAugment(seed=6)
    first = [a(image) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b(image) for _ in range(3)]))
    assert not torch.equal(first[0], c(image))
    assert not torch.equal(first[0], first[1])  # drawn anew for every sample
    a.reseed(5)
    assert torch.equal(a(image), first[0])
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    assert torch.equal(a(image, generator=g1), c(image, generator=g2))  # a per-sample generator decides alone


@settings(max_examples=30, deadline=None)
@given(st.integers(8, 40), st.integers(8, 40), st.sampled_from([torch.complex64, torch.complex128, torch.float32,
                                                                  torch.float64]), st.integers(0, 2**31 - 1))
def test_shape_and_dtype_are_kept(height: int, width: int, dtype: torch.dtype, seed: int) -> None:
    z = phantom(height, width, seed % 100)
    image = z.to(dtype) if dtype.is_complex else torch.stack([z.real, z.imag]).to(dtype)
    out = SliceAugment(AugmentConfig(elastic=2.0, noise=0.05), seed=seed)(image)
    assert out.shape == image.shape and out.dtype == image.dtype and torch.isfinite(torch.view_as_real(
        out) if out.is_complex() else out).all()


def test_two_channel_and_complex_inputs_get_the_same_augmentation() -> None:
    z = phantom()
    complex_out = SliceAugment(seed=3)(z)
    channel_out = SliceAugment(seed=3)(torch.stack([z.real, z.imag]))
    assert torch.allclose(channel_out[0], complex_out.real) and torch.allclose(channel_out[1], complex_out.imag)


def test_off_switch_and_zero_strengths_are_the_identity() -> None:
    z = phantom()
    assert torch.equal(SliceAugment(AugmentConfig.off())(z), z)
    assert torch.equal(SliceAugment(only(), seed=1)(z), z)
    assert torch.equal(SliceAugment(AugmentConfig(enabled=False, rotation_deg=45))(z), z)


def test_flips_are_exact() -> None:
    z = phantom()
    assert torch.equal(apply_params(z, AugmentParams(flip_cols=True)), torch.from_numpy(z.numpy()[:, ::-1].copy()))
    assert torch.equal(apply_params(z, AugmentParams(flip_rows=True)), torch.from_numpy(z.numpy()[::-1, :].copy()))
    drawn = [draw_params(only(flip=0.5), (8, 8), torch.Generator().manual_seed(s)) for s in range(200)]
    rate = np.mean([p.flip_rows for p in drawn] + [p.flip_cols for p in drawn])
    assert 0.4 < rate < 0.6
    always = draw_params(only(flip=1.0), (8, 8), torch.Generator().manual_seed(0))
    assert always.flip_rows and always.flip_cols


def test_rotation_and_zoom_match_the_analytic_image() -> None:
    height, width = 48, 40
    x, y = pixel_offsets(height, width)
    image = torch.from_numpy(gaussian(x, y) * np.exp(0.5j)).to(torch.complex128)
    for angle, scale in [(30.0, 1.0), (-70.0, 1.0), (0.0, 1.5), (20.0, 0.8)]:
        out = apply_params(image, AugmentParams(angle_deg=angle, scale=scale)).numpy()
        a = math.radians(angle)  # output(u) = input(R(-a) u / scale): the Gaussian turned by +a, magnified
        xs, ys = (np.cos(a) * x + np.sin(a) * y) / scale, (-np.sin(a) * x + np.cos(a) * y) / scale
        expected = gaussian(xs, ys) * np.exp(0.5j)
        assert np.abs(out - expected).max() < 0.02, (angle, scale)
    # rotation keeps the energy of an object inside the field of view (up to interpolation smoothing)
    z = phantom()
    for seed in range(3):
        out = SliceAugment(only(rotation_deg=45), seed=seed)(z)
        assert (out.abs() ** 2).sum() == pytest.approx(float((z.abs() ** 2).sum()), rel=0.03)


def test_zoom_scales_the_object_width() -> None:
    height = width = 64
    x, y = pixel_offsets(height, width)
    image = torch.from_numpy(gaussian(x, y, 5.0, 5.0)).to(torch.complex128)
    out = apply_params(image, AugmentParams(scale=1.5)).abs().numpy()
    second_moment = (out * x**2).sum() / out.sum()
    assert math.sqrt(second_moment) == pytest.approx(5.0 * 1.5, rel=0.02)  # std of a Gaussian scales with zoom


def roughness(field: np.ndarray) -> float:
    """Mean squared second difference (worst axis) over the field's variance: about 6 for white noise, near 0
    for a field that varies smoothly over many pixels."""
    f = field - field.mean()
    second = max(((f[2:] - 2 * f[1:-1] + f[:-2]) ** 2).mean(), ((f[:, 2:] - 2 * f[:, 1:-1] + f[:, :-2]) ** 2).mean())
    return float(second / (f**2).mean())


def test_elastic_displacement_moves_samples_as_documented() -> None:
    z = phantom()
    shift = torch.zeros(2, *z.shape)
    shift[0] = 1.0  # sample one column to the right: output[:, j] = input[:, j + 1]
    out = apply_params(z, AugmentParams(displacement=shift))
    assert torch.allclose(out[:, :-1], z[:, 1:], atol=1e-6) and torch.all(out[:, -1] == 0)
    shift = torch.zeros(2, *z.shape)
    shift[1] = -2.0  # two rows up
    assert torch.allclose(apply_params(z, AugmentParams(displacement=shift))[2:], z[:-2], atol=1e-6)

    for seed in range(5):
        d = draw_params(only(elastic=1.0), tuple(z.shape), torch.Generator().manual_seed(seed)).displacement.numpy()
        assert d.shape == (2, *z.shape) and 0.3 < d.std() < 3.0
        assert max(roughness(d[0]), roughness(d[1])) < 0.01  # smooth
        dx_dcol, dx_drow = np.gradient(d[0], axis=1), np.gradient(d[0], axis=0)
        dy_dcol, dy_drow = np.gradient(d[1], axis=1), np.gradient(d[1], axis=0)
        jacobian = (1 + dx_dcol) * (1 + dy_drow) - dx_drow * dy_dcol
        assert jacobian.min() > 0  # the default strength never folds the image over itself


def test_bias_field_is_smooth_positive_and_leaves_the_phase() -> None:
    z = phantom(64, 64)
    for seed in range(4):
        out = SliceAugment(only(bias=0.3), seed=seed)(z)
        ratio = (out.abs() / z.abs()).numpy()
        assert ratio.min() > 0 and np.ptp(ratio) > 0.05
        assert roughness(np.log(ratio)) < 0.01
        assert torch.allclose(out.angle(), z.angle(), atol=1e-5)


def test_phase_map_is_smooth_and_leaves_the_magnitude() -> None:
    z = phantom(64, 64)
    out = SliceAugment(only(phase=1.0), seed=2)(z)
    assert torch.allclose(out.abs(), z.abs(), atol=1e-6)
    added = np.angle((out * z.conj()).numpy())
    assert added.std() > 0.1 and roughness(added) < 0.01


def test_gamma_changes_the_contrast_of_the_magnitude_only() -> None:
    z = phantom()
    for gamma in (0.7, 1.4):
        out = apply_params(z, AugmentParams(gamma=gamma))
        top = float(z.abs().max())
        expected = top * (z.abs().double() / top) ** gamma
        assert torch.allclose(out.abs().double(), expected, rtol=1e-4, atol=1e-7)
        assert torch.allclose(out.angle(), z.angle(), atol=1e-4)
    gammas = [draw_params(only(gamma=0.3), (8, 8), torch.Generator().manual_seed(s)).gamma for s in range(50)]
    assert math.exp(-0.3) <= min(gammas) and max(gammas) <= math.exp(0.3) and np.std(np.log(gammas)) > 0.1


def test_noise_is_white_gaussian_at_the_drawn_level() -> None:
    z = torch.zeros(128, 128, dtype=torch.complex64)
    z[64, 64] = 2.0  # maximum magnitude 2
    params = draw_params(only(noise=0.1), tuple(z.shape), torch.Generator().manual_seed(0))
    sigma = float(params.noise.real.std())
    assert 0 < sigma <= 0.1
    residual = (apply_params(z, params) - z).numpy()
    residual[64, 64] = 0
    assert residual.real.std() == pytest.approx(2 * sigma, rel=0.05)
    assert residual.imag.std() == pytest.approx(2 * sigma, rel=0.05)
    assert abs(np.corrcoef(residual.real[:, :-1].ravel(), residual.real[:, 1:].ravel())[0, 1]) < 0.05


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="rotation_deg"):
        AugmentConfig(rotation_deg=-1)
    with pytest.raises(ValueError, match="flip is a probability"):
        AugmentConfig(flip=2)
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom=1.0)
    with pytest.raises(ValueError, match=r"\(2, H, W\).*\(3, 8, 8\)"):
        SliceAugment()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"complex \(H, W\) image, got shape \(1, 8, 8\)"):
        SliceAugment()(torch.zeros(1, 8, 8, dtype=torch.complex64))


def test_cheap_on_cpu() -> None:
    import time

    image = phantom(128, 128)
    aug = SliceAugment(seed=0)
    aug(image)
    start = time.perf_counter()
    for _ in range(20):
        aug(image)
    assert (time.perf_counter() - start) / 20 < 0.05  # well under a training step of the demo models


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, augment: SliceAugment) -> None:
        self.augment, self.image = augment, phantom(16, 16)

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.augment(self.image)


def test_dataloader_workers_draw_different_but_reproducible_augmentations() -> None:
    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        loader = torch.utils.data.DataLoader(_Augmented(SliceAugment(seed=1)), batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        return list(loader)

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # same torch seed: same augmentations
    # the two workers interleave (samples 0, 2, 4.. and 1, 3, 5..): their sequences must differ
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[2], first[3])


def test_describe_names_the_levers_that_are_on():
    assert AugmentConfig.flips_only().describe() == "flip 0.5"
    assert AugmentConfig.off().describe() == AugmentConfig(enabled=True, flip=0, rotation_deg=0, zoom=0, elastic=0,
                                                          gamma=0, bias=0, phase=0, noise=0).describe() == "off"
    assert AugmentConfig(noise=0.02).describe().endswith("phase 1, noise 0.02")
