#!/usr/bin/env python3
"""A tiny HTTP service for skr8tr's examples and tests (stdlib only).

    hello_http.py --port 8080 [--host 127.0.0.1] [--version v1]

``GET /`` answers ``hello from VERSION (pid PID, port PORT)``; ``GET /healthz``
answers ``ok``. Every response carries ``X-Version`` (and the same value in
``x-skr8tr-version``) and ``X-Pid`` so a test can tell which replica and which
generation served it; VERSION is ``--version``, else ``$SKR8TR_VERSION``, else
``1``. SIGTERM stops accepting, lets in-flight requests finish and exits 0.

Test knobs (used to prove that rollouts refuse a bad release):
``--fail-health`` makes ``/healthz`` answer 503 forever;
``--health-status CODE`` makes ``/healthz`` answer CODE forever (a broken release);
``--crash-after S`` exits with status 3 after S seconds;
``--ready-after S`` makes ``/healthz`` answer 503 for the first S seconds;
``--listen-after S`` refuses connections for the first S seconds (it binds late).

Knobs for rollouts judged by traffic (the ingress counts what users see):
``--fail-rate F`` (0..1) answers 500 to exactly every round(1/F)-th request
other than ``/healthz`` (counted per process, so a test knows how many failed;
``/healthz`` stays 200, so the release passes its health check);
``--delay-ms N`` answers every request other than ``/healthz`` N ms late (on
the request's own thread: other requests are not held up).

Knobs for the ingress tests (off by default):
``--log-times`` starts every request log line with the wall-clock time
(seconds since the epoch) and logs when SIGTERM arrives;
``--close-idle-on-term`` also closes idle keep-alive connections on SIGTERM
(as Go's ``Server.Shutdown``, uvicorn and gunicorn do), so that the process
exits once the requests in flight are answered instead of waiting for its
keep-alive clients to hang up.
"""

from __future__ import annotations

import argparse
import http.server
import os
import select
import signal
import sys
import threading
import time


def fail_every(rate: float) -> int:
    """Which requests ``--fail-rate`` fails: every n-th (0: none)."""
    return 0 if rate == 0 else max(1, round(1 / rate))


def build_handler(version: str, port: int, ready_at: float, fail_health: bool,
                  log_times: bool = False, stopping: threading.Event | None = None,
                  health_status: int | None = None, fail_rate: float = 0.0,
                  delay_ms: float = 0.0):
    every = fail_every(fail_rate)
    served = [0]  # requests other than /healthz, under the lock
    lock = threading.Lock()

    def fails_now() -> bool:
        with lock:
            served[0] += 1
            return every > 0 and served[0] % every == 0

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"hello_http/{version}"
        disable_nagle_algorithm = True  # headers and body go out as two writes

        def handle(self) -> None:
            if stopping is None:
                super().handle()
                return
            # Like the base class, but between requests wait for the next one or for
            # SIGTERM, and close the connection when SIGTERM comes first.
            self.close_connection = True
            while self._next_request_arrives():
                self.handle_one_request()
                if self.close_connection:
                    return

        def _next_request_arrives(self) -> bool:
            assert stopping is not None
            while not stopping.is_set():
                readable, _, _ = select.select([self.connection], [], [], 0.05)
                if readable:
                    return True
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path == "/healthz":  # never delayed nor failed by --delay-ms, --fail-rate
                if health_status is not None:
                    self._reply(health_status, f"health answers {health_status}\n")
                    return
                healthy = not fail_health and time.monotonic() >= ready_at
                self._reply(200 if healthy else 503, "ok\n" if healthy else "not ready\n")
                return
            if delay_ms > 0:
                time.sleep(delay_ms / 1000)
            if fails_now():
                self._reply(500, f"failing on purpose: {version} (--fail-rate {fail_rate})\n")
            elif self.path == "/" or self.path.startswith("/?"):
                self._reply(200, f"hello from {version} (pid {os.getpid()}, port {port})\n")
            else:
                self._reply(404, "not found\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("X-Version", version)
            self.send_header("x-skr8tr-version", version)
            self.send_header("X-Pid", str(os.getpid()))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            stamp = f"{time.time():.6f} " if log_times else ""
            sys.stdout.write(f"{stamp}{self.address_string()} {format % args}\n")
            sys.stdout.flush()

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog (socketserver's default of 5 drops bursts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="skr8tr example HTTP service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    parser.add_argument("--version", default=os.environ.get("SKR8TR_VERSION") or "1")
    parser.add_argument("--fail-health", action="store_true")
    parser.add_argument("--health-status", type=int, default=None, metavar="CODE")
    parser.add_argument("--crash-after", type=float, default=None, metavar="S")
    parser.add_argument("--ready-after", type=float, default=0.0, metavar="S")
    parser.add_argument("--listen-after", type=float, default=0.0, metavar="S")
    parser.add_argument("--log-times", action="store_true")
    parser.add_argument("--close-idle-on-term", action="store_true")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="F",
                        help="answer 500 to every round(1/F)-th request but /healthz (0..1)")
    parser.add_argument("--delay-ms", type=float, default=0.0, metavar="N",
                        help="answer every request but /healthz N ms late")
    opts = parser.parse_args(argv)
    if not 0 <= opts.fail_rate <= 1:  # also refuses nan
        parser.error(f"--fail-rate {opts.fail_rate}: expected a fraction 0..1, like 0.2")
    if not 0 <= opts.delay_ms <= 600_000:
        parser.error(f"--delay-ms {opts.delay_ms}: expected 0..600000")

    stopping = threading.Event() if opts.close_idle_on_term else None
    handler = build_handler(
        opts.version, opts.port, time.monotonic() + opts.ready_after, opts.fail_health,
        opts.log_times, stopping, opts.health_status, opts.fail_rate, opts.delay_ms,
    )
    if opts.listen_after > 0:
        time.sleep(opts.listen_after)  # until then, connections to the port are refused
    server = _Server((opts.host, opts.port), handler)
    server.daemon_threads = False  # shutdown waits for in-flight requests
    server.block_on_close = True

    def on_term(signum: int, frame: object) -> None:
        if opts.log_times:
            sys.stdout.write(f"{time.time():.6f} received {signal.Signals(signum).name}\n")
            sys.stdout.flush()
        if stopping is not None:
            stopping.set()
        # shutdown() blocks until serve_forever returns, so call it off the main thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if opts.crash_after is not None:
        def crash() -> None:
            sys.stdout.write(f"crashing on purpose after {opts.crash_after}s\n")
            sys.stdout.flush()
            os._exit(3)
        timer = threading.Timer(opts.crash_after, crash)
        timer.daemon = True
        timer.start()

    print(f"hello_http {opts.version} listening on {opts.host}:{opts.port} pid {os.getpid()}",
          flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    print("hello_http stopped cleanly", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
