"""What the daemons (conductor, ingress) share at their edge: binding, and the error
that a nursery wrapped on its way out."""

from __future__ import annotations

import trio

__all__ = ["ListenError", "bind", "sole_exception"]


class ListenError(OSError):
    """A daemon cannot bind its address; ``strerror`` names the address and the flag."""


async def bind(host: str, port: int, what: str) -> list[trio.SocketListener]:
    """``trio.open_tcp_listeners``, with an OSError that names the address and *what*
    listens there ("cannot listen on 127.0.0.1:7771 (--listen): Address already in use")."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot listen on {host}:{port} ({what}): "
                                 f"{exc.strerror or exc}") from None


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (what trio's strict nurseries
    make of an error), or *exc* itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
