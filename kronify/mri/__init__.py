"""kronify.mri: fastMRI single-coil reconstruction pipeline (data, demo data, metrics, losses, training).

Import-light on purpose: importing ``kronify.mri`` loads nothing heavy (no fastmri, h5py, nilearn);
import the submodules you need, e.g. ``from kronify.mri.data.volumes import build_datasets``.

- :mod:`kronify.mri.complex`  channel-first (2, H, W) <-> fastmri (..., H, W, 2) and small complex helpers
- :mod:`kronify.mri.data.volumes`     datasets on top of ``fastmri.data.SliceDataset``, the volume split, the transform
- :mod:`kronify.mri.data.masks`    fastMRI's own undersampling mask functions, by acceleration; the paper's fixed masks
- :mod:`kronify.mri.protocol` the two named protocols, ``paper`` (official HyperKron code) and ``fastmri``
- :mod:`kronify.mri.data.demo`     ``python -m kronify.mri.data.demo --out DIR``: fastMRI-format demo files (MNI152 brain)
"""
