"""User-facing errors of the app: a bad option or input, found before anything heavy runs.

``slide-train`` prints these as one clear message, without a traceback.
"""


class SlideAppError(ValueError):
    """A configuration or input problem the user can fix; the message says what to change."""


class ModelDirError(SlideAppError, FileNotFoundError):
    """The model directory or one of its files (config, weights, tokenizer) is missing or unusable."""


class DataError(SlideAppError):
    """The data file is missing or malformed (the message names the line), or a sequence does not fit."""
