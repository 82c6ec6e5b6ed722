"""The two named evaluation protocols, ``paper`` and ``fastmri``: how a slice becomes a sample and how it is scored.

Both start from the same complex target, the centre crop of ``fastmri.ifft2c(kspace)`` (320x320 on fastMRI
knee; its magnitude is the file's ``reconstruction_esc``). They differ in everything after that:

============================  =====================================  =========================================
                              ``paper`` (the official HyperKron code)  ``fastmri`` (fastMRI's transforms)
============================  =====================================  =========================================
acquisitions                  PD only (``CORPD_FBK``)                 PD only (``CORPD_FBK``)
k-space that is masked        the FFT of the cropped target image     the raw k-space, full width (e.g. 368)
zero-filled input             ``ifft2c(mask * fft2c(crop))``          crop of ``ifft2c(mask * kspace)``
normalisation (``scale``)     max \\|target\\| of the slice              max \\|zero-filled\\| of the slice
masks                         ONE fixed mask, train and test          random per training sample, seeded
                              (RandomMaskFunc, seed 0, saved)         per file for validation/test
training subsets              by slice                                by volume
metrics                       per slice, data range = that            per volume, data range = the evaluated
                              slice's target max; mean over slices    target volume's max; mean over volumes
============================  =====================================  =========================================

The official code's fixed masks (``mask/fastmri/random/random_af{8,4,16}_cf*_pe320.npy``) are exactly
fastMRI's ``RandomMaskFunc`` with seed 0 over 320 columns: 39 lines at 8x (centre fraction 0.04), 81 at 4x
(0.08), 21 at 16x (0.02); ``tests/mri/test_protocol.py`` checks the 8x one column by column.

``paper`` needs the 320x320 complex slice the official code reads. Files whose image is not that size (the
embedded demo data: 128x128 brain slices cropped to 96) are handled the same way at their own size: the slice
is the preset's centre crop, normalised by its own max magnitude, and the fixed mask covers the crop's width.
Files without an ``acquisition`` attribute never match ``CORPD_FBK``; the demo files carry ``CORPD_FBK`` on
purpose so that both protocols run on them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PROTOCOLS", "Protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """What a protocol fixes. Every result (metrics.json, tables, figure titles) names it by :attr:`name`."""

    name: str
    title: str  # a short phrase for tables and figure titles
    mask_over: str  # "crop": columns of the cropped image's k-space; "kspace": columns of the raw k-space
    normalise_by: str  # "target": max |target| of the slice; "zero_filled": max |zero-filled| of the slice
    fixed_mask: bool  # default: one mask for every sample (train and test) instead of per-sample masks
    metric_scope: str  # "slice": per-slice data range, mean over slices; "volume": fastMRI's volume metrics
    train_subset: str  # "slice" or "volume": the unit data-efficiency subsets are drawn in
    mask_seed: int = 0  # seed of the fixed mask (the official masks are RandomMaskFunc with seed 0)


PAPER = Protocol(
    name="paper",
    title="paper protocol (official HyperKron code: fixed mask over the 320 crop columns, per-slice metrics)",
    mask_over="crop",
    normalise_by="target",
    fixed_mask=True,
    metric_scope="slice",
    train_subset="slice",
)

FASTMRI = Protocol(
    name="fastmri",
    title="fastMRI protocol (masks over the raw k-space width, per-volume metrics)",
    mask_over="kspace",
    normalise_by="zero_filled",
    fixed_mask=False,
    metric_scope="volume",
    train_subset="volume",
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (PAPER, FASTMRI)}


def get_protocol(protocol: str | Protocol) -> Protocol:
    """The protocol named ``protocol`` (a :class:`Protocol` is returned as is)."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol]
