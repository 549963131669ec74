"""Retry settings of the network probes: the MLflow probe (``tasks.tracking.probe``) is the one Prefect-retried
step of tracking; S3 retries live in its client, DVC pushes in DVC's."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff

# 3 retries after the first attempt, waiting 2, 4, 8 s (plus jitter)
NETWORK_RETRIES = 3
NETWORK_DELAYS = exponential_backoff(backoff_factor=2)


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
