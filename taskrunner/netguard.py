"""The SSRF guard: which network addresses a webhook may reach.

Every webhook (start, end and cancel actions, including cancel actions that a start
response registered) goes through ``transport(config)``: an httpx transport whose
network backend resolves the URL's host with ``getaddrinfo``, checks *every* address it
resolves to, and then connects to one of those vetted addresses itself. Nothing resolves
the name a second time, so a DNS answer that changes between check and connect (DNS
rebinding) cannot slip past; TLS still verifies the certificate of, and sends SNI for, the
URL's host name, and the ``Host`` header is the URL's. Redirects are never followed (the
client says so), so a 3xx cannot lead anywhere either.

Denied by default: loopback, private (RFC 1918 and the like), link-local, unique-local,
shared (CGNAT) and other non-global addresses; and, even when private addresses are
allowed, unspecified, multicast and IPv4-mapped IPv6 addresses and the cloud metadata
endpoints (by address and by name). Numeric forms (``2130706433``, ``0x7f.1``,
``017700000001``, ``127.1``) are read the way ``getaddrinfo`` reads them, like curl does.
``WEBHOOK_ALLOW_PRIVATE=true`` opens the private kinds; ``WEBHOOK_ALLOWLIST`` (host names,
``*.suffix`` patterns and CIDRs) opens exactly what it lists, metadata included.

The API also calls ``static_problem`` at creation time to refuse URLs that are bad
without a DNS lookup (a literal private address, a metadata host name); the worker's check
is the one that counts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from taskrunner.config import Config

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Instance metadata services: AWS (IPv4, IPv6, ECS task credentials), GCP, Azure and
# OpenStack (169.254.169.254 too), Alibaba, Oracle.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "fd00:ec2::254",
        "fd00:ec2::23",
        "100.100.100.200",
        "192.0.0.192",
    )
)
METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
    }
)
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What a host name may contain once httpx has IDNA-encoded it (IPv6 literals: hex, ':').
_HOST_CHARS = re.compile(r"^[a-z0-9._:-]+$")
_NUMERIC_IPV4 = re.compile(r"^[0-9a-fx.]+$")
_ALLOW_HINT = "set WEBHOOK_ALLOW_PRIVATE=true or list it in WEBHOOK_ALLOWLIST to allow"


class Blocked(Exception):
    """A webhook URL the policy refuses; ``reason`` says why (shown as ``blocked: ...``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _kind(ip: IPAddress) -> tuple[str, bool] | None:
    """What makes ``ip`` unsafe, and whether ``WEBHOOK_ALLOW_PRIVATE`` opens it; None if
    it is an ordinary public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return "an IPv4-mapped IPv6 address", False
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        inner = _kind(embedded) if embedded is not None else None
        if inner is not None:
            return f"an IPv6 address embedding {inner[0]} ({embedded})", inner[1]
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address", False
    if ip.is_unspecified:
        return "an unspecified address", False
    if ip.is_multicast:
        return "a multicast address", False
    if ip.is_loopback:
        return "a loopback address", True
    if ip.is_link_local:
        return "a link-local address", True
    if isinstance(ip, ipaddress.IPv6Address) and ip in _UNIQUE_LOCAL:
        return "a unique-local address", True
    if ip.is_private:
        return "a private address", True
    if not ip.is_global:
        return "a non-public address", True
    return None


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


def _numeric_ipv4(host: str) -> IPAddress | None:
    """``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``: what inet_aton (and so
    getaddrinfo, curl and browsers) makes of them; no DNS involved."""
    if not _NUMERIC_IPV4.match(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


@dataclass(frozen=True)
class Policy:
    """Who may be called: ``allow_private`` plus an allowlist of names and networks."""

    allow_private: bool = False
    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = field(default=())

    @classmethod
    def from_config(cls, config: Config) -> Policy:
        return cls.build(config.webhook_allow_private, config.webhook_allowlist)

    @classmethod
    def build(cls, allow_private: bool = False, allowlist: Iterable[str] = ()) -> Policy:
        hosts, networks = set(), []
        for entry in allowlist:
            entry = entry.strip().lower().strip("[]")
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(allow_private, frozenset(hosts), tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """The allowlist names this host (exactly, or through a ``*.suffix`` entry)."""
        if host in self.hosts:
            return True
        return any(h.startswith("*.") and host.endswith(h[1:]) for h in self.hosts)

    def address_problem(self, ip: IPAddress, host: str) -> str | None:
        """Why ``host`` may not be reached at ``ip``, or None."""
        if any(ip in net for net in self.networks if net.version == ip.version):
            return None
        kind = _kind(ip)
        if kind is None or (kind[1] and self.allow_private):
            return None
        what, _ = kind
        shown = host if _parse_ip(host) == ip else f"{host} resolves to {ip}"
        hint = f"; {_ALLOW_HINT}" if kind[1] else ""
        return f"{shown}, {what}{hint}"

    def name_problem(self, host: str) -> str | None:
        """Problems visible in the host name alone (no DNS)."""
        if _parse_ip(host) is not None:
            return None  # an address literal (an IPv6 one may carry a %zone)
        if not _HOST_CHARS.match(host):
            return f"{host!r} is not a valid host name"
        if host in METADATA_HOSTS:
            return f"{host} is a cloud metadata host"
        if (host == "localhost" or host.endswith(".localhost")) and not self.allow_private:
            return f"{host} is a loopback name; {_ALLOW_HINT}"
        return None

    def static_problem(self, url: str) -> str | None:
        """What is wrong with ``url`` without resolving it: a bad name or a literal
        address the policy refuses. None when only DNS could tell."""
        try:
            host = normalise_host(httpx.URL(url).host)
        except (httpx.InvalidURL, UnicodeError):
            return None  # the URL check proper reports malformed URLs
        if not host or self.host_allowed(host):
            return None
        problem = self.name_problem(host)
        if problem:
            return problem
        ip = _parse_ip(host) or _numeric_ipv4(host)
        return self.address_problem(ip, host) if ip is not None else None

    async def vet(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` and check every address; the addresses to connect to.

        Raises ``Blocked`` when the name or any of its addresses is refused, and
        ``httpcore.ConnectError`` when the name does not resolve (retried later).
        """
        host = normalise_host(host)
        allowed_name = self.host_allowed(host)
        if not allowed_name:
            problem = self.name_problem(host)
            if problem:
                raise Blocked(problem)
        literal = _parse_ip(host)
        if literal is not None:
            addresses = [literal]
        else:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError) as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
            addresses = list(dict.fromkeys(_parse_ip(info[4][0]) for info in infos))
        if not allowed_name:
            for ip in addresses:
                problem = self.address_problem(ip, host)
                if problem:
                    raise Blocked(problem)
        return [str(ip) for ip in addresses]


def normalise_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot (``LOCALHOST.`` is ``localhost``)."""
    return host.lower().strip("[]").rstrip(".")


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that vets the host, then connects to a vetted address."""

    def __init__(self, policy: Policy, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.policy = policy
        self.inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.policy.vet(host, port)
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return await self.inner.connect_tcp(
                    address,
                    port,
                    timeout=timeout,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise Blocked("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, with its connection pool built on ``GuardedBackend``.

    httpx has no public knob for the network backend, but httpcore's pool has one; we
    build the pool httpx would build, with the backend added. ``tests/test_security.py``
    fails if a future httpx stops sending connections through it.
    """

    def __init__(self, policy: Policy, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),  # honours SSL_CERT_FILE / SSL_CERT_DIR
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(policy),
        )


def transport(config: Config, limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """The transport every webhook request goes through."""
    return GuardedTransport(Policy.from_config(config), limits)
