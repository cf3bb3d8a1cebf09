"""A sans-IO WebSocket client (RFC 6455): bytes in, events and bytes out.

Why it exists: the CLI makes one or two requests per run, and with
trio-websocket each run paid ~120 ms of imports (trio, trio-websocket, wsproto,
h11) and ~0.3 ms per round trip on an open connection. This module needs only
the standard library and does no I/O at all (bring your own socket, as h11 and
wsproto do), so the same code serves the blocking CLI client
(:mod:`skr8tr.blocking_client`) and can serve a trio stream later.

It speaks only what a client of the conductor needs: no extensions, no
subprotocols, no proxy. A session::

    proto = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    send(proto.handshake_request())
    rest = None
    while rest is None:  # None: the answer's header block is not complete yet
        rest = proto.receive_handshake(recv())  # HandshakeError if refused
    send(proto.encode_text('{"v": 1, ...}'))
    data = rest  # frames the server sent right behind its answer, if any
    while True:
        for event in proto.receive(data):
            ...  # Message (event.data: str for text, bytes for binary), Ping, Pong, Close
            send(proto.reply_to(event))  # a pong for a Ping, the answer to a Close
        data = recv()

A ``Close`` event is the end of the connection, whoever ended it: the server
(``by_peer=True``), or this side because the server broke the protocol
(``by_peer=False``: code 1002 for a malformed frame, 1007 for text that is
not UTF-8, 1009 for a message over ``max_message_bytes``). Either way the
caller sends ``reply_to(event)`` and stops reading; ``receive`` returns
nothing more. A stream that ends without a Close (``recv()`` gives b"") is
an abnormal closure, code 1006 (``ABNORMAL``): the caller's to report.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass

__all__ = [
    "ClientProtocol",
    "HandshakeError",
    "Message",
    "Ping",
    "Pong",
    "Close",
    "Event",
    "close_code_name",
]

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 16 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
MAX_CONTROL_PAYLOAD = 125

# Close codes that say what happened locally and never travel in a frame.
NO_STATUS, ABNORMAL = 1005, 1006
_LOCAL_ONLY_CODES = (NO_STATUS, ABNORMAL, 1015)

_CLOSE_CODE_NAMES = {
    1000: "NORMAL_CLOSURE",
    1001: "GOING_AWAY",
    1002: "PROTOCOL_ERROR",
    1003: "UNSUPPORTED_DATA",
    1005: "NO_STATUS_RCVD",
    1006: "ABNORMAL_CLOSURE",
    1007: "INVALID_FRAME_PAYLOAD_DATA",
    1008: "POLICY_VIOLATION",
    1009: "MESSAGE_TOO_BIG",
    1010: "MANDATORY_EXT",
    1011: "INTERNAL_ERROR",
    1012: "SERVICE_RESTART",
    1013: "TRY_AGAIN_LATER",
    1015: "TLS_HANDSHAKE_FAILED",
}


def close_code_name(code: int) -> str:
    """The RFC 6455 name of a close code (the names wsproto and trio-websocket print)."""
    if code in _CLOSE_CODE_NAMES:
        return _CLOSE_CODE_NAMES[code]
    if 1000 <= code <= 2999:
        return "RFC_RESERVED"
    if 3000 <= code <= 3999:
        return "IANA_RESERVED"
    if 4000 <= code <= 4999:
        return "PRIVATE_RESERVED"
    return "INVALID_CODE"


class HandshakeError(Exception):
    """The server did not accept the WebSocket upgrade; the message says why.

    ``status`` is the HTTP status the server answered with, or None when the
    answer was not HTTP at all.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
    """The connection is over. ``code`` 1005 means the server's close frame had none.

    ``by_peer`` is False when this side ends it because the server broke the
    protocol; ``code`` and ``reason`` are then what we send back.
    """

    code: int
    reason: str
    by_peer: bool = True


Event = Message | Ping | Pong | Close


class _Fail(Exception):
    """The server broke the protocol: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


class ClientProtocol:
    """One client connection's WebSocket state: handshake, frame encoding and decoding.

    *host* is the ``Host`` header (``name:port``), *path* the request target.
    *key* is the ``Sec-WebSocket-Key`` (base64 of 16 bytes); leave it None for
    a random one. Methods that build bytes never fail on I/O, because they do
    none; they raise RuntimeError when used out of order (sending before the
    handshake or after a close).
    """

    def __init__(
        self,
        host: str,
        path: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        key: str | None = None,
    ) -> None:
        self.host = host
        self.path = path or "/"
        self.max_message_bytes = max_message_bytes
        self.key = key or base64.b64encode(os.urandom(16)).decode("ascii")
        self._accept = base64.b64encode(
            hashlib.sha1(self.key.encode("ascii") + _ACCEPT_GUID).digest()
        ).decode("ascii")
        self.close_sent = False
        self.close_received = False
        self._accepted = False  # the server accepted the handshake
        self._done = False  # a Close event was returned: nothing more to decode
        self._buffer = bytearray()
        self._opcode = 0  # of the message being reassembled, 0 when none is
        self._fragments: list[bytes] = []
        self._fragments_size = 0

    @property
    def open(self) -> bool:
        """True from the accepted handshake until a close is sent, received or forced."""
        return self._accepted and not (self.close_sent or self._done)

    # ----------------------------------------------------------------- handshake

    def handshake_request(self) -> bytes:
        """The opening handshake: a ``GET`` with the upgrade headers and no extensions."""
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self.key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        ).encode("latin-1")

    def receive_handshake(self, data: bytes) -> bytes | None:
        """Feed the server's answer as it arrives.

        Returns None while the header block is incomplete; once it is complete
        and accepts the upgrade, the bytes that followed it (frames already
        sent, pass them to :meth:`receive`). Raises HandshakeError if the
        server refused (any status but 101) or answered wrongly.
        """
        if self._accepted:
            raise RuntimeError("the handshake is already over")
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HANDSHAKE_BYTES:
                raise HandshakeError(
                    f"the answer to the handshake is longer than {MAX_HANDSHAKE_BYTES} bytes"
                )
            return None
        head = bytes(self._buffer[:end])
        rest = bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        self._check_answer(head.decode("latin-1"))
        self._accepted = True
        return rest

    def _check_answer(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not (version.startswith("HTTP/1.") and len(code) == 3 and code.isdigit()):
            raise HandshakeError(
                f"the server did not answer with HTTP (it sent {status_line[:60]!r})"
            )
        status = int(code)
        if status != 101:
            raise HandshakeError(f"the handshake was refused with HTTP {status}", status)
        headers: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise HandshakeError(
                    f"the handshake answer has a malformed header line {line[:60]!r}", status
                )
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value

        def tokens(name: str) -> set[str]:
            return {t.strip().lower() for t in headers.get(name, "").split(",")}

        if "websocket" not in tokens("upgrade"):
            raise HandshakeError("the handshake answer has no `Upgrade: websocket`", status)
        if "upgrade" not in tokens("connection"):
            raise HandshakeError("the handshake answer has no `Connection: Upgrade`", status)
        if headers.get("sec-websocket-accept") != self._accept:
            raise HandshakeError(
                "the handshake answer's Sec-WebSocket-Accept does not match our Sec-WebSocket-Key",
                status,
            )
        for name in ("sec-websocket-extensions", "sec-websocket-protocol"):
            if headers.get(name):
                raise HandshakeError(
                    f"the server chose a {name} we did not offer: {headers[name][:60]!r}", status
                )

    # ----------------------------------------------------------------- sending

    def encode_text(self, text: str) -> bytes:
        """A text message (one frame)."""
        return self._frame(OP_TEXT, text.encode("utf-8"))

    def encode_binary(self, data: bytes) -> bytes:
        """A binary message (one frame)."""
        return self._frame(OP_BINARY, bytes(data))

    def encode_ping(self, payload: bytes = b"") -> bytes:
        return self._frame(OP_PING, _control_payload(payload))

    def encode_pong(self, payload: bytes = b"") -> bytes:
        return self._frame(OP_PONG, _control_payload(payload))

    def encode_close(self, code: int = 1000, reason: str = "") -> bytes:
        """Start (or answer) the closing handshake; b"" if a close was already sent.

        After this nothing else may be sent; keep reading until the server's
        Close event (or the end of the stream). Codes 1005, 1006 and 1015 are
        never sent: the frame then carries no code.
        """
        if self.close_sent:
            return b""
        payload = b""
        if code not in _LOCAL_ONLY_CODES:
            # The reason is cut to fit a control frame, at a character boundary.
            payload = struct.pack("!H", code) + reason.encode("utf-8")[:123].decode(
                "utf-8", "ignore"
            ).encode("utf-8")
        frame = self._frame(OP_CLOSE, payload)
        self.close_sent = True
        return frame

    def reply_to(self, event: Event) -> bytes:
        """What to send in answer to *event*: a pong for a ping, the close handshake's
        answer for a close (the server's code echoed, or ours after a protocol
        failure); b"" for anything else, or when a close was already sent."""
        if self.close_sent:
            return b""
        if isinstance(event, Ping):
            return self.encode_pong(event.payload)
        if isinstance(event, Close):
            return self.encode_close(event.code, "" if event.by_peer else event.reason)
        return b""

    def _frame(self, opcode: int, payload: bytes) -> bytes:
        if self.close_sent:
            raise RuntimeError("cannot send on a WebSocket after its close frame")
        if not self._accepted:
            raise RuntimeError("cannot send on a WebSocket before its handshake is accepted")
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        return header + mask + _apply_mask(payload, mask)

    # ----------------------------------------------------------------- receiving

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; returns the events they complete, in order.

        Never raises for anything the server sends: a protocol failure ends the
        list with ``Close(code, reason, by_peer=False)``. After a Close event
        every further call returns [].
        """
        if self._done:
            return []
        if not self._accepted:
            raise RuntimeError("receive() before the handshake was accepted")
        buf = self._buffer
        buf += data
        events: list[Event] = []
        pos = 0
        try:
            while not self._done:
                frame = self._next_frame(buf, pos)
                if frame is None:
                    break
                fin, opcode, payload, pos = frame
                event = self._on_frame(fin, opcode, payload)
                if event is not None:
                    events.append(event)
        except _Fail as fail:
            self._done = True
            events.append(Close(fail.code, fail.reason, by_peer=False))
        if self._done:
            buf.clear()
        else:
            del buf[:pos]
        return events

    def _next_frame(self, buf: bytearray, pos: int) -> tuple[bool, int, bytes, int] | None:
        """(fin, opcode, payload, end) of the frame at *pos*, or None if it is not all here."""
        have = len(buf) - pos
        if have < 2:
            return None
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70:
            raise _Fail(
                1002, "the server set reserved bits in a frame header (no extension was negotiated)"
            )
        if b1 & 0x80:
            raise _Fail(1002, "the server masked a frame")
        fin, opcode, n = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F
        head = 2
        if n == 126:
            if have < 4:
                return None
            n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif n == 127:
            if have < 10:
                return None
            n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n >> 63:
                raise _Fail(1002, "the server sent a frame length with the top bit set")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise _Fail(1002, "the server fragmented a control frame")
            if n > MAX_CONTROL_PAYLOAD:
                raise _Fail(
                    1002,
                    f"the server sent a control frame of {n} bytes (at most {MAX_CONTROL_PAYLOAD})",
                )
        elif opcode in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
            if opcode == OP_CONTINUATION and not self._opcode:
                raise _Fail(
                    1002, "the server sent a continuation frame with no message to continue"
                )
            if opcode != OP_CONTINUATION and self._opcode:
                raise _Fail(1002, "the server started a message before finishing the last one")
            if self._fragments_size + n > self.max_message_bytes:
                raise _Fail(1009, f"Exceeded maximum message size: {self.max_message_bytes} bytes")
        else:
            raise _Fail(1002, f"the server sent a frame with unknown opcode {opcode:#x}")
        end = pos + head + n
        if len(buf) < end:
            return None
        return fin, opcode, bytes(buf[pos + head : end]), end

    def _on_frame(self, fin: bool, opcode: int, payload: bytes) -> Event | None:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        if opcode == OP_CLOSE:
            return self._on_close(payload)
        if opcode != OP_CONTINUATION:
            if fin:  # the common case: a whole message in one frame
                return _message(opcode, payload)
            self._opcode = opcode
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if not fin:
            return None
        opcode, data = self._opcode, b"".join(self._fragments)
        self._opcode, self._fragments, self._fragments_size = 0, [], 0
        return _message(opcode, data)

    def _on_close(self, payload: bytes) -> Close:
        if not payload:
            code, reason = NO_STATUS, ""
        elif len(payload) == 1:
            raise _Fail(1002, "the server sent a close frame with a one-byte payload")
        else:
            code = int.from_bytes(payload[:2], "big")
            if not (
                1000 <= code <= 1014
                and code not in (1004, NO_STATUS, ABNORMAL)
                or 3000 <= code <= 4999
            ):
                raise _Fail(1002, f"the server sent the invalid close code {code}")
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise _Fail(1007, "the server sent a close reason that is not UTF-8") from None
        self.close_received = True
        self._done = True
        return Close(code, reason)


def _message(opcode: int, data: bytes) -> Message:
    if opcode == OP_BINARY:
        return Message(data)
    try:
        return Message(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise _Fail(1007, "the server sent a text message that is not UTF-8") from None


def _control_payload(payload: bytes) -> bytes:
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError(
            f"a ping or pong carries at most {MAX_CONTROL_PAYLOAD} bytes, got {len(payload)}"
        )
    return bytes(payload)


def _apply_mask(data: bytes, mask: bytes) -> bytes:
    """*data* XOR the 4-byte *mask* repeated: one big-integer XOR, fast at any size."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
