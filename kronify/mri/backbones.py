"""Offline lookup of the ImageNet backbone weights used by LPIPS (AlexNet) and the perceptual loss (VGG19).

Nothing here downloads anything. Both backbones are looked up in one place, the directory where
torchvision itself caches them, under the file names torchvision would use:

    <torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth   (LPIPS, net="alex")
    <torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth         (VGG19 perceptual loss)

``torch.hub.get_dir()`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``). A file elsewhere can be named
with an explicit ``path`` argument or an environment variable (``KRONIFY_LPIPS_ALEXNET``, ``KRONIFY_VGG19``);
the lookup order is: explicit path, environment variable, torch hub checkpoints directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kronify.mri.errors import MissingWeightsError

__all__ = [
    "ALEXNET",
    "VGG19",
    "BackboneWeights",
    "MissingWeightsError",
    "checkpoints_dir",
    "find_weights",
    "load_backbone_state_dict",
    "missing_weights_message",
]



@dataclass(frozen=True)
class BackboneWeights:
    """Where one torchvision ImageNet checkpoint is expected to live offline."""

    name: str
    filename: str  # torchvision's cache file name (the basename of its download URL)
    url: str  # where the user can fetch it by hand on a machine with internet access
    env_var: str


ALEXNET = BackboneWeights(
    name="AlexNet (torchvision IMAGENET1K_V1, used by LPIPS net='alex')",
    filename="alexnet-owt-7be5be79.pth",
    url="https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    env_var="KRONIFY_LPIPS_ALEXNET",
)
VGG19 = BackboneWeights(
    name="VGG19 (torchvision IMAGENET1K_V1, used by the perceptual loss)",
    filename="vgg19-dcbb9e9d.pth",
    url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
    env_var="KRONIFY_VGG19",
)


def checkpoints_dir() -> Path:
    """The directory torchvision caches ImageNet checkpoints in (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _candidates(spec: BackboneWeights, path: str | os.PathLike | None) -> list[Path]:
    if path is not None:
        return [Path(path).expanduser()]
    env = os.environ.get(spec.env_var)
    if env:
        return [Path(env).expanduser()]
    return [checkpoints_dir() / spec.filename]


def find_weights(spec: BackboneWeights, path: str | os.PathLike | None = None) -> Path | None:
    """The weights file to use, or None when it is not on disk. Never downloads."""
    for candidate in _candidates(spec, path):
        if candidate.is_file():
            return candidate
    return None


def missing_weights_message(spec: BackboneWeights, path: str | os.PathLike | None = None) -> str:
    """One message saying what was looked for, where, and where to put the file."""
    looked = ", ".join(str(p) for p in _candidates(spec, path))
    return (
        f"{spec.name} weights not found (looked for: {looked}). Nothing is downloaded at run time: "
        f"put the file {spec.filename} (from {spec.url}) into {checkpoints_dir()} "
        f"(that is $TORCH_HOME/hub/checkpoints), or set {spec.env_var}=/path/to/{spec.filename}."
    )


def load_backbone_state_dict(spec: BackboneWeights, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """Load the torchvision state dict of ``spec`` from disk; MissingWeightsError when absent."""
    found = find_weights(spec, path)
    if found is None:
        raise MissingWeightsError(missing_weights_message(spec, path))
    try:
        state = torch.load(found, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: name it
        raise MissingWeightsError(f"could not read {spec.name} weights from {found}: {exc}") from exc
    if not isinstance(state, dict):
        raise MissingWeightsError(f"{found} does not hold a state dict (got {type(state).__name__})")
    return state
