"""kronify.mri.training.module: training one reconstruction model with Lightning. Import the module you need.

- :mod:`~kronify.mri.training.module`       ``ReconModule``: loss, Adam, schedule, EMA, validation and test metrics
- :mod:`~kronify.mri.training.trainer`      ``make_trainer``: step-based validation/checkpoints, logs, precision, DDP
- :mod:`~kronify.mri.training.data_module`  ``ReconDataModule``: exactly resumable, seeded training order; phase flips
- :mod:`~kronify.mri.training.checkpoint`   atomic ``last.ckpt`` writes and lookup
- :mod:`~kronify.mri.training.ema`          the EMA copy of the weights (warm-up), used for validation and testing
- :mod:`~kronify.mri.training.schedules`    learning-rate schedules (multistep, cosine with warm-up)
- :mod:`~kronify.mri.training.wrappers`     ``reconstruct`` (a model on a batch) and ``ZeroFilledStart``
"""
