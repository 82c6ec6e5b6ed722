"""The `kronify report` command line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

import torch

from kronify.analysis import count_flops
from kronify.cli import main

needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed")
needs_timm = pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")


@needs_torchvision
def test_report_torchvision_with_flops(capsys):
    assert main(["report", "torchvision:resnet18", "--n", "2", "--input-size", "3", "32", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer4.1.conv2" in out and "skipped: in_channels/groups=3 not divisible by n=2" in out
    assert "total: 11,689,512 ->" in out and "FLOPs (input 1x3x32x32" in out


@needs_timm
def test_report_json_timm_with_terms_and_warm_start(capsys):
    import timm

    assert main(["report", "timm:convnext_atto", "--n", "4", "--terms", "1", "--warm-start", "--json",
                 "--input-size", "3", "32", "32"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "timm:convnext_atto" and d["converted"]
    rows = [r for r in d["rows"] if r["status"] == "converted"]
    assert all(r["n"] == 4 and r["terms"] == 1 and 0 < r["warm_start_error"] < 1 for r in rows)
    dense = count_flops(timm.create_model("convnext_atto"), torch.zeros(1, 3, 32, 32))["forward"]
    assert d["flops"]["forward"] == dense > 0 and d["flops"]["weight_rebuild"] > 0
    assert d["flops_input_size"] == [1, 3, 32, 32]


def test_report_factory_spec(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\ndef small():\n    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["report", "my_models:small", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "\n0      Linear  6x8" in out and "out_features=3 not divisible by n=2" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        pytest.param(["report", "timm:no_such_model_xyz"], "unknown timm model 'no_such_model_xyz'", marks=needs_timm),
        pytest.param(["report", "torchvision:no_such_model"], "unknown torchvision model 'no_such_model'",
                     marks=needs_torchvision),
        (["report", "resnet18"], "MODEL must be timm:NAME, torchvision:NAME or package.module:factory"),
        (["report", "no_such_pkg_xyz.mod:make"], "cannot import 'no_such_pkg_xyz.mod'"),
        (["report", "torch.nn:NoSuchFactory"], "'torch.nn' has no callable 'NoSuchFactory'"),
        pytest.param(["report", "torchvision:resnet18", "--n", "1"], "n must be an integer >= 2",
                     marks=needs_torchvision),
    ],
)
def test_bad_model_or_options_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _console_script() -> list[str]:
    exe = shutil.which("kronify", path=str(__import__("pathlib").Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "kronify.cli"]


def test_console_script_exit_status():
    proc = subprocess.run(_console_script() + ["report", "resnet18"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "MODEL must be timm:NAME" in proc.stderr


def test_console_script_imports_package_module_factory_from_the_current_directory(tmp_path):
    """The installed `kronify` script (whose sys.path lacks the cwd) finds the user's own package."""
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "from torch import nn\n\ndef small():\n    return nn.Sequential(nn.Conv2d(2, 8, 3), nn.Conv2d(8, 3, 1))\n"
    )
    proc = subprocess.run(_console_script() + ["report", "mypkg.nets:small", "--n", "2", "--json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["model"] == "mypkg.nets:small" and d["converted"] == ["0"]
    assert "out_channels=3 not divisible by n=2" in d["skipped"]["1"]
