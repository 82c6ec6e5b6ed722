"""Training-time augmentation of a complex image slice, applied BEFORE the slice is undersampled.

The demo data cut from one template volume are too few for a U-Net not to overfit; each training slice is
therefore varied anew every time it is drawn. The caller augments the (fully sampled) complex image, then
simulates k-space from it and masks that, so the network sees a consistent input/target pair.

Levers (each strength 0 switches that lever off; ``AugmentConfig(enabled=False)`` switches them all off):

- ``flip``: probability of flipping the rows, and independently the columns (exact ``torch.flip``);
- ``rotation_deg``, ``zoom``, ``elastic``: one resampling (``grid_sample``, bilinear, zeros outside the
  field of view) by a rotation of U(-r, r) degrees, a scale of U(1 - z, 1 + z) (> 1 magnifies) and a smooth
  random displacement whose std is ``elastic`` pixels (a ``elastic_grid`` x ``elastic_grid`` normal grid,
  bicubically upsampled);
- ``gamma``: magnitude m -> max(m) (m / max(m)) ** g with log g ~ U(-gamma, gamma); the phase is kept;
- ``bias``: multiply by a smooth positive field exp(bias * f), f a smooth random field of about unit std;
- ``phase``: multiply by exp(i * phase * f), a smooth random phase map (radians of std);
- ``noise``: add complex white Gaussian noise whose std per channel is U(0, noise) * max magnitude.

They are applied in that order. :func:`draw_params` draws every random number from a ``torch.Generator``
and :func:`apply_params` applies them, so a given seed always gives the same augmentation and the drawn
parameters can be inspected; :class:`SliceAugment` is the callable a dataset transform holds.
Images are complex ``(H, W)`` tensors or real channel-first ``(2, H, W)`` tensors (the project's layout);
the output has the input's shape and dtype.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from kronify.mri.complex import from_complex, to_complex

__all__ = ["AugmentConfig", "AugmentParams", "SliceAugment", "apply_params", "draw_params", "smooth_field", "warp"]


@dataclass(frozen=True)
class AugmentConfig:
    """Per-lever strengths (0 = off) and a master switch; see the module docstring for their meaning."""

    enabled: bool = True
    flip: float = 0.5
    rotation_deg: float = 10.0
    zoom: float = 0.1
    elastic: float = 1.0
    elastic_grid: int = 5
    gamma: float = 0.2
    bias: float = 0.2
    phase: float = 1.0
    noise: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "enabled" and (not math.isfinite(value) or value < 0):
                raise ValueError(f"AugmentConfig.{f.name} must be a finite number >= 0, got {value}")
        if self.flip > 1:
            raise ValueError(f"AugmentConfig.flip is a probability, got {self.flip}")
        if self.zoom >= 1:
            raise ValueError(f"AugmentConfig.zoom must be < 1 (scale U(1 - zoom, 1 + zoom)), got {self.zoom}")
        if self.elastic_grid < 2:
            raise ValueError(f"AugmentConfig.elastic_grid must be >= 2, got {self.elastic_grid}")

    def describe(self) -> str:
        """The levers that are on, e.g. ``"flip 0.5, rotation_deg 10"`` (``"off"`` when none is)."""
        on = [f"{f.name} {getattr(self, f.name):g}" for f in fields(self)
              if f.name not in ("enabled", "elastic_grid") and getattr(self, f.name) > 0]
        return ", ".join(on) if self.enabled and on else "off"

    @classmethod
    def flips_only(cls, p: float = 0.5) -> AugmentConfig:
        """Random row and column flips (each with probability ``p``) and nothing else: exact, free, and in the
        demo's measurements the lever that helped longer runs most (docs/results/demo_table1.md)."""
        return cls(flip=p, rotation_deg=0.0, zoom=0.0, elastic=0.0, gamma=0.0, bias=0.0, phase=0.0, noise=0.0)

    @classmethod
    def off(cls) -> AugmentConfig:
        """Every lever off (the identity)."""
        return cls(enabled=False)


@dataclass
class AugmentParams:
    """Everything drawn for one sample; ``None`` / neutral values mean that lever does nothing."""

    flip_rows: bool = False
    flip_cols: bool = False
    angle_deg: float = 0.0
    scale: float = 1.0
    displacement: Tensor | None = None  # (2, H, W) pixels, (column, row) offsets of the sampling position
    gamma: float = 1.0
    log_bias: Tensor | None = None  # (H, W)
    phase: Tensor | None = None  # (H, W) radians
    noise: Tensor | None = None  # (H, W) complex, in units of the image's maximum magnitude


def smooth_field(shape: tuple[int, int], grid: int, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """A smooth random (H, W) field of about unit std: a ``grid`` x ``grid`` standard-normal grid, bicubically
    upsampled (align_corners, so the grid's corners sit on the image's corners)."""
    coarse = torch.randn(1, 1, grid, grid, generator=generator, dtype=dtype)
    return F.interpolate(coarse, size=shape, mode="bicubic", align_corners=True)[0, 0]


def draw_params(config: AugmentConfig, shape: tuple[int, int], generator: torch.Generator | None = None) -> AugmentParams:
    """Draw one sample's augmentation for an image of ``shape`` (H, W) from ``generator`` (the global torch
    generator if None). The draws never depend on the image's values: a seed, a config and a shape fix them."""
    p = AugmentParams()
    if not config.enabled:
        return p

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    if config.flip > 0:
        p.flip_rows = uniform(0, 1) < config.flip
        p.flip_cols = uniform(0, 1) < config.flip
    if config.rotation_deg > 0:
        p.angle_deg = uniform(-config.rotation_deg, config.rotation_deg)
    if config.zoom > 0:
        p.scale = uniform(1 - config.zoom, 1 + config.zoom)
    if config.elastic > 0:
        p.displacement = config.elastic * torch.stack(
            [smooth_field(shape, config.elastic_grid, generator) for _ in range(2)])
    if config.gamma > 0:
        p.gamma = math.exp(uniform(-config.gamma, config.gamma))
    if config.bias > 0:
        p.log_bias = config.bias * smooth_field(shape, 3, generator)
    if config.phase > 0:
        p.phase = config.phase * smooth_field(shape, 3, generator)
    if config.noise > 0:
        sigma = uniform(0, config.noise)
        p.noise = torch.complex(*(sigma * torch.randn(2, *shape, generator=generator)))
    return p


def warp(z: Tensor, angle_deg: float = 0.0, scale: float = 1.0, displacement: Tensor | None = None) -> Tensor:
    """Resample a complex (H, W) image: output(u) = input(R(-angle) u / scale + displacement(u)).

    u is a pixel's offset from the image centre in pixels, (column, row); R(a) turns the column axis toward
    the row axis by a degrees. Bilinear on the real and imaginary parts, zeros outside the field of view.
    """
    height, width = z.shape[-2:]
    real = z.real.dtype
    cols = torch.arange(width, dtype=real) + 0.5 - width / 2
    rows = torch.arange(height, dtype=real) + 0.5 - height / 2
    uy, ux = torch.meshgrid(rows, cols, indexing="ij")
    a = math.radians(angle_deg)
    sx = (math.cos(a) * ux + math.sin(a) * uy) / scale
    sy = (-math.sin(a) * ux + math.cos(a) * uy) / scale
    if displacement is not None:
        sx, sy = sx + displacement[0].to(real), sy + displacement[1].to(real)
    grid = torch.stack([sx / (width / 2), sy / (height / 2)], dim=-1)[None]  # grid_sample's (x, y) in [-1, 1]
    out = F.grid_sample(from_complex(z)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return to_complex(out[0])


def apply_params(image: Tensor, params: AugmentParams) -> Tensor:
    """Apply drawn parameters to a complex (H, W) or channel-first (2, H, W) image; same shape and dtype out."""
    channels_first = not image.is_complex()
    if channels_first and (image.dim() != 3 or image.shape[0] != 2):
        raise ValueError(f"expected a complex (H, W) or a real (2, H, W) image, got {tuple(image.shape)} "
                         f"{image.dtype}")
    if not channels_first and image.dim() != 2:
        raise ValueError(f"expected a complex (H, W) image, got shape {tuple(image.shape)}")
    z = to_complex(image) if channels_first else image

    if params.flip_rows:
        z = z.flip(-2)
    if params.flip_cols:
        z = z.flip(-1)
    if params.angle_deg != 0 or params.scale != 1 or params.displacement is not None:
        z = warp(z, params.angle_deg, params.scale, params.displacement)
    if params.gamma != 1:
        magnitude = z.abs()
        top = magnitude.max()
        if top > 0:
            z = torch.polar(top * (magnitude / top) ** params.gamma, z.angle())
    real = z.real.dtype
    if params.log_bias is not None:
        z = z * params.log_bias.to(real).exp()
    if params.phase is not None:
        z = z * torch.polar(torch.ones((), dtype=real), params.phase.to(real))
    if params.noise is not None:
        z = z + z.abs().max() * params.noise.to(z.dtype)
    return from_complex(z).to(image.dtype) if channels_first else z.to(image.dtype)


class SliceAugment:
    """Callable augmentation: ``aug(image)`` draws fresh parameters from its own generator for every call.

    ``SliceAugment(config, seed)`` replays the same sequence for the same seed; :meth:`reseed` restarts it,
    and ``aug(image, generator=g)`` draws from ``g`` instead (a per-sample seed, independent of the order in
    which samples are drawn). In a process other than the one that seeded it (a DataLoader worker, which
    would otherwise repeat its siblings' sequence) it first reseeds from ``seed`` and that process's
    ``torch.initial_seed()``, which differs per worker and epoch and follows ``torch.manual_seed``.
    """

    def __init__(self, config: AugmentConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else AugmentConfig()
        self.seed = seed
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random sequence from ``seed`` (in this process)."""
        self.generator.manual_seed(seed)
        self._pid = os.getpid()

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not self.config.enabled:
            return image
        if generator is None:
            if self._pid != os.getpid():
                self.reseed((self.seed * 1_000_003 + torch.initial_seed()) % 2**63)
            generator = self.generator
        return apply_params(image, draw_params(self.config, tuple(image.shape[-2:]), generator))
