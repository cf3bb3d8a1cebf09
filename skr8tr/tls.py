"""TLS contexts for every part of skr8tr: the conductor serves, the others verify.

- The conductor (``--tls-cert FILE --tls-key FILE``) serves ``wss://`` and
  ``https://`` with :func:`server_context`: TLS 1.2 or newer, the certificate
  chain from ``--tls-cert`` (leaf first), its key from ``--tls-key``.
- Node agents, the CLI and the ingress connect to a ``wss://`` conductor with
  :func:`client_context`: the certificate is always verified and must name the
  host of the URL. ``--ca FILE`` (PEM) replaces the system's trust store with
  that file, so a private CA is trusted for the conductor and nothing else is;
  without it the system's trust store is used.

There is no way to turn verification off: a self-signed conductor is used by
giving its certificate (or its CA) as ``--ca``.

Loading files is short synchronous I/O done once at start-up; errors come out
as :class:`TlsError` with one line naming the file and what is wrong.

trio-websocket reports a failed TLS handshake only as a handshake that never
finishes (the connect timeout). So before a ``wss://`` connection the trio
clients (node agent, ingress) call :func:`check_handshake`, which does one TLS
handshake of its own and turns a failure into a :class:`TlsError` that says
why (an unknown CA, a name mismatch, an expired certificate) at once. The
CLI's blocking client sees the failure of its own handshake and passes it to
:func:`describe_failure`; it never imports trio, so neither does this module
at the top.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from urllib.parse import urlsplit

__all__ = ["TlsError", "server_context", "client_context", "is_loopback_host",
           "check_handshake", "describe_failure"]


class TlsError(Exception):
    """A TLS file is missing, unreadable or unusable; the message names it."""


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side context for ``cert_file`` (PEM chain) and ``key_file`` (PEM key)."""
    for flag, path in (("--tls-cert", cert_file), ("--tls-key", key_file)):
        if not os.path.isfile(path):
            raise TlsError(f"{flag} {path}: no such file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise TlsError(f"--tls-cert {cert_file} / --tls-key {key_file}: cannot use them "
                       f"({exc.reason or exc}); expected a PEM certificate and its PEM "
                       "private key") from None
    except OSError as exc:
        raise TlsError(f"cannot read --tls-cert {cert_file} / --tls-key {key_file}: "
                       f"{exc.strerror or exc}") from None
    return ctx


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context: ``ca_file`` (PEM) as the only trust anchor, or the
    system's trust store when None. Hostname checking is on."""
    if ca_file is not None and not os.path.isfile(ca_file):
        raise TlsError(f"--ca {ca_file}: no such file")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"--ca {ca_file}: not a PEM certificate file "
                       f"({getattr(exc, 'reason', None) or exc})") from None
    except OSError as exc:
        raise TlsError(f"cannot read --ca {ca_file}: {exc.strerror or exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; False for wildcards and the rest."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def check_handshake(url: str, ssl_context: ssl.SSLContext, timeout_s: float) -> None:
    """Do one TLS handshake with the server of ``wss://`` *url*; TlsError if it fails.

    Returns quietly when the server cannot be reached or does not answer in
    *timeout_s*: the real connection then reports that in its own words.
    """
    import trio  # here, not at the top: the blocking CLI client uses this module without trio

    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
        except OSError:
            return
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            why = describe_failure(exc)
            raise TlsError(why or f"TLS handshake with {host}:{port} failed") from None
        finally:
            await trio.aclose_forcefully(stream)


def describe_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, if *exc* (or what caused it) says so."""
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"the TLS certificate does not verify: {seen.verify_message or seen}; "
                    "pass the CA that signed it with --ca FILE")
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None
