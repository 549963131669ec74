"""What the flows' tasks share: the retries of the network probes and the timeout of every task.

Retries: the MLflow probe (``tasks.tracking.probe``) is the one Prefect-retried step of tracking;
S3 retries live in its client, DVC pushes in DVC's.

Timeouts: every task is bounded by one key of the ``timeouts`` section (:data:`TIMEOUTS`), through
Prefect's own ``timeout_seconds``. The decorators carry the package defaults; a flow applies its
run's configuration with :func:`bounded` and calls a task with :func:`call`, which turns Prefect's
``TaskRunTimeoutError`` into a one-line :class:`~mimic.errors.StageTimeout` naming the task and the
setting that raises the bound. The stage tasks (``tasks.stages``) take ``timeouts.stage``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from prefect.tasks import exponential_backoff

# 3 retries after the first attempt, waiting 2, 4, 8 s (plus jitter)
NETWORK_RETRIES = 3
NETWORK_DELAYS = exponential_backoff(backoff_factor=2)

# task name -> the key of the ``timeouts`` section that bounds it (every task of tasks/ and flows/)
TIMEOUTS = {
    "fetch-teacher": "transfer", "admit": "transfer", "version-inputs": "transfer", "store-student": "transfer",
    "list-incoming": "transfer", "admit-teacher": "transfer",
    "probe-mlflow": "service", "open-mlflow-run": "service", "finish-mlflow-run": "service",
    "fail-mlflow-run": "service", "register-student": "service", "publish-artifacts": "service", "submit-audit": "service",
}


def retry_if_unavailable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only when the service was unavailable (not for bad names, permissions or refused input)."""
    from mimic.errors import MimicError, ServiceUnavailable

    try:
        state.result()
    except ServiceUnavailable:
        return True
    except MimicError:
        return False
    except Exception:  # noqa: BLE001 - unexpected client errors (e.g. connection resets) are retried
        return True
    return False


NETWORK = {"retries": NETWORK_RETRIES, "retry_delay_seconds": NETWORK_DELAYS, "retry_jitter_factor": 0.2,
           "retry_condition_fn": retry_if_unavailable}


@cache
def _defaults() -> Any:
    from mimic.config import load_config

    return load_config().timeouts


def setting(name: str) -> str:
    """The ``timeouts.*`` key that bounds the task ``name``."""
    return f"timeouts.{TIMEOUTS[name]}"


def timeout_of(name: str, timeouts: Any = None) -> float | None:
    """``timeout_seconds`` of the task ``name`` under ``timeouts`` (a ``TimeoutsConfig``; default: the
    package defaults); None when the key is 0 (no limit)."""
    return getattr(timeouts or _defaults(), TIMEOUTS[name]) or None


def bounded(task: Any, timeouts: Any, **options: Any) -> Any:
    """``task`` with the run's ``timeout_seconds`` (and any other Prefect ``options``, e.g. retries)."""
    seconds = timeout_of(task.name, timeouts)
    t = task.with_options(timeout_seconds=seconds, **options)
    if seconds is None:  # 0 = no limit; with_options reads None as "keep the decorator's"
        t.timeout_seconds = None
    return t


def call(task: Any, timeouts: Any, *args: Any, options: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """Run ``task`` bounded by ``timeouts`` and return its result; its error is raised as is, and a
    timeout as one line: ``task 'fetch-teacher' exceeded timeouts.transfer=3600 s; raise it with ...``."""
    from prefect.task_engine import TaskRunTimeoutError

    t = bounded(task, timeouts, **(options or {}))
    state = t(*args, return_state=True, **kwargs)
    try:
        return state.result()
    except TaskRunTimeoutError:
        from mimic.errors import StageTimeout

        raise StageTimeout(f"task '{task.name}'", t.timeout_seconds, setting(task.name)) from None
