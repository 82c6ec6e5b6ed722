"""kronify.mri training pieces: EMA, atomic checkpoints, the resumable sampler, exact resume after a real kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kronify.mri.checkpoint import AtomicCheckpointIO, LastCheckpoint, atomic_torch_save
from kronify.mri.ema import EMA
from kronify.mri.training import ReconModule, StepBatchSampler, resolve_precision

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


# -- EMA ---------------------------------------------------------------------------------------------------------
def test_ema_follows_warmup_decay_and_copies_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.999, warmup=True)
    expected = model[0].weight.detach().clone()
    for t in range(5):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
            model[1].running_mean.add_(1.0)
        d = min(0.999, (1 + t) / (10 + t))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        expected = d * expected + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, expected)
    torch.testing.assert_close(ema.module[1].running_mean, model[1].running_mean)
    assert int(ema.num_updates) == 5 and "num_updates" in ema.state_dict()
    ema.train()
    assert not ema.module.training and not any(p.requires_grad for p in ema.parameters())


def test_ema_without_warmup_uses_fixed_decay_and_rejects_bad_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.9 * before + 0.1 * model.weight.detach())
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


# -- atomic checkpoints ------------------------------------------------------------------------------------------
class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("simulated crash while writing")


def test_atomic_save_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        atomic_torch_save({"step": 2, "w": torch.zeros(3), "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind
    AtomicCheckpointIO().save_checkpoint({"step": 3}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "32-true"
    with pytest.raises(ValueError, match="needs a GPU"):
        resolve_precision("16-mixed", "cpu")
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp8", "cpu")


# -- the resumable training order ---------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 13), batch=st.integers(1, 4), world=st.integers(1, 3), total=st.integers(1, 12),
       data=st.data())
def test_step_sampler_partitions_the_stream_and_resumes(n, batch, world, total, data):
    start = data.draw(st.integers(0, total))
    full = [list(StepBatchSampler(n, batch, seed=7, total=total, rank=r, world_size=world)) for r in range(world)]
    for g in range(total):
        # global batch g = the ranks' batches in order; positions run through seeded permutations of the data
        items = [it for r in range(world) for it in full[r][g]]
        positions = range(g * batch * world, (g + 1) * batch * world)
        for pos, (index, seed) in zip(positions, items):
            perm = np.random.default_rng([7, pos // n]).permutation(n)
            assert index == perm[pos % n]
        assert len({s for _, s in items}) == len(items)  # every sample its own mask seed
    for r in range(world):
        resumed = list(StepBatchSampler(n, batch, seed=7, total=total, start=start, rank=r, world_size=world))
        assert resumed == full[r][start:]


def test_module_rejects_bad_optimiser_settings():
    with pytest.raises(ValueError, match="milestones"):
        ReconModule(nn.Conv2d(2, 2, 1), milestones=[5, 3])
    with pytest.raises(ValueError, match="learning rate"):
        ReconModule(nn.Conv2d(2, 2, 1), lr=0)


def test_last_checkpoint_is_written_at_the_end(tmp_path):
    """Every `every` steps and at the last step even when it is not a multiple of `every`."""

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = []

    class Spy(pl.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            seen.append(trainer.global_step)

    trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[LastCheckpoint(tmp_path, every=2), Spy()],
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(16, 2), batch_size=2))
    assert seen == [2, 4, 5]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5


# -- resume after a real kill ---------------------------------------------------------------------------------------
KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import pytorch_lightning as pl
    import _common

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    make = _common.make_trainer
    _common.make_trainer = lambda *a, **k: make(*a, callbacks=[Kill()], **k)
    sys.exit(_common.run_recipe("unet", sys.argv[2:]))
""")


def _recipe(argv):
    sys.path.insert(0, str(RECIPES))
    try:
        import _common

        assert _common.run_recipe("unet", argv) == 0
    finally:
        sys.path.remove(str(RECIPES))


def test_resume_after_sigkill_gives_the_same_run(demo_root, tmp_path):
    """Kill a run with SIGKILL after a mid-run checkpoint, --resume it: same weights, history and test metrics."""
    args = ["--data-path", str(demo_root), "--preset", "tiny", "--max-steps", "7", "--ckpt-every", "3",
            "--val-every", "2", "--no-progress"]
    _recipe(args + ["--out", str(tmp_path / "full")])

    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, "KILL_AT_STEP": "5", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(driver), str(RECIPES), *args, "--out", str(tmp_path / "killed")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpt = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3  # the checkpoint before the kill
    assert not (tmp_path / "killed" / "metrics.json").exists()

    _recipe(args + ["--out", str(tmp_path / "killed"), "--resume"])
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["steps"] == full["steps"] == 7
    for key in ("ssim_mean", "psnr_mean", "nmse_mean", "phase_error_mean", "ssim_std", "psnr_std"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    history_full = json.loads((tmp_path / "full" / "history.json").read_text())
    history_resumed = json.loads((tmp_path / "killed" / "history.json").read_text())
    assert [h["step"] for h in history_resumed] == [h["step"] for h in history_full] == [2, 4, 6]
    for h_full, h_resumed in zip(history_full, history_resumed):
        assert h_resumed == pytest.approx(h_full, abs=1e-6)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # model and EMA weights, EMA counter
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-6, rtol=0)
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 7
