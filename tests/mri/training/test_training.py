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

import zoo
from kronify.mri.training.checkpoint import AtomicCheckpointIO, LastCheckpoint, atomic_torch_save
from kronify.mri.data.transforms import MRISample
from kronify.mri.training.ema import EMA
from kronify.mri.training.data_module import StepBatchSampler
from kronify.mri.training.module import ReconModule
from kronify.mri.training.trainer import resolve_precision
from kronify.mri.training.wrappers import reconstruct

REPO = Path(__file__).resolve().parents[3]
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
    import kronify.mri.experiments.run as runs

    class Kill(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    make = runs.make_trainer
    runs.make_trainer = lambda *a, **k: make(*a, callbacks=[Kill()], **k)
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


# -- global random draws: a function of (seed, step, rank) ----------------------------------------------------------
def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(2).tolist(), __import__("random").random()


def test_each_training_step_reseeds_the_global_rngs_from_seed_step_and_rank(monkeypatch):
    """Whatever was drawn before, a step's dropout/drop-path draws are the same (what makes a resumed run draw
    what the uninterrupted one drew, with no RNG state in the checkpoint); other steps, ranks and seeds differ."""
    module = ReconModule(nn.Conv2d(2, 2, 1), seed=5)

    def draws_at(step: int, rank: int = 0, noise: int = 0) -> tuple:
        monkeypatch.setattr(ReconModule, "global_step", property(lambda self: step))
        monkeypatch.setattr(ReconModule, "global_rank", property(lambda self: rank))
        torch.rand(noise), np.random.rand(noise)  # whatever happened before this step
        module.on_train_batch_start(None, 0)
        return _draws()

    first = draws_at(3)
    assert draws_at(3, noise=17) == first
    assert draws_at(4) != first and draws_at(3, rank=1) != first
    other = ReconModule(nn.Conv2d(2, 2, 1), seed=6)
    other.on_train_batch_start(None, 0)
    assert _draws() != first
    torch.manual_seed(5)
    assert ReconModule(nn.Conv2d(2, 2, 1))._seed == 5  # default: the torch seed (pl.seed_everything's)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ReconModule(nn.Conv2d(2, 2, 1), seed=-1)


# -- a checkpoint saved by rank 0 alone ---------------------------------------------------------------------------
SAVE_ON_RANK_ZERO = textwrap.dedent("""
    import datetime, json, sys, time
    from pathlib import Path
    import torch.distributed as dist
    from torch import nn
    from kronify.mri.training.module import ReconModule

    rank, folder = int(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo", init_method=f"file://{folder / 'pg'}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=20))
    done = folder / "done.json"
    if rank == 0:  # saves alone, as a checkpoint callback on rank 0 only would
        module = ReconModule(nn.Conv2d(2, 2, 1), seed=1)
        start = time.perf_counter()
        try:
            checkpoint = {}
            module.on_save_checkpoint(checkpoint)
            result = {"seconds": time.perf_counter() - start, "keys": sorted(checkpoint["kronify"])}
        except Exception as exc:  # a collective waiting on rank 1 times out
            result = {"error": repr(exc), "seconds": time.perf_counter() - start}
        done.write_text(json.dumps(result))
    else:  # takes part in no collective until rank 0 is done (or 60 s have passed)
        deadline = time.time() + 60
        while not done.exists() and time.time() < deadline:
            time.sleep(0.05)
""")


def test_checkpoint_hook_on_rank_zero_alone_does_not_wait_for_other_ranks(tmp_path):
    script = tmp_path / "save_on_rank_zero.py"
    script.write_text(SAVE_ON_RANK_ZERO)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    result = json.loads((tmp_path / "done.json").read_text())
    assert "error" not in result, (result, outputs)
    assert result["seconds"] < 5 and result["keys"] == ["history", "seed", "train_seconds"]


# -- half precision -------------------------------------------------------------------------------------------------
def _batch(model: nn.Module, size: int = 32, b: int = 2) -> MRISample:
    torch.manual_seed(0)
    inputs = zoo.example_inputs(model, (size, size), batch=b) if getattr(model, "needs_kspace", False) else None
    x = inputs[0] if inputs else torch.randn(b, 2, size, size)
    mask = inputs[1] if inputs else torch.ones(b, 1, 1, size)
    kspace = inputs[2] if inputs else x
    return MRISample(input=x, target=x + 0.1 * torch.randn_like(x), kspace=kspace, mask=mask,
                     scale=torch.ones(b), fname=["a.h5"] * b, slice_num=torch.arange(b), max_value=torch.ones(b))


@pytest.mark.parametrize("name", ["modl_demo", "kron_modl_demo", "unet_demo", "swinmr_demo", "unet_ddpm_tiny"])
def test_training_and_eval_step_under_cpu_bf16_autocast(name):
    """bf16 autocast (as bf16-mixed runs training): every FFT (MoDL's data consistency, the loss) runs in float32
    (fastmri.fft2c rejects bf16), so the loss is a finite float32 value with finite gradients, also for the EMA."""
    model = zoo.create(name)
    module = ReconModule(model, lpips=None)
    batch = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = module.training_loss(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and terms["freq"] > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        output = reconstruct(module.ema.module, batch)
        eval_loss, _ = module.loss_fn(output, batch.target)
    assert torch.isfinite(output.float()).all() and torch.isfinite(eval_loss)
