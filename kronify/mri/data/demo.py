"""Embedded demo dataset in fastMRI single-coil format, built from a real MRI volume (no download).

``python -m kronify.mri.data.demo --out DIR [--nifti PATH] [--cases N|all] [--seed S] [--crop C] [--matrix H W] [--slices K]``
or :func:`build_demo_dataset` writes ``DIR/singlecoil_train/*.h5`` and ``DIR/singlecoil_val/*.h5`` that
``fastmri.data.SliceDataset(challenge="singlecoil")`` and :mod:`kronify.mri.data.datasets` read exactly like the real
fastMRI knee files: ``kspace`` complex64 (slices, H, W) with readout oversampling x2 (H = 2 x crop, like
fastMRI's 640 -> 320) and W slightly wider than the crop (like 368 -> 320), ``reconstruction_esc`` float32
(slices, crop, crop) = |centre crop of fastmri.ifft2c(kspace)|, an ISMRMRD XML ``ismrmrd_header``
(encoded/recon matrix size and field of view, encoding limits) and attrs ``acquisition``, ``max`` (max of
``reconstruction_esc``), ``norm`` (its Euclidean norm) and ``patient_id`` (the same attributes as the real
files; the demo notice is in the header's protocolName, in ``DIR/README.txt`` and in the manifest).

THIS IS BRAIN ANATOMY (the MNI152 T1 template shipped in the nilearn package, or the ``--nifti`` volume),
NOT KNEE, AND NOT FOR PUBLICATION NUMBERS. It exists so the whole pipeline can run without fastMRI.

How a case is made (all random draws come from ``--seed``):

- Geometry: every case is its own slab of ``slices`` consecutive source slices, axial, coronal or sagittal
  (sagittal only in one hemisphere, because the MNI template is left-right symmetric). Slabs of one
  orientation never overlap and keep a gap of ``GAP`` slices; slabs of different orientations are
  orthogonal. So no two cases share a slice, whatever split seed the loader uses later: a test case
  never shares a slice with a training case. The slab stays axis-aligned; each case gets its own in-plane
  rotation (+-10 deg), zoom (0.9-1.1) and shift, resampled with cubic splines onto the demo grid.
- Intensity: contrast gamma (0.8-1.25) and a smooth multiplicative bias field (+-~20%).
- Phase: a smooth random phase per case: a low-order polynomial background plus B0-like Gaussian blobs.
- Noise: complex Gaussian noise added in k-space (fastmri.fft2c convention, orthonormal), image SNR 20-40.
- About one case in six is labelled ``CORPDFS_FBK`` (with a darker contrast and lower SNR) so the
  loader's acquisition filter has something to remove.

Another anatomy (e.g. to test generalisation): ``python -m kronify.mri.data.demo --nifti PATH [--out DIR]`` runs the
same builder on any 3-D NIfTI volume. Without ``--out`` it writes ``./demo-<name>``; without ``--cases`` it
makes every disjoint slab that fits (``--cases all``). Its files are named ``<name>_s<seed>_<case>.h5`` and
their header names the source, so they never pass for the template's ``demo_s<seed>_<case>.h5``. Use the
trained run's ``--crop``/``--slices`` (the demo preset builds crop 128, 8 slices) to score it like the
demo's test volumes. The sagittal one-hemisphere rule is kept for any source (simple, and safe for a test
set). The default build (no ``--nifti``) is unchanged by this option.

Same parameters and seed give byte-identical files (no HDF5 timestamps, fixed write order). A manifest
``kronify_demo.json`` records the parameters and file hashes; a second build with the same parameters
reuses the files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kronify.mri.data.demo_cases import DEMO_PROTOCOL, case_image, header_xml, load_source, slab_slots, write_case

__all__ = ["NOTICE", "DemoBuild", "build_demo_dataset", "default_source", "demo_matrix", "main", "nifti_label"]

NOTICE = (
    "kronify demo data: brain anatomy from the MNI152 T1 template shipped in nilearn (or the given NIfTI), "
    "NOT knee and NOT fastMRI; synthetic phase and noise. For trying the pipeline only, not for publication numbers."
)
MANIFEST = "kronify_demo.json"  # same name as kronify.mri.data.volumes.DEMO_MANIFEST
FOLDERS = ("singlecoil_train", "singlecoil_val")
_MNI_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_VERSION = 1


@dataclass
class DemoBuild:
    """Result of :func:`build_demo_dataset`."""

    root: Path
    files: list[Path]
    reused: bool
    seconds: float
    bytes: int
    manifest: dict[str, Any]


def default_source() -> Path:
    """The MNI152 T1 template inside the installed nilearn package (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; install kronify[mri] or pass --nifti PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / _MNI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the MNI152 template {path} is missing from nilearn; pass --nifti PATH")
    return path


def demo_matrix(crop: int) -> tuple[int, int]:
    """k-space matrix for a crop: readout x2 oversampled, phase encoding 368/320 of the crop (fastMRI's ratio)."""
    width = int(math.ceil(crop * 368 / 320))
    return 2 * crop, width + (width % 2)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (POSIX flock; no locking where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Plan:
    """The source volume and each case's slab, drawn before anything is written."""

    vol: np.ndarray
    voxel: np.ndarray
    centre: np.ndarray
    pixel_mm: float
    slabs: list[tuple[str, int, int]]
    fat_suppressed: set[int]
    label: str = "demo"  # file names <label>_s<seed>_<case>.h5
    salt: str = ""  # mixed into patient_id (the source's hash for a --nifti build)
    protocol: str = DEMO_PROTOCOL


def _plan(source: Path, cases: int, seed: int, crop: int, slices: int, fov_mm: float, **naming: str) -> _Plan:
    pixel_mm = fov_mm / crop
    vol, voxel, centre, body = load_source(source, pixel_mm)
    slots = slab_slots(body, slices, centre)
    if cases > len(slots):
        raise ValueError(f"{source.name} has room for {len(slots)} disjoint slabs of {slices} slices, "
                         f"not {cases} cases; ask for fewer cases or fewer slices")
    rng = np.random.default_rng(seed)
    slabs = [slots[i] for i in rng.permutation(len(slots))[:cases]]
    return _Plan(vol, voxel, centre, pixel_mm, slabs, set(rng.permutation(cases)[: cases // 6].tolist()), **naming)


def _write_cases(
    out: Path, plan: _Plan, seed: int, crop: int, matrix: tuple[int, int], slices: int, fov_mm: float, verbose: bool,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Make and write every case; the files and a record per case for the manifest."""
    vol, voxel, centre, pixel_mm = plan.vol, plan.voxel, plan.centre, plan.pixel_mm
    for d in FOLDERS:
        (out / d).mkdir(parents=True, exist_ok=True)
    header = header_xml(matrix, crop, fov_mm, float(voxel.min()), slices, plan.protocol)
    files, records = [], []
    for case, slot in enumerate(plan.slabs):
        case_rng = np.random.default_rng([seed, case])
        fs = case in plan.fat_suppressed
        image = case_image(vol, voxel, centre, slot, slices, matrix, pixel_mm, case_rng, fs)
        image *= np.exp(case_rng.uniform(np.log(1e-4), np.log(5e-4))) / np.abs(image).max()  # fastMRI-like units
        snr = case_rng.uniform(12, 24) if fs else case_rng.uniform(20, 40)
        signal = np.abs(image)
        sigma = signal[signal > 0.1 * signal.max()].mean() / snr
        kspace = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(image, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
        noise = case_rng.standard_normal((2, *kspace.shape)) * (sigma / math.sqrt(2))
        kspace = (kspace + noise[0] + 1j * noise[1]).astype(np.complex64)
        rel = f"{FOLDERS[1] if case % 5 == 4 else FOLDERS[0]}/{plan.label}_s{seed}_{case:03d}.h5"
        acquisition = "CORPDFS_FBK" if fs else "CORPD_FBK"
        patient_id = hashlib.sha256(f"kronify-demo-{plan.salt}{seed}-{case}".encode()).hexdigest()
        write_case(out / rel, kspace, crop, header, acquisition, patient_id)
        files.append(out / rel)
        records.append({"file": rel, "acquisition": acquisition, "orientation": slot[0],
                        "source_slices": [slot[2], slot[2] + slices], "snr": round(float(snr), 2)})
        if verbose:
            print(f"  {rel}: {slot[0]} slab {slot[2]}-{slot[2] + slices - 1}, {acquisition}, SNR {snr:.1f}")
    return files, records


def nifti_label(path: str | os.PathLike) -> str:
    """A file-name-safe name for a NIfTI volume: its name without .nii/.nii.gz, other characters as ``_``."""
    name = Path(path).name
    for suffix in (".gz", ".nii"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "nifti"


def build_demo_dataset(
    out: str | os.PathLike,
    *,
    cases: int | None = 12,
    seed: int = 0,
    crop: int = 128,
    matrix: Sequence[int] | None = None,
    slices: int = 22,
    fov_mm: float = 200.0,
    nifti: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = False,
) -> DemoBuild:
    """Write the demo dataset into ``out`` (see the module docstring); reuse it when ``out`` already holds a
    complete build with the same parameters (unless ``force``).

    ``matrix`` is the k-space size (H, W), default :func:`demo_matrix` (crop) = (2 crop, ~1.15 crop).
    ``cases=None`` makes every disjoint slab that fits. With ``nifti`` (any 3-D volume) the files are named
    after it (:func:`nifti_label`) and the volume is checked before anything is written.
    """
    start = time.perf_counter()
    out = Path(out)
    matrix = tuple(int(m) for m in (matrix or demo_matrix(crop)))
    if len(matrix) != 2 or crop < 8 or matrix[0] < crop or matrix[1] < crop:
        raise ValueError(f"matrix {matrix} must be a pair >= crop {crop} (and crop >= 8)")
    if (cases is not None and cases < 1) or slices < 1 or fov_mm <= 0:
        raise ValueError(f"cases ({cases}), slices ({slices}) and fov_mm ({fov_mm}) must be positive")
    source = Path(nifti) if nifti is not None else default_source()
    if not source.is_file():
        raise FileNotFoundError(f"NIfTI volume {str(source)!r} does not exist (or is not a file)")
    source_sha256 = _sha256(source)
    naming: dict[str, str] = {}
    if nifti is not None:
        load_source(source, fov_mm / crop)  # a bad volume fails here, before the output folder is touched
        naming = {"label": nifti_label(source), "salt": f"{source_sha256[:16]}-",
                  "protocol": f"kronify demo from {source.name}: synthetic phase, noise and k-space, "
                              "not for publication numbers"}
    if cases is None:
        _, _, centre, body = load_source(source, fov_mm / crop)
        cases = len(slab_slots(body, slices, centre))
        if cases == 0:
            raise ValueError(f"{source.name} has no room for a slab of {slices} slices; ask for fewer slices")
    params = {
        "version": _VERSION, "cases": cases, "seed": seed, "crop": crop, "matrix": list(matrix),
        "slices": slices, "fov_mm": fov_mm, "source": source.name, "source_sha256": source_sha256,
    }
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out / ".kronify_demo.lock"):  # several processes (e.g. DDP ranks) may build the same folder
        manifest_path = out / MANIFEST
        old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        if old is not None and not force and old.get("params") == params:
            files = [out / f for f in old["files"]]
            sizes = [entry["bytes"] for entry in old["files"].values()]
            if all(f.is_file() and f.stat().st_size == size for f, size in zip(files, sizes)):
                return DemoBuild(out, files, True, time.perf_counter() - start, sum(sizes), old)
        listed = set(old["files"]) if old else set()
        present = [p for d in FOLDERS for p in sorted((out / d).glob("*.h5"))]
        foreign = [p for p in present if p.relative_to(out).as_posix() not in listed]
        if foreign:
            raise FileExistsError(f"{out} holds h5 files that are not from a kronify demo build, e.g. {foreign[0]}; "
                                  "choose an empty --out folder")
        plan = _plan(source, cases, seed, crop, slices, fov_mm, **naming)  # fails before the old build is touched
        for rel in listed:
            (out / rel).unlink(missing_ok=True)
        manifest_path.unlink(missing_ok=True)
        files, records = _write_cases(out, plan, seed, crop, matrix, slices, fov_mm, verbose)
        manifest = {
            "format": "kronify-demo", "notice": NOTICE, "params": params, "cases": records,
            "files": {f.relative_to(out).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in files},
        }
        (out / "README.txt").write_text(
            NOTICE + "\n\nBuilt by `python -m kronify.mri.data.demo`; parameters and file hashes in " + MANIFEST + ".\n"
            "Every case is a disjoint slab of the source volume, so no two cases share a slice.\n"
        )
        tmp = manifest_path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.replace(manifest_path)  # written last: a build that stopped half-way is never reused
        return DemoBuild(out, files, False, time.perf_counter() - start, sum(f.stat().st_size for f in files), manifest)


def _cases_arg(text: str) -> int | str:
    """``--cases``: a positive number or ``all``."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m kronify.mri.data.demo --out DIR ...``."""
    parser = argparse.ArgumentParser(prog="python -m kronify.mri.data.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (gets singlecoil_train/ and singlecoil_val/); "
                        "required without --nifti, default ./demo-<name> with it")
    parser.add_argument("--nifti", default=None, help="source NIfTI volume, any 3-D MRI, e.g. another anatomy "
                        "(default: nilearn's MNI152 T1 template)")
    parser.add_argument("--cases", type=_cases_arg, default=None,
                        help="number of volumes, or 'all' for every disjoint slab that fits "
                             "(default 12; all with --nifti)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--crop", type=int, default=128, help="recon/crop size in pixels (default 128)")
    parser.add_argument("--matrix", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="k-space matrix (default: 2*crop x ~1.15*crop, fastMRI's 640x368 for crop 320)")
    parser.add_argument("--slices", type=int, default=22, help="slices per volume (default 22)")
    parser.add_argument("--fov-mm", type=float, default=200.0, help="field of view of the crop in mm (default 200)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an identical build exists")
    args = parser.parse_args(argv)
    if args.out is None and args.nifti is None:
        parser.error("--out DIR is required (it is optional only with --nifti)")
    out = args.out if args.out is not None else f"demo-{nifti_label(args.nifti)}"
    if args.cases is None:  # default: 12 cases of the template, every slab of a --nifti volume
        cases = None if args.nifti else 12
    else:
        cases = None if args.cases == "all" else args.cases
    print(NOTICE)
    try:
        build = build_demo_dataset(out, cases=cases, seed=args.seed, crop=args.crop, matrix=args.matrix,
                                   slices=args.slices, fov_mm=args.fov_mm, nifti=args.nifti, force=args.force,
                                   verbose=True)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    state = "reused existing build in" if build.reused else "wrote"
    print(f"{state} {build.root}: {len(build.files)} files, {build.bytes / 1e6:.1f} MB, {build.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
