"""The paper's Table 1 and its official configurations, written once.

*Parameter-Efficient MRI Reconstruction via Kronecker Convolution With Phase Information Constraints* (Kronecker
U-Net / SwinMR / MoDL on fastMRI single-coil knee); official code Whethe/HyperKron-MRI-Recon.

- :data:`TABLE1_ROWS`: the rows recipes/table1.py trains: (label, model family, Kronecker n (0: dense), algebra);
  family None is zero-filling. :data:`COMPRESSED_ROWS`: rows of ours, a trained dense row compressed.
- :data:`TABLE1`: the paper's published values per row label (parameters in M, FLOPs in G, SSIM, PSNR and LPIPS
  as mean and std). Its text does not state the acceleration (the official configurations run 8x); it has no dense
  U-Net, SwinMR, MoDL, Kronecker MoDL, fastMRI U-Net or complex-algebra rows. (Its LB U-Net SSIM repeats the
  zero-filled value, as printed.)
- :data:`OFFICIAL_CONFIGS`: the official code's configurations the zoo builds, and the Table 1 row each one is
  reported as (``zoo.paper_reference`` counts them against :data:`TABLE1`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["COMPRESSED_ROWS", "OFFICIAL_CONFIGS", "TABLE1", "TABLE1_ROWS", "OfficialConfig", "PaperRow"]

#: The rows of recipes/table1.py: (label, family, Kronecker n (0: dense), algebra); family None is zero-filling.
TABLE1_ROWS: tuple[tuple[str, str | None, int, str], ...] = (
    ("Zero-filled", None, 0, "learned"),
    ("LB U-Net", "lbunet", 0, "learned"),
    ("Efficient U-Net", "efficient_unet", 0, "learned"),
    ("U-Net", "unet_ddpm", 0, "learned"),
    ("Kronecker U-Net", "unet_ddpm", 2, "learned"),
    ("U-Net (fastMRI)", "unet", 0, "learned"),
    ("Kronecker U-Net (fastMRI)", "unet", 2, "learned"),
    ("Kronecker U-Net (fastMRI, complex algebra)", "unet", 2, "complex"),
    ("SwinMR", "swinmr", 0, "learned"),
    ("Kronecker SwinMR", "swinmr", 2, "learned"),
    ("MoDL", "modl", 0, "learned"),
    ("Kronecker MoDL", "modl", 2, "learned"),
)

#: Rows that are not in the paper: a trained dense row compressed into its Kronecker model (recipes/compress.py,
#: kronify.mri.experiments.compress), as (label, the dense row it is compressed from).
COMPRESSED_ROWS: tuple[tuple[str, str], ...] = (
    ("Kron U-Net (compressed from the trained U-Net)", "U-Net (fastMRI)"),
    ("Kron MoDL (compressed from the trained MoDL)", "MoDL"),
)


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 1: parameters in millions and FLOPs in G (convention not stated; None for
    zero-filling), and the image metrics as (mean, std)."""

    label: str
    params_m: float | None
    gflops: float | None
    ssim: tuple[float, float] | None = None
    psnr: tuple[float, float] | None = None
    lpips: tuple[float, float] | None = None


# The paper's Table 1 (/work/shared/seeds/000_82e303a2590c0f8d.txt), in its order.
TABLE1: dict[str, PaperRow] = {r.label: r for r in (
    PaperRow("Zero-filled", None, None, ssim=(0.430, 0.130), psnr=(22.75, 1.73), lpips=(0.504, 0.058)),
    PaperRow("LB U-Net", 1.025, 2.512, ssim=(0.430, 0.130), psnr=(23.92, 2.54), lpips=(0.449, 0.067)),
    PaperRow("Efficient U-Net", 3.896, 1.039, ssim=(0.730, 0.083), psnr=(28.97, 2.41), lpips=(0.396, 0.066)),
    PaperRow("Kronecker SwinMR", 1.204, 41.649, ssim=(0.763, 0.073), psnr=(29.35, 2.35), lpips=(0.266, 0.048)),
    PaperRow("Kronecker U-Net", 2.630, 1.075, ssim=(0.762, 0.075), psnr=(29.78, 2.52), lpips=(0.274, 0.006)),
)}


@dataclass(frozen=True)
class OfficialConfig:
    """A configuration to count: zoo model `model`, dense (`n` None) or converted at `n` with the model's
    KRON_SETTINGS (plus `overrides`), reported in the paper's Table 1 as row `paper` (None: not in the table)."""

    label: str
    model: str
    n: int | None = None
    overrides: dict[str, Any] | None = None
    paper: str | None = None
    source: str = ""
    builder_kwargs: dict[str, Any] = field(default_factory=dict)


# SwinMR options: embed 120, depths 6×6, heads 6×6, window 8, mlp 2, 2 channels (`zoo.swinmr.swinmr_paper`).
# The official n = 4 SwinMR picks n per layer (`get_phn`): 4 where both widths divide by 4, else 2, so its
# 2-channel first and last convs run at n = 2; the overrides below do the same.
_SWIN_N4_FIRST_LAST = {"conv_first": {"n": 2}, "conv_last": {"n": 2}}

OFFICIAL_CONFIGS: tuple[OfficialConfig, ...] = (
    OfficialConfig("LB U-Net (our re-implementation)", "lbunet", paper="LB U-Net",
                   source="not in the official code; sized to the paper's count"),
    OfficialConfig("Efficient U-Net (our re-implementation)", "efficient_unet", paper="Efficient U-Net",
                   source="not in the official code; sized to the paper's count"),
    OfficialConfig("SwinMR (dense)", "swinmr_paper", source="options/SwinIR/train_swinMR_*.json"),
    OfficialConfig("Kronecker SwinMR, n = 2", "swinmr_paper", n=2, paper="Kronecker SwinMR",
                   source="options/SwinHyperIR/train_hyperswin_*.json"),
    OfficialConfig("Kronecker SwinMR, n = 4", "swinmr_paper", n=4, overrides=_SWIN_N4_FIRST_LAST,
                   paper="Kronecker SwinMR", source="options/SwinHyperIR/train_hyperswin_n=4_*.json"),
    OfficialConfig("DDPM U-Net (dense)", "unet_ddpm", source="options/UNET/train_unet_v2_*.json"),
    OfficialConfig("Kronecker DDPM U-Net, n = 2", "unet_ddpm", n=2, paper="Kronecker U-Net",
                   source="options/HyperUnet/train_hyperunet_*.json"),
)
