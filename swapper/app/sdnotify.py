"""systemd's readiness protocol (sd_notify): tell the service manager that swapper is up, and
that it is stopping, so that a ``Type=notify`` unit and whatever is ordered after it start only
once the listener accepts connections.

Owns: the notify socket's address, taken out of the environment once (``from_environment``) so
that no child (a llama-server, a wrapper script) inherits it and speaks for swapper. Without
``NOTIFY_SOCKET`` (not started by systemd) every call does nothing.

The protocol is one datagram of newline-separated ``KEY=value`` fields to the AF_UNIX socket the
variable names; a leading ``@`` names a socket in Linux's abstract namespace.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger("swapper")

NOTIFY_SOCKET = "NOTIFY_SOCKET"


class Notifier:
    """Sends state changes to the service manager that started swapper, if one did."""

    __slots__ = ("_address",)

    def __init__(self, address: str | None) -> None:
        self._address = address or None

    @classmethod
    def from_environment(cls) -> Notifier:
        """Takes ``NOTIFY_SOCKET`` out of this process's environment (children must not see it)."""
        return cls(os.environ.pop(NOTIFY_SOCKET, None))

    def notify(self, *fields: str) -> bool:
        """Sends ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; True once sent."""
        if self._address is None:
            return False
        address = self._address
        if address.startswith("@"):
            address = "\0" + address[1:]
        elif not address.startswith("/"):
            log.warning("unsupported NOTIFY_SOCKET address; not notifying", address=self._address)
            self._address = None
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(address)
                sock.sendall("\n".join(fields).encode())
        except OSError as exc:
            # The unit then fails its start timeout, which says more than a crash here would.
            log.warning("cannot notify the service manager", address=self._address, error=str(exc))
            return False
        return True
