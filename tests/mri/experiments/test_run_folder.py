"""Run folders written before the package split (issue 20) still load: ``fixtures/run_before_issue20`` is the
efficient_unet run of ``make demo`` written by commit 28f8973 (metrics.json, the CSVs, history.json; no
checkpoint or examples, which are large), read through :class:`RunRecord` and the study code."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kronify.mri.errors import RunError
from kronify.mri.experiments.run_folder import METRICS_KEYS, RunRecord, write_json
from kronify.mri.experiments.study import per_volume_values, row_over_seeds

OLD_RUN = Path(__file__).parent / "fixtures" / "run_before_issue20"


def test_an_old_run_folder_reads_as_a_record():
    record = RunRecord.read(OLD_RUN)
    assert set(METRICS_KEYS) <= set(record.info)
    assert record.model == "efficient_unet" and record.protocol == "fastmri" and not record.by_slice
    assert record.mean("psnr") == pytest.approx(24.34094223672482)
    assert record.std("psnr") == record.info["psnr_std"] and record.mean("lpips") is None
    assert len(record.test_files) == record.info["n_volumes"] == 8
    history = record.history()
    assert [h["step"] for h in history][-1] == record.info["steps"] and "val_psnr" in history[0]
    with open(OLD_RUN / "per_volume.csv", newline="") as f:
        expected = {r["fname"]: float(r["psnr"]) for r in csv.DictReader(f)}
    assert record.per_volume("psnr") == expected == per_volume_values(OLD_RUN, "psnr")


def test_an_old_run_folder_is_a_row_and_opens_for_evaluation(tmp_path):
    row = row_over_seeds([OLD_RUN], [0])
    assert row.first["model"] == "efficient_unet" and row.summaries["psnr"].mean == pytest.approx(24.34094223672482)
    assert row.as_dict()["per_seed"]["psnr"] == [row.first["psnr_mean"]]
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    with pytest.raises(RunError, match="has no checkpoint"):
        RunRecord.open(run)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    opened = RunRecord.open(run)
    assert opened.info["family"] == "efficient_unet" and opened.checkpoint == (run / "checkpoints" / "last.ckpt")
    with pytest.raises(RunError, match="cannot read checkpoint"):
        opened.ema_state_dict()


def test_a_run_without_a_protocol_reads_as_fastmri(tmp_path):
    info = json.loads((OLD_RUN / "metrics.json").read_text())
    for key in ("protocol", "metrics_over", "data_root"):
        info.pop(key)
    write_json(tmp_path / "metrics.json", {**info, "psnr_std": float("nan")})
    record = RunRecord.read(tmp_path)
    assert record.protocol == "fastmri" and record.data_root is None and record.std("psnr") is None
    with pytest.raises(FileNotFoundError, match="no finished run"):
        RunRecord.read(tmp_path / "missing")
    assert np.isfinite(record.mean("ssim"))
