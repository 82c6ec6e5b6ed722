"""recipes/evaluate.py and kronify.mri.experiments.evaluate.evaluate_run on a trained tiny run: the run's own test scores are
reproduced, fastMRI's own evaluation scores the exported submission files the same, any folder can be scored,
and bad input stops with exit code 2, a message naming the thing, and no file touched."""

from __future__ import annotations

import csv
import json
import math
import runpy
import shutil
from argparse import Namespace
from pathlib import Path

import fastmri
import h5py
import numpy as np
import pytest
from scipy import stats
import torch
from fastmri import evaluate as fastmri_eval
from fastmri.data.subsample import RandomMaskFunc
from hypothesis import given, settings
from hypothesis import strategies as st

from kronify.mri.experiments.evaluate import FIXED_MASK
from kronify.mri.experiments.run_folder import METRICS_KEYS
from kronify.mri.experiments.export import SLICE_INDEX, ReconstructionWriter
from kronify.mri.errors import RunError
from kronify.mri.experiments.run_folder import RunRecord

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"
SCORES = ("ssim", "psnr", "nmse", "phase_error")


@pytest.fixture(scope="module")
def recipes_path():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(RECIPES))
        yield


def run_recipe(script: str, argv: list[str]) -> int:
    """``main(argv)`` of recipes/<script>.py (loaded by path: no clash with other packages' module names)."""
    try:
        return runpy.run_path(str(RECIPES / f"{script}.py"))["main"](argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.fixture(scope="module")
def trained_run(recipes_path, demo_root, tmp_path_factory) -> Path:
    """A Kronecker U-Net trained for 3 steps with the tiny preset (its own split, test metrics and checkpoint)."""
    import _common

    out = tmp_path_factory.mktemp("run") / "kron_unet"
    assert _common.run_recipe("unet", ["--data-path", str(demo_root), "--preset", "tiny", "--max-steps", "3",
                                       "--kron-n", "2", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def ema_run(trained_run, tmp_path_factory) -> Path:
    """A copy of the run whose EMA weights have ZeroFilledStart's gain at 1 (the live weights' stays near its start,
    0): scored with the EMA weights its output is the raw network's, far from the zero-filled input; with the live
    weights it would be that input."""
    run = tmp_path_factory.mktemp("ema") / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "metrics.json", run / "metrics.json")
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert abs(float(ckpt["state_dict"]["model.gain"])) < 0.1
    ckpt["state_dict"]["ema.module.gain"] = torch.tensor(1.0)
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def acquisition(path: Path) -> str:
    with h5py.File(path, "r") as hf:
        return hf.attrs["acquisition"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def evaluated(trained_run, tmp_path_factory) -> Path:
    """recipes/evaluate.py on the run's own test split."""
    before = snapshot(trained_run)
    out = tmp_path_factory.mktemp("eval") / "test"
    assert run_recipe("evaluate", ["--run", str(trained_run), "--out", str(out), "--batch-size", "5"]) == 0
    assert snapshot(trained_run) == before  # the run folder is read, never written
    return out


@pytest.fixture(scope="module")
def exported(ema_run, tmp_path_factory) -> Path:
    """recipes/evaluate.py --save-reconstructions on ``ema_run``'s test split."""
    out = tmp_path_factory.mktemp("export") / "test"
    assert run_recipe("evaluate", ["--run", str(ema_run), "--out", str(out), "--save-reconstructions"]) == 0
    return out


def test_reproduces_the_runs_own_test_scores(trained_run, evaluated):
    """Lightning's test loop during training and evaluate_run are two independent paths to the same scores."""
    run = json.loads((trained_run / "metrics.json").read_text())
    ours = json.loads((evaluated / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(ours)
    for key in ("model", "family", "kron_n", "algebra", "acceleration", "params", "gflops", "steps", "preset"):
        assert ours[key] == run[key], key
    assert ours["eval_set"] == "the run's test split" and ours["eval_files"] == run["test_files"]
    assert ours["eval_weights"] == "ema" and ours["eval_run"] == str(trained_run.resolve())
    for key in ("ssim_mean", "psnr_mean", "nmse_mean", "phase_error_mean", "ssim_std"):
        assert ours[key] == pytest.approx(run[key], rel=1e-6), key
    assert ours["zero_filled"].keys() == run["zero_filled"].keys()
    for key, value in run["zero_filled"].items():  # LPIPS is None without its weights
        assert ours["zero_filled"][key] == (value if value is None else pytest.approx(value, rel=1e-6)), key
    for name in ("per_volume.csv", "per_slice.csv"):
        mine, theirs = read_csv(evaluated / name), read_csv(trained_run / name)
        assert [(r["fname"], r.get("slice_num")) for r in mine] == [(r["fname"], r.get("slice_num")) for r in theirs]
        for a, b in zip(mine, theirs):
            for m in SCORES:
                assert float(a[m]) == pytest.approx(float(b[m]), rel=1e-6), (name, m)
    assert (evaluated / "reconstruction.png").stat().st_size > 1000
    assert not (evaluated / "history.json").exists()  # an evaluation has no training history
    assert not (evaluated / "reconstructions").exists()


def test_scores_the_ema_weights(evaluated, exported):
    """The EMA copy's output (gain 1) is scored, not the live weights' (gain ~0, the zero-filled input)."""
    ema = json.loads((exported / "metrics.json").read_text())
    assert ema["zero_filled"] == json.loads((evaluated / "metrics.json").read_text())["zero_filled"]
    assert abs(ema["psnr_mean"] - ema["zero_filled"]["psnr_mean"]) > 0.5


def test_the_paired_comparison_with_zero_filling_pairs_the_written_volumes(exported):
    """vs_zero_filled is model minus zero-filled over the volumes of per_volume.csv and zero_filled_per_volume.csv
    (the t-interval and scipy's Wilcoxon test recomputed here)."""
    ema = json.loads((exported / "metrics.json").read_text())
    model, zero = read_csv(exported / "per_volume.csv"), read_csv(exported / "zero_filled_per_volume.csv")
    assert [r["fname"] for r in model] == [r["fname"] for r in zero] and len(model) == ema["n_volumes"]
    for metric in ("psnr", "ssim"):
        diff = np.array([float(a[metric]) - float(b[metric]) for a, b in zip(model, zero)])
        got = ema["vs_zero_filled"][metric]
        assert got["n"] == len(diff) and got["mean_difference"] == pytest.approx(diff.mean(), rel=1e-9)
        half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
        assert got["t_ci"] == pytest.approx([diff.mean() - half, diff.mean() + half], rel=1e-9)
        assert got["wilcoxon_p"] == pytest.approx(stats.wilcoxon(diff).pvalue, rel=1e-9)


def test_exported_reconstructions_are_scored_the_same_by_fastmri(demo_root, trained_run, exported, tmp_path):
    """One h5 per volume with `reconstruction` (slices x H x W float32 magnitudes); fastmri.evaluate's functions,
    on the files' own `reconstruction_esc` targets, give our per-volume scores, and its folder evaluation
    (Metrics over target/prediction folders) gives their means, our fastmri-protocol summary."""
    test_files = json.loads((trained_run / "metrics.json").read_text())["test_files"]
    recon_dir = exported / "reconstructions"
    assert sorted(p.name for p in recon_dir.glob("*.h5")) == sorted(test_files)
    slices = json.loads((recon_dir / SLICE_INDEX).read_text())
    volumes = {r["fname"]: r for r in read_csv(exported / "per_volume.csv")}
    targets = tmp_path / "targets"
    targets.mkdir()
    for fname in test_files:
        source = next(demo_root.rglob(fname))
        (targets / fname).symlink_to(source)
        with h5py.File(recon_dir / fname, "r") as hf, h5py.File(source, "r") as src:
            assert list(hf) == ["reconstruction"]
            recon = hf["reconstruction"][()]
            gt = src["reconstruction_esc"][()]
        assert recon.dtype == np.float32 and recon.shape == gt.shape  # tiny preset: every slice, the file's crop
        assert slices[fname] == list(range(gt.shape[0]))
        row = volumes[fname]
        assert float(fastmri_eval.ssim(gt, recon, gt.max())[0]) == pytest.approx(float(row["ssim"]), rel=1e-5)
        assert float(fastmri_eval.psnr(gt, recon, gt.max())) == pytest.approx(float(row["psnr"]), rel=1e-5)
        assert float(fastmri_eval.nmse(gt, recon)) == pytest.approx(float(row["nmse"]), rel=1e-4)
    args = Namespace(target_path=targets, predictions_path=recon_dir, acquisition=None, acceleration=None)
    means = fastmri_eval.evaluate(args, "reconstruction_esc").means()
    summary = json.loads((exported / "metrics.json").read_text())
    assert summary["protocol"] == "fastmri" and summary["metrics_over"] == "volumes"
    for ours, theirs in (("ssim", "SSIM"), ("psnr", "PSNR"), ("nmse", "NMSE")):
        assert means[theirs] == pytest.approx(np.mean([float(r[ours]) for r in volumes.values()]), rel=1e-4)
        assert means[theirs] == pytest.approx(summary[f"{ours}_mean"], rel=1e-4)


def test_evaluates_every_volume_of_any_folder(demo_root, trained_run, evaluated):
    """--data-path scores all of the folder's volumes (of the run's acquisition); a volume's scores do not depend
    on which folder it is scored in (its mask is seeded by its file name). The default output is RUN/eval-<ROOT>."""
    assert run_recipe("evaluate", ["--run", str(trained_run), "--data-path", str(demo_root)]) == 0
    out = trained_run / f"eval-{demo_root.name}"
    metrics = json.loads((out / "metrics.json").read_text())
    expected = sorted(p.name for p in demo_root.rglob("*.h5") if acquisition(p) == "CORPD_FBK")
    assert metrics["eval_set"] == "all volumes" and metrics["eval_files"] == expected
    assert metrics["n_volumes"] == len(expected) and metrics["eval_data"] == str(demo_root.resolve())
    rows = {r["fname"]: r for r in read_csv(out / "per_volume.csv")}
    for ref in read_csv(evaluated / "per_volume.csv"):
        for m in SCORES:
            assert float(rows[ref["fname"]][m]) == pytest.approx(float(ref[m]), rel=1e-6), m
    assert not (out / "reconstructions").exists()
    shutil.rmtree(out)  # leave the shared run as the other tests expect it


def _run_without_checkpoint(trained_run: Path, tmp_path: Path) -> list[str]:
    bare = tmp_path / "bare_run"
    bare.mkdir()
    shutil.copy(trained_run / "metrics.json", bare / "metrics.json")
    return ["--run", str(bare)]


def _corrupt_checkpoint(trained_run: Path, tmp_path: Path) -> list[str]:
    run = tmp_path / "corrupt_run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained_run / "metrics.json", run / "metrics.json")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    return ["--run", str(run)]


def _empty_folder(trained_run: Path, tmp_path: Path) -> list[str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no h5 here")
    return ["--run", str(trained_run), "--data-path", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("make_argv, message", [
    (lambda run, tmp: ["--run", str(tmp / "no_such_run")], "no_such_run' does not exist"),
    (_run_without_checkpoint, "bare_run has no checkpoint checkpoints/last.ckpt"),
    (_corrupt_checkpoint, "cannot read checkpoint"),
    (lambda run, tmp: ["--run", str(run.parent)], "has no metrics.json"),
    (_empty_folder, "no .h5 files under"),
    (lambda run, tmp: ["--run", str(run), "--data-path", str(tmp / "nowhere"), "--out", str(tmp / "o")],
     "nowhere' does not exist"),
    (lambda run, tmp: ["--run", str(run), "--out", str(run)], "holds a training run"),
    (lambda run, tmp: ["--run", str(run), "--batch-size", "0"], "--batch-size must be >= 1"),
    (lambda run, tmp: ["--run", str(run), "--device", "abacus"], "--device 'abacus' is not a device"),
])
def test_bad_input_gives_exit_code_2_and_touches_nothing(trained_run, tmp_path, capsys, make_argv, message):
    argv = make_argv(trained_run, tmp_path)
    before_run, before_tmp = snapshot(trained_run.parent), snapshot(tmp_path)
    assert run_recipe("evaluate", argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert snapshot(trained_run.parent) == before_run and snapshot(tmp_path) == before_tmp


def test_trained_run_loads_the_ema_weights_not_the_live_ones(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "metrics.json").write_text(json.dumps(
        {"model": "m", "family": "unet", "kron_n": 0, "acceleration": 4, "preset": "tiny"}))
    live, ema = torch.zeros(3), torch.arange(3.0)
    torch.save({"state_dict": {"model.weight": live, "ema.module.weight": ema, "ema.num_updates": torch.tensor(5)}},
               tmp_path / "checkpoints" / "last.ckpt")
    run = RunRecord.open(tmp_path)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(torch.full((3,), 7.0))
    assert torch.equal(run.load_ema_weights(model).weight.detach(), ema)
    wrong = torch.nn.Linear(3, 1)
    with pytest.raises(RunError, match="do not fit the rebuilt model 'm'"):
        run.load_ema_weights(wrong)
    with pytest.raises(RunError, match="does not record the run's test volumes"):
        run.test_files


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.permutations(range(4)), st.integers(1, 5), st.integers(1, 5)),
                min_size=1, max_size=3, unique_by=lambda v: v[0]))
def test_writer_stores_each_volume_in_slice_order(tmp_path_factory, volumes):
    """Whatever order a volume's slices arrive in, its file holds them sorted by slice number, (slices, H, W)."""
    out = tmp_path_factory.mktemp("recons")
    rng = np.random.default_rng(0)
    expected = {}
    with ReconstructionWriter(out) as writer:
        for name, order, h, w in volumes:
            images = {s: rng.random((h, w)).astype(np.float32) for s in order}
            for s in order:
                writer.add(f"{name}.h5", s, images[s])
            expected[f"{name}.h5"] = np.stack([images[s] for s in sorted(images)])
    assert sorted(p.name for p in out.glob("*.h5")) == sorted(expected)
    for fname, stack in expected.items():
        with h5py.File(out / fname, "r") as hf:
            assert np.array_equal(hf["reconstruction"][()], stack)
    assert json.loads((out / SLICE_INDEX).read_text()) == {f: [0, 1, 2, 3] for f in expected}


def test_writer_rejects_a_volume_that_comes_back(tmp_path):
    writer = ReconstructionWriter(tmp_path)
    writer.add("a.h5", 0, np.zeros((2, 2)))
    writer.add("b.h5", 0, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="slices of a.h5 arrived after the volume was written"):
        writer.add("a.h5", 1, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="slice 0 of b.h5 was given twice"):
        writer.add("b.h5", 0, np.zeros((2, 2)))
    assert math.isclose(float(h5py.File(tmp_path / "a.h5", "r")["reconstruction"][()].sum()), 0.0)


def fastmri_fixed_mask(width: int, acceleration: int = 4, center_fraction: float = 0.08) -> np.ndarray:
    """The paper protocol's mask straight from fastMRI: RandomMaskFunc with seed 0 over ``width`` columns."""
    mask, _ = RandomMaskFunc([center_fraction], [acceleration])((1, width, 1), seed=0)
    return mask.reshape(-1).numpy()


def test_scores_a_run_under_another_protocol(demo_root, ema_run, tmp_path):
    """--protocol paper on a fastmri run: one seed-0 mask over the crop's k-space, each slice scored with its own
    target max as data range, means over slices."""
    out = tmp_path / "paper"
    assert run_recipe("evaluate", ["--run", str(ema_run), "--protocol", "paper", "--out", str(out),
                                   "--save-reconstructions"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "paper" and metrics["run_protocol"] == "fastmri"
    assert metrics["metrics_over"] == "slices" and metrics["fixed_mask"] is True
    mask = fastmri_fixed_mask(32)
    assert np.array_equal(np.load(out / FIXED_MASK), mask)
    examples = np.load(out / "examples.npz")
    for zero_filled, target in zip(examples["zero_filled"], examples["target"]):
        kspace = fastmri.fft2c(torch.from_numpy(target).movedim(0, -1))  # (H, W, 2)
        expected = fastmri.ifft2c(kspace * torch.from_numpy(mask).view(1, -1, 1)).movedim(-1, 0)
        assert torch.allclose(torch.from_numpy(zero_filled), expected, rtol=1e-4, atol=1e-6 * float(target.max()))
    rows = read_csv(out / "per_slice.csv")
    for fname in {r["fname"] for r in rows}:
        with h5py.File(out / "reconstructions" / fname, "r") as hf, h5py.File(next(demo_root.rglob(fname))) as src:
            recon, gt = hf["reconstruction"][()], src["reconstruction_esc"][()]
        for r in (r for r in rows if r["fname"] == fname):
            s = int(r["slice_num"])
            one_gt, one = gt[s : s + 1], recon[s : s + 1]
            assert float(r["psnr"]) == pytest.approx(float(fastmri_eval.psnr(one_gt, one, one_gt.max())), rel=1e-5)
            assert float(r["ssim"]) == pytest.approx(float(fastmri_eval.ssim(one_gt, one, one_gt.max())[0]), rel=1e-5)
    assert metrics["psnr_mean"] == pytest.approx(np.mean([float(r["psnr"]) for r in rows]), rel=1e-9)
    assert metrics["n_slices"] == len(rows)


def test_a_paper_run_is_scored_under_its_own_protocol_and_mask(recipes_path, demo_root, tmp_path):
    """Without --protocol a run is scored as it was tested: the paper run's saved mask, its own test scores."""
    import _common

    run = tmp_path / "paper_run"
    assert _common.run_recipe("unet", ["--data-path", str(demo_root), "--preset", "tiny", "--max-steps", "1",
                                       "--protocol", "paper", "--out", str(run), "--no-progress"]) == 0
    assert run_recipe("evaluate", ["--run", str(run)]) == 0
    ours = json.loads((run / "eval-test" / "metrics.json").read_text())
    theirs = json.loads((run / "metrics.json").read_text())
    assert ours["protocol"] == theirs["protocol"] == "paper" and ours["metrics_over"] == "slices"
    (saved,) = run.glob("mask_*.npy")
    assert np.array_equal(np.load(run / "eval-test" / FIXED_MASK), np.load(saved))
    for key in ("ssim_mean", "psnr_mean", "nmse_mean", "phase_error_mean"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key
        assert ours["zero_filled"][key] == pytest.approx(theirs["zero_filled"][key], rel=1e-6), key
