"""Metrics: fastMRI SSIM/PSNR/NMSE equality, volume aggregation, DDP merging, phase error, LPIPS plumbing."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from fastmri import evaluate as fm_eval
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri import backbones as W
from kronify.mri.lpips import LPIPSMetric, to_lpips_input
from kronify.mri.complex import magnitude
from kronify.mri.metrics import (
    MetricsAccumulator,
    phase_error,
    slice_metrics,
    volume_metrics,
    write_csv,
)

H = 32


def _f(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


def _random_lpips_net() -> torch.nn.Module:
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision's deprecated `pretrained=False`, called by lpips
        warnings.simplefilter("ignore", UserWarning)
        return lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)


def _phantom(rng: np.random.Generator, n: int = H) -> np.ndarray:
    """Smooth complex image (2, n, n) with structure (SSIM needs some)."""
    yy, xx = np.mgrid[-1:1:complex(0, n), -1:1:complex(0, n)]
    mag = np.exp(-((xx - rng.uniform(-0.3, 0.3)) ** 2 + yy**2) / rng.uniform(0.1, 0.4))
    mag += 0.5 * (np.abs(xx) < rng.uniform(0.2, 0.6)) * (np.abs(yy) < 0.5)
    phase = rng.uniform(-1, 1) + rng.uniform(-2, 2) * xx + rng.uniform(-2, 2) * yy
    c = mag * np.exp(1j * phase)
    return np.stack([c.real, c.imag]).astype(np.float32)


def _volume(rng, slices, scale=1.0, noise=0.05):
    tgt = np.stack([_phantom(rng) for _ in range(slices)]) * scale
    out = tgt + noise * scale * rng.standard_normal(tgt.shape).astype(np.float32)
    return torch.from_numpy(out.astype(np.float32)), torch.from_numpy(tgt.astype(np.float32))


# --------------------------------------------------------------------- SSIM / PSNR / NMSE
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), noise=st.floats(0.001, 0.5), maxscale=st.floats(1.0, 3.0))
def test_slice_metrics_equal_fastmri(seed, noise, maxscale):
    rng = np.random.default_rng(seed)
    gt = np.abs(rng.standard_normal((H, H))).astype(np.float32) + 1.0
    pred = (gt + noise * rng.standard_normal((H, H))).astype(np.float32)
    maxval = float(gt.max() * maxscale)  # the volume max can exceed this slice's max
    got = slice_metrics(gt, pred, maxval)
    assert got["ssim"] == pytest.approx(_f(fm_eval.ssim(gt[None], pred[None], maxval)), rel=1e-12)
    assert got["psnr"] == pytest.approx(_f(fm_eval.psnr(gt[None], pred[None], maxval)), rel=1e-12)
    assert got["nmse"] == pytest.approx(_f(fm_eval.nmse(gt[None], pred[None])), rel=1e-12)
    # and the data range matters (it is not silently the slice max)
    assert slice_metrics(gt, pred, 2 * maxval)["psnr"] == pytest.approx(got["psnr"] + 20 * math.log10(2), rel=1e-6)


def test_accumulator_matches_fastmri_per_slice_and_per_volume():
    rng = np.random.default_rng(1)
    vols = {"a.h5": _volume(rng, 5, scale=3.0), "b.h5": _volume(rng, 3, scale=0.5, noise=0.1)}
    items = [(f, s) for f, (out, _) in vols.items() for s in range(out.shape[0])]
    order = rng.permutation(len(items))
    acc = MetricsAccumulator(lpips=None)
    maxes = {f: float(magnitude(t).max()) for f, (_, t) in vols.items()}
    for chunk in np.array_split(order, 3):  # batches mixing volumes, out of order
        sel = [items[i] for i in chunk]
        acc.update(
            torch.stack([vols[f][0][s] for f, s in sel]),
            torch.stack([vols[f][1][s] for f, s in sel]),
            [f for f, _ in sel],
            torch.tensor([s for _, s in sel]),
            torch.tensor([maxes[f] for f, _ in sel]),
        )
    rows = acc.slice_rows()
    assert [(r["fname"], r["slice_num"]) for r in rows] == sorted(items)
    for r in rows:
        out, tgt = vols[r["fname"]]
        gt = magnitude(tgt[r["slice_num"]]).numpy()
        pred = magnitude(out[r["slice_num"]]).numpy()
        mv = maxes[r["fname"]]
        assert r["ssim"] == pytest.approx(_f(fm_eval.ssim(gt[None], pred[None], mv)), rel=1e-12)
        assert r["psnr"] == pytest.approx(_f(fm_eval.psnr(gt[None], pred[None], mv)), rel=1e-12)
        assert r["nmse"] == pytest.approx(_f(fm_eval.nmse(gt[None], pred[None])), rel=1e-12)
        assert r["lpips"] is None
    vrows = {r["fname"]: r for r in acc.volume_rows()}
    assert set(vrows) == set(vols)
    for f, (out, tgt) in vols.items():
        gt, pred = magnitude(tgt).numpy(), magnitude(out).numpy()
        ref = volume_metrics(gt, pred, maxes[f])
        assert ref["ssim"] == pytest.approx(_f(fm_eval.ssim(gt, pred, maxes[f])), rel=1e-12)
        for m in ("ssim", "psnr", "nmse"):
            assert vrows[f][m] == pytest.approx(ref[m], rel=1e-5), m
        assert vrows[f]["n_slices"] == out.shape[0]
    # a volume's PSNR pools errors over the volume: not the mean of slice PSNRs
    slice_psnr = [r["psnr"] for r in rows if r["fname"] == "b.h5"]
    assert vrows["b.h5"]["psnr"] != pytest.approx(np.mean(slice_psnr), rel=1e-6)
    # the fastmri protocol's summary: mean (std) over volumes of fastmri.evaluate's volume metrics, whose data
    # range defaults to the target volume's max
    summ = acc.summary()
    assert summ["n_slices"] == 8 and summ["n_volumes"] == 2
    assert (summ["protocol"], summ["metrics_over"]) == ("fastmri", "volumes")
    refs = [{m: _f(getattr(fm_eval, m)(magnitude(t).numpy(), magnitude(o).numpy())) for m in ("ssim", "psnr", "nmse")}
            for o, t in vols.values()]
    for m in ("ssim", "psnr", "nmse"):
        vals = [r[m] for r in refs]
        assert summ[f"{m}_mean"] == pytest.approx(np.mean(vals), rel=1e-5)
        assert summ[f"{m}_std"] == pytest.approx(np.std(vals), rel=1e-4, abs=1e-9)
    phase = [np.mean([r["phase_error"] for r in rows if r["fname"] == f]) for f in vols]
    assert summ["phase_error_mean"] == pytest.approx(np.mean(phase))
    assert summ["lpips_mean"] is None and summ["lpips_std"] is None
    assert "lpips=None" in acc.lpips_message


def test_scale_argument_returns_to_original_units():
    rng = np.random.default_rng(2)
    out, tgt = _volume(rng, 2, scale=7.0)
    scale = torch.tensor([3.0, 0.25])
    mv = float(magnitude(tgt).max())
    a, b = MetricsAccumulator(lpips=None), MetricsAccumulator(lpips=None)
    a.update(out, tgt, ["v", "v"], [0, 1], mv)
    b.update(out / scale.view(-1, 1, 1, 1), tgt / scale.view(-1, 1, 1, 1), ["v", "v"], [0, 1], mv, scale=scale)
    for ra, rb in zip(a.slice_rows(), b.slice_rows()):
        for m in ("ssim", "psnr", "nmse", "phase_error"):
            assert rb[m] == pytest.approx(ra[m], rel=1e-4, abs=1e-6)


def test_merge_deduplicates_distributed_sampler_padding():
    rng = np.random.default_rng(3)
    out, tgt = _volume(rng, 5)
    mv = float(magnitude(tgt).max())
    # 5 slices over 2 ranks: DistributedSampler pads rank 1 with slice 0 again
    r0, r1 = MetricsAccumulator(lpips=None), MetricsAccumulator(lpips=None)
    r0.update(out[[0, 2, 4]], tgt[[0, 2, 4]], ["v"] * 3, [0, 2, 4], mv)
    r1.update(out[[1, 3, 0]], tgt[[1, 3, 0]], ["v"] * 3, [1, 3, 0], mv)
    gathered = [pickle.loads(pickle.dumps(r.state())) for r in (r0, r1)]  # as all_gather_object would
    merged = MetricsAccumulator(lpips=None)
    for s in gathered:
        merged.merge(s)
    merged.merge(r0)  # merging again changes nothing
    single = MetricsAccumulator(lpips=None)
    single.update(out, tgt, ["v"] * 5, list(range(5)), mv)
    assert len(merged) == 5
    assert merged.slice_rows() == single.slice_rows()
    assert merged.summary() == single.summary()
    assert merged.volume_rows() == single.volume_rows()
    merged.reset()
    assert len(merged) == 0


def test_write_csv_roundtrip(tmp_path):
    import csv

    rng = np.random.default_rng(4)
    out, tgt = _volume(rng, 2)
    acc = MetricsAccumulator(lpips=None)
    acc.update(out, tgt, ["v", "v"], [3, 4], float(magnitude(tgt).max()))
    write_csv(acc.slice_rows(), tmp_path / "s.csv")
    with open(tmp_path / "s.csv") as f:
        back = list(csv.DictReader(f))
    assert [int(r["slice_num"]) for r in back] == [3, 4]
    assert float(back[0]["ssim"]) == pytest.approx(acc.slice_rows()[0]["ssim"])
    with pytest.raises(ValueError, match="no rows"):
        write_csv([], tmp_path / "empty.csv")


def test_accumulator_bad_input_names_it():
    acc = MetricsAccumulator(lpips=None)
    x = torch.zeros(2, 2, H, H)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        acc.update(x[:, :1], x[:, :1], ["a", "b"], [0, 1], 1.0)
    with pytest.raises(ValueError, match="fname has 1 entries for a batch of 2"):
        acc.update(x, x, ["a"], [0, 1], 1.0)
    with pytest.raises(TypeError, match="lpips must be"):
        MetricsAccumulator(lpips="alex")
    assert len(acc) == 0


# --------------------------------------------------------------------- phase error
def _rotate(x: torch.Tensor, theta) -> torch.Tensor:
    c = torch.complex(x[0].double(), x[1].double()) * torch.exp(1j * torch.as_tensor(theta, dtype=torch.float64))
    return torch.stack([c.real, c.imag]).float()


@settings(max_examples=25, deadline=None)
@given(theta=st.floats(-3.1, 3.1), seed=st.integers(0, 1000))
def test_phase_error_of_global_phase_shift_is_its_size(theta, seed):
    tgt = torch.from_numpy(_phantom(np.random.default_rng(seed)))
    assert phase_error(_rotate(tgt, theta), tgt) == pytest.approx(abs(theta), abs=1e-5)
    # wrapping: a shift of theta + 2π is the same shift; theta ± π lands in [0, π]
    assert phase_error(_rotate(tgt, theta + 2 * math.pi), tgt) == pytest.approx(abs(theta), abs=1e-5)
    assert phase_error(_rotate(tgt, theta + math.pi), tgt) == pytest.approx(math.pi - abs(theta), abs=1e-5)


def test_phase_error_wraps_across_pi():
    tgt = torch.from_numpy(_phantom(np.random.default_rng(0)))
    # target phase near +π and output near −π differ by a small wrapped angle, not ~2π
    t = _rotate(torch.stack([torch.abs(tgt[0]) + 1, torch.zeros_like(tgt[0])]), math.pi - 0.05)
    o = _rotate(torch.stack([torch.abs(tgt[0]) + 1, torch.zeros_like(tgt[0])]), -math.pi + 0.05)
    assert phase_error(o, t) == pytest.approx(0.1, abs=1e-5)
    assert phase_error(_rotate(tgt, 1.5 * math.pi), tgt) == pytest.approx(0.5 * math.pi, abs=1e-5)


def test_phase_error_ignores_pixels_below_ten_percent_of_max():
    mag = torch.ones(H, H)
    mag[:, : H // 2] = 0.09  # below 10 % of the max (1.0)
    mag[0, 0] = 0.11  # just above: counts
    tgt = torch.stack([mag, torch.zeros_like(mag)])
    out = tgt.clone()
    out[:, :, : H // 2] = _rotate(tgt[:, :, : H // 2], 2.0)  # wrong phase only on the dim half ...
    assert phase_error(out, tgt) != 0.0  # ... and at [0, 0], which is above threshold
    n_kept = (mag > 0.1).sum().item()
    assert phase_error(out, tgt) == pytest.approx(2.0 / n_kept, abs=1e-5)
    out[:, 0, 0] = tgt[:, 0, 0]
    assert phase_error(out, tgt) == pytest.approx(0.0, abs=1e-7)
    assert phase_error(out, tgt, threshold=0.05) > 0.5  # lower threshold: the dim half counts
    assert math.isnan(phase_error(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4)))
    with pytest.raises(ValueError, match=r"\(2, H, W\)"):
        phase_error(torch.zeros(3, 4, 4), torch.zeros(3, 4, 4))


# --------------------------------------------------------------------- LPIPS
def test_weight_file_names_are_torchvisions():
    from torchvision.models import AlexNet_Weights, VGG19_Weights

    for tv_weights, spec in ((AlexNet_Weights.IMAGENET1K_V1, W.ALEXNET), (VGG19_Weights.IMAGENET1K_V1, W.VGG19)):
        assert tv_weights.url == spec.url and tv_weights.url.rsplit("/", 1)[-1] == spec.filename


def test_lpips_package_ships_its_linear_weights():
    import pathlib

    import lpips

    assert (pathlib.Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth").is_file()


def test_lpips_unavailable_reports_where_to_put_weights_without_downloading(offline_hub):
    metric = LPIPSMetric()
    assert not metric.available
    assert W.ALEXNET.filename in metric.message
    assert str(offline_hub) in metric.message and W.ALEXNET.env_var in metric.message
    x = torch.rand(2, H, H)
    assert metric(x, x, 1.0) is None
    acc = MetricsAccumulator(lpips=metric)
    out, tgt = _volume(np.random.default_rng(5), 2)
    acc.update(out, tgt, ["v", "v"], [0, 1], float(magnitude(tgt).max()))
    assert all(r["lpips"] is None for r in acc.slice_rows())
    assert acc.summary()["lpips_mean"] is None and acc.volume_rows()[0]["lpips"] is None
    assert acc.lpips_message == metric.message
    assert not offline_hub.exists()  # nothing was even created in the cache


def test_lpips_bad_paths_are_reported_not_raised(offline_hub, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "alex.pth"
    metric = LPIPSMetric(weights_path=missing)
    assert not metric.available and str(missing) in metric.message
    monkeypatch.setenv(W.ALEXNET.env_var, str(missing))
    assert str(missing) in LPIPSMetric().message
    monkeypatch.delenv(W.ALEXNET.env_var)
    offline_hub.mkdir(parents=True)
    (offline_hub / W.ALEXNET.filename).write_bytes(b"truncated")
    metric = LPIPSMetric()
    assert not metric.available
    assert "could not read" in metric.message and W.ALEXNET.filename in metric.message


def test_lpips_loads_alexnet_trunk_from_the_checkpoint_file(offline_hub):
    """The real-weights code path, fed a torchvision-format AlexNet checkpoint written here."""
    import torchvision

    torch.manual_seed(1)
    state = torchvision.models.alexnet(weights=None).state_dict()
    offline_hub.mkdir(parents=True)
    torch.save(state, offline_hub / W.ALEXNET.filename)
    metric = LPIPSMetric()
    assert metric.available and metric.message is None
    loaded = dict(metric.net.net.named_parameters())
    assert torch.equal(loaded["slice1.0.weight"], state["features.0.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    assert all(not p.requires_grad for p in metric.net.parameters())


@pytest.mark.parametrize("size", [32, 48])
def test_lpips_random_backbone_identity_positivity_symmetry(offline_hub, size):
    metric = LPIPSMetric(net=_random_lpips_net())
    g = torch.Generator().manual_seed(size)
    a = torch.rand(3, size, size, generator=g) * 2.0
    b = a + 0.3 * torch.rand(3, size, size, generator=g)
    assert torch.equal(metric(a, a, 2.0), torch.zeros(3))
    d_ab, d_ba = metric(a, b, 2.0), metric(b, a, 2.0)
    assert d_ab.shape == (3,) and bool((d_ab > 0).all())
    torch.testing.assert_close(d_ab, d_ba, rtol=1e-5, atol=1e-7)
    acc = MetricsAccumulator(lpips=metric)
    out, tgt = _volume(np.random.default_rng(6), 2)
    acc.update(out, tgt, ["v", "v"], [0, 1], float(magnitude(tgt).max()))
    assert all(r["lpips"] > 0 for r in acc.slice_rows())
    assert acc.summary()["lpips_mean"] > 0 and acc.lpips_message is None
    with pytest.raises(ValueError, match="at least 32x32"):
        metric(a[:, :16, :16], a[:, :16, :16], 1.0)


def test_lpips_input_scaling():
    mag = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])
    x = to_lpips_input(mag, 2.0)
    assert x.shape == (1, 3, 2, 2)
    torch.testing.assert_close(x[0, 0], torch.tensor([[-1.0, 0.0], [1.0, 1.0]]))
    assert torch.equal(x[0, 0], x[0, 2])


def test_lpips_with_real_alexnet_weights():
    if W.find_weights(W.ALEXNET) is None:
        pytest.skip(W.missing_weights_message(W.ALEXNET))
    metric = LPIPSMetric()
    assert metric.available, metric.message
    tgt = magnitude(torch.from_numpy(np.stack([_phantom(np.random.default_rng(i), 64) for i in range(2)])))
    g = torch.Generator().manual_seed(0)
    small = tgt + 0.02 * torch.randn(tgt.shape, generator=g)
    large = tgt + 0.3 * torch.randn(tgt.shape, generator=g)
    mv = float(tgt.max())
    assert torch.equal(metric(tgt, tgt, mv), torch.zeros(2))
    assert bool((metric(small, tgt, mv) < metric(large, tgt, mv)).all())


# ------------------------------------------------------------------------------------------------ protocols


def _feed(acc: MetricsAccumulator, vols: dict, max_value) -> None:
    for f, (out, tgt) in vols.items():
        acc.update(out, tgt, [f] * out.shape[0], list(range(out.shape[0])), max_value(f, tgt))


def test_paper_protocol_scores_each_slice_with_its_own_target_max():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(11)
    vols = {"a.h5": _volume(rng, 3, scale=2.0), "b.h5": _volume(rng, 2, scale=0.3, noise=0.1)}
    acc = MetricsAccumulator(lpips=None, protocol="paper")
    _feed(acc, vols, lambda f, t: None)  # the paper protocol needs no max_value: it comes from each target
    ssim, psnr = [], []
    for out, tgt in vols.values():
        for o, t in zip(magnitude(out).numpy().astype(np.float64), magnitude(tgt).numpy().astype(np.float64)):
            ssim.append(structural_similarity(t, o, data_range=t.max()))
            psnr.append(peak_signal_noise_ratio(t, o, data_range=t.max()))
    summ = acc.summary()
    assert (summ["protocol"], summ["metrics_over"], summ["n_slices"]) == ("paper", "slices", 5)
    assert summ["ssim_mean"] == pytest.approx(np.mean(ssim), rel=1e-5)
    assert summ["ssim_std"] == pytest.approx(np.std(ssim), rel=1e-3)
    assert summ["psnr_mean"] == pytest.approx(np.mean(psnr), rel=1e-5)
    assert summ["psnr_std"] == pytest.approx(np.std(psnr), rel=1e-3)
    # a stale (larger) max_value changes nothing under the paper protocol
    other = MetricsAccumulator(lpips=None, protocol="paper")
    _feed(other, vols, lambda f, t: 10 * float(magnitude(t).max()))
    assert other.summary()["psnr_mean"] == pytest.approx(summ["psnr_mean"], rel=1e-12)


def test_fastmri_protocol_rejects_a_data_range_that_is_not_the_scored_volume_max():
    rng = np.random.default_rng(12)
    vols = {"vol.h5": _volume(rng, 3)}
    stale = MetricsAccumulator(lpips=None, protocol="fastmri")
    _feed(stale, vols, lambda f, t: 1.18 * float(magnitude(t).max()))  # e.g. the file's max of a larger crop
    with pytest.raises(ValueError, match=r"volume vol\.h5.*not the max of its scored target slices"):
        stale.summary()
    per_slice = MetricsAccumulator(lpips=None, protocol="fastmri")
    for s in range(3):  # a per-slice data range under the volume protocol is caught as well
        out, tgt = vols["vol.h5"][0][s : s + 1], vols["vol.h5"][1][s : s + 1]
        per_slice.update(out, tgt, ["vol.h5"], [s], float(magnitude(tgt).max()))
    assert len({float(magnitude(t).max()) for t in vols["vol.h5"][1]}) == 3  # the slices' maxima differ
    with pytest.raises(ValueError, match="vol.h5"):
        per_slice.volume_rows()


def test_rows_of_two_protocols_never_mix_and_a_bare_accumulator_adopts_the_rows_protocol():
    rng = np.random.default_rng(13)
    vols = {"a.h5": _volume(rng, 2)}
    paper = MetricsAccumulator(lpips=None, protocol="paper")
    _feed(paper, vols, lambda f, t: None)
    merged = MetricsAccumulator(lpips=None).merge(pickle.loads(pickle.dumps(paper.state())))
    assert merged.protocol.name == "paper" and merged.summary() == paper.summary()
    with pytest.raises(ValueError, match="'paper' protocol into 'fastmri'"):
        MetricsAccumulator(lpips=None, protocol="fastmri").merge(paper)
    with pytest.raises(ValueError, match="unknown protocol 'knee'"):
        MetricsAccumulator(lpips=None, protocol="knee")
