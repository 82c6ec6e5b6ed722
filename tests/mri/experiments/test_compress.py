"""recipes/compress.py and kronify.mri.experiments.compress: a trained tiny dense run compressed end to end (U-Net
and MoDL), the warm start made from the teacher's EMA weights, the run folder read by recipes/evaluate.py and
the tables, --budget, --resume, and every bad input refused with exit code 2 and no file touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kronify
from kronify.io import read_record
from kronify.mri.experiments.compress import KRON_SAVE, CompressSettings
from kronify.mri.experiments.presets import get_preset
from kronify.mri.experiments.run_folder import RunRecord
from kronify.mri.experiments.study import row_over_seeds
from kronify.mri.losses import CompositeLoss
from kronify.mri.training.distill import DistillReconModule, DistillWeights
from zoo.build import build_model, rebuild_run_model

from test_evaluate import recipes_path, run_recipe  # noqa: F401 (recipes_path: a fixture)

pytestmark = pytest.mark.usefixtures("recipes_path")  # the recipes import _common, as when run as scripts


def train(family: str, root: Path, out: Path, *extra: str) -> Path:
    """A tiny-preset run of ``family`` trained for 5 steps into ``out``."""
    import _common

    assert _common.run_recipe(family, ["--data-path", str(root), "--preset", "tiny", "--max-steps", "5",
                                       "--out", str(out), "--no-progress", *extra]) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dense_run(demo_root, tmp_path_factory) -> Path:
    return train("unet", demo_root, tmp_path_factory.mktemp("dense") / "unet")


@pytest.fixture(scope="module")
def compressed(dense_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "run"
    before = snapshot(dense_run)
    assert run_recipe("compress", ["--run", str(dense_run), "--out", str(out), "--calibration-batches", "2",
                                   "--no-progress"]) == 0
    assert snapshot(dense_run) == before  # the teacher's folder is only read
    return out


def test_compressed_run_folder(compressed, dense_run):
    info = json.loads((compressed / "metrics.json").read_text())
    teacher = json.loads((dense_run / "metrics.json").read_text())
    preset = get_preset("tiny")
    kron_params = sum(p.numel() for p in build_model("unet", preset, 2, "learned").parameters())
    assert info["params"] == kron_params < teacher["params"]  # the from-scratch Kronecker model's size
    assert info["steps"] == max(1, round(0.2 * teacher["steps"]))  # default: 20 % of the dense run's steps
    assert info["family"] == "unet" and info["kron_n"] == 2 and info["preset"] == "tiny"
    c = info["compression"]
    assert c["teacher"] == str(dense_run.resolve()) and c["teacher_steps"] == teacher["steps"]
    assert c["warm_start"] == "calibrated" and c["output_error_mean"] is not None and c["convert_seconds"] > 0
    assert c["target"] == "both" and c["distill"]["teacher"] == c["distill"]["target"] == 0.5  # the default
    assert (compressed / KRON_SAVE / "kronify_config.json").is_file()
    assert (compressed / "checkpoints" / "last.ckpt").is_file() and info["test_files"] == teacher["test_files"]


def test_evaluate_reproduces_the_compressed_run(compressed):
    out = compressed.parent / "eval"
    assert run_recipe("evaluate", ["--run", str(compressed), "--out", str(out)]) == 0
    own, again = (json.loads((p / "metrics.json").read_text()) for p in (compressed, out))
    for key in ("psnr_mean", "ssim_mean", "nmse_mean"):
        assert again[key] == pytest.approx(own[key], rel=1e-6)


def test_saved_weights_are_the_checkpoints_ema(compressed):
    run = RunRecord.open(compressed)
    model = rebuild_run_model(run, get_preset("tiny"))
    assert any(kronify.is_kron(m) for m in model.modules())
    ema = run.ema_state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ema[key])


def test_tables_read_compressed_runs_like_any_other(compressed):
    row = row_over_seeds([compressed], [0])
    assert row.first["model"] == "kron_unet_demo_compressed" and "psnr" in row.summaries


def test_weight_only_warm_start_is_the_nearest_kronecker_sum(dense_run, tmp_path):
    out = tmp_path / "w"
    assert run_recipe("compress", ["--run", str(dense_run), "--out", str(out), "--steps", "0",
                                   "--warm-start", "weights", "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 0
    preset = get_preset("tiny")
    teacher = RunRecord.open(dense_run).load_ema_weights(build_model("unet", preset, 0, "learned"))
    kronify.convert(teacher.model, n=2, warm_start=True)
    student = rebuild_run_model(RunRecord.open(out), preset)
    x = torch.randn(2, 2, 32, 32)
    torch.testing.assert_close(student(x), teacher(x))


def test_budget_run_rebuilds_from_its_save(dense_run, tmp_path):
    out = tmp_path / "b"
    assert run_recipe("compress", ["--run", str(dense_run), "--out", str(out), "--budget", "0.5", "--fraction", "0.5",
                                   "--calibration-batches", "2", "--no-progress"]) == 0
    info = json.loads((out / "metrics.json").read_text())
    assert info["compression"]["budget"] == 0.5 and info["model"].endswith("_budget0.5")
    assert info["steps"] == max(1, round(0.5 * info["compression"]["teacher_steps"]))
    assert info["params"] <= 0.55 * info["compression"]["teacher_params"]
    config = read_record(out / KRON_SAVE)[0]["config"]  # the final save keeps the budget's per-layer choices
    assert config is not None and config["overrides"]
    assert run_recipe("evaluate", ["--run", str(out), "--out", str(tmp_path / "e")]) == 0
    again = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert again["psnr_mean"] == pytest.approx(info["psnr_mean"], rel=1e-6)


def test_modl_with_kspace_inputs_and_resume(demo_root, tmp_path):
    dense = train("modl", demo_root, tmp_path / "modl")
    out = tmp_path / "c"
    argv = ["--run", str(dense), "--out", str(out), "--steps", "2", "--calibration-batches", "2", "--no-progress"]
    assert run_recipe("compress", argv) == 0
    (out / "metrics.json").unlink()  # as if stopped after its last checkpoint
    assert run_recipe("compress", argv) == 2  # a run is there: --resume or another --out
    config = read_record(out / KRON_SAVE)[0]["config"]
    assert run_recipe("compress", [*argv[:5], "4", *argv[6:], "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    assert config is not None and read_record(out / KRON_SAVE)[0]["config"] == config  # kept through the resume


@pytest.mark.parametrize("case", ["kron_run", "compressed_run", "preset", "protocol", "out_holds_run",
                                  "out_inside_run", "missing_run", "bad_budget"])
def test_bad_input_is_refused_and_nothing_changes(case, dense_run, compressed, demo_root, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {"kron_run": lambda: ["--run", str(train("unet", demo_root, tmp_path / "k", "--kron-n", "2")),
                                 "--out", str(out)],
            "compressed_run": lambda: ["--run", str(compressed), "--out", str(out)],
            "preset": lambda: ["--run", str(dense_run), "--out", str(out), "--preset", "demo"],
            "protocol": lambda: ["--run", str(dense_run), "--out", str(out), "--protocol", "paper"],
            "out_holds_run": lambda: ["--run", str(dense_run), "--out", str(compressed)],
            "out_inside_run": lambda: ["--run", str(dense_run), "--out", str(dense_run / "sub")],
            "missing_run": lambda: ["--run", str(tmp_path / "nothing"), "--out", str(out)],
            "bad_budget": lambda: ["--run", str(dense_run), "--out", str(out), "--budget", "1.5"]}[case]()
    before = {p: snapshot(p) for p in (dense_run, compressed)}
    capsys.readouterr()
    assert run_recipe("compress", [*argv, "--no-progress"]) == 2
    message = capsys.readouterr().err
    named = {"kron_run": "not a dense", "compressed_run": "compressed run", "preset": "preset 'tiny'",
             "protocol": "protocol 'fastmri'", "out_holds_run": "already holds", "out_inside_run": "inside the dense",
             "missing_run": "does not exist", "bad_budget": "--budget"}[case]
    assert named in message
    assert not out.exists() and {p: snapshot(p) for p in before} == before


def test_distillation_loss_follows_the_teacher():
    """The student's training loss is the preset loss against the teacher's output (and the target, weighted)."""
    torch.manual_seed(0)
    teacher, student = torch.nn.Conv2d(2, 2, 3, padding=1), torch.nn.Conv2d(2, 2, 3, padding=1)
    batch = type("Batch", (), {"input": torch.randn(2, 2, 8, 8), "target": torch.randn(2, 2, 8, 8)})()
    loss = CompositeLoss(gamma=0.0)
    for weights in (DistillWeights(), DistillWeights(0.5, 0.5), DistillWeights(0.0, 1.0)):
        module = DistillReconModule(student, teacher, weights, loss=loss)
        total, terms = module.training_loss(batch)
        out = student(batch.input)
        expected = weights.teacher * loss(out, teacher(batch.input))[0] + weights.target * loss(out, batch.target)[0]
        torch.testing.assert_close(total, expected)
        assert set(terms) == {k for k, w in (("teacher", weights.teacher), ("target", weights.target)) if w > 0}
    same = DistillReconModule(teacher, teacher, DistillWeights(), loss=loss)
    assert float(same.training_loss(batch)[0].detach()) == 0.0
    assert "teacher" not in same.state_dict() and all(not k.startswith("teacher") for k in same.state_dict())


def test_feature_matching_needs_layers_and_checks_names():
    with pytest.raises(ValueError, match="layer names"):
        DistillWeights(features=1.0)
    with pytest.raises(ValueError, match="teacher \\+ target"):
        DistillWeights(teacher=0.0, target=0.0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1))
    with pytest.raises(ValueError, match="not found"):
        DistillReconModule(conv, conv, DistillWeights(features=1.0, layers=("nope",)))


def test_settings_are_checked_before_anything_runs():
    for bad in (dict(kron_n=1), dict(budget=0.0), dict(steps=-1), dict(target="x"), dict(calibration_batches=0),
                dict(warm_start="x"), dict(lr=0.0), dict(fraction=0.0), dict(fraction=1.5)):
        with pytest.raises(Exception, match="--"):
            CompressSettings(**bad).check()
