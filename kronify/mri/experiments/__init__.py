"""kronify.mri.experiments: from settings to tables. Import the module you need.

- :mod:`~kronify.mri.experiments.presets`     named set-ups (``paper``, ``demo``, ``tiny``): sizes, steps, models
- :mod:`~kronify.mri.experiments.run`         one run: ``train_and_test`` and the train-and-test call of a ``RunSpec``
- :mod:`~kronify.mri.experiments.run_folder`  the only reader/writer of a run folder (``RunRecord``, ``write_run``)
- :mod:`~kronify.mri.experiments.evaluate`    zero-filled baseline, example slices, ``evaluate_run`` on any folder
- :mod:`~kronify.mri.experiments.study`       rows trained over seeds and their paired comparisons
- :mod:`~kronify.mri.experiments.statistics`  summaries over seeds, paired tests over volumes, Welch over seeds
- :mod:`~kronify.mri.experiments.jobs`        several runs side by side, each in its own process
- :mod:`~kronify.mri.experiments.figures`     reconstruction, comparison, curves and error-bar figures
- :mod:`~kronify.mri.experiments.export`      reconstructions in fastMRI's submission layout
"""
