"""An open WebSocket on a trio stream, either side, with no reader task.

Why no reader task: trio-websocket, which skr8tr used before, runs one per
connection (socket -> wsproto -> a memory channel -> ``get_message`` in the
handler's task), and its ``send_message`` always yields at its lock before
writing. A ``ping`` on an open ``/v1/cli`` connection cost ~300 µs of which the
conductor's own work was ~16 µs: the rest was those scheduling rounds. Here
the task that asks for a message reads the socket itself, feeds the framing
layer (:class:`skr8tr.ws.frames.Protocol`, wsproto) and returns the next
message; a send writes at once when nobody else is sending. That leaves one
scheduling round per request (trio's own, after the write).

Rules of use, the same on the server (:mod:`skr8tr.ws.server`) and the
client (:mod:`skr8tr.ws.trio_client`):

- One task reads at a time (:meth:`WebSocket.get_message`); any number may
  send (:meth:`~WebSocket.send_message`, :meth:`~WebSocket.send_messages`),
  serialized by a lock that is taken without a scheduling round when free.
- The reader answers pings and close frames. A task busy with something else
  answers a ping when it next reads. :attr:`WebSocket.last_received` says
  when the peer last sent anything (a pong included), for keep-alive checks
  with :meth:`~WebSocket.send_ping`.
- A write goes to the stream in pieces of at most :data:`WRITE_CHUNK_BYTES`,
  so that a TLS stream never holds more than that of it encrypted for a peer
  that does not read.
- A message over ``max_message_bytes`` (UTF-8 for text) is refused with close
  code 1009, a frame that breaks RFC 6455 with 1002 (1007: text that is not
  UTF-8). The peer's own close is answered with its code.
- Every way the connection ends surfaces as
  :class:`~skr8tr.ws.frames.ConnectionClosed` carrying the close code and
  reason: the peer's close, ours, a limit, or 1006 when the stream ended or
  broke without a close frame. Messages that arrived before the peer's close
  are still returned first; once this side starts a close (``aclose`` or a
  limit), pending messages are dropped.
- :meth:`~WebSocket.aclose` does the closing handshake and always closes the
  stream, also when cancelled; bound it with ``move_on_after``.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable

import trio

from skr8tr.ws.frames import (
    ABNORMAL_CLOSURE,
    Close,
    CloseReason,
    ConnectionClosed,
    Event,
    Message,
    Ping,
    Pong,
    Protocol,
)

__all__ = ["RECEIVE_BYTES", "WRITE_CHUNK_BYTES", "WebSocket"]

RECEIVE_BYTES = 64 * 1024
# What a stuck write may hold of its own per connection; a TLS record's size.
WRITE_CHUNK_BYTES = 16 * 1024


class WebSocket:
    """An open WebSocket over *stream*, framed by *proto*; see the module docstring.

    *received* is what came behind the handshake (frames sent at once);
    *peer* names the other end in logs.
    """

    def __init__(self, stream: trio.abc.Stream, proto: Protocol, *, peer: str = "?",
                 received: bytes = b"") -> None:
        self.stream = stream
        #: The other end's address, for logs.
        self.peer = peer
        self._proto = proto
        self._events: deque[Event] = deque(proto.receive(received) if received else ())
        self._messages: deque[str | bytes] = deque()
        self._closed: CloseReason | None = None
        self._readable = True  # False once the stream ended or the parser gave up
        self._reading = False
        self._broken = False  # a write failed part-way: nothing more may be written
        self._send_lock = trio.StrictFIFOLock()
        self._pings: dict[bytes, trio.Event] = {}  # payload -> set when its pong is read
        #: When (``trio.current_time()``) bytes last came from the peer.
        self.last_received = trio.current_time()

    @property
    def max_message_bytes(self) -> int:
        return self._proto.max_message_bytes

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection ended or is ending; None while it is open."""
        return self._closed

    # ------------------------------------------------------------------ receiving

    async def get_message(self) -> str | bytes:
        """The next message: ``str`` for text, ``bytes`` for binary.

        Raises ConnectionClosed once the connection is over and every message
        received before the peer's close was returned. Cancelling it loses
        nothing: what was read stays for the next call. Raises
        trio.BusyResourceError if another task is reading.
        """
        if self._reading:
            raise trio.BusyResourceError("another task is reading this WebSocket")
        self._reading = True
        try:
            while True:
                if self._messages:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    return self._messages.popleft()
                if self._closed is not None or not self._readable:
                    await trio.lowlevel.checkpoint_if_cancelled()
                    raise self._closed_error()
                await self._receive()
        finally:
            self._reading = False

    async def _receive(self) -> None:
        """Read once (unless events are still to be handled) and handle the events."""
        if not self._events:
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._readable = False
                self._end(ABNORMAL_CLOSURE, "the connection was lost")
                return
            self.last_received = trio.current_time()
            self._events.extend(self._proto.receive(data))
        await self._handle_events()

    async def _handle_events(self) -> None:
        # An event leaves the queue once handled: a cancelled pong is sent next time.
        events = self._events
        while events:
            event = events[0]
            kind = type(event)
            if kind is Message:
                if self._closed is None:
                    self._messages.append(event.data)  # type: ignore[union-attr]
            elif kind is Ping:
                if self._closed is None:
                    await self._write(self._proto.reply_to(event))
            elif kind is Pong:
                waiter = self._pings.pop(event.payload, None)  # type: ignore[union-attr]
                if waiter is not None:
                    waiter.set()
            elif kind is Close:
                assert isinstance(event, Close)
                events.clear()
                self._readable = False
                if not event.by_peer:
                    await self._fail(event.code, event.reason)
                elif self._closed is None:
                    # The peer closes: echo its code; the stream is closed by aclose.
                    self._end(event.code, event.reason)
                    with contextlib.suppress(ConnectionClosed):
                        await self._write(self._proto.reply_to(event), closing=True)
                return  # else: the answer to our own close
            events.popleft()

    async def _fail(self, code: int, reason: str) -> None:
        """The peer broke a rule: say so with *code* and stop taking its messages."""
        if self._closed is not None:
            return
        self._end(code, reason)
        self._messages.clear()
        with contextlib.suppress(ConnectionClosed):
            await self._write(self._proto.encode_close(code, reason), closing=True)

    # ------------------------------------------------------------------ sending

    async def send_message(self, message: str | bytes) -> None:
        """Send one message (text for ``str``, binary for ``bytes``).

        Writes before any scheduling round when nobody else is sending. Raises
        ConnectionClosed if the connection is over or closing.
        """
        if self._closed is not None:
            raise self._closed_error()
        await self._write(self._proto.encode_message(message))

    async def send_messages(self, texts: Iterable[str]) -> None:
        """Send *texts* as that many text messages, in one write to the socket.

        On loopback each write wakes the peer and can cost the conductor ~100 µs
        when the machine is busy; a command publishes several events at once,
        and a rollout batch queues several launches for a node, so they go
        together. What is sent this way goes out before a send started later
        in the same scheduling round. Raises ConnectionClosed like send_message.
        """
        if self._closed is not None:
            raise self._closed_error()
        encode = self._proto.encode_text
        await self._write(b"".join(encode(text) for text in texts))

    async def send_ping(self, payload: bytes = b"") -> None:
        """Send a ping; its pong moves :attr:`last_received` when a task reads.
        Raises ConnectionClosed like send_message."""
        if self._closed is not None:
            raise self._closed_error()
        await self._write(self._proto.encode_ping(payload))

    async def ping(self, payload: bytes) -> None:
        """Send a ping and wait until its pong is read, by whichever task reads
        (so some task must be reading). Raises ConnectionClosed if the connection
        ends first,
        ValueError if a ping with this payload is waiting already."""
        if payload in self._pings:
            raise ValueError(f"a ping with payload {payload!r} is waiting for its pong already")
        waiter = self._pings[payload] = trio.Event()
        try:
            await self.send_ping(payload)
            await waiter.wait()
            if self._pings.get(payload) is waiter:  # woken by the end of the connection
                raise self._closed_error()
        finally:
            self._pings.pop(payload, None)

    async def _write(self, data: bytes, *, closing: bool = False) -> None:
        """Write *data* whole, or mark the connection broken.

        *closing* lets a close frame go out after ``closed`` was set.
        """
        if self._broken or (self._closed is not None and not closing):
            raise self._closed_error()
        if not data:
            return
        lock = self._send_lock
        try:
            lock.acquire_nowait()  # uncontended: no scheduling round here
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if self._broken:
                raise self._closed_error()
            # Cancelled here nothing was written; later, a part may have been.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                if len(data) <= WRITE_CHUNK_BYTES:
                    await self.stream.send_all(data)
                else:
                    view = memoryview(data)
                    for start in range(0, len(view), WRITE_CHUNK_BYTES):
                        await self.stream.send_all(view[start:start + WRITE_CHUNK_BYTES])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._broken = True
                self._end(ABNORMAL_CLOSURE, "the connection was lost")
                raise self._closed_error() from None
            except BaseException:
                self._broken = True  # cancelled part-way: the framing is lost
                self._end(ABNORMAL_CLOSURE, "a write was interrupted")
                raise
        finally:
            lock.release()

    # ------------------------------------------------------------------ closing

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with *code* and *reason*: our close frame (unless a close went either
        way already), the peer's answer (messages meanwhile are dropped), then
        the stream.

        Idempotent; never raises ConnectionClosed. The stream is closed
        whatever happens, cancellation included. If another task is reading,
        the peer's answer is not waited for.
        """
        try:
            if self._closed is None:
                self._end(code, reason)
                self._messages.clear()
                await self._write(self._proto.encode_close(code, reason), closing=True)
            while self._readable and not self._reading and not self._broken:
                await self._receive()
        except ConnectionClosed:
            pass  # the peer answered our close (or left): what aclose waits for
        finally:
            self._readable = False
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.stream.aclose()

    def _end(self, code: int, reason: str) -> None:
        if self._closed is None:
            self._closed = CloseReason(code, reason)
            for waiter in self._pings.values():
                waiter.set()

    def _closed_error(self) -> ConnectionClosed:
        closed = self._closed or CloseReason(ABNORMAL_CLOSURE, "the connection was lost")
        return ConnectionClosed(closed.code, closed.reason)
