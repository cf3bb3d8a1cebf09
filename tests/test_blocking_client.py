"""The CLI's blocking client against a real conductor and against misbehaving peers.

The conductor runs in this test's trio run (``security_helpers.open_conductor``);
the blocking client runs in a worker thread so that it does not stop the
conductor's event loop. Where the trio client (:mod:`skr8tr.client`) reports a
failure, the blocking client must report the very same ClientError (code, exit
status, message): the parity tests run both against the same peer.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from skr8tr import blocking_client, client
from skr8tr.core import protocol
from skr8tr.wire import CallOptions, ClientError
from skr8tr.ws import server as wsserver
from skr8tr.ws import trio_client
from tests.conftest import free_port
from tests.security_helpers import open_conductor
from tests.wire_helpers import decode_request
from tests.ws_helpers import serve_websocket

DEADLINE_S = 30


async def in_thread(fn: Callable, *args, **kw):
    """Run the blocking *fn* in a worker thread (abandoned if the test times out)."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kw), abandon_on_cancel=True)


async def blocking_error(fn: Callable, *args, **kw) -> ClientError:
    with pytest.raises(ClientError) as failed:
        await in_thread(fn, *args, **kw)
    return failed.value


def read_watch(opts: CallOptions, stop: Callable[[list], bool], action=None) -> list:
    """Messages of /v1/watch until ``stop(messages)``; ``action()`` after the first one."""
    seen = []
    with blocking_client.open_watch(opts) as stream:
        for msg in stream:
            seen.append(msg)
            if len(seen) == 1 and action is not None:
                action()
            if stop(seen):
                return seen
    raise AssertionError("unreachable: a watch stream ends only with an error")


# ------------------------------------------------------------------ a real conductor


async def test_calls_and_reply_errors_against_a_conductor(tmp_path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            unsigned = CallOptions(c.url, 5.0, None)
            admin = CallOptions(c.url, 5.0, c.admin)
            pong = await in_thread(blocking_client.call, unsigned, "ping", {})
            assert pong["pong"] == "conductor"
            assert await in_thread(blocking_client.call, unsigned, "list", {"app": None}) == []
            assert await in_thread(blocking_client.call, unsigned, "nodes", {}) == []
            status = await in_thread(blocking_client.call, unsigned, "status", {})
            assert set(status) >= {"nodes", "apps", "replicas", "rollouts"}

            missing = await blocking_error(blocking_client.call, admin, "down", {"app": "nope"})
            assert (missing.code, missing.exit) == ("NOT_FOUND", 1)
            refused = await blocking_error(blocking_client.call, unsigned, "down", {"app": "x"})
            assert (refused.code, refused.exit) == ("UNAUTHORIZED", 1)
            bad = await blocking_error(blocking_client.call, unsigned, "list", {"app": "B!"})
            assert (bad.code, bad.exit) == ("BAD_REQUEST", 1)


async def test_many_calls_on_one_open_connection(tmp_path):
    def session(opts: CallOptions) -> list:
        with blocking_client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s) as conn:
            answers = [blocking_client.call_on(conn, opts, "ping", {}) for _ in range(50)]
            answers.append(blocking_client.call_on(conn, opts, "nodes", {}))
            with pytest.raises(ClientError) as missing:
                blocking_client.call_on(conn, opts, "history", {"app": "nope"})
            answers.append(missing.value.code)
            answers.append(blocking_client.call_on(conn, opts, "ping", {}))  # still usable
        return answers

    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            answers = await in_thread(session, CallOptions(c.url, 5.0, None))
    assert [a["pong"] for a in answers[:50]] == ["conductor"] * 50
    assert answers[50:] == [[], "NOT_FOUND", answers[0]]


async def test_watch_stream_delivers_the_snapshot_then_events(tmp_path):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            opts = CallOptions(c.url, 5.0, c.admin)
            manifest = "app quiet\n  exec /bin/sleep\n  args 60\n"
            up = {"manifest": manifest, "format": "skr8tr", "base_dir": str(tmp_path)}

            def deploy() -> None:  # no node: the app is kept, its replicas unplaced
                with pytest.raises(ClientError) as no_capacity:
                    blocking_client.call(opts, "up", up)
                assert no_capacity.value.code == "NO_CAPACITY"

            def unplaced(seen: list) -> bool:
                return any(m.type == "event" and m.event == "app.unplaced" for m in seen)

            seen = await in_thread(read_watch, opts, unplaced, deploy)
    assert isinstance(seen[0], protocol.SnapshotMessage) and seen[0].state["nodes"] == []
    events = [m for m in seen if m.type == "event"]
    assert events[0].event == "app.created" and events[0].data["app"] == "quiet"
    assert [m.seq for m in seen] == sorted(m.seq for m in seen)


async def test_a_ping_from_the_server_is_answered(tmp_path):
    async def handler(request: wsserver.Request) -> None:
        ws = await request.accept()
        async def read_on() -> None:  # the reader sees the pong; the client's close ends it
            with _quiet():
                await ws.get_message()

        with trio.move_on_after(DEADLINE_S), _quiet():
            raw = await ws.get_message()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_on)
                await ws.ping(b"still there?")  # returns only once our pong arrived
                req = decode_request(raw)
                await ws.send_message(protocol.ok_reply(req.id, {"pong": "peer"}))

    with trio.fail_after(DEADLINE_S):
        async with _serve_ws(handler) as url:
            result = await in_thread(blocking_client.call, CallOptions(url, 10.0, None), "ping", {})
    assert result == {"pong": "peer"}


# ------------------------------------------------------------------ misbehaving peers


class _quiet:
    """Swallow the ways a peer's connection may end in these tests."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(
            exc_type,
            trio_client.ConnectionClosed | trio.BrokenResourceError | trio.ClosedResourceError,
        )


@asynccontextmanager
async def _serve_ws(handler) -> AsyncIterator[str]:
    async def guarded(request: wsserver.Request) -> None:
        with _quiet():
            await handler(request)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, guarded, "127.0.0.1", 0, None)
        yield f"ws://127.0.0.1:{server.port}"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _serve_tcp(handler) -> AsyncIterator[str]:
    async def guarded(stream: trio.SocketStream) -> None:
        with _quiet():
            await handler(stream)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, guarded, 0, host="127.0.0.1"))
        yield f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()


def http_answer(answer: bytes):
    async def handler(stream: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(4096)
        await stream.send_all(answer)
        await trio.sleep_forever()

    return _serve_tcp(handler)


def ws_peer(
    cli: Callable[[trio_client.ClientConnection], Awaitable[None]],
    watch: Callable[[trio_client.ClientConnection], Awaitable[None]] | None = None,
):
    """A WebSocket peer: *cli* serves /v1/cli connections, *watch* /v1/watch ones."""

    async def handler(request: wsserver.Request) -> None:
        ws = await request.accept()
        await (watch if request.path == "/v1/watch" and watch else cli)(ws)

    return _serve_ws(handler)


async def _read_forever(ws) -> None:
    while True:
        await ws.get_message()


async def _close_1011(ws) -> None:
    await ws.get_message()
    await ws.aclose(code=1011, reason="bye")


async def _close_1000_without_reason(ws) -> None:
    await ws.get_message()
    await ws.aclose()


async def _drop_tcp(ws) -> None:
    await ws.get_message()
    await ws.stream.aclose()  # no close frame: an abnormal closure (1006)


async def _not_json(ws) -> None:
    await ws.get_message()
    await ws.send_message("not json")
    await _read_forever(ws)


async def _not_a_reply(ws) -> None:
    await ws.get_message()
    await ws.send_message('{"v": 1, "id": null, "ok": "yes"}')
    await _read_forever(ws)


async def _too_big(ws) -> None:
    await ws.get_message()
    await ws.send_message("x" * (4 * 1024 * 1024 + 1))
    await _read_forever(ws)


async def _other_ids_only(ws) -> None:
    while True:
        await ws.get_message()
        await ws.send_message(protocol.ok_reply("someone-else", {"pong": "x"}))


async def _error_reply(ws) -> None:
    req = decode_request(await ws.get_message())
    await ws.send_message(protocol.error_reply(req.id, "CONFLICT", "a rollout of web runs"))
    await _read_forever(ws)


async def _watch_then_close(ws) -> None:
    await ws.send_message(protocol.snapshot_message(1, 1.0, {"nodes": []}))
    await ws.send_message(protocol.event_message(2, 2.0, "node.joined", {"node": "n1"}))
    await ws.aclose(code=1001, reason="going away")


async def _watch_garbage(ws) -> None:
    await ws.send_message(protocol.snapshot_message(1, 1.0, {"nodes": []}))
    await ws.send_message('{"type": "event"}')
    await _read_forever(ws)


@asynccontextmanager
async def _refused_port() -> AsyncIterator[str]:
    yield f"ws://127.0.0.1:{free_port()}"


PEERS = {
    "refused port": (_refused_port, None),
    "HTTP 404": (
        partial(http_answer, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        None,
    ),
    "HTTP 200": (partial(http_answer, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"), None),
    "close 1011": (partial(ws_peer, _close_1011), None),
    "close 1000": (partial(ws_peer, _close_1000_without_reason), None),
    "TCP dropped": (partial(ws_peer, _drop_tcp), None),
    "reply not JSON": (partial(ws_peer, _not_json), None),
    "not a reply": (partial(ws_peer, _not_a_reply), None),
    "reply too big": (partial(ws_peer, _too_big), None),
    "error reply": (partial(ws_peer, _error_reply), None),
    "silent": (partial(ws_peer, _read_forever), 0.5),
    "replies to others": (partial(ws_peer, _other_ids_only), 0.5),
}


def _as_tuple(err: ClientError) -> tuple[str, int, str]:
    return err.code, err.exit, err.message


@pytest.mark.parametrize("name", list(PEERS))
async def test_call_failures_match_the_trio_client(name):
    open_peer, timeout_s = PEERS[name]
    with trio.fail_after(DEADLINE_S):
        async with open_peer() as url:
            opts = CallOptions(url, timeout_s or 5.0, None)
            with pytest.raises(ClientError) as via_trio:
                await client.call(opts, "ping", {})
            via_blocking = await blocking_error(blocking_client.call, opts, "ping", {})
    assert _as_tuple(via_blocking) == _as_tuple(via_trio.value)
    expected_exit = 1 if name in ("reply not JSON", "not a reply", "error reply") else 3
    assert via_blocking.exit == expected_exit, via_blocking


@pytest.mark.parametrize("watch", [_watch_then_close, _watch_garbage])
async def test_watch_failures_match_the_trio_client(watch):
    async def trio_watch(opts: CallOptions, seen: list) -> None:
        async with client.open_watch(opts) as stream:
            async for msg in stream:
                seen.append(msg)

    def blocking_watch(opts: CallOptions, seen: list) -> None:
        with blocking_client.open_watch(opts) as stream:
            seen.extend(stream)

    with trio.fail_after(DEADLINE_S):
        async with ws_peer(_read_forever, watch) as url:
            opts = CallOptions(url, 5.0, None)
            trio_seen, blocking_seen = [], []
            with pytest.raises(ClientError) as via_trio:
                await trio_watch(opts, trio_seen)
            via_blocking = await blocking_error(blocking_watch, opts, blocking_seen)
    assert _as_tuple(via_blocking) == _as_tuple(via_trio.value)
    assert blocking_seen == trio_seen and blocking_seen[0].type == "snapshot"
    if watch is _watch_then_close:
        assert [m.seq for m in blocking_seen] == [1, 2]
        assert "the stream closed: CloseReason<code=1001, name=GOING_AWAY" in via_blocking.message
    else:
        assert via_blocking.code == "BAD_REPLY" and via_blocking.exit == 1


async def test_a_listening_socket_that_never_answers_is_unreachable():
    with socket.socket() as listener:  # listens, never accepts: the kernel completes the
        listener.bind(("127.0.0.1", 0))  # TCP handshake, nobody answers the upgrade
        listener.listen(8)
        url = f"ws://127.0.0.1:{listener.getsockname()[1]}"
        with trio.fail_after(DEADLINE_S):
            err = await blocking_error(
                blocking_client.call, CallOptions(url, 0.3, None), "ping", {}
            )
    assert (err.code, err.exit) == ("UNREACHABLE", 3)
    assert f"cannot reach the conductor at {url}/v1/cli (no answer within 0.3 s)" in err.message


async def test_a_server_that_hangs_up_during_the_handshake_is_unreachable():
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.aclose()

    with trio.fail_after(DEADLINE_S):
        async with _serve_tcp(hang_up) as url:
            err = await blocking_error(
                blocking_client.call, CallOptions(url, 5.0, None), "ping", {}
            )
    assert err.exit == 3 and "(the connection closed during the handshake)" in err.message


@pytest.mark.parametrize(
    "answer, words",
    [
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: AAAA\r\n\r\n",
            "Sec-WebSocket-Accept does not match",
        ),
        (b"hello there\r\n\r\n", "did not answer with HTTP"),
    ],
)
async def test_a_wrong_handshake_answer_is_unreachable(answer, words):
    # (the trio client dies with an h11 traceback on these)
    with trio.fail_after(DEADLINE_S):
        async with http_answer(answer) as url:
            err = await blocking_error(
                blocking_client.call, CallOptions(url, 5.0, None), "ping", {}
            )
    assert err.code == "UNREACHABLE" and err.exit == 3 and words in err.message


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://127.0.0.1:7771", "must start with ws:// or wss://"),
        ("ws://127.0.0.1:port", "Port could not be cast"),
        ("ws://:7771", "has no host"),
    ],
)
async def test_a_malformed_url_is_bad_usage(url, words):
    err = await blocking_error(blocking_client.call, CallOptions(url, 1.0, None), "ping", {})
    assert (err.code, err.exit) == ("BAD_URL", 2) and words in err.message


async def test_an_unknown_host_is_unreachable():
    url = "ws://no-such-host.invalid:7771"
    with trio.fail_after(DEADLINE_S):
        err = await blocking_error(blocking_client.call, CallOptions(url, 5.0, None), "ping", {})
    assert (err.code, err.exit) == ("UNREACHABLE", 3)
    assert err.message.startswith(f"cannot reach the conductor at {url}/v1/cli (")


async def test_a_closed_connection_refuses_more_calls(tmp_path):
    def session(opts: CallOptions) -> ClientError:
        conn = blocking_client.open_conductor(opts.conductor, "/v1/cli", opts.timeout_s)
        with conn:
            blocking_client.call_on(conn, opts, "ping", {})
        conn.close()  # again: nothing happens
        with pytest.raises(ClientError) as closed:
            blocking_client.call_on(conn, opts, "ping", {})
        return closed.value

    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            err = await in_thread(session, CallOptions(c.url, 5.0, None))
    assert err.exit == 3 and "the connection closed: CloseReason<code=1000" in err.message


# ------------------------------------------------------------------ wss://



async def test_wss_is_verified_with_the_given_ca(tmp_path, pki, other_pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path, tls_cert=str(pki.cert), tls_key=str(pki.key)) as c:
            for url in (c.url, c.url.replace("127.0.0.1", "localhost")):
                opts = CallOptions(url, 5.0, None, ca_file=str(pki.ca))
                assert (await in_thread(blocking_client.call, opts, "ping", {}))["pong"]
                assert await in_thread(blocking_client.call, opts, "nodes", {}) == []

            for ca in (str(other_pki.ca), None):  # a CA that did not sign it; the system's
                opts = CallOptions(c.url, 5.0, None, ca_file=ca)
                err = await blocking_error(blocking_client.call, opts, "ping", {})
                assert (err.code, err.exit) == ("UNREACHABLE", 3)
                assert "the TLS certificate does not verify" in err.message
                assert "--ca FILE" in err.message

            plain = CallOptions(c.url.replace("wss://", "ws://"), 3.0, None)
            err = await blocking_error(blocking_client.call, plain, "ping", {})
            assert err.exit == 3

            with_ca = CallOptions(c.url.replace("wss://", "ws://"), 3.0, None, ca_file=str(pki.ca))
            err = await blocking_error(blocking_client.call, with_ca, "ping", {})
            assert (err.code, err.exit) == ("USAGE", 2) and "wss://" in err.message

            missing = CallOptions(c.url, 3.0, None, ca_file=str(tmp_path / "nope.pem"))
            err = await blocking_error(blocking_client.call, missing, "ping", {})
            assert (err.code, err.exit) == ("USAGE", 2) and "no such file" in err.message

            # The trio client says the same about a CA that does not match.
            bad = CallOptions(c.url, 5.0, None, ca_file=str(other_pki.ca))
            with pytest.raises(ClientError) as via_trio:
                await client.call(bad, "ping", {})
            via_blocking = await blocking_error(blocking_client.call, bad, "ping", {})
            assert _as_tuple(via_blocking) == _as_tuple(via_trio.value)


async def test_wss_to_a_plain_conductor_fails_with_a_reason(tmp_path, pki):
    with trio.fail_after(DEADLINE_S):
        async with open_conductor(tmp_path) as c:
            opts = CallOptions(f"wss://127.0.0.1:{c.ws_port}", 5.0, None, ca_file=str(pki.ca))
            err = await blocking_error(blocking_client.call, opts, "ping", {})
            with pytest.raises(ClientError) as via_trio:
                await client.call(opts, "ping", {})
    assert err.exit == 3 and "TLS failed" in err.message
    assert _as_tuple(err) == _as_tuple(via_trio.value)


async def test_a_silent_tls_server_is_a_timeout_not_a_hang():
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    with trio.fail_after(DEADLINE_S):
        async with _serve_tcp(silent) as url:
            opts = CallOptions(url.replace("ws://", "wss://"), 0.3, None)
            err = await blocking_error(blocking_client.call, opts, "ping", {})
    assert err.exit == 3 and "(no answer within 0.3 s)" in err.message


def test_json_of_a_request_is_what_the_trio_client_sends():
    # Both clients build requests with the same function: the wire text is the same.
    from skr8tr import wire

    assert client.build_request is wire.build_request
    req = wire.build_request("ping", {}, None)
    assert json.loads(json.dumps(req)) == {"v": 1, "id": req["id"], "cmd": "ping", "args": {}}
