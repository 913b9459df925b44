"""The one place that maps errors to HTTP responses.

Every error body is ``{"error": "<short>", "details": ["<field>: <problem>", ...]}``, and
``details`` always names what caused it: the field, the id, the route or the state.
Domain errors from the state machine keep their status (400/404/409/503), with the status
words of a 409 spelt as the JSON spells them (``Success``, not ``success``); a value that
PostgreSQL refuses (``DataError``) is a 400; a database that cannot be reached within the
pool timeout, or a PUT /task the counter buffer refused, is a 503; anything unexpected is
a logged 500 that never leaks internals.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable

import falcon
import psycopg
import psycopg_pool

from taskrunner.api.counters import Refused
from taskrunner.api.validation import Invalid
from taskrunner.db import DomainError
from taskrunner.vocabulary import (
    DELIVERY_STATUSES,
    TASK_STATUSES,
    delivery_status_label,
    status_label,
)

log = logging.getLogger(__name__)


class ApiError(falcon.HTTPError):
    """An HTTP error with our body shape: a short message and per-field details."""

    def __init__(
        self,
        status: int,
        error: str,
        details: Iterable[str] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, title=error, headers=headers)
        self.details = list(details)


def bad_request(details: Iterable[str], error: str = "invalid input") -> ApiError:
    return ApiError(400, error, details)


def not_found(error: str, details: Iterable[str] = ()) -> ApiError:
    return ApiError(404, error, details)


def error_body(exc: falcon.HTTPError) -> dict:
    """The JSON body of any HTTP error, ours or one Falcon raised (404 route, 405, ...)."""
    details = getattr(exc, "details", None)
    if details is None:
        details = [exc.description] if exc.description else []
    title = exc.title or ""
    if title[:3].isdigit():  # Falcon's default titles are status lines: "404 Not Found"
        title = title[4:].lower()
    return {"error": title, "details": details}


def serialize_error(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
    """``app.set_error_serializer``: always JSON, whatever the client accepts."""
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(error_body(exc))


# Status words in the state machine's messages (SQL spells them in lower case). Task
# statuses are unambiguous words; a delivery status only where one is named ("delivery is
# queued", "only failed deliveries"), since "failed" is also an ordinary word.
_TASK_STATUS = re.compile(r"\b(" + "|".join(TASK_STATUSES) + r")\b")
_DELIVERY_STATUS = re.compile(
    r"\b(is|only) (" + "|".join(s for s in DELIVERY_STATUSES if s not in TASK_STATUSES) + r")\b"
)
_NOT_FOUND = re.compile(r"^(task|delivery) (\S+) not found$")


def json_spelling(text: str) -> str:
    """``task 1 is success`` -> ``task 1 is Success``: statuses as the JSON spells them."""
    text = _TASK_STATUS.sub(lambda m: status_label(m[1]), text)
    return _DELIVERY_STATUS.sub(lambda m: f"{m[1]} {delivery_status_label(m[2])}", text)


def _domain_details(exc: DomainError) -> list[str]:
    """The details of a state-machine error; one naming the id or the state when the SQL
    raised it with none."""
    if exc.details:
        return exc.details
    found = _NOT_FOUND.match(exc.message)
    if exc.status == 404 and found:
        return [f"id: no {found[1]} {found[2]}"]
    return [f"status: {exc.message}"] if exc.status == 409 else []


def _domain_error(req, resp, exc: DomainError, params) -> None:
    message, details = exc.message, _domain_details(exc)
    if exc.status == 409:  # only statuses and ids in these texts, never client input
        message, details = json_spelling(message), [json_spelling(d) for d in details]
    raise ApiError(exc.status, message, details) from exc


def _no_route(req, resp, exc: falcon.HTTPError, params) -> None:
    raise ApiError(404, "not found", [f"path: no route {req.method} {req.path}"]) from exc


def _method_not_allowed(req, resp, exc: falcon.HTTPError, params) -> None:
    allowed = (exc.headers or {}).get("Allow", "")
    detail = f"method: {req.method} {req.path} allows only {allowed}"
    raise ApiError(405, "method not allowed", [detail], headers={"Allow": allowed}) from exc


def _invalid(req, resp, exc: Invalid, params) -> None:
    raise bad_request(exc.details) from exc


def _bad_value(req, resp, exc: psycopg.Error, params) -> None:
    # a value PostgreSQL refuses (e.g. "\u0000" in a string): the client's input, not a bug
    raise bad_request([f"body: {exc.diag.message_primary or exc}"]) from exc


def _database_down(req, resp, exc: Exception, params) -> None:
    log.warning("database unavailable: %s", exc)
    raise ApiError(503, "database unavailable") from exc


def _counters_refused(req, resp, exc: Refused, params) -> None:
    # the PUT /task buffer is bounded: the client retries, nothing of its request was kept
    raise ApiError(503, exc.error, [exc.detail], headers={"Retry-After": "1"}) from exc


def _unexpected(req, resp, exc: Exception, params) -> None:
    log.exception("unhandled error on %s %s", req.method, req.path)
    raise ApiError(500, "internal error") from exc


def install(app: falcon.App) -> None:
    """Register the serializer and the handlers (Falcon picks the most specific class)."""
    app.set_error_serializer(serialize_error)
    app.add_error_handler(Exception, _unexpected)
    app.add_error_handler(falcon.HTTPRouteNotFound, _no_route)
    app.add_error_handler(falcon.HTTPMethodNotAllowed, _method_not_allowed)
    app.add_error_handler(DomainError, _domain_error)
    app.add_error_handler(Invalid, _invalid)
    app.add_error_handler(psycopg.DataError, _bad_value)
    app.add_error_handler(psycopg_pool.PoolTimeout, _database_down)
    app.add_error_handler(psycopg.OperationalError, _database_down)
    app.add_error_handler(Refused, _counters_refused)
