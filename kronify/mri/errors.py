"""Every error kronify.mri raises on purpose; each message names the file, folder, flag or value at fault.

- :class:`DataError`: bad data files or a selection that does not fit them (kronify.mri.data).
- :class:`MissingWeightsError`: pretrained backbone weights needed but not on disk (kronify.mri.backbones).
- :class:`RunFolderError`: a run that cannot start: its folder already holds one, or the set-up does not fit the
  model (kronify.mri.experiments.run).
- :class:`RunError`: a finished run folder that cannot be read or evaluated (kronify.mri.experiments.run_folder).
- :class:`RecipeError`: a user-facing problem with a run's settings (bad flag combination, data that does not fit
  the preset); the recipes print it and exit with code 2.
"""

from __future__ import annotations

__all__ = ["DataError", "MissingWeightsError", "RecipeError", "RunError", "RunFolderError"]


class DataError(ValueError):
    """A problem with the data files or the selection; the message names the file or the value."""


class MissingWeightsError(FileNotFoundError):
    """Raised when a backbone's pretrained weights are needed but not found offline."""


class RunFolderError(ValueError):
    """A run that cannot start: its folder already holds one (without ``resume``), or the set-up does not fit
    the model; the message names the folder or the setting."""


class RunError(ValueError):
    """A run folder that cannot be evaluated; the message names the folder or file."""


class RecipeError(Exception):
    """A user-facing problem (bad flag combination, data that does not fit the preset); printed, exit code 2."""
