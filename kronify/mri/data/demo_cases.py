"""How one demo case is made (used by :mod:`kronify.mri.data.demo`): the source volume loaded and resampled
(:func:`load_source`), the slabs that fit it (:func:`slab_slots`), the ISMRMRD header (:func:`header_xml`), one
case's complex image (:func:`case_image`: geometry, contrast, bias field, phase) and its fastMRI-format file
(:func:`write_case`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

GAP = 3  # source slices left between two slabs of the same orientation


def load_source(path: Path, pixel_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Volume in RAS orientation, spline-prefiltered for cubic resampling; its voxel size, anatomy centre and
    anatomy mask (cached per file version and pixel size: filtering takes about a second)."""
    stat = path.stat()
    return _load_source_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size, pixel_mm)


@functools.lru_cache(maxsize=4)
def _load_source_cached(path: str, _mtime_ns: int, _size: int, pixel_mm: float) -> tuple[np.ndarray, ...]:
    import nibabel as nib
    from scipy import ndimage

    try:
        img = nib.as_closest_canonical(nib.load(path))
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(f"cannot read {path} as a NIfTI volume: {err}") from err
    vol = np.asarray(img.dataobj, dtype=np.float64)
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim == 2 or (vol.ndim == 3 and sorted(vol.shape)[0] == 1):
        raise ValueError(f"{path} is a 2-D image (shape {vol.shape}); a 3-D volume is needed to cut slabs from")
    if vol.ndim == 4:
        raise ValueError(f"{path} holds {vol.shape[3]} volumes (shape {vol.shape}); give a single 3-D volume")
    if vol.ndim != 3 or min(vol.shape) < 8 or not np.isfinite(vol).all() or vol.max() <= 0:
        reason = ("has non-finite values" if vol.ndim == 3 and not np.isfinite(vol).all() else
                  "has no positive intensity" if vol.ndim == 3 and min(vol.shape) >= 8 else
                  "needs 3 dimensions of at least 8 voxels")
        raise ValueError(f"{path} is not a usable 3D MRI volume (shape {vol.shape}): it {reason}")
    vol = np.clip(vol, 0, None) / vol.max()
    voxel = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    sigma = np.clip(0.42 * (pixel_mm / voxel - 1.0), 0.0, None)  # anti-alias before downsampling
    if sigma.max() > 0:
        vol = ndimage.gaussian_filter(vol, sigma)
    centre = np.array([np.average(np.arange(n), weights=vol.sum(axis=tuple(a for a in range(3) if a != i)))
                       for i, n in enumerate(vol.shape)])
    body = vol > 0.1 * vol.max()
    vol = ndimage.spline_filter(vol, order=3)
    for array in (vol, voxel, centre, body):
        array.setflags(write=False)
    return vol, voxel, centre, body


def slab_slots(body: np.ndarray, slices: int, centre: np.ndarray) -> list[tuple[str, int, int]]:
    """Disjoint slabs (orientation, axis, first slice) where the anatomy covers >= 20% of its largest area."""
    out = []
    for orientation, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        area = body.sum(axis=tuple(a for a in range(3) if a != axis))
        usable = np.nonzero(area >= 0.2 * area.max())[0]
        lo, hi = int(usable[0]), int(usable[-1]) + 1
        if orientation == "sagittal":  # one hemisphere only: a symmetric template mirrors the other
            hi = min(hi, int(centre[axis]) - 1)
        count = max(0, (hi - lo + GAP) // (slices + GAP))
        first = lo + ((hi - lo) - (count * (slices + GAP) - GAP)) // 2
        out += [(orientation, axis, first + k * (slices + GAP)) for k in range(count)]
    return out


DEMO_PROTOCOL = "kronify demo: MNI152 brain, NOT knee, not for publication numbers"


def header_xml(matrix: tuple[int, int], crop: int, fov_mm: float, slice_mm: float, num_slices: int,
                protocol: str = DEMO_PROTOCOL) -> bytes:
    """ISMRMRD header with the fields fastMRI parses (encoded/recon matrix, field of view, encoding limits)."""
    from xml.sax.saxutils import escape

    height, width = matrix
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <measurementInformation><protocolName>{escape(protocol)}</protocolName></measurementInformation>
  <acquisitionSystemInformation><systemVendor>kronify synthetic</systemVendor><receiverChannels>1</receiverChannels></acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>127730000</H1resonanceFrequency_Hz></experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>{height}</x><y>{width}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_mm * height / crop:.4f}</x><y>{fov_mm * width / crop:.4f}</y><z>{slice_mm:.4f}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{crop}</x><y>{crop}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>{fov_mm:.4f}</x><y>{fov_mm:.4f}</y><z>{slice_mm:.4f}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{width - 1}</maximum><center>{width // 2}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>{num_slices - 1}</maximum><center>{num_slices // 2}</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>
""".encode()


def case_image(
    vol: np.ndarray, voxel: np.ndarray, centre: np.ndarray, slot: tuple[str, int, int],
    slices: int, matrix: tuple[int, int], pixel_mm: float, rng: np.random.Generator, fat_suppressed: bool,
) -> np.ndarray:
    """Complex image (slices, H, W) of one case: resampled magnitude x bias field x exp(i phase)."""
    from scipy import ndimage

    _, axis, first = slot
    height, width = matrix
    row_axis, col_axis = {2: (1, 0), 1: (2, 0), 0: (2, 1)}[axis]  # rows: A->P or S->I, columns: L->R or P->A
    theta = np.deg2rad(rng.uniform(-10, 10))
    zoom = rng.uniform(0.9, 1.1)
    shift = rng.normal(0.0, 4.0, size=2)  # mm
    rows = (np.arange(height) - height // 2) * pixel_mm
    cols = (np.arange(width) - width // 2) * pixel_mm
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    u = (np.cos(theta) * rr - np.sin(theta) * cc) / zoom + shift[0]
    v = (np.sin(theta) * rr + np.cos(theta) * cc) / zoom + shift[1]
    coords = np.empty((3, slices, height, width))
    coords[axis] = (first + np.arange(slices))[:, None, None]
    coords[row_axis] = centre[row_axis] - u / voxel[row_axis]
    coords[col_axis] = centre[col_axis] + v / voxel[col_axis]
    mag = ndimage.map_coordinates(vol, coords, order=3, mode="constant", cval=0.0, prefilter=False)
    mag = np.clip(mag, 0.0, None) ** (rng.uniform(1.3, 1.6) if fat_suppressed else rng.uniform(0.8, 1.25))

    # normalised in-plane coordinates: +-1 across the phase-encoding field of view
    fov = pixel_mm * min(height, width) / 2
    y, x = rr / fov, cc / fov
    z = ((np.arange(slices) - slices / 2) / max(slices, 1))[:, None, None]
    poly = [np.ones_like(x), x, y, x * x, x * y, y * y]
    bias = sum(c * t for c, t in zip(rng.normal(0.0, 0.08, size=6), poly)) + rng.normal(0, 0.1) * z
    phase = rng.uniform(-np.pi, np.pi) + rng.normal(0.0, 0.5) * z
    phase = phase + sum(c * t for c, t in zip(rng.normal(0.0, [0, 1.0, 1.0, 0.5, 0.5, 0.5]), poly))
    for _ in range(3):  # B0-like off-resonance blobs
        cy, cx = rng.uniform(-0.6, 0.6, size=2)
        cz, width_b = rng.uniform(-0.5, 0.5), rng.uniform(0.08, 0.25)
        phase = phase + rng.normal(0.0, 1.5) * np.exp(
            -((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * width_b**2)
        )
    return mag * np.exp(bias) * np.exp(1j * phase)


def write_case(path: Path, kspace: np.ndarray, crop: int, header: bytes, acquisition: str, patient_id: str) -> None:
    """fastMRI single-coil h5 file; ``reconstruction_esc`` = |centre crop of fastmri.ifft2c(kspace)|."""
    import fastmri
    import h5py
    import torch
    from fastmri.data import transforms as T

    with torch.no_grad():
        image = fastmri.ifft2c(T.to_tensor(kspace))
        recon = fastmri.complex_abs(T.complex_center_crop(image, (crop, crop))).numpy().astype(np.float32)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as hf:
        hf.create_dataset("ismrmrd_header", data=np.bytes_(header), track_times=False)
        hf.create_dataset("kspace", data=kspace, track_times=False)
        hf.create_dataset("reconstruction_esc", data=recon, track_times=False)
        hf.attrs["acquisition"] = acquisition
        hf.attrs["max"] = float(recon.max())
        hf.attrs["norm"] = float(np.linalg.norm(recon))
        hf.attrs["patient_id"] = patient_id
    tmp.replace(path)
