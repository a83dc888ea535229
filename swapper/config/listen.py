"""Listen addresses and TLS: what ``--listen``/``-listen`` and ``metricsListen`` mean.

Owns: nothing; pure parsing plus the one ``ssl.SSLContext`` a TLS start builds.

Go's ``net.Listen`` reads ``:8080`` as every interface, and every llama-swap unit file, Docker
command and Windows service says ``-listen :8080``, so an empty host means every interface here
too (asyncio binds IPv4 and IPv6 for an empty host). A bare port (``8080``) stays loopback:
that form is swapper's own and always meant ``127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import ssl

ALL_INTERFACES = ""  # asyncio's create_server binds every interface for an empty host
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class AddressError(ValueError):
    """A listen address that is not ``[host]:port`` or ``port``."""


def parse_address(value: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``:port`` (every interface) or ``port`` (loopback)."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"invalid listen address {value!r}: put an IPv6 host in brackets")
    try:
        port = int(port_text)
    except ValueError:
        raise AddressError(f"invalid listen address {value!r}") from None
    if not 0 <= port <= 65535:
        raise AddressError(f"invalid listen address {value!r}: port out of range")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (an empty host is every interface)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def url_of(host: str, port: int, *, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    shown = host or "0.0.0.0"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}"


def tls_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server context for ``-tls-cert-file``/``-tls-key-file``; raises OSError/SSLError early."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
