"""The recipes: each trains a few steps on demo data and writes complete results; table1 --tiny has every row;
data_efficiency writes its table; bad flags and data give clear errors."""

from __future__ import annotations

import csv
import json
import math
import runpy
import sys
from pathlib import Path

import pytest

from kronify.mri.evaluate import METRICS_KEYS

REPO = Path(__file__).resolve().parents[1]
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


def check_run(out: Path, model: str, kron_n: int, acceleration: int = 4) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(METRICS_KEYS) <= set(metrics)
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


def test_table1_tiny_writes_every_row(demo_root, tmp_path):
    import table1

    out = tmp_path / "t1"
    assert table1.main(["--tiny", "--data-path", str(demo_root), "--accelerations", "4", "--out", str(out),
                        "--no-progress"]) == 0
    md = (out / "table1.md").read_text()
    with open(out / "table1.csv") as f:
        rows = list(csv.DictReader(f))
    labels = [label for label, *_ in table1.ROWS]
    assert [r["Model"] for r in rows] == labels and len(labels) == 10
    for label in labels:
        assert f"| {label} " in md
    zero = rows[0]
    assert zero["Params (M)"] == "-" and zero["Paper PSNR (std)"] == "22.75 (1.73)"
    assert all(r["Params (M)"] != "-" and r["Steps"] == "2" for r in rows[1:])
    assert next(r for r in rows if r["Model"] == "Kronecker U-Net")["Paper SSIM (std)"] == "0.762 (0.075)"
    assert "Command: `python recipes/table1.py --tiny" in md and "Machine:" in md
    for png in ("comparison_4x.png", "curves_4x.png"):
        assert (out / png).stat().st_size > 1000


def test_data_efficiency_tiny(demo_root, tmp_path):
    import data_efficiency

    out = tmp_path / "de"
    assert data_efficiency.main(tiny(demo_root, out, "--fractions", "0.5", "1.0")) == 0
    with open(out / "data_efficiency.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["Fraction"], r["Model"]) for r in rows] == [
        ("50%", "unet_demo"), ("50%", "kron_unet_demo"), ("100%", "unet_demo"), ("100%", "kron_unet_demo")]
    assert int(rows[0]["Train volumes"]) < int(rows[2]["Train volumes"])
    assert (out / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--acceleration", "6"], "invalid choice: 6"),
    (["--algebra", "octonion"], "invalid choice: 'octonion'"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--kron-n", "1"], "--kron-n must be 0 (dense) or >= 2"),
    (["--kron-n", "4", "--algebra", "complex"], "--algebra complex is the n = 2 algebra"),
    (["--max-steps", "0"], "--max-steps must be >= 1"),
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
