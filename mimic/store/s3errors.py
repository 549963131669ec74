"""botocore / s3transfer failures -> one-line :class:`StoreError` / :class:`StoreUnavailable`.

Retrying is botocore's job (standard retry mode, see :mod:`mimic.store.s3`): by the time an
exception reaches this module every attempt has been made, so nothing here retries. botocore and
s3transfer are imported lazily (``import mimic.store`` never imports them).
"""

from __future__ import annotations

import builtins
from typing import Any

from mimic.errors import StoreError, StoreUnavailable
from mimic.store.base import one_line

# answers a retry may fix (botocore's standard mode retries them; after that the service is "unavailable")
_TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "SlowDown", "RequestThrottled",
    "RequestLimitExceeded", "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException",
    "InternalError", "ServiceUnavailable", "PriorRequestNotComplete", "RequestThrottledException",
})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
                           "InvalidToken", "ExpiredToken", "AccountProblem"})


def client_error(e: Any) -> tuple[int, str, str]:
    """(HTTP status, error code, message) of a botocore ClientError."""
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    err = e.response.get("Error", {})
    return status, str(err.get("Code", "")), one_line(err.get("Message", ""))


def http_reason(status: int, code: str, message: str) -> str:
    """``HTTP 503 SlowDown: Please reduce your request rate`` (parts that say nothing left out)."""
    text = f"HTTP {status}" + (f" {code}" if code and code != str(status) else "")
    return text + (f": {message}" if message else "")


def unwrap(e: BaseException) -> tuple[BaseException, bool]:
    """The botocore error inside the wrappers boto3/s3transfer add, and whether it was a stream
    error that s3transfer re-requested (``RetriesExceededError``)."""
    from boto3.exceptions import S3UploadFailedError

    streamed = False
    for _ in range(4):
        last = getattr(e, "last_exception", None)  # s3transfer / boto3 RetriesExceededError
        if isinstance(last, BaseException):
            e, streamed = last, True
        elif isinstance(e, S3UploadFailedError) and e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    return e, streamed


def network_errors() -> tuple[type[BaseException], ...]:
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    return (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError, ux.HTTPError,
            builtins.ConnectionError, TimeoutError)


def failure(e: BaseException, *, what: str, where: str, attempts: int, stream_attempts: int,
            bucket: str, endpoint: str) -> BaseException:
    """The one-line StoreError for ``e`` (returned, to be raised ``from e``); ``e`` itself when
    it is not a storage failure (a bug)."""
    from botocore import exceptions as bx

    cause, streamed = unwrap(e)
    if isinstance(cause, StoreError):
        return cause
    if isinstance(cause, bx.ClientError):
        status, code, message = client_error(cause)
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            tries = int(cause.response.get("ResponseMetadata", {}).get("RetryAttempts", attempts - 1)) + 1
            return StoreUnavailable(f"{where}: {what} failed after {tries} attempts: "
                                    f"{http_reason(status, code, message)}")
        if code == "NoSuchBucket":
            return StoreError(f"bucket '{bucket}' does not exist ({where} at {endpoint})")
        if status == 403 or code in _DENIED_CODES:
            return StoreError(f"{where}: access denied ({code or status}): check the credentials "
                              f"(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the bucket policy")
        if code in ("NoSuchKey", "NoSuchVersion") or status == 404:
            return StoreError(f"{where}: no such object")
        if status == 412 or code == "PreconditionFailed":
            return StoreError(f"{where}: the object changed during the {what}; run again")
        return StoreError(f"{where}: {what} failed: {http_reason(status, code, message)}")
    if type(cause).__name__ == "S3DownloadFailedError":  # s3transfer: a ranged GET's IfMatch failed
        return StoreError(f"{where}: the object changed during the {what}; run again")
    if isinstance(cause, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return StoreError(f"{where}: no usable AWS credentials ({one_line(cause)}): set AWS_ACCESS_KEY_ID and "
                          f"AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for an "
                          f"S3-compatible server")
    if isinstance(cause, network_errors()):
        n = stream_attempts if streamed else attempts
        return StoreUnavailable(f"{where}: {what} failed after {n} attempts: {one_line(cause) or type(cause).__name__}")
    if isinstance(cause, bx.BotoCoreError):
        return StoreError(f"{where}: {what} failed: {one_line(cause)}")
    if isinstance(cause, OSError):  # the local file, not the network (those are botocore errors above)
        name = f" {cause.filename}" if cause.filename else ""
        return StoreError(f"{where}: {what} failed: local file{name}: {cause.strerror or one_line(cause)}")
    return e
