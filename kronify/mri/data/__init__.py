"""kronify.mri.data: the slices a model is trained and scored on. Import the module you need.

- :mod:`~kronify.mri.data.volumes`     scan a fastMRI single-coil folder (checked h5 volumes), split it by volume
- :mod:`~kronify.mri.data.datasets`    datasets of a split (train/val/test) and of an evaluation; their shared checks
- :mod:`~kronify.mri.data.transforms`  one slice -> an ``MRISample`` (mask, zero-filled input, target) per protocol
- :mod:`~kronify.mri.data.masks`       fastMRI's mask functions by acceleration; the fixed masks of the paper protocol
- :mod:`~kronify.mri.data.augment`     training-time augmentation of a slice before masking (``AugmentConfig``)
- :mod:`~kronify.mri.data.demo`        ``python -m kronify.mri.data.demo --out DIR``: the embedded demo dataset
- :mod:`~kronify.mri.data.demo_cases`  how one demo case is made (source volume, slab, image, header, file)
"""
