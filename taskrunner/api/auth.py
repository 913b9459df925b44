"""Optional bearer-token auth: with ``API_TOKEN`` set, every request needs
``Authorization: Bearer <token>`` except the probes and the API description."""

from __future__ import annotations

import hmac

import falcon

from taskrunner.api.errors import ApiError

# Liveness/readiness probes and Prometheus scrapes carry no token; the OpenAPI document
# describes the API and the web UI's files are code: neither holds data (the UI asks for
# the token and sends it on its API calls).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/ui", "/view"})
OPEN_PREFIX = "/ui/static/"


class BearerAuth:
    """Falcon middleware comparing the bearer token in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in OPEN_PATHS or req.path.startswith(OPEN_PREFIX):
            return
        header = req.get_header("Authorization") or ""
        scheme, _, credentials = header.partition(" ")
        if not header:
            problem = "Authorization: a bearer token is required"
        elif scheme.lower() != "bearer" or not credentials.strip():
            problem = "Authorization: must be 'Bearer <token>'"
        elif not hmac.compare_digest(credentials.strip().encode(), self._token):
            problem = "Authorization: the token is not valid"
        else:
            return
        raise ApiError(401, "unauthorized", [problem], headers={"WWW-Authenticate": "Bearer"})
