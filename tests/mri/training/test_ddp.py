"""Two CPU processes (Lightning DDP on gloo) train, compress and test like one process on the same data."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def _run(args: list[str]) -> None:
    """Run a recipe (``args[0]``, default unet_fastmri.py) with ``args``."""
    if not args[0].endswith(".py"):
        args = ["unet_fastmri.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "recipes" / args[0]), *args[1:]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _slices(out: Path) -> list[tuple[str, str]]:
    with open(out / "per_slice.csv") as f:
        return sorted((r["fname"], r["slice_num"]) for r in csv.DictReader(f))


def test_two_process_ddp_matches_one_process(make_demo, tmp_path):
    # 3 test volumes x 5 slices = 15 test slices, 1 validation volume = 5 validation slices: on 2 processes the
    # DistributedSampler pads each with one duplicate, which must count neither in the metrics nor in the loss
    root = make_demo(tmp_path / "data", cases=10, slices=5)
    common = ["--data-path", str(root), "--preset", "tiny", "--max-steps", "3", "--accelerator", "cpu",
              "--no-progress"]
    _run(common + ["--out", str(tmp_path / "one")])
    _run(common + ["--out", str(tmp_path / "two"), "--devices", "2", "--strategy", "ddp"])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["n_slices"] == two["n_slices"] == 15 and one["n_volumes"] == two["n_volumes"] == 3
    assert _slices(tmp_path / "one") == _slices(tmp_path / "two")
    assert two["steps"] == one["steps"] == 3
    # same global batch (2 = 2 x 1) and sample order: the same training up to float summation order
    for key in ("ssim_mean", "ssim_std", "psnr_mean", "psnr_std", "nmse_mean", "phase_error_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert [h["val_psnr"] for h in h2] == pytest.approx([h["val_psnr"] for h in h1], rel=1e-5)
    assert [h["val_loss"] for h in h2] == pytest.approx([h["val_loss"] for h in h1], rel=1e-5)


def test_table1_with_a_compressed_row_and_compress_recipe_under_ddp(make_demo, tmp_path):
    # every rank runs the whole table: the compressions too (a rank that skipped one would start the next row's
    # DDP fit while rank 0 compressed: mismatched models), after rank 0 has written the teacher's run
    root = make_demo(tmp_path / "data", cases=10, slices=5)
    ddp = ["--data-path", str(root), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-progress"]
    _run(["table1.py", "--tiny", "--models", "unet", "--accelerations", "4", "8", "--max-steps", "3",
          "--out", str(tmp_path / "t1"), *ddp])
    for acc in (4, 8):
        runs = tmp_path / "t1" / "runs" / f"{acc}x"
        compressed = json.loads((runs / "kron_unet_demo_compressed_budget0.5" / "metrics.json").read_text())
        assert compressed["world_size"] == 2 and compressed["compression"]["teacher"] == str(runs / "unet_demo")
        assert all(json.loads(m.read_text())["world_size"] == 2 for m in runs.glob("*/metrics.json"))
    assert "Kron U-Net (compressed from the trained U-Net)" in (tmp_path / "t1" / "table1.md").read_text()
    # recipes/compress.py alone: Lightning starts rank 1 inside the compression, after rank 0 wrote kron/
    teacher = str(tmp_path / "t1" / "runs" / "4x" / "unet_demo")
    common = ["compress.py", "--run", teacher, "--steps", "3", "--no-progress"]
    _run(common + ["--out", str(tmp_path / "one")])
    _run(common + ["--out", str(tmp_path / "two"), *ddp[2:]])
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["params"] == two["params"]
    for key in ("ssim_mean", "psnr_mean", "nmse_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
