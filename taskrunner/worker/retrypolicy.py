"""When a failed webhook attempt is tried again: exponential backoff with full jitter.

The worker asks ``delay_ms`` after each attempt; None means no further attempt (the SQL
then records the delivery as failed, and a failed start fails its task).
"""

from __future__ import annotations

import random

from taskrunner.config import Config


def retry_delay_ms(attempt: int, config: Config) -> int | None:
    """Delay before the next attempt: exponential backoff with full jitter.

    None once ``attempt`` reached ``webhook_max_attempts`` (the SQL then gives up). At
    least 1 ms, so a retry is always scheduled strictly after the failed attempt.
    """
    if attempt >= config.webhook_max_attempts:
        return None
    cap = min(config.webhook_backoff_max, config.webhook_backoff_base * 2 ** (attempt - 1))
    return max(1, int(random.uniform(0, cap) * 1000))


def delay_ms(ok: bool, retryable: bool, attempt: int, config: Config) -> int | None:
    """The delay before trying attempt ``attempt`` again, or None when it is not retried:
    it succeeded, another attempt cannot help (``retryable`` is False), or it was the last."""
    if ok or not retryable:
        return None
    return retry_delay_ms(attempt, config)
