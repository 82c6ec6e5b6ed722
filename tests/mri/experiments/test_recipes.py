"""The recipes: each trains a few steps on demo data and writes complete results; table1 --tiny has every row;
data_efficiency writes its table; bad flags and data give clear errors."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from kronify.mri.experiments.run_folder import METRICS_KEYS

REPO = Path(__file__).resolve().parents[3]
RECIPES = REPO / "recipes"


@pytest.fixture(autouse=True)
def _recipes_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))


def run_script(name: str, argv: list[str]) -> int:
    """Run recipes/<name>.py as ``__main__`` with ``argv``; returns its exit code."""
    old = sys.argv
    sys.argv = [str(RECIPES / f"{name}.py"), *argv]
    try:
        runpy.run_path(str(RECIPES / f"{name}.py"), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = old
    return 0


def tiny(demo_root, out, *extra):
    return ["--data-path", str(demo_root), "--preset", "tiny", "--max-steps", "2", "--out", str(out),
            "--no-progress", *extra]


def check_run(out: Path, model: str, kron_n: int, acceleration: int = 4, protocol: str = "fastmri") -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(metrics)
    assert metrics["protocol"] == protocol
    assert metrics["metrics_over"] == {"paper": "slices", "fastmri": "volumes"}[protocol]
    assert metrics["fixed_mask"] == (protocol == "paper") and metrics["mask_type"] == "random"
    assert metrics["model"] == model and metrics["kron_n"] == kron_n and metrics["acceleration"] == acceleration
    assert metrics["steps"] == 2 and metrics["params"] > 0 and metrics["gflops"] > 0 and metrics["train_seconds"] > 0
    for key in ("ssim_mean", "ssim_std", "psnr_mean", "psnr_std", "nmse_mean", "phase_error_mean"):
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
    assert metrics["lpips_mean"] is None or 0 <= metrics["lpips_mean"] <= 1
    assert (metrics["lpips_mean"] is None) == (metrics["lpips_message"] is not None)
    assert metrics["n_volumes"] >= 1 and metrics["n_slices"] >= metrics["n_volumes"]
    with open(out / "per_volume.csv") as f:
        volumes = list(csv.DictReader(f))
    assert len(volumes) == metrics["n_volumes"] and {"fname", "ssim", "psnr", "nmse", "phase_error"} <= set(volumes[0])
    assert (out / "reconstruction.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "logs" / "csv" / "version_0" / "metrics.csv").is_file()
    return metrics


@pytest.mark.parametrize("recipe, family, zoo_name, kron", [
    ("unet_fastmri", "unet", "unet_demo", ["0", "2"]),
    ("swinmr_fastmri", "swinmr", "swinmr_demo", ["2"]),
    ("modl_fastmri", "modl", "modl_demo", ["0"]),
])
def test_recipe_trains_and_writes_complete_metrics(demo_root, tmp_path, recipe, family, zoo_name, kron):
    out = tmp_path / recipe
    assert run_script(recipe, tiny(demo_root, out, "--kron-n", *kron, "--acceleration", "8")) == 0
    assert (out / "split.json").is_file()  # one split for every variant of the run
    for n in map(int, kron):
        name = zoo_name if n == 0 else f"kron_{zoo_name}"
        metrics = check_run(out if len(kron) == 1 else out / name, name, n, acceleration=8)
        assert metrics["family"] == family
    if kron == ["0", "2"]:  # the Kronecker U-Net has about half the parameters of the dense one
        dense = json.loads((out / zoo_name / "metrics.json").read_text())
        kron_m = json.loads((out / f"kron_{zoo_name}" / "metrics.json").read_text())
        assert kron_m["params"] < 0.6 * dense["params"]


def test_recipe_builds_the_demo_into_the_cache_once(tmp_path, capsys):
    import _common

    argv = ["--preset", "tiny", "--max-steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--algebra", "complex", "--kron-n", "2"]
    assert _common.run_recipe("unet", argv + ["--out", str(tmp_path / "a")]) == 0
    assert "built the demo dataset" in capsys.readouterr().out
    assert _common.run_recipe("unet", argv + ["--out", str(tmp_path / "b")]) == 0
    assert "built the demo dataset" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["model"] == "kron_unet_demo_complex" and metrics["algebra"] == "complex"
    assert metrics["data"] == "demo"


@pytest.mark.parametrize("protocol", ["paper", "fastmri"])
def test_table1_tiny_writes_every_row(demo_root, tmp_path, protocol):
    import table1

    out = tmp_path / "t1"
    assert table1.main(["--tiny", "--protocol", protocol, "--data-path", str(demo_root), "--accelerations", "4",
                        "--out", str(out), "--no-progress"]) == 0
    md = (out / "table1.md").read_text()
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    labels = [label for label, *_ in table1.ROWS]
    assert [r["Model"] for r in rows] == labels and len(labels) == 14  # the paper's 12 and 2 compressed rows
    assert all(r["Protocol"] == protocol for r in rows)
    assert f"# Table 1 (tiny preset, {protocol} protocol)" in md and f"- Protocol `{protocol}`" in md
    for label in labels:
        assert f"| {label} " in md
    # the paper's U-Net rows are the DDPM-style U-Net, fastMRI's U-Net has rows of its own
    runs = {r.name for r in (out / "runs" / "4x").iterdir()}
    assert {"unet_ddpm_tiny", "kron_unet_ddpm_tiny", "unet_demo", "kron_unet_demo",
            "kron_unet_demo_compressed_budget0.5", "kron_modl_demo_compressed_budget0.5"} <= runs
    data = json.loads((out / "table1.json").read_text())
    assert data["protocol"] == protocol and [r["model"] for r in data["rows"]] == labels
    kron_unet = data["rows"][labels.index("Kronecker U-Net")]
    assert kron_unet["zoo_model"] == "kron_unet_ddpm_tiny" and kron_unet["protocol"] == protocol
    for r in data["rows"]:
        for metric in ("ssim", "psnr", "nmse", "phase_error"):
            assert isinstance(r[metric]["mean"], float) and isinstance(r[metric]["std"], float), (r["model"], metric)
        assert r["display"]["SSIM (std)"] == f"{r['ssim']['mean']:.3f} ({r['ssim']['std']:.3f})"
        metrics = out / "runs" / "4x" / (r["zoo_model"] or "") / "metrics.json"
        if r["zoo_model"]:
            assert json.loads(metrics.read_text())["protocol"] == protocol
    assert kron_unet["paper"]["ssim"] == {"mean": 0.762, "std": 0.075}
    assert bool(list(out.glob("mask_*.npy"))) == (protocol == "paper")  # the fixed mask is saved with the run
    zero = rows[0]
    assert zero["Params (M)"] == "-" and zero["Paper PSNR (std)"] == "22.75 (1.73)"
    # compressed rows distil for 10 % of their teacher's 2 steps (at least 1)
    assert all(r["Params (M)"] != "-" and r["Steps"] == ("1" if r["Model"] in table1.COMPRESSED else "2")
               for r in rows[1:])
    compressed = data["rows"][labels.index("Kron U-Net (compressed from the trained U-Net)")]
    assert compressed["dense_row"] == "U-Net (fastMRI)" and compressed["paired"] is not None
    assert compressed["params"] <= 0.55 * data["rows"][labels.index("U-Net (fastMRI)")]["params"]
    assert next(r for r in rows if r["Model"] == "Kronecker U-Net")["Paper SSIM (std)"] == "0.762 (0.075)"
    assert "Command: `python recipes/table1.py --tiny" in md and "Machine:" in md
    assert "training, compressing and testing the runs (1 at a time)" in md  # the wall time's breakdown
    assert sum(data["phase_seconds"].values()) <= data["wall_seconds"] + 1e-6
    for png in ("comparison_4x.png", "curves_4x.png"):
        assert (out / png).stat().st_size > 1000


@pytest.mark.parametrize("protocol", ["fastmri", "paper"])
def test_data_efficiency_tiny(demo_root, tmp_path, protocol):
    import data_efficiency

    out = tmp_path / "de"
    assert data_efficiency.main(tiny(demo_root, out, "--fractions", "0.25", "1.0", "--protocol", protocol)) == 0
    with open(out / "data_efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Fraction"], r["Model"]) for r in rows] == [
        ("25%", "unet_demo"), ("25%", "kron_unet_demo"), ("100%", "unet_demo"), ("100%", "kron_unet_demo")]
    full_slices = int(rows[2]["Train slices"])
    if protocol == "paper":  # subsets by slice: ceil(25% of the slices), drawn from any volume
        assert int(rows[0]["Train slices"]) == math.ceil(0.25 * full_slices)
    else:  # subsets by volume: whole volumes
        volumes = int(rows[2]["Train volumes"])
        assert int(rows[0]["Train volumes"]) == math.ceil(0.25 * volumes)
        assert int(rows[0]["Train slices"]) == full_slices // volumes * int(rows[0]["Train volumes"])
    assert f"{protocol} protocol" in (out / "data_efficiency.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000


def test_recipe_under_the_paper_protocol_saves_its_fixed_mask(demo_root, tmp_path):
    import _common

    out = tmp_path / "paper"
    assert _common.run_recipe("swinmr", tiny(demo_root, out, "--protocol", "paper", "--acceleration", "8")) == 0
    metrics = check_run(out, "swinmr_demo", 0, acceleration=8, protocol="paper")
    (mask_file,) = out.glob("mask_*.npy")
    from fastmri.data.subsample import RandomMaskFunc

    reference, _ = RandomMaskFunc([0.04], [8])((1, 32, 1), None, 0)  # the official code's mask, at the crop width
    np.testing.assert_array_equal(np.load(mask_file), reference.reshape(-1).numpy())
    assert metrics["center_fraction"] is None and metrics["train_patch"] is None  # tiny preset: whole slices


def test_mask_flags_reach_the_data(demo_root, tmp_path):
    import _common

    out = tmp_path / "eq"
    argv = tiny(demo_root, out, "--mask-type", "equispaced_fraction", "--center-fraction", "0.05",
                "--acceleration", "16", "--fixed-mask")
    assert _common.run_recipe("unet", argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["mask_type"], metrics["center_fraction"], metrics["acceleration"]) == ("equispaced_fraction", 0.05,
                                                                                          16)
    assert metrics["protocol"] == "fastmri" and metrics["fixed_mask"] is True
    (mask_file,) = out.glob("mask_equispaced_fraction_16x_w40.npy")  # fastmri: the raw k-space width (40)
    mask = np.load(mask_file)
    assert mask.shape == (40,) and mask[19:21].all() and 40 / mask.sum() == pytest.approx(16, rel=0.3)


@pytest.mark.parametrize("argv, message", [
    (["--acceleration", "6"], "invalid choice: 6"),
    (["--protocol", "knee"], "invalid choice: 'knee'"),
    (["--mask-type", "spiral"], "invalid choice: 'spiral'"),
    (["--center-fraction", "1.5"], "--center-fraction must lie in (0, 1)"),
    (["--center-fraction", "0.5", "--acceleration", "4"], "center fraction 0.5 for acceleration 4"),
    (["--algebra", "octonion"], "invalid choice: 'octonion'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--kron-n", "1"], "--kron-n must be 0 (dense) or >= 2"),
    (["--kron-n", "4", "--algebra", "complex"], "--algebra complex is the n = 2 algebra"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--jobs", "2", "--devices", "2"], "--jobs > 1 trains single-process runs side by side"),
    (["--data-path", "/nonexistent/fastmri"], "does not exist"),
])
def test_bad_flags_give_clear_errors(demo_root, tmp_path, capsys, argv, message):
    import _common

    base = ["--data-path", str(demo_root), "--preset", "tiny", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as exc:
        _common.run_recipe("unet", base + argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_preset_that_does_not_fit_the_data(demo_root, tmp_path, capsys):
    import _common

    with pytest.raises(SystemExit):
        _common.run_recipe("unet", ["--data-path", str(demo_root), "--preset", "paper", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "preset 'paper' crops 320x320 but the data does not fit" in err and "larger than the image" in err


def test_existing_run_needs_resume(demo_root, tmp_path, capsys):
    import _common

    argv = tiny(demo_root, tmp_path / "run")
    argv[argv.index("--max-steps") + 1] = "1"
    assert _common.run_recipe("unet", argv) == 0
    with pytest.raises(SystemExit):
        _common.run_recipe("unet", argv)
    assert "pass --resume" in capsys.readouterr().err
    argv[argv.index("--max-steps") + 1] = "2"  # --resume continues the finished run to a longer schedule
    assert _common.run_recipe("unet", argv + ["--resume"]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 2


def test_table1_rejects_the_single_run_acceleration_flag(capsys):
    import table1

    with pytest.raises(SystemExit) as exc:
        table1.main(["--acceleration", "8"])
    assert exc.value.code == 2
    assert "use --accelerations" in capsys.readouterr().err


def test_table1_trains_rows_side_by_side_with_the_same_results(demo_root, tmp_path):
    """--jobs 2 (two worker processes of one torch thread) gives each seed's run exactly the numbers --jobs 1
    gives it with one thread; the two seeds' runs differ."""
    import table1
    import torch

    per_seed = {}
    threads = torch.get_num_threads()
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        torch.set_num_threads(1 if jobs == "1" else threads)  # the workers of --jobs 2 get threads // 2 >= 1
        try:
            assert table1.main(["--tiny", "--max-steps", "4", "--lr", "0.05", "--models", "modl", "--seeds", "2",
                                "--jobs", jobs, "--data-path", str(demo_root), "--accelerations", "4",
                                "--out", str(out), "--no-progress"]) == 0
        finally:
            torch.set_num_threads(threads)
        rows = json.loads((out / "table1.json").read_text())["rows"]
        per_seed[jobs] = {r["model"]: r["seeds"]["per_seed"]["psnr"] for r in rows if r.get("seeds")}
    assert set(per_seed["1"]) == {"MoDL", "Kronecker MoDL", "Kron MoDL (compressed from the trained MoDL)"}
    for model, (seed0, seed1) in per_seed["1"].items():
        if threads <= 3:  # workers of one thread, as in the --jobs 1 run
            assert per_seed["2"][model] == pytest.approx([seed0, seed1], abs=1e-9), model
        assert abs(seed0 - seed1) > 1e-3, model  # the comparison can tell runs apart


def test_demo_table_rows_and_explicit_families():
    import table1
    from kronify.mri.experiments.presets import get_preset

    demo = [label for label, *_ in table1.select_rows(None, get_preset("demo"))]
    assert demo == ["Zero-filled", "LB U-Net", "Efficient U-Net", "U-Net (fastMRI)", "Kronecker U-Net (fastMRI)",
                    "Kron U-Net (compressed from the trained U-Net)", "SwinMR", "Kronecker SwinMR", "MoDL", "Kronecker MoDL",
                    "Kron MoDL (compressed from the trained MoDL)"]
    assert len(table1.select_rows(None, get_preset("tiny"))) == len(table1.ROWS)
    ddpm = [label for label, *_ in table1.select_rows("unet_ddpm,modl", get_preset("demo"))]
    assert ddpm == ["Zero-filled", "U-Net", "Kronecker U-Net", "MoDL", "Kronecker MoDL", "Kron MoDL (compressed from the trained MoDL)"]
    fastmri = [label for label, *_ in table1.select_rows("unet", get_preset("demo"))]
    assert fastmri == ["Zero-filled", "U-Net (fastMRI)", "Kronecker U-Net (fastMRI)", "Kron U-Net (compressed from the trained U-Net)"]
    assert len(table1.select_rows("unet", get_preset("tiny"))) == 5  # tiny runs every row, complex algebra too
    # a compressed row comes only with the dense row it is compressed from
    no_teacher = get_preset("demo", table_rows=("Kronecker MoDL", "Kron MoDL (compressed from the trained MoDL)"))
    assert [label for label, *_ in table1.select_rows(None, no_teacher)] == ["Zero-filled", "Kronecker MoDL"]
    assert all(label in {lab for lab, *_ in table1.ROWS} for label in get_preset("demo").table_rows)
    with pytest.raises(ValueError, match=r"table_rows \['Kronecker LB U-Net'\] are not rows of Table 1"):
        get_preset("demo", table_rows=("MoDL", "Kronecker LB U-Net"))


def test_a_presets_training_patches_apply_under_the_fastmri_protocol_too(demo_root, tmp_path, monkeypatch):
    """The demo's SwinMR trains on patches under fastMRI's transforms and is tested on whole slices."""
    import dataclasses

    import _common
    from kronify.mri.experiments import presets

    tiny_preset = presets.PRESETS["tiny"]
    patched = dataclasses.replace(tiny_preset, models={
        **tiny_preset.models, "swinmr": dataclasses.replace(tiny_preset.models["swinmr"], train_patch=16)})
    monkeypatch.setitem(presets.PRESETS, "tiny", patched)
    out = tmp_path / "patch"
    assert _common.run_recipe("swinmr", tiny(demo_root, out)) == 0
    metrics = check_run(out, "swinmr_demo", 0)
    assert metrics["train_patch"] == 16 and metrics["protocol"] == "fastmri"
    assert metrics["n_slices"] >= 1  # scored on whole 32x32 slices (check_run: every metric finite)


def test_table1_starts_the_teachers_of_compressed_rows_first_then_the_longest_rows():
    import table1
    from types import SimpleNamespace

    from kronify.mri.experiments.presets import get_preset

    demo = get_preset("demo")
    rows = [(label, family) for label, family, *_ in table1.select_rows(None, demo)[1:] if label not in table1.COMPRESSED]
    order = sorted(rows, key=lambda r: table1._start_order(r[0], SimpleNamespace(family=r[1], max_steps=None), demo))
    steps = [demo.steps_for(family) for _, family in order[2:]]
    assert [label for label, _ in order[:2]] == ["U-Net (fastMRI)", "MoDL"]  # the compressions wait on these two
    assert steps == sorted(steps, reverse=True) and order[2][0] == "Kronecker U-Net (fastMRI)"  # then 1,600 steps
