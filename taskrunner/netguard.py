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
shared (CGNAT), site-local and other non-global addresses; and, even when private
addresses are allowed, unspecified and multicast addresses, the cloud metadata endpoints
(by address and by name), IPv6 addresses written around an IPv4 one (IPv4-mapped,
IPv4-translated, IPv4-compatible) and local-use NAT64 addresses. An IPv6 address that
leads to an IPv4 one (6to4, Teredo server or client, well-known NAT64) is judged by that
IPv4 address as well. Numeric forms (``2130706433``, ``0x7f.1``,
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
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated by RFC 4291
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
        kind = _ipv6_kind(ip)
        if kind is not None:
            return kind
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
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "a site-local address", True  # fec0::/10, deprecated but still routable
    if ip.is_private:
        return "a private address", True
    if not ip.is_global:
        return "a non-public address", True
    return None


def _ipv6_kind(ip: ipaddress.IPv6Address) -> tuple[str, bool] | None:
    """The IPv6 forms that carry an IPv4 address: refused outright (mapped, translated,
    compatible: no legitimate target is written that way), or refused when the IPv4
    address they lead to is (6to4, Teredo, NAT64)."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped IPv6 address", False
    if ip in _IPV4_TRANSLATED:
        return f"an IPv4-translated IPv6 address ({_low_ipv4(ip)})", False
    if ip in _IPV4_COMPATIBLE and not (ip.is_unspecified or ip.is_loopback):
        return f"an IPv4-compatible IPv6 address ({_low_ipv4(ip)})", False
    for embedded in _embedded_ipv4(ip):
        inner = _kind(embedded)
        if inner is not None:
            openable = inner[1] and ip not in _NAT64_LOCAL
            return f"an IPv6 address embedding {inner[0]} ({embedded})", openable
    if ip in _NAT64_LOCAL:
        return (
            "a local-use NAT64 address (RFC 8215), whose embedded IPv4 address depends on"
            " the network's prefix length; list it in WEBHOOK_ALLOWLIST to allow",
            False,
        )
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a 6to4, Teredo (server and client) or NAT64 address leads to.

    Local-use NAT64 prefixes (``64:ff9b:1::/48``) may be /48 to /96 long; the common /96
    layout is read here so the reason names the address, and ``_ipv6_kind`` refuses the
    rest of that prefix whatever it embeds."""
    found = [ip.sixtofour] if ip.sixtofour is not None else []
    if ip.teredo is not None:
        found.extend(ip.teredo)
    if ip in _NAT64 or ip in _NAT64_LOCAL:
        found.append(_low_ipv4(ip))
    return found


def _low_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    """The IPv4 address in the last 32 bits (the RFC 6052 /96 layout)."""
    return ipaddress.IPv4Address(ip.packed[-4:])


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
