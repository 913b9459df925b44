"""Keep-alive: the API keeps an idle connection open longer than whatever sits in front.

A real gunicorn (``taskrunner api``); one raw TCP connection sends a request, idles for
3 s (longer than gunicorn's own 2 s default) and sends another on the same socket, as a
pooled client or a load balancer does.
"""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest
from procs import free_port, running, service_env, wait_healthy

pytestmark = pytest.mark.slow

IDLE = 3.0  # seconds between the two requests: more than gunicorn's default of 2


def _get_health(conn: http.client.HTTPConnection) -> int | None:
    """GET /health on ``conn``; None when the server had closed the connection."""
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        return response.status
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return None


def _second_request_after_idling(db_url: str, tmp_path: Path, **extra: str) -> int | None:
    port = free_port()
    env = service_env(db_url, port, tmp_path, API_PROCESSES="1", **extra)
    with running(["api"], env):
        wait_healthy(f"http://127.0.0.1:{port}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            assert _get_health(conn) == 200
            sock = conn.sock
            time.sleep(IDLE)
            status = _get_health(conn)
            assert conn.sock is sock or status is None  # the same connection, not a new one
            return status
        finally:
            conn.close()


def test_an_idle_connection_is_still_served_after_the_old_default(
    db_url: str, tmp_path: Path
) -> None:
    assert _second_request_after_idling(db_url, tmp_path) == 200


def test_api_keepalive_sets_how_long_an_idle_connection_stays(db_url: str, tmp_path: Path) -> None:
    # the same exchange against a keep-alive shorter than the idle time: closed meanwhile
    assert _second_request_after_idling(db_url, tmp_path, API_KEEPALIVE="1") is None
