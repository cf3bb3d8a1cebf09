"""The framing layer (skr8tr.ws.frames) as a client, against wsproto's own server.

Everything runs in memory: bytes from ``ClientProtocol`` go into a wsproto
server connection and back. Frames wsproto would never send (masked,
reserved bits, bad opcodes...) are written by hand.
"""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto import events as wse

from skr8tr.ws.frames import (
    ClientProtocol,
    Close,
    HandshakeError,
    Message,
    Ping,
    Pong,
    close_code_name,
)

KIB = 1024
MIB = 1024 * KIB
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, MIB - 1, MIB]


def server_for(client: ClientProtocol) -> WSConnection:
    """A wsproto server that has read the client's handshake request."""
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.handshake_request())
    events = list(server.events())
    assert len(events) == 1 and isinstance(events[0], wse.Request), events
    return server


def connected(**kw) -> tuple[ClientProtocol, WSConnection]:
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli", **kw)
    server = server_for(client)
    assert client.receive_handshake(server.send(wse.AcceptConnection())) == b""
    assert client.open
    return client, server


def server_events(server: WSConnection, data: bytes) -> list:
    """What the server makes of *data*, with message pieces joined into whole messages."""
    server.receive_data(data)
    out, parts = [], []
    for event in server.events():
        if isinstance(event, wse.Message):
            parts.append(event.data)
            if event.message_finished:
                joined = "".join(parts) if isinstance(event, wse.TextMessage) else b"".join(parts)
                out.append(("text" if isinstance(event, wse.TextMessage) else "binary", joined))
                parts = []
        else:
            out.append(event)
    return out


def frame(first: int, payload: bytes, *, masked: bool = False) -> bytes:
    """A hand-made server frame: *first* is the FIN/RSV/opcode byte."""
    n = len(payload)
    if n < 126:
        head = bytes([first, n | (0x80 if masked else 0)])
    elif n < 65536:
        head = bytes([first, 126 | (0x80 if masked else 0)]) + struct.pack("!H", n)
    else:
        head = bytes([first, 127 | (0x80 if masked else 0)]) + struct.pack("!Q", n)
    if masked:
        mask = b"\x01\x02\x03\x04"
        return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + payload


# ------------------------------------------------------------------ handshake


def test_handshake_request_is_what_a_server_expects():
    client = ClientProtocol("example.org:7771", "/v1/watch")
    request = client.handshake_request().decode()
    assert request.startswith("GET /v1/watch HTTP/1.1\r\n") and request.endswith("\r\n\r\n")
    lines = request.split("\r\n")
    for header in (
        "Host: example.org:7771",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {client.key}",
        "Sec-WebSocket-Version: 13",
    ):
        assert header in lines
    assert "Sec-WebSocket-Extensions" not in request and "Sec-WebSocket-Protocol" not in request
    assert len(base64.b64decode(client.key)) == 16
    server_for(client)  # wsproto accepts it as a valid upgrade request
    assert ClientProtocol("h:1", "/").key != client.key


def test_accepted_handshake_returns_the_bytes_after_the_headers():
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    server = server_for(client)
    answer = server.send(wse.AcceptConnection()) + server.send(wse.TextMessage(data="early"))
    # Fed a byte at a time: nothing until the header block is complete.
    for i in range(len(answer)):
        rest = client.receive_handshake(answer[i : i + 1])
        if rest is not None:
            break
    assert rest == b""
    assert client.open
    tail = answer[i + 1 :]
    assert client.receive(tail) == [Message("early")]


def test_bytes_after_the_headers_in_the_same_chunk_are_returned():
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    server = server_for(client)
    answer = server.send(wse.AcceptConnection()) + server.send(wse.TextMessage(data="hello"))
    rest = client.receive_handshake(answer)
    assert client.receive(rest) == [Message("hello")]


@pytest.mark.parametrize("status", [400, 403, 404, 429, 500, 503])
def test_refused_handshake_carries_the_http_status(status):
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    server = server_for(client)
    with pytest.raises(HandshakeError) as refused:
        client.receive_handshake(server.send(wse.RejectConnection(status_code=status)))
    assert refused.value.status == status
    assert str(refused.value) == f"the handshake was refused with HTTP {status}"
    assert not client.open


def _accept_answer(client: ClientProtocol) -> str:
    return server_for(client).send(wse.AcceptConnection()).decode("latin-1")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda a, k: a.replace(k, base64.b64encode(b"x" * 20).decode()), "Sec-WebSocket-Accept"),
        (
            lambda a, k: "\r\n".join(
                line
                for line in a.split("\r\n")
                if not line.lower().startswith("sec-websocket-accept")
            ),
            "Sec-WebSocket-Accept",
        ),
        (
            lambda a, k: "\r\n".join(
                line for line in a.split("\r\n") if not line.lower().startswith("upgrade")
            ),
            "Upgrade",
        ),
        (
            lambda a, k: "\r\n".join(
                line for line in a.split("\r\n") if not line.lower().startswith("connection")
            ),
            "Connection",
        ),
        (
            lambda a, k: a.replace(
                "\r\n\r\n", "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
            ),
            "sec-websocket-extensions",
        ),
        (lambda a, k: a.replace("\r\n\r\n", "\r\nno colon here\r\n\r\n"), "malformed header"),
    ],
)
def test_a_101_with_wrong_headers_is_refused(edit, words):
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    answer = _accept_answer(client)
    accept = base64.b64encode(
        hashlib.sha1(client.key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    assert accept in answer
    with pytest.raises(HandshakeError) as refused:
        client.receive_handshake(edit(answer, accept).encode("latin-1"))
    assert refused.value.status == 101 and words in str(refused.value)


def test_headers_are_case_insensitive_and_may_list_tokens():
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    accept = base64.b64encode(
        hashlib.sha1(client.key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    ).decode()
    answer = (
        f"HTTP/1.1 101 Switching Protocols\r\nUPGRADE: WebSocket\r\n"
        f"connection: keep-alive, upgrade\r\nsec-websocket-accept:{accept}\r\n\r\n"
    )
    assert client.receive_handshake(answer.encode()) == b""


@pytest.mark.parametrize(
    "answer", [b"hello there\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc Nope\r\n\r\n"]
)
def test_an_answer_that_is_not_http_is_refused_without_a_status(answer):
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    with pytest.raises(HandshakeError) as refused:
        client.receive_handshake(answer)
    assert refused.value.status is None and "did not answer with HTTP" in str(refused.value)


def test_an_endless_header_block_is_refused():
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    assert client.receive_handshake(b"HTTP/1.1 101 Switching Protocols\r\n") is None
    with pytest.raises(HandshakeError) as refused:
        for _ in range(100):
            client.receive_handshake(b"X-Filler: " + b"a" * 1000 + b"\r\n")
    assert "longer than" in str(refused.value)


def test_out_of_order_use_is_a_runtime_error():
    client = ClientProtocol("127.0.0.1:7771", "/v1/cli")
    with pytest.raises(RuntimeError):
        client.encode_text("too early")
    with pytest.raises(RuntimeError):
        client.receive(b"\x81\x00")
    client, _ = connected()
    with pytest.raises(RuntimeError):
        client.receive_handshake(b"HTTP/1.1 101 Again\r\n\r\n")
    assert client.encode_close() != b""
    assert client.encode_close() == b""  # only one close frame, ever
    with pytest.raises(RuntimeError):
        client.encode_text("too late")
    with pytest.raises(ValueError):
        connected()[0].encode_ping(b"x" * 126)


# ------------------------------------------------------------------ messages


@pytest.mark.parametrize("size", SIZES)
def test_text_round_trip(size):
    client, server = connected(max_message_bytes=2 * MIB)
    text = ("é" * (size // 2)) + ("a" * (size % 2))  # multi-byte characters across frames
    assert server_events(server, client.encode_text(text)) == [("text", text)]
    assert client.receive(server.send(wse.TextMessage(data=text))) == [Message(text)]


@pytest.mark.parametrize("size", SIZES)
def test_binary_round_trip(size):
    client, server = connected(max_message_bytes=2 * MIB)
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert server_events(server, client.encode_binary(data)) == [("binary", data)]
    assert client.receive(server.send(wse.BytesMessage(data=data))) == [Message(data)]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_client_frames_are_masked_and_use_the_shortest_length(size):
    client, _ = connected()
    encoded = client.encode_binary(b"\0" * size)
    assert encoded[0] == 0x82 and encoded[1] & 0x80
    head = 2 + (2 if 126 <= size < 65536 else 8 if size >= 65536 else 0)
    assert len(encoded) == head + 4 + size
    mask = encoded[head : head + 4]
    assert encoded[head + 4 :] == (mask * (size // 4 + 1))[:size]  # zero bytes XOR the mask


def test_fragmented_messages_with_pings_in_between():
    client, server = connected()
    wire = (
        server.send(wse.TextMessage(data="hel", message_finished=False))
        + server.send(wse.Ping(payload=b"1"))
        + server.send(wse.TextMessage(data="lo ", message_finished=False))
        + server.send(wse.Pong(payload=b"2"))
        + server.send(wse.TextMessage(data="wörld", message_finished=True))
        + server.send(wse.BytesMessage(data=b"\x00\x01", message_finished=False))
        + server.send(wse.Ping(payload=b"3"))
        + server.send(wse.BytesMessage(data=b"\x02", message_finished=True))
    )
    assert client.receive(wire) == [
        Ping(b"1"),
        Pong(b"2"),
        Message("hello wörld"),
        Ping(b"3"),
        Message(b"\x00\x01\x02"),
    ]


def test_ping_is_answered_with_a_pong_in_one_call():
    client, server = connected()
    (ping,) = client.receive(server.send(wse.Ping(payload=b"are you there")))
    assert ping == Ping(b"are you there")
    (pong,) = server_events(server, client.reply_to(ping))
    assert isinstance(pong, wse.Pong) and pong.payload == b"are you there"
    assert client.reply_to(Message("x")) == b"" and client.reply_to(Pong(b"")) == b""
    server_pong = server_events(server, client.encode_ping(b"p"))
    assert isinstance(server_pong[0], wse.Ping)


def test_a_ping_read_together_with_the_close_after_it_gets_no_pong():
    """A node's keep-alive pings, then its close, all read at once by a conductor that
    was frozen: answering the pings after the close was parsed raised RuntimeError."""
    client, server = connected()
    data = server.send(wse.Ping(payload=b"1")) + server.send(wse.CloseConnection(code=1000))
    events = client.receive(data)
    assert events == [Ping(b"1"), Close(1000, "")]
    assert client.reply_to(events[0]) == b""
    assert client.reply_to(events[1]) != b""  # the close is still answered


def test_close_handshake_started_by_the_client():
    client, server = connected()
    late = server.send(wse.TextMessage(data="late"))  # sent before our close reaches it
    (close,) = server_events(server, client.encode_close(1000, "bye"))
    assert isinstance(close, wse.CloseConnection) and (close.code, close.reason) == (1000, "bye")
    assert client.close_sent and not client.open
    assert client.receive(late + server.send(close.response())) == [
        Message("late"),
        Close(1000, "bye"),
    ]
    assert client.close_received and client.reply_to(Close(1000, "bye")) == b""
    assert client.receive(b"\x81\x01x") == []  # nothing after the close


def test_close_handshake_started_by_the_server():
    client, server = connected()
    events = client.receive(server.send(wse.CloseConnection(code=1001, reason="going away")))
    assert events == [Close(1001, "going away")]
    assert not client.open
    (answer,) = server_events(server, client.reply_to(events[0]))
    assert isinstance(answer, wse.CloseConnection) and answer.code == 1001


def test_a_close_without_a_code_is_1005_and_answered_without_one():
    client, _ = connected()
    (close,) = client.receive(b"\x88\x00")
    assert close == Close(1005, "")
    assert client.reply_to(close)[1] & 0x7F == 0  # an empty close frame


def test_close_reason_is_cut_to_fit_a_control_frame():
    client, server = connected()
    (close,) = server_events(server, client.encode_close(4000, "é" * 200))
    assert close.code == 4000 and 0 < len(close.reason.encode()) <= 123


# ------------------------------------------------------------------ failures


def failure(data: bytes) -> tuple[ClientProtocol, WSConnection, list]:
    client, server = connected()
    return client, server, client.receive(data)


def test_oversize_message_closes_with_1009_before_it_is_whole():
    client, server = connected(max_message_bytes=1000)
    assert client.receive(server.send(wse.TextMessage(data="a" * 1000))) == [Message("a" * 1000)]
    first_part = server.send(wse.BytesMessage(data=b"b" * 5000))[:1100]
    (close,) = client.receive(first_part)
    assert close == Close(1009, "Exceeded maximum message size: 1000 bytes", by_peer=False)
    (answer,) = server_events(server, client.reply_to(close))
    assert isinstance(answer, wse.CloseConnection) and answer.code == 1009
    assert client.receive(b"b" * 1001) == []


def test_oversize_fragmented_message_closes_with_1009():
    client, server = connected(max_message_bytes=1000)
    wire = server.send(wse.TextMessage(data="a" * 600, message_finished=False)) + server.send(
        wse.TextMessage(data="a" * 600, message_finished=True)
    )
    (close,) = client.receive(wire)
    assert close.code == 1009 and not close.by_peer


@pytest.mark.parametrize(
    "data, words",
    [
        (frame(0x81, b"hi", masked=True), "masked"),
        (frame(0xC1, b"hi"), "reserved bits"),
        (frame(0xA1, b"hi"), "reserved bits"),
        (frame(0x83, b"hi"), "opcode"),
        (frame(0x8B, b""), "opcode"),
        (frame(0x09, b"ping"), "fragmented a control frame"),
        (frame(0x89, b"p" * 126), "control frame of 126 bytes"),
        (frame(0x80, b"cont"), "continuation"),
        (frame(0x01, b"a") + frame(0x81, b"b"), "before finishing"),
        (frame(0x88, b"\x03"), "one-byte"),
        (frame(0x88, struct.pack("!H", 999)), "invalid close code 999"),
        (frame(0x88, struct.pack("!H", 1005)), "invalid close code 1005"),
        (frame(0x88, struct.pack("!H", 5000)), "invalid close code 5000"),
        (bytes([0x81, 127]) + struct.pack("!Q", 1 << 63), "top bit"),
    ],
)
def test_protocol_errors_close_with_1002(data, words):
    client, server, events = failure(data)
    (close,) = events
    # The wording is wsproto's; *words* says what the case is.
    assert close.code == 1002 and not close.by_peer and close.reason, (words, close)
    (answer,) = server_events(server, client.reply_to(close))
    assert isinstance(answer, wse.CloseConnection) and answer.code == 1002


@pytest.mark.parametrize(
    "data",
    [
        frame(0x81, b"\xff\xfe"),
        frame(0x01, b"caf\xc3") + frame(0x80, b"\xa9\xff"),  # split character, then garbage
        frame(0x88, struct.pack("!H", 1000) + b"\xc0\xaf"),
    ],
)
def test_invalid_utf8_closes_with_1007(data):
    _, _, events = failure(data)
    assert [(e.code, e.by_peer) for e in events] == [(1007, False)]


def test_a_character_split_across_fragments_is_fine():
    _, _, events = failure(frame(0x01, b"caf\xc3") + frame(0x80, b"\xa9"))
    assert events == [Message("café")]


def test_events_before_a_failure_are_kept():
    _, _, events = failure(frame(0x81, b"one") + frame(0x89, b"p") + frame(0x83, b""))
    assert events[:2] == [Message("one"), Ping(b"p")] and events[2].code == 1002


@pytest.mark.parametrize(
    "code, name",
    [
        (1000, "NORMAL_CLOSURE"),
        (1006, "ABNORMAL_CLOSURE"),
        (1009, "MESSAGE_TOO_BIG"),
        (1011, "INTERNAL_ERROR"),
        (1014, "RFC_RESERVED"),
        (3001, "IANA_RESERVED"),
        (4000, "PRIVATE_RESERVED"),
        (999, "INVALID_CODE"),
    ],
)
def test_close_code_names_match_wsproto(code, name):
    assert close_code_name(code) == name


# ------------------------------------------------------------------ chunking


@st.composite
def server_streams(draw):
    """A server's byte stream (messages, some fragmented, pings between) and its events."""
    client, server = connected(max_message_bytes=MIB)
    wire, expected = b"", []
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            data = draw(st.text(max_size=300))
            pieces = [data[i:j] for i, j in _cuts(draw, len(data))]
            kind = wse.TextMessage
        else:
            data = draw(st.binary(max_size=70000 if draw(st.integers(0, 9)) == 0 else 300))
            pieces = [data[i:j] for i, j in _cuts(draw, len(data))]
            kind = wse.BytesMessage
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            wire += server.send(kind(data=piece, message_finished=last))
            if not last and draw(st.booleans()):
                payload = draw(st.binary(max_size=125))
                wire += server.send(wse.Ping(payload=payload))
                expected.append(Ping(payload))
        expected.append(Message(data))
    if draw(st.booleans()):
        wire += server.send(wse.CloseConnection(code=1000, reason="done"))
        expected.append(Close(1000, "done"))
    return client, wire, expected


def _cuts(draw, n: int) -> list[tuple[int, int]]:
    points = sorted(set(draw(st.lists(st.integers(0, n), max_size=4))) - {0, n})
    bounds = [0, *points, n]
    return list(zip(bounds, bounds[1:], strict=False)) or [(0, 0)]


@settings(max_examples=200, deadline=None)
@given(stream=server_streams(), data=st.data())
def test_any_chunking_of_a_stream_gives_the_same_events(stream, data):
    client, wire, expected = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    bounds = [0, *cuts, len(wire)]
    events = []
    for i, j in zip(bounds, bounds[1:], strict=False):
        events += client.receive(wire[i:j])
    assert events == expected
