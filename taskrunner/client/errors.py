"""The exceptions of ``taskrunner.client``: an HTTP error answer carries the server's
``error``, ``details`` and status; a server out of reach is ``Unreachable``."""

from __future__ import annotations

from typing import Any


class TaskrunnerError(Exception):
    """Anything ``taskrunner.client`` raises."""


class Unreachable(TaskrunnerError):
    """No answer from the server (connection refused, reset, timed out), after retries
    where the call allows them."""


class ApiError(TaskrunnerError):
    """The server answered with an error: ``status``, its ``error`` and ``details``."""

    def __init__(
        self, status: int, error: str, details: list[str], method: str = "", url: str = ""
    ) -> None:
        self.status = status
        self.error = error
        self.details = details
        self.method = method
        self.url = url
        detail = f" ({'; '.join(details)})" if details else ""
        super().__init__(f"{method} {url}: {status} {error}{detail}".strip())


class BadRequest(ApiError):
    """400: bad input; ``details`` names each field as ``<field>: <problem>``."""


class Unauthorized(ApiError):
    """401: the server sets ``API_TOKEN`` and the token is missing or wrong."""


class NotFound(ApiError):
    """404: no such task, batch or delivery."""


class Conflict(ApiError):
    """409: the transition is illegal for the task's status (``details`` names it)."""


class Unavailable(ApiError):
    """503: the database is out of reach (or the counter buffer refused the update)."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    503: Unavailable,
}


def api_error(status: int, body: Any, method: str, url: str) -> ApiError:
    """The exception for an error answer; a body that is not the API's error object (a
    proxy's page, gunicorn's 414) becomes ``error`` text with no details."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        details = [str(d) for d in body.get("details") or []]
        error = body["error"]
    else:
        error, details = (str(body)[:200] if body else f"HTTP {status}"), []
    return _BY_STATUS.get(status, ApiError)(status, error, details, method, url)
