"""Webhook target rules (SSRF): only public http(s) hosts, unless private targets are allowed.

``validate_webhook_url`` runs at submission; delivery re-checks with ``check_webhook_target`` and
connects to the address it checked (DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ldm_serve.errors import InvalidInput

URL_FIELD = "webhook.url"
MAX_URL_LENGTH = 2048
_PRIVATE_HINT = "private targets are refused unless allow_private_webhooks is set"

Resolver = Callable[[str, int], Sequence[str]]
"""``resolve(host, port) -> [ip, ...]``; raises ``OSError`` when the name does not resolve."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_HOSTNAME = re.compile(
    r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_LOCALHOST_NAMES = ("localhost", "localhost.", "localhost.localdomain")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to through the system resolver (``getaddrinfo``)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address (``"loopback"``, ``"private"``, ...), or None.

    IPv6 addresses that carry an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, NAT64
    ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by the IPv4 address they carry.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = address_problem(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip in _NAT64:
            inner = address_problem(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64-embedded {inner}" if inner else None
        if ip.sixtofour is not None:
            inner = address_problem(ip.sixtofour)
            if inner:
                return f"6to4-embedded {inner}"
    for name, flag in (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    ):
        if flag:
            return name
    if not ip.is_global:
        return "non-global (special-purpose)"
    return None


@dataclass(frozen=True)
class WebhookTarget:
    """A checked webhook URL.

    ``addresses`` are the checked IP addresses of a named host (empty when the host is an IP
    literal or private targets are allowed); delivery connects to ``addresses[0]``.
    """

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[str, ...] = ()


def _refuse(message: str) -> InvalidInput:
    return InvalidInput(URL_FIELD, message)


def _parse_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def check_webhook_target(
    url: str,
    *,
    allow_private: bool = False,
    resolve: Resolver | None = None,
    max_length: int = MAX_URL_LENGTH,
) -> WebhookTarget:
    """Apply every target rule to ``url`` and return the normalised, resolved target.

    Rules, in order: a string of at most ``max_length`` characters without spaces or control
    characters; scheme http or https; a host; no ``user:password@``; a valid port; a canonical
    host (IPv4 in dotted-quad form, no decimal/octal/hex forms such as ``2130706433`` or
    ``0x7f.1``; hostnames in LDH form after IDNA). Unless ``allow_private``: an IP literal must be
    a public unicast address, ``localhost`` names are refused, and a hostname must resolve (with
    ``resolve``, default ``system_resolver``) to public unicast addresses only.

    Raises:
        InvalidInput: field ``webhook.url``; the message names the rule that failed.
    """
    if not isinstance(url, str):
        raise _refuse("must be a string")
    if len(url) > max_length:
        raise _refuse(f"is longer than {max_length} characters")
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise _refuse("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _refuse("scheme must be http or https")
    if "@" in parts.netloc:
        raise _refuse("must not contain credentials (user:password@)")
    raw_host = parts.hostname
    if not raw_host:
        raise _refuse("must include a host")
    port = port if port is not None else (443 if scheme == "https" else 80)

    literal = _parse_ip(raw_host) if ":" in raw_host else None  # IPv6 (urlsplit strips the brackets)
    if literal is None:
        try:
            host = raw_host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _refuse(f"host {raw_host!r} is not a valid hostname") from None
        last_label = host.rstrip(".").rsplit(".", 1)[-1]
        if _NUMERIC_LABEL.match(last_label):  # a WHATWG "IPv4 host": must be canonical dotted quad
            try:
                literal = ipaddress.IPv4Address(host.rstrip("."))
            except ValueError:
                raise _refuse(f"host {raw_host!r} is a non-canonical numeric address") from None
        elif len(host) > 253 or not _HOSTNAME.match(host):
            raise _refuse(f"host {raw_host!r} is not a valid hostname")
    if literal is not None:
        host = str(literal)

    netloc_host = f"[{host}]" if ":" in host else host
    netloc = netloc_host if parts.port is None else f"{netloc_host}:{parts.port}"
    normalised = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))

    if allow_private:
        return WebhookTarget(normalised, scheme, host, port)
    if literal is not None:
        problem = address_problem(literal)
        if problem:
            raise _refuse(f"host {host} is not a public address ({problem}); {_PRIVATE_HINT}")
        return WebhookTarget(normalised, scheme, host, port)
    if host in _LOCALHOST_NAMES or host.rstrip(".").endswith(".localhost"):
        raise _refuse(f"host {host} names this machine; {_PRIVATE_HINT}")
    try:
        addresses = list((resolve or system_resolver)(host, port))
    except (OSError, UnicodeError):
        raise _refuse(f"host {host} does not resolve") from None
    if not addresses:
        raise _refuse(f"host {host} does not resolve")
    for address in addresses:
        ip = _parse_ip(address.split("%", 1)[0])
        if ip is None:
            raise _refuse(f"host {host} resolves to an unparseable address {address!r}")
        problem = address_problem(ip)
        if problem:
            raise _refuse(
                f"host {host} resolves to {address}, not a public address ({problem}); {_PRIVATE_HINT}"
            )
    return WebhookTarget(normalised, scheme, host, port, tuple(addresses))


def validate_webhook_url(
    url: str,
    *,
    allow_private: bool = False,
    resolve: Resolver | None = None,
    max_length: int = MAX_URL_LENGTH,
) -> str:
    """Check a webhook URL at submission time and return it normalised (see ``check_webhook_target``).

    May block on DNS when ``allow_private`` is false; call it from a thread in async code.

    Raises:
        InvalidInput: field ``webhook.url``, naming the rule that failed.
    """
    return check_webhook_target(url, allow_private=allow_private, resolve=resolve, max_length=max_length).url
