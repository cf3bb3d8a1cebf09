"""``skr8tr conductor``: the root nursery and everything it owns.

One Trio program. The root nursery owns the WebSocket server (``/v1/cli``,
``/v1/node``, ``/v1/watch``), the HTTP listener, the reconciler, the
node-expiry watchdog and the signal handler (SIGHUP re-reads the authorized
keys; SIGINT/SIGTERM shut down cleanly: sessions close, workloads keep running
on their nodes).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import trio
import trio_websocket

from skr8tr import __version__
from skr8tr.conductor import api as api_mod
from skr8tr.conductor import state_store, status_http
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.http import serve_http
from skr8tr.conductor.node_sessions import serve_node
from skr8tr.core import protocol
from skr8tr.core.keys import (
    AuthorizedKeys,
    AuthorizedKeysError,
    load_authorized_keys,
    parse_authorized_keys,
)

log = logging.getLogger("skr8tr.conductor")


class StartError(Exception):
    """The conductor refuses to start; the message is one line for the operator."""


@dataclass(frozen=True)
class ConductorConfig:
    listen: tuple[str, int] = ("127.0.0.1", 7771)
    http: tuple[str, int] = ("127.0.0.1", 7780)
    authorized_keys: str | None = None
    insecure: bool = False
    node_timeout_s: float = 15.0
    port_range: tuple[int, int] = (20000, 32000)
    state_path: str | None = None
    adopt_grace_s: float | None = None  # None: 2 x the node heartbeat


def parse_hostport(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise StartError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7771")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def parse_port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
        raise StartError(f"--port-range {text!r}: expected LO-HI within 1-65535, "
                         "e.g. 20000-32000")
    return int(lo), int(hi)


def config_from_args(opts: argparse.Namespace) -> ConductorConfig:
    if opts.authorized_keys is None and not opts.insecure:
        raise StartError("no --authorized-keys FILE given; list the admin and node keys "
                         "there (`admin HEX comment`), or pass --insecure for a throwaway "
                         "local cluster")
    return ConductorConfig(
        listen=parse_hostport(opts.listen, "--listen"),
        http=parse_hostport(opts.http, "--http"),
        authorized_keys=opts.authorized_keys,
        insecure=opts.insecure,
        node_timeout_s=opts.node_timeout,
        port_range=parse_port_range(opts.port_range),
        state_path=None if opts.state is None else os.path.abspath(opts.state),
        adopt_grace_s=opts.adopt_grace,
    )


def _load_state(config: ConductorConfig) -> state_store.StoredState | None:
    if config.state_path is None:
        return None
    try:
        os.makedirs(os.path.dirname(config.state_path), exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create the folder of --state {config.state_path}: "
                         f"{exc.strerror}") from None
    try:
        return state_store.load(config.state_path)
    except state_store.StateFileError as exc:
        raise StartError(f"{exc} (the file was left as it is; fix or move it)") from None


def _load_keys(config: ConductorConfig) -> AuthorizedKeys:
    if config.authorized_keys is None:
        return parse_authorized_keys("", filename="(none)")
    try:
        return load_authorized_keys(config.authorized_keys)
    except AuthorizedKeysError as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise StartError(f"cannot read --authorized-keys {config.authorized_keys}: "
                         f"{exc.strerror}") from None


async def run_conductor(config: ConductorConfig, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled. ``task_status.started((ws_port, http_port))`` once listening."""
    authority = api_mod.Authority(_load_keys(config), insecure=config.insecure)
    if config.insecure:
        log.warning("INSECURE MODE: no key is checked; anyone who can reach %s:%d can "
                    "start processes on every node", *config.listen)
    cluster = Cluster(node_timeout_s=config.node_timeout_s, port_range=config.port_range,
                      state_path=config.state_path, adopt_grace_s=config.adopt_grace_s)
    cli = api_mod.CliApi(cluster, authority, time.time)
    stored = _load_state(config)
    if stored is not None:
        try:
            cli.rollouts.interrupted = cluster.load_state(stored)
        except state_store.StateFileError as exc:
            raise StartError(f"{exc} (the file was left as it is)") from None
        cli.rollouts.restore(stored.rollouts)
        cluster.start_adopt_grace()

    async def on_websocket(request: trio_websocket.WebSocketRequest) -> None:
        path = request.path.split("?", 1)[0]
        if path not in ("/v1/cli", "/v1/node", "/v1/watch"):
            await request.reject(404, body=b"unknown path; use /v1/cli, /v1/node or /v1/watch\n")
            return
        ws = await request.accept()
        if path == "/v1/cli":
            await cli.serve_connection(ws)
        elif path == "/v1/node":
            await serve_node(cluster, authority, cli, ws)
        else:
            await api_mod.serve_watch(cluster, ws)

    # The status page, /api/*, /metrics; `server` is bound below, before any request.
    on_http = status_http.StatusSite(cluster, cli, listen=config.listen,
                                     ws_port=lambda: server.port)

    async with trio.open_nursery() as nursery:
        await nursery.start(_serve_signals, authority, config, nursery.cancel_scope)
        await nursery.start(cluster.run_reconciler)
        await nursery.start(cli.rollouts.run)
        await nursery.start(cluster.run_expiry_watchdog)
        server = await nursery.start(_websocket_server(on_websocket, config))
        listeners = await nursery.start(serve_http, on_http, *config.http)
        http_port = listeners[0].socket.getsockname()[1]
        log.info("skr8tr conductor %s: API ws://%s:%d, status http://%s:%d", __version__,
                 config.listen[0], server.port, config.http[0], http_port)
        task_status.started((server.port, http_port))


def _websocket_server(handler, config: ConductorConfig):
    async def serve(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await trio_websocket.serve_websocket(
            handler, config.listen[0], config.listen[1], ssl_context=None,
            max_message_size=protocol.MAX_MESSAGE_BYTES, task_status=task_status,
        )
    return serve


async def _serve_signals(authority: api_mod.Authority, config: ConductorConfig,
                         root: trio.CancelScope, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    authority.authorized = _load_keys(config)
                except StartError as exc:
                    log.error("SIGHUP: keeping the previous authorized keys: %s", exc)
                else:
                    log.info("SIGHUP: re-read %s (%d key(s))", config.authorized_keys,
                             len(authority.authorized))
            else:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                root.cancel()
                return


def main(opts: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, opts.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(opts)
        _load_keys(config)  # fail before anything listens
        _load_state(config)
        trio.run(run_conductor, config)
    except StartError as exc:
        sys.stderr.write(f"error: START: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"error: START: cannot listen: {exc.strerror or exc}\n")
        return 2
    except KeyboardInterrupt:
        return 0  # Ctrl-C before the signal handler was installed
    return 0
