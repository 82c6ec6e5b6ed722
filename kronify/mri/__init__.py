"""kronify.mri: fastMRI single-coil reconstruction with kronify (data, training, experiments).

Import-light on purpose: importing ``kronify.mri`` or one of its subpackages loads nothing heavy (no fastmri,
h5py, nilearn, Lightning); import the module you need, e.g. ``from kronify.mri.data.datasets import build_datasets``.
Dependencies run one way: recipes -> zoo -> kronify.mri -> kronify (kronify.mri never imports zoo; the recipes
hand it ``zoo.build.build_run_model``).

Shared pieces:

- :mod:`kronify.mri.errors`     every error class kronify.mri raises on purpose
- :mod:`kronify.mri.protocol`   the two named protocols, ``paper`` (official HyperKron code) and ``fastmri``
- :mod:`kronify.mri.complex`    channel-first (2, H, W) <-> fastmri (..., H, W, 2), centred FFTs, magnitude
- :mod:`kronify.mri.losses`     the paper's composite loss (Charbonnier image + k-space, VGG19 perceptual)
- :mod:`kronify.mri.metrics`    SSIM/PSNR/NMSE (fastMRI's), phase error, LPIPS; the accumulator; table metrics
- :mod:`kronify.mri.lpips`      LPIPS (AlexNet) on magnitudes, offline weights only
- :mod:`kronify.mri.backbones`  where pretrained backbone weights (AlexNet, VGG19) are found offline
- :mod:`kronify.mri.paper`      the paper's Table 1 numbers, its rows and official configurations, written once

Subpackages (each ``__init__`` lists its modules):

- :mod:`kronify.mri.data`         volumes and splits, datasets, transforms, masks, augmentation, the demo data
- :mod:`kronify.mri.training`     the Lightning module, trainer, data module, checkpoints, EMA, schedules, wrappers
- :mod:`kronify.mri.experiments`  presets, one run (RunSpec), run folders (RunRecord), evaluation, studies over
  seeds, tables, statistics, jobs, figures, export
"""
