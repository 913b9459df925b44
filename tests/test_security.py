"""Security: the SSRF guard on webhooks, bearer-token auth, and every documented limit.

The SSRF table goes through the worker's real HTTP client (``webhooks.create_client``), so
it tests the path that counts: resolution, the check of every address, and the connect.
Host names under ``.test`` resolve through a fake ``getaddrinfo`` (no DNS needed).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpcore
import pytest
from conftest import create_batch, task_spec, webhook
from falcon import testing
from test_worker import (  # noqa: F401 (sink and start_worker are fixtures)
    attempts,
    deliveries,
    sink,
    start_worker,
    task_row,
    wait_until,
)

from taskrunner import netguard
from taskrunner.api.app import create_app
from taskrunner.api.counters import CounterBuffer
from taskrunner.api.validation import LIMITS
from taskrunner.config import Config
from taskrunner.worker import webhooks
from taskrunner.worker.webhooks import WorkItem

# -- fake DNS ----------------------------------------------------------------------------

FAKE_DNS = {
    "internal.test": ["10.1.2.3"],
    "mixed.test": ["93.184.216.34", "127.0.0.1"],  # one bad address is enough
    "v6private.test": ["fd12:3456::1"],
    "meta.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:10.0.0.1"],
    "public.test": ["93.184.216.34"],
    "app.corp.test": ["10.9.9.9"],
}
_real_getaddrinfo = socket.getaddrinfo


def _fake_getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list:
    name = host.decode() if isinstance(host, bytes) else host
    if name not in FAKE_DNS:
        return _real_getaddrinfo(host, port, *args, **kwargs)
    return [
        (
            socket.AF_INET6 if ":" in a else socket.AF_INET,
            socket.SOCK_STREAM,
            6,
            "",
            (a, int(port or 0), 0, 0) if ":" in a else (a, int(port or 0)),
        )
        for a in FAKE_DNS[name]
    ]


@pytest.fixture(autouse=True)
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _fake_getaddrinfo)


def item(url: str, event: str = "start") -> WorkItem:
    return WorkItem(uuid.uuid4(), uuid.uuid4(), event, 1, url, "POST", {"a": 1}, {})


def deliver(url: str, config: Config, event: str = "start") -> webhooks.WebhookResult:
    """One attempt through the worker's real client."""

    async def go() -> webhooks.WebhookResult:
        async with webhooks.create_client(config) as client:
            return await webhooks.call(client, item(url, event), config)

    return asyncio.run(go())


DENY = Config(webhook_timeout=2)
ALLOW_PRIVATE = Config(webhook_timeout=2, webhook_allow_private=True)

# -- SSRF: the table ---------------------------------------------------------------------

BLOCKED = [
    # (url, what the reason must say)
    ("http://127.0.0.1/hook", "127.0.0.1, a loopback address"),
    ("http://127.0.0.1:8085/task", "loopback"),
    ("https://127.0.0.1:8443/", "loopback"),
    ("http://127.1/", "127.1 resolves to 127.0.0.1, a loopback"),
    ("http://2130706433/", "2130706433 resolves to 127.0.0.1"),  # decimal
    ("http://0x7f000001/", "resolves to 127.0.0.1"),  # hex
    ("http://0x7f.1/", "0x7f.1 resolves to 127.0.0.1"),  # hex, short form
    ("http://017700000001/", "resolves to 127.0.0.1"),  # octal
    ("http://0177.0.0.1/", "invalid URL"),  # octal, dotted: httpx refuses to send it
    ("http://127.0.0.1./", "127.0.0.1, a loopback"),  # trailing dot
    ("http://localhost/", "localhost is a loopback name"),
    ("http://LOCALHOST./", "localhost is a loopback name"),
    ("http://api.localhost/", "loopback name"),
    ("http://[::1]/", "::1, a loopback address"),
    ("http://[0:0:0:0:0:0:0:1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "IPv4-mapped"),
    ("http://[::ffff:7f00:1]/", "IPv4-mapped"),
    ("http://[::ffff:93.184.216.34]/", "IPv4-mapped"),  # mapped public: still a trick
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://10.0.0.1/", "a private address"),
    ("http://172.16.5.4/", "a private address"),
    ("http://192.168.1.1/", "a private address"),
    ("http://100.64.0.1/", "non-public"),  # shared address space (CGNAT)
    ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
    ("http://169.254.170.2/v2/credentials", "cloud metadata address"),
    ("http://[fd00:ec2::254]/", "cloud metadata address"),
    ("http://100.100.100.200/", "cloud metadata address"),
    ("http://metadata.google.internal/computeMetadata/v1/", "cloud metadata host"),
    ("http://metadata.google.internal./", "cloud metadata host"),
    ("http://169.254.1.1/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),  # with a zone id
    ("http://[fc00::1]/", "unique-local"),
    ("http://[2002:7f00:1::]/", "embedding a loopback address (127.0.0.1)"),  # 6to4
    ("http://[64:ff9b::a00:1]/", "embedding a private address (10.0.0.1)"),  # NAT64
    # IPv6 forms that embed or translate to a refused IPv4 address (issue 13, item 9)
    ("http://[64:ff9b::a9fe:a9fe]/", "embedding a cloud metadata address (169.254.169.254)"),
    ("http://[64:ff9b:1::a9fe:a9fe]/", "embedding a cloud metadata address (169.254.169.254)"),
    ("http://[64:ff9b:1::7f00:1]/", "embedding a loopback address (127.0.0.1)"),  # RFC 8215
    ("http://[64:ff9b:1::5db8:d822]/", "a local-use NAT64 address"),  # layout unknowable
    ("http://[::169.254.169.254]/", "an IPv4-compatible IPv6 address (169.254.169.254)"),
    ("http://[::127.0.0.1]/", "an IPv4-compatible IPv6 address (127.0.0.1)"),
    ("http://[::7f00:1]/", "IPv4-compatible"),
    ("http://[::ffff:0:127.0.0.1]/", "an IPv4-translated IPv6 address (127.0.0.1)"),  # RFC 2765
    ("http://[::ffff:0:a9fe:a9fe]/", "IPv4-translated"),
    ("http://[2002:a9fe:a9fe::1]/", "embedding a cloud metadata address"),  # 6to4
    ("http://[2002:a00:1::1]/", "embedding a private address (10.0.0.1)"),  # 6to4
    # Teredo: client 127.0.0.1 (stored inverted), then server 127.0.0.1
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/", "embedding a loopback address"),
    ("http://[2001:0:7f00:1:8000:63bf:a2c9:cbdd]/", "embedding a loopback address (127.0.0.1)"),
    ("http://[2001:0:4136:e378:8000:63bf:5601:5601]/", "embedding a cloud metadata address"),
    ("http://[fec0::1]/", "a site-local address"),  # RFC 3879, deprecated
    ("http://[fec0:1:2::3%25eth0]/", "site-local"),
    ("http://224.0.0.1/", "multicast"),
    ("http://user:secret@127.0.0.1/", "loopback"),  # userinfo
    ("http://example.com@127.0.0.1/", "127.0.0.1, a loopback"),  # the host is after '@'
    ("http://127.0.0.1:80@internal.test/", "internal.test resolves to 10.1.2.3"),
    ("http://internal.test/", "internal.test resolves to 10.1.2.3, a private address"),
    ("http://INTERNAL.TEST./x", "internal.test resolves to 10.1.2.3"),
    ("http://mixed.test/", "mixed.test resolves to 127.0.0.1"),
    ("http://v6private.test/", "unique-local"),
    ("http://meta.test/", "meta.test resolves to 169.254.169.254, a cloud metadata"),
    ("http://mapped.test/", "IPv4-mapped"),
    ("http://%31%32%37.0.0.1/", "not a valid host name"),  # percent-encoded host
]


@pytest.mark.parametrize(("url", "reason"), BLOCKED)
def test_webhook_to_a_refused_address_is_blocked_and_not_retried(url, reason):
    result = deliver(url, DENY)
    assert not result.ok
    assert result.error.startswith(("blocked: ", "invalid URL: ")), result.error
    assert reason in result.error
    assert result.retryable is False


def test_cancel_actions_registered_by_a_start_response_are_guarded_too():
    result = deliver("http://169.254.169.254/cancel", DENY, event="cancel")
    assert result.error.startswith("blocked: ") and result.retryable is False


# Opened by WEBHOOK_ALLOW_PRIVATE=true (nothing listens there: the attempt is refused by
# the network, not by the guard) versus kept shut whatever it says.
@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/", "http://localhost:9/", "http://[::1]:9/", "http://0x7f.1:9/"],
)
def test_allow_private_opens_loopback_and_private_addresses(url):
    result = deliver(url, ALLOW_PRIVATE)
    assert not (result.error or "").startswith("blocked"), result.error
    assert result.retryable


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/",
        "http://metadata.google.internal/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://[64:ff9b:1::a9fe:a9fe]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://[::127.0.0.1]/",
        "http://[::ffff:0:127.0.0.1]/",
        "http://[2002:a9fe:a9fe::1]/",
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",
    ],
)
def test_allow_private_keeps_metadata_unspecified_and_mapped_addresses_shut(url):
    assert deliver(url, ALLOW_PRIVATE).error.startswith("blocked: ")


def test_allowlist_opens_exactly_the_listed_hosts_and_networks():
    policy = netguard.Policy.build(False, ["127.0.0.0/8", "internal.test", "*.corp.test", "[::1]"])
    assert asyncio.run(policy.vet("127.0.0.2", 80)) == ["127.0.0.2"]
    assert asyncio.run(policy.vet("::1", 80)) == ["::1"]
    assert asyncio.run(policy.vet("internal.test", 80)) == ["10.1.2.3"]
    assert asyncio.run(policy.vet("APP.corp.test.", 80)) == ["10.9.9.9"]
    for refused in ("10.0.0.1", "v6private.test", "169.254.169.254"):
        with pytest.raises(netguard.Blocked):
            asyncio.run(policy.vet(refused, 80))
    assert Config.from_env({"WEBHOOK_ALLOWLIST": "10.0.0.0/8, hooks.test"}).webhook_allowlist == [
        "10.0.0.0/8",
        "hooks.test",
    ]


def test_public_addresses_pass():
    policy = netguard.Policy()
    assert asyncio.run(policy.vet("public.test", 443)) == ["93.184.216.34"]
    assert asyncio.run(policy.vet("8.8.8.8", 53)) == ["8.8.8.8"]
    assert asyncio.run(policy.vet("2606:4700:4700::1111", 443)) == ["2606:4700:4700::1111"]
    # IPv6 forms leading to a public IPv4 address are as reachable as that address
    for public in ("64:ff9b::5db8:d822", "2002:5db8:d822::1"):
        assert asyncio.run(policy.vet(public, 443)) == [public]


class _Recorder(httpcore.AsyncNetworkBackend):
    """Records where the guard connects (and the TLS server name); never connects."""

    def __init__(self) -> None:
        self.connects: list[str] = []
        self.server_names: list[str | None] = []

    async def connect_tcp(self, host: str, port: int, **kwargs: Any) -> Any:
        self.connects.append(host)
        recorder = self

        class Stream(httpcore.AsyncNetworkStream):
            async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
                recorder.server_names.append(server_hostname)
                raise httpcore.ConnectError("recorded")

            async def aclose(self) -> None:
                pass

        return Stream()


def test_the_guard_connects_to_the_address_it_checked_and_keeps_sni(monkeypatch):
    """DNS rebinding: the name answers a public address to the check and loopback after;
    the guard resolves once and connects to the vetted address, never by name again. TLS
    still names the URL's host (SNI and certificate check)."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"], ["127.0.0.1"]])
    lookups: list[str] = []

    def rebinding(host, port, *args, **kwargs):
        if host == "rebind.test":
            lookups.append(host)
            FAKE_DNS["rebind.test"] = next(answers)
        return _fake_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    recorder = _Recorder()
    backend = netguard.GuardedBackend(netguard.Policy(), inner=recorder)
    pool = httpcore.AsyncConnectionPool(network_backend=backend)

    async def go() -> None:
        with pytest.raises(httpcore.ConnectError):
            await pool.request("GET", "https://rebind.test/hook")

    try:
        asyncio.run(go())
    finally:
        FAKE_DNS.pop("rebind.test", None)
    assert lookups == ["rebind.test"]
    assert recorder.connects == ["93.184.216.34"]
    assert recorder.server_names == ["rebind.test"]


def test_the_worker_client_sends_every_connection_through_the_guard():
    client = webhooks.create_client(DENY)
    transport = client._transport
    assert isinstance(transport, netguard.GuardedTransport)
    assert isinstance(transport._pool._network_backend, netguard.GuardedBackend)
    assert client.follow_redirects is False
    asyncio.run(client.aclose())


def test_names_that_do_not_resolve_are_a_retried_connection_error():
    result = deliver("http://no-such-host.invalid/", DENY)
    assert not result.ok and result.retryable
    assert not result.error.startswith("blocked")


# -- SSRF: the worker records a blocked delivery as final -------------------------------


def test_worker_fails_a_blocked_start_at_once_with_the_reason(conn, start_worker, sink):  # noqa: F811
    task_id = create_batch(conn, [task_spec("t", actions=[webhook(url=sink.url("/start"))])])["t"][
        "id"
    ]
    start_worker(webhook_allow_private=False)
    wait_until(lambda: task_row(conn, task_id)["status"] == "failure", "the task to fail")
    (delivery,) = deliveries(conn, task_id, "start")
    assert delivery["status"] == "failed"
    assert [a["error"] for a in attempts(conn, delivery["id"])] == [
        f"blocked: 127.0.0.1, a loopback address; {netguard._ALLOW_HINT}"
    ]
    assert task_row(conn, task_id)["failure_reason"].startswith(
        "start webhook failed: blocked: 127.0.0.1"
    )
    assert sink.hits == []


def test_worker_follows_the_allowlist_and_never_a_redirect(conn, start_worker, sink):  # noqa: F811
    sink.routes["/start"] = lambda hit: (302, None)  # Location: /redirected
    task_id = create_batch(conn, [task_spec("t", actions=[webhook(url=sink.url("/start"))])])["t"][
        "id"
    ]
    start_worker(webhook_allow_private=False, webhook_allowlist=["127.0.0.0/8"])
    wait_until(lambda: task_row(conn, task_id)["status"] == "failure", "the task to fail")
    assert [h.path for h in sink.hits] == ["/start"] * 3  # webhook_max_attempts, no redirect
    (delivery,) = deliveries(conn, task_id, "start")
    assert delivery["last_error"] == "HTTP 302"


# -- the API: obvious SSRF at creation, auth, limits ----------------------------------------


@pytest.fixture
def make_client(pool) -> Iterator[Any]:
    buffers: list[CounterBuffer] = []

    def make(**settings: Any) -> testing.TestClient:
        buffers.append(CounterBuffer(pool, interval=3600))
        return testing.TestClient(create_app(Config(**settings), pool, buffers[-1]))

    yield make
    for buffer in buffers:
        buffer.close()


def hook(url: str = "http://example.com/hook", **params: Any) -> dict:
    return {"kind": "Webhook", "params": {"url": url, "verb": "Post", **params}}


def spec(local_id: str = "a", **fields: Any) -> dict:
    return {"id": local_id, "name": local_id, "kind": "k", "on_start": hook(), **fields}


@pytest.mark.parametrize(
    ("url", "detail"),
    [
        ("http://127.0.0.1:9000/x", "[0].on_success[0].params.url: blocked: 127.0.0.1, a loopback"),
        ("http://2130706433/", "blocked: 2130706433 resolves to 127.0.0.1"),
        ("http://[::ffff:10.0.0.1]/", "IPv4-mapped"),
        ("http://[64:ff9b:1::a9fe:a9fe]/", "embedding a cloud metadata address"),
        ("http://[::127.0.0.1]/", "IPv4-compatible"),
        ("http://[::ffff:0:127.0.0.1]/", "IPv4-translated"),
        ("http://[fec0::1]/", "site-local"),
        ("http://169.254.169.254/", "cloud metadata address"),
        ("http://metadata.google.internal./", "cloud metadata host"),
        ("http://localhost:8085/", "loopback name"),
    ],
)
def test_api_refuses_literal_private_urls_at_creation(make_client, url, detail):
    result = make_client().simulate_post("/task", json=[spec(on_success=[hook(url)])])
    assert result.status_code == 400
    assert any(detail in d for d in result.json["details"]), result.json


def test_api_leaves_names_to_the_worker_and_honours_allow_private(make_client):
    # a name is resolved by the worker only (DNS can change between now and then)
    assert (
        make_client()
        .simulate_post("/task", json=[spec(on_start=hook("http://internal.test/"))])
        .status_code
        == 201
    )
    allowed = make_client(webhook_allow_private=True)
    assert (
        allowed.simulate_post(
            "/task", json=[spec(on_start=hook("http://127.0.0.1:9/"))]
        ).status_code
        == 201
    )
    listed = make_client(webhook_allowlist=["10.0.0.0/8"])
    assert (
        listed.simulate_post("/task", json=[spec(on_start=hook("http://10.1.1.1/"))]).status_code
        == 201
    )
    # metadata stays shut with allow_private
    shut = allowed.simulate_post("/task", json=[spec(on_start=hook("http://169.254.169.254/"))])
    assert shut.status_code == 400


TOKEN = "s3cret-token"


@pytest.mark.parametrize(
    ("headers", "detail"),
    [
        ({}, "Authorization: a bearer token is required"),
        ({"Authorization": f"Basic {TOKEN}"}, "Authorization: must be 'Bearer <token>'"),
        ({"Authorization": "Bearer"}, "Authorization: must be 'Bearer <token>'"),
        ({"Authorization": "Bearer wrong"}, "Authorization: the token is not valid"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "Authorization: the token is not valid"),
    ],
)
def test_without_the_token_every_data_route_is_401(make_client, headers, detail):
    client = make_client(api_token=TOKEN)
    some_id = str(uuid.uuid4())
    for method, path in [
        ("GET", "/task"),
        ("POST", "/task"),
        ("PUT", "/task"),
        ("GET", f"/task/{some_id}"),
        ("PATCH", f"/task/{some_id}"),
        ("DELETE", f"/task/{some_id}"),
        ("PATCH", f"/task/pause/{some_id}"),
        ("POST", f"/delivery/{some_id}/retry"),
        ("GET", "/no/such/route"),
    ]:
        result = client.simulate_request(method, path, headers=headers, json={})
        assert result.status_code == 401, (method, path)
        assert result.json == {"error": "unauthorized", "details": [detail]}
        assert result.headers["WWW-Authenticate"] == "Bearer"


def test_with_the_token_requests_pass_and_probes_never_need_it(make_client, monkeypatch):
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr("taskrunner.api.auth.hmac.compare_digest", spy)
    client = make_client(api_token=TOKEN)
    auth = {"Authorization": f"bearer {TOKEN}"}
    assert client.simulate_get("/task", headers=auth).status_code == 200
    assert client.simulate_post("/task", json=[spec()], headers=auth).status_code == 201
    assert compared == [(TOKEN.encode(), TOKEN.encode())] * 2  # constant-time comparison
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert client.simulate_get(path).status_code == 200, path
    # no token configured: no auth at all
    assert make_client().simulate_get("/task").status_code == 200


# -- limits: each one answered with a clear 4xx ------------------------------------------

L = LIMITS


def _over(chars: int) -> str:
    return "x" * (chars + 1)


def _post(tasks: Any) -> tuple[str, str, Any, dict]:
    return ("POST", "/task", tasks, {})


LIMIT_CASES = [
    # (limit name, request, status, a detail that must be in the answer)
    (
        "body_bytes",
        ("POST", "/task", "BIG", {}),
        413,
        f"body: must be at most {L['body_bytes']} bytes",
    ),
    (
        "batch_tasks",
        _post([spec(str(i)) for i in range(L["batch_tasks"] + 1)]),
        400,
        f"body: must have at most {L['batch_tasks']} items",
    ),
    ("name_chars", _post([spec(name=_over(L["name_chars"]))]), 400, "[0].name: must be at most"),
    ("kind_chars", _post([spec(kind=_over(L["kind_chars"]))]), 400, "[0].kind: must be at most"),
    ("local_id_chars", _post([spec(_over(L["local_id_chars"]))]), 400, "[0].id: must be at most"),
    (
        "url_chars",
        _post([spec(on_start=hook("http://example.com/" + _over(L["url_chars"])))]),
        400,
        "[0].on_start.params.url: must be at most 2048 characters",
    ),
    (
        "headers_entries",
        _post(
            [spec(on_start=hook(headers={f"H{i}": "v" for i in range(L["headers_entries"] + 1)}))]
        ),
        400,
        "[0].on_start.params.headers: must have at most 50 entries",
    ),
    (
        "header_name_chars",
        _post([spec(on_start=hook(headers={_over(L["header_name_chars"]): "v"}))]),
        400,
        "[0].on_start.params.headers: must be at most 256 characters",
    ),
    (
        "header_value_chars",
        _post([spec(on_start=hook(headers={"X-A": _over(L["header_value_chars"])}))]),
        400,
        "[0].on_start.params.headers.X-A: must be at most 8192 characters",
    ),
    (
        "actions_per_list",
        _post([spec(on_success=[hook()] * (L["actions_per_list"] + 1))]),
        400,
        "[0].on_success: must have at most 100 items",
    ),
    (
        "dependencies",
        _post([spec(dependencies=[{"id": str(uuid.uuid4())}] * (L["dependencies"] + 1))]),
        400,
        "[0].dependencies: must have at most 10000 items",
    ),
    (
        "rules",
        _post([spec(rules=[{"Concurency": {}}] * (L["rules"] + 1))]),
        400,
        "[0].rules: must have at most 20 items",
    ),
    (
        "dedupe_matchers",
        _post(
            [
                spec(
                    dedupe_strategy=[{"kind": "k", "status": "Running"}]
                    * (L["dedupe_matchers"] + 1)
                )
            ]
        ),
        400,
        "[0].dedupe_strategy: must have at most 20 items",
    ),
    (
        "matcher_fields",
        _post(
            [
                spec(
                    dedupe_strategy=[
                        {"kind": "k", "status": "Running", "fields": [f"f{i}" for i in range(21)]}
                    ]
                )
            ]
        ),
        400,
        "[0].dedupe_strategy[0].fields: must have at most 20 items",
    ),
    (
        "field_chars",
        _post([spec(dedupe_strategy=[{"kind": "k", "status": "Running", "fields": [_over(200)]}])]),
        400,
        "[0].dedupe_strategy[0].fields[0]: must be at most 200 characters",
    ),
    (
        "metadata_bytes",
        _post([spec(metadata={"x": "y" * L["metadata_bytes"]})]),
        400,
        f"[0].metadata: must be at most {L['metadata_bytes']} bytes as JSON",
    ),
    (
        "requester_chars",
        ("POST", "/task", [spec()], {"X-Requester": _over(L["requester_chars"])}),
        400,
        "X-Requester: must be at most 200 characters",
    ),
    (
        "failure_reason_chars",
        ("PATCH", "/task/{id}", {"status": "Failure", "failure_reason": _over(10_000)}, {}),
        400,
        "failure_reason: must be at most 10000 characters",
    ),
    (
        "max_concurency",
        _post(
            [
                spec(
                    rules=[
                        {
                            "Concurency": {
                                "matcher": {"kind": "k", "status": "Running"},
                                "max_concurency": L["max_concurency"] + 1,
                            }
                        }
                    ]
                )
            ]
        ),
        400,
        "[0].rules[0].Concurency.max_concurency: must be at most 1000000",
    ),
    (
        "max_capacity",
        _post(
            [
                spec(
                    expected_count=1,
                    rules=[
                        {
                            "Capacity": {
                                "matcher": {"kind": "k", "status": "Running"},
                                "max_capacity": L["max_capacity"] + 1,
                            }
                        }
                    ],
                )
            ]
        ),
        400,
        "[0].rules[0].Capacity.max_capacity: must be at most 1000000000000",
    ),
    (
        "expected_count",
        ("PATCH", "/task/{id}", {"expected_count": L["expected_count"] + 1}, {}),
        400,
        "expected_count: must be at most 1000000000000",
    ),
    (
        "max_starts",
        _post(
            [
                spec(
                    rules=[
                        {
                            "RateLimit": {
                                "matcher": {"kind": "k"},
                                "max_starts": L["max_starts"] + 1,
                                "per_seconds": 1,
                            }
                        }
                    ]
                )
            ]
        ),
        400,
        "[0].rules[0].RateLimit.max_starts: must be at most 1000000",
    ),
    (
        "per_seconds",
        _post(
            [
                spec(
                    rules=[
                        {
                            "type": "RateLimit",
                            "matcher": {"kind": "k"},
                            "max_starts": 1,
                            "per_seconds": L["per_seconds"] + 1,
                        }
                    ]
                )
            ]
        ),
        400,
        "[0].rules[0].per_seconds: must be at most 86400",
    ),
    (
        "counter_increment",
        ("PATCH", "/task/{id}", {"new_success": L["counter_increment"] + 1}, {}),
        400,
        "new_success: must be at most 1000000000",
    ),
    (
        "batch_tasks (PUT array)",
        (
            "PUT",
            "/task",
            [{"task_id": str(uuid.uuid4())}] * (L["batch_tasks"] + 1),
            {},
        ),
        400,
        "body: must have at most 10000 items",
    ),
    (
        "per_page",
        ("GET", "/task?per_page=501", None, {}),
        400,
        "per_page: must be between 1 and 500",
    ),
    (
        "per_page (page_size)",
        ("GET", "/task?page_size=0", None, {}),
        400,
        "page_size: must be between 1 and 500",
    ),
    ("page", ("GET", "/task?page=1000001", None, {}), 400, "page: must be between 0 and 1000000"),
    (
        "filter_chars",
        ("GET", "/task?name=" + _over(200), None, {}),
        400,
        "name: must be at most 200",
    ),
    (
        "metadata_bytes (filter)",
        ("GET", "/task?metadata=" + "x" * (L["metadata_bytes"] + 1), None, {}),
        400,
        "metadata: must be at most 65536 bytes",
    ),
    (
        "reported_errors",
        _post([{"id": str(i)} for i in range(200)]),
        400,
        "(and ",
    ),
]


def test_every_limit_has_a_case():
    assert {name.split(" ")[0] for name, *_ in LIMIT_CASES} == set(LIMITS)


@pytest.mark.parametrize(
    ("limit", "request_", "status", "detail"), LIMIT_CASES, ids=[c[0] for c in LIMIT_CASES]
)
def test_each_limit_is_a_clear_4xx(make_client, conn, limit, request_, status, detail):
    client = make_client()
    method, path, body, headers = request_
    if "{id}" in path:
        task = client.simulate_post("/task", json=[spec()]).json[0]
        path = path.replace("{id}", task["id"])
    path, _, query = path.partition("?")
    if body == "BIG":
        raw = b"[" + b" " * L["body_bytes"] + b"]"
    else:
        raw = None if body is None else json.dumps(body).encode()
    result = client.simulate_request(
        method,
        path,
        query_string=query,
        body=raw,
        headers={"Content-Type": "application/json", **headers},
    )
    assert result.status_code == status, result.text[:500]
    assert any(detail in d for d in result.json["details"]), result.json["details"][:5]
    assert result.json["error"]


def test_at_the_limits_requests_pass(make_client):
    client = make_client()
    fields = {
        "name": "n" * L["name_chars"],
        "kind": "k" * L["kind_chars"],
        "metadata": {"x": "y" * (L["metadata_bytes"] - 8)},
        "on_success": [hook(headers={"X-A": "v" * L["header_value_chars"]})]
        * L["actions_per_list"],
    }
    assert (
        client.simulate_post("/task", json=[spec("i" * L["local_id_chars"], **fields)]).status_code
        == 201
    )
    assert client.simulate_get("/task", params={"per_page": L["per_page"]}).status_code == 200
