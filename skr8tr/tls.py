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

Every client does the TLS handshake of its ``wss://`` connection first, on
that connection, before the WebSocket upgrade, and passes a failure to
:func:`describe_failure`, which says why (an unknown CA, a name mismatch, an
expired certificate) in one line. No client opens a second connection to find
out: the conductor would count each as a ``bad_handshake``. The CLI's
blocking client uses this module without trio, so it imports no trio.
"""

from __future__ import annotations

import ipaddress
import os
import ssl

__all__ = ["TlsError", "server_context", "client_context", "is_loopback_host",
           "describe_failure"]


class TlsError(Exception):
    """A TLS file is missing, unreadable or unusable; the message names it."""


# A certificate chain or a CA bundle is a few KiB (the whole Mozilla bundle ~200 KiB):
# OpenSSL reads what it is given, so a file past this is refused before it is.
MAX_PEM_BYTES = 4 * 1024 * 1024


def _check_file(flag: str, path: str) -> None:
    """TlsError unless *path* is a regular file (not a FIFO or device that OpenSSL would
    wait on or read forever) of at most :data:`MAX_PEM_BYTES`."""
    if not os.path.isfile(path):
        what = "no such file" if not os.path.exists(path) else "not a regular file"
        raise TlsError(f"{flag} {path}: {what}")
    if os.path.getsize(path) > MAX_PEM_BYTES:
        raise TlsError(f"{flag} {path}: over {MAX_PEM_BYTES} bytes: not a PEM file")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side context for ``cert_file`` (PEM chain) and ``key_file`` (PEM key)."""
    for flag, path in (("--tls-cert", cert_file), ("--tls-key", key_file)):
        _check_file(flag, path)
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
    if ca_file is not None:
        _check_file("--ca", ca_file)
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


# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH: the
# certificate is trusted but names another host; --ca would not help.
_NAME_MISMATCH_CODES = (62, 64)


def describe_failure(exc: BaseException) -> str | None:
    """Why a TLS handshake failed, if *exc* (or what caused it) says so.

    *exc* is what the handshake raised: ``trio.BrokenResourceError`` caused by
    an ``ssl.SSLError``, or the ``ssl.SSLError`` itself.
    """
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            why = seen.verify_message or seen
            if seen.verify_code in _NAME_MISMATCH_CODES:
                return (f"the TLS certificate does not verify: {why}; connect by a host "
                        "name or address that the certificate lists")
            return (f"the TLS certificate does not verify: {why}; "
                    "pass the CA that signed it with --ca FILE")
        if isinstance(seen, ssl.SSLError):
            return f"TLS failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None
