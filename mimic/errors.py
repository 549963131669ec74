"""Errors that are the user's to fix. The CLI prints them as one line and exits non-zero."""


class MimicError(Exception):
    """Base class for every user-facing error (bad input, bad config, diverged training)."""


class CheckpointError(MimicError):
    """A model file could not be loaded safely: wrong format, layout, keys, shapes or values."""


class DataError(MimicError):
    """A dataset is missing, empty, too small, corrupt or has the wrong layout."""


class ConfigError(MimicError):
    """A parameter is unknown or has an invalid value."""


class TrainingDiverged(MimicError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class StoreError(MimicError):
    """An artifact could not be stored or fetched: bad URI, missing bucket/object/credentials,
    a network failure that outlasted the retries, or a transfer that failed verification."""
