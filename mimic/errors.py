"""Errors that are the user's to fix. The CLI prints them as one line and exits non-zero."""


class MimicError(Exception):
    """Base class for every user-facing error (bad input, bad config, diverged training)."""


class CheckpointError(MimicError):
    """A model file could not be loaded safely: wrong format, layout, keys, shapes or values."""


class DataError(MimicError):
    """A dataset is missing, empty, too small, corrupt or has the wrong layout."""


class ConfigError(MimicError):
    """A parameter is unknown or has an invalid value."""


def check_config(cond: bool, msg: str) -> None:
    """Raise :class:`ConfigError` with ``msg`` unless ``cond`` (the parameter sections' validation)."""
    if not cond:
        raise ConfigError(msg)


class TrainingDiverged(MimicError):
    """A loss became NaN or infinite; the last good checkpoint is kept."""


class StoreError(MimicError):
    """An artifact could not be stored or fetched: bad URI, missing bucket/object/credentials,
    a network failure that outlasted the retries, or a transfer that failed verification."""


class ServiceUnavailable(MimicError):
    """A network service (S3, MLflow) did not answer within the bounded retries. Local results are
    kept; running the same command again when the service is back resumes without recomputing."""


class StoreUnavailable(StoreError, ServiceUnavailable):
    """The S3 endpoint failed every attempt (connection errors, timeouts, 5xx, throttling)."""


class TrackingUnavailable(ServiceUnavailable):
    """The MLflow tracking server could not be reached or kept failing."""


class StageTimeout(MimicError):
    """A stage or a service step ran past its ``timeouts.*`` bound (hung, or slower than the bound allows).

    ``what``: ``"stage 'distill'"`` or ``"task 'fetch-teacher'"``; ``setting``: the key that raises the bound.
    """

    def __init__(self, what: str, seconds: float, setting: str = "timeouts.stage") -> None:
        self.what, self.seconds, self.setting = what, seconds, setting
        super().__init__(f"{what} exceeded {setting}={seconds:g} s; raise it with --set {setting}=SECONDS (0 = no limit)")

    def __reduce__(self):  # pickled by Prefect with the failed state: rebuild from the parts, not the message
        return (type(self), (self.what, self.seconds, self.setting))
