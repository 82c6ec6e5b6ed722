"""Named training set-ups for the recipes: ``paper`` (fastMRI, GPU), ``demo`` (embedded demo data, 2 CPU cores)
and ``tiny`` (tests).

``paper`` follows the Kronecker paper's official code (Whethe/HyperKron-MRI-Recon,
``options/*/train_*.json``): 320×320 centre crops, the 20 central slices of each volume, batch 8, Adam lr 2e-4,
MultiStepLR ×0.5 at steps 50k, 70k, 90k, 100k and 110k (the official configuration sets no end; we stop at
120 k), EMA 0.999, composite loss α 15 / β 0.1 / γ 0.0025 (γ > 0 needs the VGG19 weights on disk), SwinMR
trained on random 192×192 patches and the U-Nets on whole slices, a validation and a checkpoint every 5 k
steps; its U-Net is the paper's DDPM-style ``unet_ddpm`` (fastMRI's U-Net keeps the family ``unet``). It runs
8× (the official configurations' acceleration) and 4×, under the ``paper`` protocol by default.

``demo`` is sized so that ``make demo`` (eight trained models plus zero-filling, set-up included) takes under
20 minutes on 2 CPU cores: 96×96 crops of a demo dataset of 30 short volumes (8 slices each, so that ~15
training volumes bring 15 different anatomies and phase maps), small model widths, 600–1,600 steps per model,
two runs at a time (``jobs``), and γ = 0 (no VGG19 weights are shipped; the perceptual term is off and the table
says so). Four choices make such short runs learn, all stated in the table: the learning rate is 1e-3 (5× the
paper's; the runs are ~100× shorter), every training sample is flipped at random and gets a random global
phase (both exact for MRI data, see :func:`kronify.mri.training.data_module.rotate_phase`; without them a network
overfits the few training volumes), and every model is wrapped in
:class:`kronify.mri.training.wrappers.ZeroFilledStart` so it starts from the zero-filled image instead of from a
random output. Numbers from it are pipeline checks on brain images, not a reproduction of the paper.
:data:`DEMO_NOTES` (``Preset.notes``, printed in the table) points to docs/results/demo_setup.md, which states
every other choice and what was measured.

``tiny`` uses the same switches at toy sizes (tests). ``demo`` and ``tiny`` use the ``fastmri`` protocol by
default (fastMRI's own transforms are what the demo data's format stands for); both run under either protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from kronify.mri.data.augment import AugmentConfig
from kronify.mri.paper import COMPRESSED_ROWS, TABLE1_ROWS

__all__ = ["DEMO_NOTES", "FAMILIES", "PRESETS", "ModelSpec", "Preset", "get_preset"]

#: Model families a recipe can train (the zoo's dense architectures).
FAMILIES = ("unet", "unet_ddpm", "swinmr", "modl", "lbunet", "efficient_unet")

@dataclass(frozen=True)
class ModelSpec:
    """A zoo model and how long to train it within a preset."""

    zoo_name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    max_steps: int | None = None  # None: the preset's max_steps
    correction: bool = False  # the network predicts a correction to its input (fastMRI's U-Net does not add it)
    train_patch: int | None = None  # train on random patch x patch windows of each slice (None: whole slices)
    start_gain: float = 0.0  # initial gain of kronify.mri.training.wrappers.ZeroFilledStart (presets that use it)


@dataclass(frozen=True)
class Preset:
    """Everything a recipe needs besides the data root and the model variant."""

    name: str
    description: str
    crop: int
    batch_size: int  # global (split over processes)
    max_steps: int
    milestones_frac: tuple[float, ...]  # MultiStepLR milestones as fractions of the model's max_steps
    val_every: int
    ckpt_every: int
    lr: float = 2e-4
    ema_decay: float = 0.999
    alpha: float = 15.0
    beta: float = 0.1
    gamma: float = 0.0025
    num_slices: int | None = 20
    num_workers: int = 0
    eval_batch_size: int = 8
    precision: str = "auto"
    models: dict[str, ModelSpec] = field(default_factory=dict)
    demo_build: dict[str, Any] | None = None  # kwargs of build_demo_dataset when no --data-path is given
    phase_augment: bool = False  # random global phase per training sample (kronify.mri.training.data_module.rotate_phase)
    zero_filled_start: bool = False  # wrap models in kronify.mri.training.wrappers.ZeroFilledStart
    accelerations: tuple[int, ...] = (4, 8)  # what table1 runs
    protocol: str = "fastmri"  # kronify.mri.protocol: "paper" or "fastmri"
    augment: AugmentConfig | None = None  # training slices augmented before masking (kronify.mri.data.augment)
    notes: tuple[str, ...] = ()  # the set-up's choices and what they were measured to give (printed by table1)
    schedule: str = "multistep"  # kronify.mri.training.schedules: "multistep" (milestones_frac) or "cosine"
    warmup_frac: float = 0.0  # cosine schedule: linear warm-up over this fraction of the model's steps
    jobs: int = 1  # runs trained at a time, one process each (kronify.mri.experiments.jobs; the recipes' --jobs)
    table_rows: tuple[str, ...] | None = None  # the rows recipes/table1.py runs by default (None: every row)

    def __post_init__(self) -> None:
        labels = [row[0] for row in TABLE1_ROWS] + [label for label, _ in COMPRESSED_ROWS]
        unknown = [label for label in self.table_rows or () if label not in labels]
        if unknown:
            raise ValueError(f"preset {self.name!r}: table_rows {unknown} are not rows of Table 1 ({labels})")
        if self.jobs < 1:
            raise ValueError(f"preset {self.name!r}: jobs must be >= 1, got {self.jobs}")

    def warmup_steps(self, max_steps: int) -> int:
        """Warm-up steps of the cosine schedule for a run of ``max_steps`` steps."""
        return min(max_steps - 1, round(self.warmup_frac * max_steps)) if self.schedule == "cosine" else 0

    def model(self, family: str) -> ModelSpec:
        if family not in self.models:
            raise ValueError(f"preset {self.name!r} has no model for {family!r}; it has {sorted(self.models)}")
        return self.models[family]

    def steps_for(self, family: str) -> int:
        return self.model(family).max_steps or self.max_steps

    def milestones(self, max_steps: int) -> list[int]:
        """MultiStepLR milestones (step counts) for a run of ``max_steps`` steps."""
        return sorted({max(1, round(f * max_steps)) for f in self.milestones_frac if round(f * max_steps) < max_steps})


PAPER = Preset(
    name="paper",
    description="the paper's set-up on fastMRI single-coil knee (320x320, batch 8, 120k steps; for GPUs)",
    crop=320,
    batch_size=8,
    max_steps=120_000,
    milestones_frac=tuple(m / 120_000 for m in (50_000, 70_000, 90_000, 100_000, 110_000)),
    val_every=5_000,
    ckpt_every=5_000,
    num_workers=8,
    eval_batch_size=8,
    models={
        "unet": ModelSpec("unet"),
        "unet_ddpm": ModelSpec("unet_ddpm"),
        "swinmr": ModelSpec("swinmr_paper", train_patch=192),
        "modl": ModelSpec("modl"),
        "lbunet": ModelSpec("lbunet"),
        "efficient_unet": ModelSpec("efficient_unet"),
    },
    accelerations=(8, 4),
    protocol="paper",
)

#: The demo preset's notes in table1.md; the choices and their measurements are in docs/results/demo_setup.md.
DEMO_NOTES = (
    "Demo set-up: every choice (steps and widths per model, flips, SwinMR's patches, the LB U-Net's size, two runs "
    "at a time) and what it was measured to give, with the levers measured and not used: docs/results/demo_setup.md.",
)

DEMO = Preset(
    name="demo",
    description="CPU demo on the embedded demo data (brain, not knee): 96x96 crops, small models, minutes",
    crop=96,
    batch_size=4,
    max_steps=600,
    milestones_frac=(0.7, 0.9),
    val_every=200,
    ckpt_every=200,
    lr=1e-3,
    gamma=0.0,
    num_slices=None,
    eval_batch_size=16,
    precision="32-true",
    models={
        "unet": ModelSpec("unet_demo", {"chans": 16}, 1600, correction=True),
        "unet_ddpm": ModelSpec("unet_ddpm_demo", {}, 300, correction=True),
        "swinmr": ModelSpec("swinmr_demo", {}, 1000, train_patch=48),
        "modl": ModelSpec("modl_demo", {"iterations": 2, "features": 32, "denoiser_out_init": 0.01}, 1000,
                          start_gain=1.0),
        "lbunet": ModelSpec("lbunet", {}, 1200),
        "efficient_unet": ModelSpec("efficient_unet", {}, 600),
    },
    demo_build={"cases": 30, "seed": 0, "crop": 128, "slices": 8},
    accelerations=(4,),
    phase_augment=True,
    zero_filled_start=True,
    augment=AugmentConfig.flips_only(),
    notes=DEMO_NOTES,
    jobs=2,
    table_rows=("LB U-Net", "Efficient U-Net", "U-Net (fastMRI)", "Kronecker U-Net (fastMRI)",
                "Kron U-Net (compressed from the trained U-Net)", "SwinMR", "Kronecker SwinMR", "MoDL",
                "Kronecker MoDL", "Kron MoDL (compressed from the trained MoDL)"),
)

TINY = Preset(
    name="tiny",
    description="seconds-long runs for tests (any small data, crop 32)",
    crop=32,
    batch_size=2,
    max_steps=4,
    milestones_frac=(0.5,),
    val_every=2,
    ckpt_every=2,
    lr=1e-3,
    gamma=0.0,
    num_slices=None,
    eval_batch_size=4,
    precision="32-true",
    models={
        "unet": ModelSpec("unet_demo", {"chans": 4, "num_pool_layers": 2}, correction=True),
        "unet_ddpm": ModelSpec("unet_ddpm_tiny", correction=True),
        "swinmr": ModelSpec("swinmr_demo", {"embed_dim": 8, "depths": (1,), "num_heads": (2,)}),
        "modl": ModelSpec("modl_demo", {"iterations": 1, "features": 4}),
        "lbunet": ModelSpec("lbunet_small"),
        "efficient_unet": ModelSpec("efficient_unet", {"decoder_channels": (16, 16, 8, 8, 8)}),
    },
    demo_build={"cases": 6, "seed": 0, "crop": 32, "matrix": (64, 40), "slices": 6},
    accelerations=(4, 8),
    phase_augment=True,
    zero_filled_start=True,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (PAPER, DEMO, TINY)}


def get_preset(name: str, **changes: Any) -> Preset:
    """The named preset, with dataclass fields replaced by ``changes`` (None values are ignored)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(PRESETS[name], **changes) if changes else PRESETS[name]
