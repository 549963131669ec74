"""Cache policies and retry settings shared by the tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.tasks import exponential_backoff

from mimic.config import Config, config_from_dict

# network steps: 3 retries after the first attempt, waiting 2, 4, 8 s (plus jitter)
NETWORK_RETRIES = 3
NETWORK_DELAYS = exponential_backoff(backoff_factor=2)

HEAVY = {"persist_result": True, "result_serializer": "json", "cache_result_in_memory": False}


def content_cache(stage: str, key_of: Callable[[Config, dict[str, Any]], str]) -> Callable[[Any, dict[str, Any]], str]:
    """A ``cache_key_fn``: ``<stage>-<content key>``, the key computed from the task's parameters.

    Content only (no flow-run id, no output directory): any audit that needs the same step reuses
    it. The flow checks the cached files still exist and refreshes the cache when they do not.
    """

    def fn(context: Any, parameters: dict[str, Any]) -> str:
        cfg = config_from_dict(parameters["params"])
        return f"mimic-{stage}-{key_of(cfg, parameters)}"

    fn.__name__ = f"{stage}_cache_key"
    return fn


def retry_if_unavailable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a network task only when the service was unavailable (not for a missing bucket/object,
    bad credentials or refused input: a retry cannot fix those)."""
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
