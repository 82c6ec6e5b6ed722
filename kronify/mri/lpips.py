"""LPIPS (AlexNet) on MRI magnitude images, available only when its weights are on disk.

The ``lpips`` package brings its own linear calibration layers (inside the wheel) but asks torchvision for the
AlexNet ImageNet trunk, which torchvision would download. We never let it: the trunk is built randomly
initialised (``pnet_rand=True``) and then filled from the checkpoint found by :mod:`kronify.mri.backbones`.
When the checkpoint is missing, the metric is *unavailable*: it returns None and carries one message saying
where to put the file. It never crashes and never reports a number computed with a random trunk.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from kronify.mri.backbones import ALEXNET, load_backbone_state_dict
from kronify.mri.errors import MissingWeightsError

__all__ = ["LPIPSMetric", "to_lpips_input"]

MIN_SIZE = 32  # AlexNet's pooling leaves nothing of smaller images


def to_lpips_input(magnitude: Tensor, maxval: Tensor | float) -> Tensor:
    """(B,H,W) magnitudes -> (B,3,H,W) in [-1, 1]: 2·x/maxval − 1, clamped, grey replicated to 3 channels."""
    maxval = torch.as_tensor(maxval, dtype=magnitude.dtype, device=magnitude.device).reshape(-1, 1, 1)
    x = (2.0 * magnitude / maxval - 1.0).clamp(-1.0, 1.0)
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def _build_lpips_alex(weights_path: str | os.PathLike | None) -> nn.Module:
    """lpips.LPIPS(net='alex') with the AlexNet trunk loaded from a local torchvision checkpoint."""
    import lpips  # noqa: PLC0415  (optional dependency of the mri extra)

    state = load_backbone_state_dict(ALEXNET, weights_path)
    lin_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not lin_path.is_file():
        raise MissingWeightsError(f"the lpips package has no linear-layer weights at {lin_path}; reinstall lpips")
    # lpips prints a banner and calls torchvision's deprecated `pretrained=False` (no download with pnet_rand).
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(pretrained=True, net="alex", version="0.1", pnet_rand=True, model_path=str(lin_path))
    # lpips keeps torchvision's `features` indices as module names inside slice1..slice5.
    trunk_state = {}
    for slice_name, block in model.net.named_children():
        for idx, _ in block.named_children():
            for key in ("weight", "bias"):
                src = f"features.{idx}.{key}"
                if src in state:
                    trunk_state[f"{slice_name}.{idx}.{key}"] = state[src]
    try:
        model.net.load_state_dict(trunk_state, strict=True)
    except RuntimeError as exc:
        raise MissingWeightsError(f"the AlexNet checkpoint does not fit LPIPS's trunk: {exc}") from exc
    return model.eval().requires_grad_(False)


class LPIPSMetric:
    """LPIPS distance between magnitude images (lower is better), or None when unavailable.

    Args:
        net: an ``lpips.LPIPS``-compatible module ``net(in0, in1) -> (B,1,1,1)`` taking (B,3,H,W) in [-1, 1];
            given for tests or custom set-ups. When None, LPIPS(AlexNet) is built from local weights.
        weights_path: explicit path of torchvision's ``alexnet-owt-7be5be79.pth`` (else env var / torch hub dir).
    """

    def __init__(self, net: nn.Module | None = None, *, weights_path: str | os.PathLike | None = None) -> None:
        self.message: str | None = None
        if net is None:
            try:
                net = _build_lpips_alex(weights_path)
            except (MissingWeightsError, ImportError) as exc:
                net, self.message = None, f"LPIPS unavailable: {exc}"
        self.net = net.eval().requires_grad_(False) if net is not None else None

    @property
    def available(self) -> bool:
        return self.net is not None

    @torch.no_grad()
    def __call__(self, output_mag: Tensor, target_mag: Tensor, maxval: Tensor | float) -> Tensor | None:
        """Per-image LPIPS (B,) for (B,H,W) magnitudes scaled by ``maxval`` (scalar or (B,)); None if unavailable."""
        if self.net is None:
            return None
        if output_mag.shape != target_mag.shape or output_mag.dim() != 3:
            raise ValueError(f"expected two (B,H,W) magnitude batches, got {tuple(output_mag.shape)} "
                             f"and {tuple(target_mag.shape)}")
        if min(output_mag.shape[-2:]) < MIN_SIZE:
            raise ValueError(f"LPIPS (AlexNet) needs images of at least {MIN_SIZE}x{MIN_SIZE} pixels, "
                             f"got {tuple(output_mag.shape[-2:])}")
        param = next(self.net.parameters(), None)
        if param is not None and param.device != output_mag.device:
            self.net.to(output_mag.device)
        dtype = param.dtype if param is not None else output_mag.dtype
        a = to_lpips_input(output_mag.to(dtype), maxval)
        b = to_lpips_input(target_mag.to(dtype), maxval)
        return self.net(a, b).reshape(-1)
