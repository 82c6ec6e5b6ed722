"""kronify.mri.experiments.run.train_and_test from Python: any image-to-image model trains, is tested with its EMA weights
and written like a recipe's run; a folder that holds a run, or patches for a k-space model, are refused without
touching anything."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kronify.mri.data.datasets import build_datasets
from kronify.mri.experiments.presets import get_preset
from kronify.mri.errors import RunFolderError
from kronify.mri.experiments.run import Hardware, train_and_test

CPU = Hardware(accelerator="cpu", progress_bar=False)


class NeedsKspace(nn.Module):
    needs_kspace = True

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, kspace, mask):
        return self.conv(x)


@pytest.fixture()
def datasets(demo_root: Path, tmp_path: Path) -> dict:
    return build_datasets(demo_root, tmp_path / "split.json", crop=32, accelerations=4, num_slices=None)


def test_a_plain_model_trains_and_writes_a_complete_run(datasets, tmp_path):
    torch.manual_seed(0)
    model = nn.Conv2d(2, 2, 3, padding=1)
    out = tmp_path / "run"
    result = train_and_test(model, get_preset("tiny"), datasets, out, max_steps=3, hardware=CPU,
                            info={"model": "conv3x3"})
    on_disk = json.loads((out / "metrics.json").read_text())
    assert result == on_disk and on_disk["model"] == "conv3x3" and on_disk["steps"] == 3
    assert on_disk["test_files"] == datasets["test"].files and on_disk["n_volumes"] == len(datasets["test"].files)
    assert set(on_disk["vs_zero_filled"]) == {"psnr", "ssim"} and on_disk["augment"] == "off"
    for name in ("per_volume.csv", "zero_filled_per_volume.csv", "per_slice.csv", "history.json",
                 "reconstruction.png", "checkpoints/last.ckpt"):
        assert (out / name).is_file(), name

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RunFolderError, match="already holds a run"):
        train_and_test(nn.Conv2d(2, 2, 3, padding=1), get_preset("tiny"), datasets, out, max_steps=3, hardware=CPU)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_training_patches_are_refused_for_a_kspace_model(datasets, tmp_path):
    tiny = get_preset("tiny")
    patched = dataclasses.replace(tiny, models={**tiny.models,
                                                "modl": dataclasses.replace(tiny.models["modl"], train_patch=16)})
    with pytest.raises(RunFolderError, match="NeedsKspace uses k-space .* cannot train on 16x16 patches"):
        train_and_test(NeedsKspace(), patched, datasets, tmp_path / "run", family="modl", hardware=CPU)
    assert not (tmp_path / "run").exists()
