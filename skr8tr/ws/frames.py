"""The one WebSocket framing layer (RFC 6455), sans-IO: bytes in, events and bytes out.

Every transport of skr8tr (the conductor's server, the Trio client, the CLI's
blocking client) frames with :class:`Protocol`, which is wsproto's
``Connection``: wsproto parses and masks frames, checks UTF-8 and close codes.
This module adds what wsproto leaves to its user: whole messages out of
fragments, a limit on their size, and what to send back (a pong for a ping,
the answer to a close). It also holds what all transports share: the errors
(:class:`ConnectionClosed`, :class:`HandshakeError`), close-code names, the
client's opening handshake (:class:`ClientProtocol`) and :func:`frame_text`.

The client handshake is written here rather than taken from wsproto because
wsproto's goes through h11, and so does wsproto's package ``__init__``: the
CLI and the idle node agent import neither (start-up time, resident memory).
:func:`_load_wsproto` imports wsproto's frame modules without that
``__init__``; a process that imports wsproto itself later gets all of it.

A session (the server side is the same without the handshake)::

    proto = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    send(proto.handshake_request())
    rest = None
    while rest is None:  # None: the answer's header block is not complete yet
        rest = proto.receive_handshake(recv())  # HandshakeError if refused
    send(proto.encode_message('{"v": 1, ...}'))
    data = rest  # frames the server sent right behind its answer, if any
    while True:
        for event in proto.receive(data):
            ...  # Message (event.data: str for text, bytes for binary), Ping, Pong, Close
            send(proto.reply_to(event))  # a pong for a Ping, the answer to a Close
        data = recv()

A ``Close`` event is the end of the connection, whoever ended it: the peer
(``by_peer=True``, or the answer to our own close), or this side because the
peer broke the protocol (``by_peer=False``: code 1002 for a malformed frame,
1007 for text that is not UTF-8, 1009 for a message over
``max_message_bytes``). Either way the caller sends ``reply_to(event)`` and
stops reading; ``receive`` returns nothing more. A stream that ends without
a Close is an abnormal closure, code 1006 (:data:`ABNORMAL_CLOSURE`): the
transport's to report.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import importlib.util
import os
import struct
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

__all__ = [
    "ABNORMAL_CLOSURE",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ClientProtocol",
    "Close",
    "CloseReason",
    "ConnectionClosed",
    "Event",
    "HandshakeError",
    "Message",
    "Ping",
    "Pong",
    "Protocol",
    "close_code_name",
    "frame_text",
]

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_HANDSHAKE_BYTES = 16 * 1024
ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Close codes that say what happened locally and never travel in a frame.
NO_STATUS_RCVD, ABNORMAL_CLOSURE = 1005, 1006

_CLOSE_CODE_NAMES = {
    1000: "NORMAL_CLOSURE", 1001: "GOING_AWAY", 1002: "PROTOCOL_ERROR",
    1003: "UNSUPPORTED_DATA", 1005: "NO_STATUS_RCVD", 1006: "ABNORMAL_CLOSURE",
    1007: "INVALID_FRAME_PAYLOAD_DATA", 1008: "POLICY_VIOLATION", 1009: "MESSAGE_TOO_BIG",
    1010: "MANDATORY_EXT", 1011: "INTERNAL_ERROR", 1012: "SERVICE_RESTART",
    1013: "TRY_AGAIN_LATER", 1015: "TLS_HANDSHAKE_FAILED",
}


def close_code_name(code: int) -> str:
    """The RFC 6455 name of a close code (``NORMAL_CLOSURE`` for 1000...)."""
    if code in _CLOSE_CODE_NAMES:
        return _CLOSE_CODE_NAMES[code]
    if 1000 <= code <= 2999:
        return "RFC_RESERVED"
    if 3000 <= code <= 3999:
        return "IANA_RESERVED"
    if 4000 <= code <= 4999:
        return "PRIVATE_RESERVED"
    return "INVALID_CODE"


# ---------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class CloseReason:
    """Why a connection ended: the close code (1006: no close frame) and its reason."""

    code: int
    reason: str = ""

    @property
    def name(self) -> str:
        return close_code_name(self.code)

    def __str__(self) -> str:
        # The form the clients' error messages have always shown (trio-websocket's).
        return f"CloseReason<code={self.code}, name={self.name}, reason={self.reason or None}>"


class ConnectionClosed(Exception):
    """The connection is over, or this side is closing it: ``code`` and ``reason`` say why.

    Raised by every transport, whoever ended the connection: the peer's close,
    ours, a limit, or 1006 when the stream ended or broke without a close frame.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"WebSocket closed with {code} ({close_code_name(code)})"
                         + (f": {reason}" if reason else ""))

    @property
    def close_reason(self) -> CloseReason:
        return CloseReason(self.code, self.reason)


class HandshakeError(Exception):
    """No WebSocket was opened: the upgrade was refused, malformed or cut short.

    On a client, the server refused or answered wrongly; on the server, the
    peer sent something that is not an upgrade (and was answered with a 4xx
    when it spoke HTTP). ``status`` is the HTTP status of that answer, or None
    when there was none.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message: ``str`` for a text message, ``bytes`` for a binary one."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The connection is over. ``code`` 1005 means the peer's close frame had none.

    ``by_peer`` is False when this side ends it because the peer broke the
    protocol; ``code`` and ``reason`` are then what we send back.
    """

    code: int
    reason: str
    by_peer: bool = True


Event = Message | Ping | Pong | Close


# ---------------------------------------------------------------------- wsproto


def _load_wsproto() -> tuple[ModuleType, ModuleType]:
    """``(wsproto.connection, wsproto.events)``, without running ``wsproto/__init__.py``
    unless something imported it already: that file imports the handshake, and
    with it h11, which frames do not need.

    ``wsproto`` is then a package whose body runs on first use of a name that
    only its ``__init__`` defines (``WSConnection``...): a process that wants
    all of wsproto later gets all of it, with the submodules loaded here.
    """
    if "wsproto" not in sys.modules:
        spec = importlib.util.find_spec("wsproto")
        if spec is None or spec.loader is None:
            raise ImportError("wsproto is not installed")
        package = importlib.util.module_from_spec(spec)  # its path, not its body yet

        def complete(name: str) -> Any:
            del package.__getattr__
            spec.loader.exec_module(package)
            try:
                return package.__dict__[name]
            except KeyError:
                raise AttributeError(f"module 'wsproto' has no attribute {name!r}") from None

        package.__getattr__ = complete  # type: ignore[attr-defined]
        sys.modules["wsproto"] = package
        try:
            importlib.import_module("wsproto.connection")
        except BaseException:
            del sys.modules["wsproto"]
            raise
    return sys.modules["wsproto.connection"], sys.modules["wsproto.events"]


_connection, _events = _load_wsproto()
_Connection = _connection.Connection
_State = _connection.ConnectionState
_CLIENT, _SERVER = _connection.ConnectionType.CLIENT, _connection.ConnectionType.SERVER
_TextMessage, _BytesMessage = _events.TextMessage, _events.BytesMessage
_WsPing, _WsPong, _WsClose = _events.Ping, _events.Pong, _events.CloseConnection
# wsproto sends a close frame without a code only for this very member, not for 1005.
_NO_STATUS = sys.modules["wsproto.frame_protocol"].CloseReason.NO_STATUS_RCVD


# ---------------------------------------------------------------------- frames


class Protocol:
    """One side of one WebSocket's frames, after the handshake: wsproto's ``Connection``
    with messages made whole and limited to *max_message_bytes* (UTF-8 for text).

    *client* chooses the side (a client masks what it sends and refuses masked
    frames). Methods that
    build bytes raise RuntimeError when used out of order (sending after a
    close); ``receive`` never raises for what the peer sends.
    """

    def __init__(self, *, client: bool,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._conn = _Connection(_CLIENT if client else _SERVER)
        self._parts: list[Any] = []
        self._size = 0
        self._done = False  # a Close event was returned: nothing more to decode

    @property
    def close_sent(self) -> bool:
        return self._conn.state in (_State.LOCAL_CLOSING, _State.CLOSED)

    @property
    def close_received(self) -> bool:
        return self._conn.state in (_State.REMOTE_CLOSING, _State.CLOSED) and self._done

    @property
    def open(self) -> bool:
        """True until a close is sent, received or forced."""
        return not self._done and self._conn.state is _State.OPEN

    # ------------------------------------------------------------------ receiving

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns the events they complete, in order.

        Never raises for anything the peer sends: a protocol failure ends the
        list with ``Close(code, reason, by_peer=False)``. After a Close event
        every further call returns [].
        """
        if self._done:
            return []
        conn = self._conn
        if data:
            conn.receive_data(data)
        out: list[Event] = []
        for event in conn.events():
            kind = type(event)
            if kind is _TextMessage or kind is _BytesMessage:
                message = self._on_data(event)
                if message is None:
                    continue
                out.append(message)
                if type(message) is Close:
                    break
            elif kind is _WsPing:
                out.append(Ping(bytes(event.payload)))
            elif kind is _WsPong:
                out.append(Pong(bytes(event.payload)))
            elif kind is _WsClose:
                self._done = True
                code = int(event.code)  # a plain int, not wsproto's enum
                if conn.state in (_State.REMOTE_CLOSING, _State.CLOSED):
                    out.append(Close(code, event.reason or ""))
                else:  # wsproto could not parse a frame: its state did not move
                    out.append(Close(code, event.reason or "", by_peer=False))
                break
        return out

    def _on_data(self, event: Any) -> Message | Close | None:
        data = event.data
        if isinstance(data, str):
            self._size += len(data) if data.isascii() else len(data.encode())
        else:
            data = bytes(data)
            self._size += len(data)
        if self._size > self.max_message_bytes:
            self._done = True
            self._parts = []
            return Close(1009, f"Exceeded maximum message size: {self.max_message_bytes} bytes",
                         by_peer=False)
        if not event.message_finished:
            self._parts.append(data)
            return None
        if self._parts:
            self._parts.append(data)
            data = "".join(self._parts) if isinstance(data, str) else b"".join(self._parts)
            self._parts = []
        self._size = 0
        return Message(data)

    # ------------------------------------------------------------------ sending

    def encode_message(self, message: str | bytes) -> bytes:
        """One message in one frame: text for ``str``, binary for ``bytes``."""
        if isinstance(message, str):
            return self._send(_TextMessage(data=message))
        return self._send(_BytesMessage(data=bytes(message)))

    def encode_text(self, text: str) -> bytes:
        return self._send(_TextMessage(data=text))

    def encode_binary(self, data: bytes) -> bytes:
        return self._send(_BytesMessage(data=bytes(data)))

    def encode_ping(self, payload: bytes = b"") -> bytes:
        return self._send(_WsPing(payload=bytes(payload)))

    def encode_pong(self, payload: bytes = b"") -> bytes:
        return self._send(_WsPong(payload=bytes(payload)))

    def encode_close(self, code: int = 1000, reason: str = "") -> bytes:
        """Start (or answer) the closing handshake; b"" if a close was sent already.

        After this nothing else may be sent. The reason is cut to fit a
        control frame. 1005 (no code) sends a close frame without one; the
        other codes that never travel (1006, 1015) go as 1000.
        """
        if self.close_sent:
            return b""
        if code == NO_STATUS_RCVD:  # answering a close that had no code: none either
            return self._send(_WsClose(code=_NO_STATUS))
        return self._send(_WsClose(code=code, reason=reason))

    def reply_to(self, event: Event) -> bytes:
        """What to send in answer to *event*: a pong for a ping, the close handshake's
        answer for a close (the peer's code and reason echoed, or ours after a
        protocol failure); b"" for anything else, or when a close was sent already."""
        if self.close_sent:
            return b""
        if type(event) is Ping:
            # A ping read in the same data as the peer's close that followed it: the
            # close is parsed already, and no pong may follow it (nor is one of use).
            return self.encode_pong(event.payload) if self._conn.state is _State.OPEN else b""
        if type(event) is Close:
            return self.encode_close(event.code, event.reason)
        return b""

    def _send(self, event: Any) -> bytes:
        try:
            return self._conn.send(event)
        except _connection.LocalProtocolError:
            raise RuntimeError(f"cannot send {type(event).__name__} on a WebSocket in state "
                               f"{self._conn.state.name}") from None


def frame_text(text: str) -> bytes:
    """*text* as one unmasked, unfragmented text frame: the bytes a server sends for it,
    the same on every connection without extensions (so they can be made once)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x81, 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 127, n)
    return head + payload


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value that answers ``Sec-WebSocket-Key`` *key*."""
    return base64.b64encode(hashlib.sha1(key + ACCEPT_GUID).digest())


# ---------------------------------------------------------------------- client handshake


class ClientProtocol(Protocol):
    """A client connection: the opening handshake, then :class:`Protocol`'s frames.

    *host* is the ``Host`` header (``name:port``), *path* the request target,
    *headers* extra ``(name, value)`` request headers. *key* is the
    ``Sec-WebSocket-Key`` (base64 of 16 bytes); leave it None for a random one.
    """

    def __init__(self, host: str, path: str, *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, key: str | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(client=True, max_message_bytes=max_message_bytes)
        self.host = host
        self.path = path or "/"
        self.headers = list(headers or [])
        self.key = key or base64.b64encode(os.urandom(16)).decode("ascii")
        self._accepted = False
        self._head = bytearray()

    @property
    def open(self) -> bool:
        return self._accepted and super().open

    def handshake_request(self) -> bytes:
        """The opening handshake: a ``GET`` with the upgrade headers and no extensions."""
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"{extra}\r\n"
        ).encode("latin-1")

    def receive_handshake(self, data: bytes) -> bytes | None:
        """Feed the server's answer as it arrives.

        Returns None while the header block is incomplete; once it is complete
        and accepts the upgrade, the bytes that followed it (frames sent
        already: pass them to :meth:`receive`). Raises HandshakeError if the
        server refused (any status but 101) or answered wrongly.
        """
        if self._accepted:
            raise RuntimeError("the handshake is already over")
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError(
                    f"the answer to the handshake is longer than {MAX_HANDSHAKE_BYTES} bytes")
            return None
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
        self._head = bytearray()
        self._check_answer(head.decode("latin-1"))
        self._accepted = True
        return rest

    def receive(self, data: bytes) -> list[Event]:
        if not self._accepted:
            raise RuntimeError("receive() before the handshake was accepted")
        return super().receive(data)

    def _send(self, event: Any) -> bytes:
        if not self._accepted:
            raise RuntimeError("cannot send on a WebSocket before its handshake is accepted")
        return super()._send(event)

    def _check_answer(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not (version.startswith("HTTP/1.") and len(code) == 3 and code.isdigit()):
            raise HandshakeError(
                f"the server did not answer with HTTP (it sent {status_line[:60]!r})")
        status = int(code)
        if status != 101:
            raise HandshakeError(f"the handshake was refused with HTTP {status}", status)
        fields: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise HandshakeError(
                    f"the handshake answer has a malformed header line {line[:60]!r}", status)
            name, value = name.strip().lower(), value.strip()
            fields[name] = f"{fields[name]}, {value}" if name in fields else value

        def tokens(name: str) -> set[str]:
            return {t.strip().lower() for t in fields.get(name, "").split(",")}

        if "websocket" not in tokens("upgrade"):
            raise HandshakeError("the handshake answer has no `Upgrade: websocket`", status)
        if "upgrade" not in tokens("connection"):
            raise HandshakeError("the handshake answer has no `Connection: Upgrade`", status)
        if fields.get("sec-websocket-accept") != accept_token(self.key.encode()).decode():
            raise HandshakeError("the handshake answer's Sec-WebSocket-Accept does not match "
                                 "our Sec-WebSocket-Key", status)
        for name in ("sec-websocket-extensions", "sec-websocket-protocol"):
            if fields.get(name):
                raise HandshakeError(
                    f"the server chose a {name} we did not offer: {fields[name][:60]!r}", status)
