"""A finished training run on disk, as a recipe writes it: its ``metrics.json``, its test volumes and the EMA
weights in ``checkpoints/last.ckpt``.

Reading a run never writes into it. Every problem (no folder, no metrics.json, no checkpoint, weights that do not
fit the model) is a :class:`RunError` whose message names the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kronify.mri.training.checkpoint import LAST

from kronify.mri.errors import RunError

__all__ = ["EMA_PREFIX", "REQUIRED_KEYS", "RunError", "TrainedRun"]

#: Keys of a run's metrics.json needed to rebuild its model and data.
REQUIRED_KEYS = ("model", "family", "kron_n", "acceleration", "preset")
#: Where :class:`kronify.mri.training.module.ReconModule` keeps the EMA copy in its state dict.
EMA_PREFIX = "ema.module."



@dataclass(frozen=True)
class TrainedRun:
    """One recipe run: ``path`` (its folder), ``info`` (its metrics.json) and ``checkpoint`` (last.ckpt)."""

    path: Path
    info: Mapping[str, Any]
    checkpoint: Path

    @classmethod
    def open(cls, run_dir: str | os.PathLike) -> TrainedRun:
        """Check ``run_dir`` holds a finished run (metrics.json with the model's description, a checkpoint)."""
        path = Path(run_dir).expanduser()
        if not path.is_dir():
            raise RunError(f"run folder {str(path)!r} does not exist or is not a folder")
        metrics = path / "metrics.json"
        if not metrics.is_file():
            inner = sorted(p.parent.name for p in path.glob("*/metrics.json"))
            hint = (f"; it holds several runs, pass one of them: {', '.join(str(path / n) for n in inner)}"
                    if inner else "; a recipe writes it when its run has finished")
            raise RunError(f"run folder {path} has no metrics.json{hint}")
        try:
            info = json.loads(metrics.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"cannot read {metrics}: {err}") from err
        if not isinstance(info, dict):
            raise RunError(f"{metrics} is not a recipe's metrics.json (not a JSON object)")
        missing = [key for key in REQUIRED_KEYS if key not in info]
        if missing:
            raise RunError(f"{metrics} lacks {missing}: not a recipe's metrics.json")
        checkpoint = path / "checkpoints" / LAST
        if not checkpoint.is_file():
            raise RunError(f"run folder {path} has no checkpoint {checkpoint.relative_to(path)}")
        return cls(path.resolve(), info, checkpoint.resolve())

    @property
    def protocol(self) -> str:
        """The protocol the run was trained and tested under (runs from before protocols: ``fastmri``, whose
        per-file test masks and per-volume data range they used)."""
        return str(self.info.get("protocol") or "fastmri")

    @property
    def data_root(self) -> Path | None:
        """The data folder the run was trained on (None for runs that did not record it)."""
        root = self.info.get("data_root")
        return Path(root) if root else None

    @property
    def test_files(self) -> list[str]:
        """The run's test volumes (file names)."""
        files = self.info.get("test_files")
        if not files:
            raise RunError(f"{self.path / 'metrics.json'} does not record the run's test volumes (a run made "
                           "before they were recorded); pass a data folder to evaluate on instead")
        return list(files)

    def ema_state_dict(self) -> dict[str, Tensor]:
        """The EMA weights from the checkpoint (keys as in the trained model)."""
        try:
            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt or foreign file
            raise RunError(f"cannot read checkpoint {self.checkpoint}: {type(err).__name__}: {err}") from err
        state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
        ema = {k[len(EMA_PREFIX):]: v for k, v in (state or {}).items() if k.startswith(EMA_PREFIX)}
        if not ema:
            raise RunError(f"checkpoint {self.checkpoint} holds no EMA weights ('{EMA_PREFIX}*' in its state_dict)")
        return ema

    def load_ema_weights(self, model: nn.Module) -> nn.Module:
        """Load the EMA weights into ``model`` (built like the run's model); returns it in eval mode."""
        try:
            model.load_state_dict(self.ema_state_dict(), strict=True)
        except RuntimeError as err:
            raise RunError(f"the weights in {self.checkpoint} do not fit the rebuilt model "
                           f"{self.info['model']!r}: {err}") from err
        return model.eval()
