"""``skr8tr conductor``: the root nursery and everything it owns.

One Trio program. The root nursery owns the WebSocket server (``/v1/cli``,
``/v1/node``, ``/v1/watch``, ``/v1/ingress``), the HTTP listener, the reconciler, the
node-expiry watchdog and the signal handler (SIGHUP re-reads the authorized
keys and closes the sessions of node and ingress keys no longer listed; SIGINT/SIGTERM
shut down cleanly: sessions close, workloads keep running on their nodes).

With ``--tls-cert``/``--tls-key`` both listeners speak TLS (``wss://``,
``https://``); without them, listening on anything but loopback is announced
on every start, because manifests and environment values then cross the
network in clear. ``--audit-log FILE`` records every signed command
(:mod:`skr8tr.conductor.audit`). The per-client limits are flags too
(:mod:`skr8tr.conductor.limits`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from functools import partial

import trio

from skr8tr import __version__, tls
from skr8tr.conductor import api as api_mod
from skr8tr.conductor import audit, loops, replay_store, state_file, status_http, watch
from skr8tr.conductor.accept import fit_limits_to_descriptors
from skr8tr.conductor.authority import Authority
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.file_store import FileStore
from skr8tr.conductor.http import serve_http
from skr8tr.conductor.ingress_sessions import IngressDesk, serve_ingress
from skr8tr.conductor.limits import AddressSlots, ClosedCounter, Limits, LogThrottle
from skr8tr.conductor.listen import WebSocketListener
from skr8tr.conductor.node_sessions import serve_node
from skr8tr.conductor.origins import WILDCARD_HOSTS, HostPolicy, OriginError
from skr8tr.conductor.seat import Seat
from skr8tr.conductor.store import Store, StoreError
from skr8tr.core import envelope, hostport, ingress_protocol, protocol
from skr8tr.core.keys import (
    AuthorizedKeys,
    AuthorizedKeysError,
    parse_authorized_keys,
)
from skr8tr.core.node_protocol import Refused
from skr8tr.core.signatures import fingerprint
from skr8tr.daemon_errors import ListenError, sole_exception
from skr8tr.heap import TrimAfterPeaks, release_free_heap
from skr8tr.keyfiles import load_authorized_keys
from skr8tr.ws import server as wsserver
from skr8tr.ws.server import ConnectionClosed

log = logging.getLogger("skr8tr.conductor")


class StartError(Exception):
    """The conductor refuses to start; the message is one line for the operator."""


@dataclass(frozen=True)
class ConductorConfig:
    listen: tuple[str, int] = ("127.0.0.1", 7771)
    http: tuple[str, int] = ("127.0.0.1", 7780)
    authorized_keys: str | None = None
    insecure: bool = False
    require_pq: bool = False  # --require-pq: only ML-DSA-65 and hybrid keys hold roles
    node_timeout_s: float = 15.0
    port_range: tuple[int, int] = (20000, 32000)
    state_path: str | None = None
    adopt_grace_s: float | None = None  # None: 2 x the node heartbeat
    tls_cert: str | None = None
    tls_key: str | None = None
    audit_log: str | None = None
    limits: Limits = Limits()
    allowed_hosts: tuple[str, ...] = ()  # --allowed-host: names HTTP and WebSockets answer
    allowed_origins: tuple[str, ...] = ()  # --allowed-origin: pages that may open /v1/*
    store_endpoints: tuple[str, ...] = ()  # --store etcd://...: etcd's client URLs
    store_prefix: str = "/skr8tr"
    advertise_url: str | None = None  # None: ws(s):// + --listen (its bound port)
    lease_ttl_s: float = 5.0
    keep_revisions: int = 10  # --keep-revisions (core/revisions.py retain)


def parse_hostport(text: str, flag: str) -> tuple[str, int]:
    try:
        return hostport.parse_hostport(text, flag)
    except ValueError as exc:
        raise StartError(str(exc)) from None


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
    require_pq = bool(getattr(opts, "require_pq", False))
    if require_pq and opts.insecure:
        raise StartError("--require-pq and --insecure contradict each other: --insecure "
                         "checks no key at all; give --authorized-keys with post-quantum keys")
    tls_cert, tls_key = getattr(opts, "tls_cert", None), getattr(opts, "tls_key", None)
    if (tls_cert is None) != (tls_key is None):
        raise StartError("--tls-cert and --tls-key go together: the certificate (PEM) and "
                         "its private key (PEM)")
    defaults = Limits()
    try:
        limits = Limits(
            max_connections_per_address=getattr(opts, "max_connections_per_address", None)
            or defaults.max_connections_per_address,
            messages_per_s=getattr(opts, "max_messages_per_s", None) or defaults.messages_per_s,
            message_burst=getattr(opts, "message_burst", None) or defaults.message_burst,
            handshake_timeout_s=getattr(opts, "handshake_timeout", None)
            or defaults.handshake_timeout_s,
            idle_timeout_s=getattr(opts, "idle_timeout", None) or defaults.idle_timeout_s,
            max_connections=getattr(opts, "max_connections", None),
            watch_idle_timeout_s=getattr(opts, "watch_idle_timeout", None)
            or defaults.watch_idle_timeout_s,
            watch_queue_bytes=getattr(opts, "watch_queue_bytes", None)
            or defaults.watch_queue_bytes,
            max_watchers_per_address=getattr(opts, "max_watchers_per_address", None)
            or defaults.max_watchers_per_address,
            cli_bytes_per_s=getattr(opts, "max_bytes_per_s", None) or defaults.cli_bytes_per_s,
            node_bytes_per_s=getattr(opts, "max_node_bytes_per_s", None)
            or defaults.node_bytes_per_s,
            max_ingresses=getattr(opts, "max_ingresses", None) or defaults.max_ingresses,
        )
    except ValueError as exc:
        raise StartError(str(exc)) from None
    allowed_hosts = tuple(getattr(opts, "allowed_host", None) or ())
    allowed_origins = tuple(getattr(opts, "allowed_origin", None) or ())
    try:
        HostPolicy.from_flags(allowed_hosts, allowed_origins)
    except OriginError as exc:
        raise StartError(str(exc)) from None
    store, prefix = getattr(opts, "store", None), getattr(opts, "store_prefix", "/skr8tr")
    endpoints: tuple[str, ...] = ()
    if store is not None:
        if opts.state is not None:
            raise StartError("--store and --state exclude each other: with --store the "
                             "desired state lives in etcd")
        # Imported only here: a lone conductor does not load httpx (idle RSS).
        from skr8tr.conductor.etcd_client import endpoints_from_url
        try:
            endpoints = tuple(endpoints_from_url(store))
        except ValueError as exc:
            raise StartError(f"--store {store!r}: {exc}") from None
    if not prefix.startswith("/") or prefix.rstrip("/") == "" or any(
            ord(c) < 33 or ord(c) > 126 for c in prefix):
        raise StartError(f"--store-prefix {prefix!r}: expected a key path such as /skr8tr "
                         "(starting with /, printable ASCII, no spaces)")
    lease_ttl = getattr(opts, "lease_ttl", 5.0)
    if lease_ttl < 2 or lease_ttl > 3600:
        raise StartError(f"--lease-ttl {lease_ttl:g}: expected 2 to 3600 seconds (etcd "
                         "grants whole seconds, at least 2)")
    advertise = getattr(opts, "advertise_url", None)
    if advertise is not None and not advertise.startswith(("ws://", "wss://")):
        raise StartError(f"--advertise-url {advertise!r}: expected ws://HOST:PORT or "
                         "wss://HOST:PORT, the address clients and nodes dial")
    listen = parse_hostport(opts.listen, "--listen")
    if endpoints and advertise is None and listen[0] in WILDCARD_HOSTS:
        raise StartError(f"--listen {opts.listen} with --store needs --advertise-url: the "
                         "URL the other conductors hand out for this one, and by which "
                         "they tell it apart (e.g. ws://10.0.0.1:7771)")
    return ConductorConfig(
        store_endpoints=endpoints,
        store_prefix=prefix.rstrip("/"),
        advertise_url=advertise,
        lease_ttl_s=float(lease_ttl),
        keep_revisions=getattr(opts, "keep_revisions", 10),
        listen=listen,
        http=parse_hostport(opts.http, "--http"),
        authorized_keys=opts.authorized_keys,
        insecure=opts.insecure,
        require_pq=require_pq,
        node_timeout_s=opts.node_timeout,
        port_range=parse_port_range(opts.port_range),
        state_path=None if opts.state is None else os.path.abspath(opts.state),
        adopt_grace_s=opts.adopt_grace,
        tls_cert=tls_cert,
        tls_key=tls_key,
        audit_log=None if getattr(opts, "audit_log", None) is None
        else os.path.abspath(opts.audit_log),
        limits=limits,
        allowed_hosts=allowed_hosts,
        allowed_origins=allowed_origins,
    )


def _tls_context(config: ConductorConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        return tls.server_context(config.tls_cert, config.tls_key)
    except tls.TlsError as exc:
        raise StartError(str(exc)) from None


def _open_audit(config: ConductorConfig, *, quiet: bool = False) -> audit.AuditLog | None:
    if config.audit_log is None:
        return None
    try:
        return audit.AuditLog.open(config.audit_log, quiet=quiet)
    except audit.AuditError as exc:
        raise StartError(str(exc)) from None


def _load_state(config: ConductorConfig) -> state_file.StoredState | None:
    if config.state_path is None:
        return None
    try:
        os.makedirs(os.path.dirname(config.state_path), exist_ok=True)
    except OSError as exc:
        raise StartError(f"cannot create the folder of --state {config.state_path}: "
                         f"{exc.strerror}") from None
    try:
        return state_file.load(config.state_path)
    except state_file.StateFileError as exc:
        raise StartError(f"{exc} (the file was left as it is; fix or move it)") from None


def _load_keys(config: ConductorConfig, *, quiet: bool = False) -> AuthorizedKeys:
    """The authorized keys (StartError if unreadable); with --require-pq the Ed25519 ones
    hold no role, and the log names each of them (at start and on every SIGHUP) unless
    *quiet* (the check before listening, so that the start names each key once)."""
    if config.authorized_keys is None:
        return parse_authorized_keys("", filename="(none)")
    try:
        keys = load_authorized_keys(config.authorized_keys)
    except AuthorizedKeysError as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise StartError(f"cannot read --authorized-keys {config.authorized_keys}: "
                         f"{exc.strerror}") from None
    if config.require_pq:
        keys = keys.post_quantum_only()
        if quiet:
            return keys
        for entry in keys.ignored():
            log.warning("--require-pq: ignoring %s key %s (%s%s) in %s: it is not "
                        "post-quantum", entry.algorithm.name, fingerprint(entry.pub_hex),
                        "/".join(sorted(entry.roles)),
                        f", {entry.comment}" if entry.comment else "", config.authorized_keys)
        if len(keys.ignored()) == len(keys):
            log.error("--require-pq: no key in %s is post-quantum; no command and no node "
                      "will be accepted", config.authorized_keys)
    return keys


async def run_conductor(config: ConductorConfig, *,
                        task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled. ``task_status.started((ws_port, http_port))`` once listening."""
    ha_mode = bool(config.store_endpoints)
    if ha_mode:
        # The nonces of accepted requests are in etcd for every conductor to see.
        guard = envelope.ReplayGuard()
    else:
        # Requests signed before this moment are refused: the previous process may have
        # accepted them (replay_store; a client clock behind ours is refused for its lag).
        guard = replay_store.open_replay_guard(config.state_path, started_at=time.time())
    authority = Authority(_load_keys(config), insecure=config.insecure, guard=guard)
    ssl_context = _tls_context(config)
    if config.insecure:
        log.warning("INSECURE MODE: no key is checked; anyone who can reach %s:%d can "
                    "start processes on every node", *config.listen)
    if ssl_context is None:
        for flag, (host, port) in (("--listen", config.listen), ("--http", config.http)):
            if not tls.is_loopback_host(host):
                log.warning("NO TLS on %s %s:%d: manifests, environment values and logs "
                            "travel in clear; pass --tls-cert and --tls-key", flag, host, port)
    # Its URLs are set once the listeners are bound; with etcd it follows until elected.
    seat = Seat(url="", role="follower" if ha_mode else "leader")

    adopt_grace_s = config.adopt_grace_s
    if ha_mode and adopt_grace_s is None:
        # After a failover the nodes must first notice that their conductor is gone (a
        # frozen one only by its silence: 3 heartbeats, i.e. one node timeout, checked
        # every half heartbeat) and dial the next, while the new leader was elected
        # about a lease TTL after the old one froze: one node timeout plus one TTL.
        adopt_grace_s = config.node_timeout_s + config.lease_ttl_s

    def new_cluster(store: Store | None) -> Cluster:
        cluster = Cluster(node_timeout_s=config.node_timeout_s, port_range=config.port_range,
                          store=store, adopt_grace_s=adopt_grace_s, seat=seat,
                          keep_revisions=config.keep_revisions)
        cluster.ingresses = ingresses
        return cluster

    closed = ClosedCounter()
    # Below the open-file limit (raised as far as it goes): over a cap a connection is
    # closed at once, and accept never runs out of descriptors (accept, limits).
    limits, admission = fit_limits_to_descriptors(config.limits, closed)
    ingresses = IngressDesk(limits)  # the daemon's: its sessions and counts outlive a term
    watchers = AddressSlots(limits.max_watchers_per_address)
    watch_throttle = LogThrottle()
    policy = HostPolicy.from_flags(config.allowed_hosts, config.allowed_origins,
                                   tls=ssl_context is not None)
    first = new_cluster(None if ha_mode or config.state_path is None
                        else FileStore(config.state_path))
    cli = api_mod.CliApi(first, authority, time.time, limits=limits, closed=closed)

    async def begin_term(cluster: Cluster) -> None:
        """Load the desired state into ``cluster`` and serve commands from it."""
        where = config.state_path or (f"etcd {config.store_prefix}" if ha_mode else "")
        stored, interrupted = await cluster.open_store(where)
        cli.begin_term(cluster)
        cli.rollouts.interrupted = interrupted
        if stored is not None:
            cli.rollouts.restore(stored.rollouts)
            cluster.start_adopt_grace()

    async def serve_term(cluster: Cluster, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """A leader's loops: reconcile, store, rollouts, node expiry, counters."""
        async with trio.open_nursery() as nursery:
            await nursery.start(loops.serve_reconciler, cluster)
            await nursery.start(loops.serve_store_writes, cluster)
            await nursery.start(cli.rollouts.run)
            await nursery.start(loops.serve_expiry_watchdog, cluster)
            await nursery.start(on_http.count_rollouts)
            task_status.started()

    if not ha_mode:
        try:
            await begin_term(first)
        except (state_file.StateFileError, StoreError) as exc:
            raise StartError(f"{exc} (the file was left as it is)") from None
    cli.audit_log = audit_log = _open_audit(config)

    async def on_websocket(request: wsserver.Request) -> None:
        path = request.path.split("?", 1)[0]
        if path not in ("/v1/cli", "/v1/node", "/v1/watch", "/v1/ingress"):
            await request.reject(404, body=b"unknown path; use /v1/cli, /v1/node, /v1/watch "
                                 b"or /v1/ingress\n")
            return
        if path != "/v1/cli" and not seat.leading:
            await _refuse_stream(request, path, seat, ingresses)
            return
        if path == "/v1/watch" and not watchers.acquire(request.peer):
            closed.count("too_many_watchers")
            n = watch_throttle.note("too_many_watchers", trio.current_time())
            if n:
                log.warning("refused %d /v1/watch stream(s), the last from %s: it has %d "
                            "open (--max-watchers-per-address)", n, request.peer,
                            limits.max_watchers_per_address)
            await request.reject(429, body=(
                f"{limits.max_watchers_per_address} /v1/watch streams are open from "
                f"{request.peer} already (--max-watchers-per-address)\n").encode())
            return
        try:
            if path == "/v1/cli":
                await cli.serve_connection(await request.accept())
                return
            with seat.for_term():  # a deposed leader closes them at once
                cluster = cli.cluster
                if path == "/v1/watch":  # subscribed before the handshake ends (watch.py)
                    await watch.serve_watch(cluster, request.accept, limits=cli.limits,
                                            closed=cli.closed)
                    return
                if path == "/v1/ingress":
                    ws = await request.accept(
                        max_message_size=ingress_protocol.MAX_MESSAGE_BYTES)
                    await serve_ingress(cluster, authority, ingresses, cli.policing, ws)
                    return
                ws = await request.accept()
                await serve_node(cluster, authority, cli.policing, cli.log_requests, ws)
        finally:
            if path == "/v1/watch":
                watchers.release(request.peer)

    server = WebSocketListener(on_websocket, limits=limits, closed=closed,
                               max_message_size=protocol.MAX_MESSAGE_BYTES,
                               ssl_context=ssl_context, admission=admission, policy=policy)
    # The status page, /api/*, /metrics; `server` is bound below, before any request.
    on_http = status_http.StatusSite(first, cli, listen=config.listen,
                                     ws_port=lambda: server.port, tls=ssl_context is not None,
                                     admission=admission, policy=policy)

    try:
        # The etcd client is closed after the nursery, not by one of its tasks: on the way
        # out a leader still revokes its lease (shielded), so the next need not wait a TTL.
        async with contextlib.AsyncExitStack() as resources, \
                trio.open_nursery() as nursery:
            await nursery.start(_serve_signals, authority, ingresses, config,
                                nursery.cancel_scope)
            await nursery.start(cli.refusals.serve)
            if audit_log is not None:
                await nursery.start(audit_log.serve)
            nursery.start_soon(_serve_heap_trim, admission.gate)
            if not ha_mode:
                await nursery.start(serve_term, first)
            await nursery.start(server.serve, *config.listen)
            listeners = await nursery.start(partial(
                serve_http, on_http, *config.http, ssl_context=ssl_context,
                limits=limits, closed=closed, admission=admission,
                check_host=policy.check_host))
            http_port = listeners[0].socket.getsockname()[1]
            policy.http_address, policy.http_port = config.http[0], http_port
            ws_scheme, http_scheme = ("wss", "https") if ssl_context else ("ws", "http")
            seat.url = config.advertise_url or _url(ws_scheme, config.listen[0], server.port)
            seat.http = _url(http_scheme, _advertised_host(seat.url, config.http[0]),
                             http_port)
            if ha_mode:
                from skr8tr.conductor import ha
                from skr8tr.conductor.etcd_client import EtcdClient
                from skr8tr.conductor.etcd_nonces import EtcdNonceGuard

                client = await resources.enter_async_context(
                    EtcdClient(list(config.store_endpoints)))
                cli.nonces = EtcdNonceGuard(client, config.store_prefix,
                                            fence=seat.current_fence)
                await nursery.start(cli.nonces.serve)
                await nursery.start(partial(
                    ha.serve_ha, client, config.store_prefix, config.lease_ttl_s, seat,
                    new_cluster, begin_term, serve_term, cli.begin_term))
            else:
                seat.lead(0)
            log.info("skr8tr conductor %s: API %s://%s:%d, status %s://%s:%d%s", __version__,
                     ws_scheme, config.listen[0], server.port, http_scheme, config.http[0],
                     http_port, f", advertised as {seat.url}" if config.advertise_url else "")
            task_status.started((server.port, http_port))
    finally:
        if audit_log is not None:
            audit_log.close()


async def _refuse_stream(request: wsserver.Request, path: str, seat: Seat,
                         ingresses: IngressDesk | None = None) -> None:
    """A follower's answer on /v1/watch, /v1/node and /v1/ingress: one message naming the
    leader, then a close, so that the stream's client goes to the leader."""
    code, message, leader = seat.refusal()
    if path == "/v1/ingress":
        if ingresses is not None:
            ingresses.note("not_leader", request.peer, message)
        text = ingress_protocol.error(code, message, leader=leader, with_leader=True)
    elif path == "/v1/watch":
        text = protocol.not_leader_watch_message(message, leader) if code == "NOT_LEADER" \
            else protocol.dumps({"v": protocol.PROTOCOL_VERSION, "type": "error", "error": {
                "code": code, "message": message, "leader": None}})
    else:
        text = Refused(code=code, message=message, leader=leader).encode()
    ws = await request.accept()
    with contextlib.suppress(ConnectionClosed):
        await ws.send_message(text)
        await ws.aclose(code=1000, reason=code)


def _url(scheme: str, host: str, port: int) -> str:
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _advertised_host(url: str, http_host: str) -> str:
    """The status page's host: --http's own unless it listens everywhere, then the
    advertised URL's host."""
    if http_host not in WILDCARD_HOSTS:
        return http_host
    rest = url.split("://", 1)[1].rsplit(":", 1)[0]
    return rest.strip("[]")


HEAP_CHECK_EVERY_S = 10.0


async def _serve_heap_trim(gate) -> None:
    """Give freed memory back to the kernel after a crowd of connections has left (a
    watcher flood: RSS stayed at its peak, #13.5); a check every HEAP_CHECK_EVERY_S."""
    peaks = TrimAfterPeaks()
    while True:
        await trio.sleep(HEAP_CHECK_EVERY_S)
        if peaks.due(gate.open):
            release_free_heap()
            log.info("gave freed memory back to the system: at least %d connections "
                     "closed since their peak",
                     peaks.min_drop)


async def _serve_signals(authority: Authority, ingresses: IngressDesk,
                         config: ConductorConfig, root: trio.CancelScope, *,
                         task_status=trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                try:
                    keys = _load_keys(config)
                except StartError as exc:
                    log.error("SIGHUP: keeping the previous authorized keys: %s", exc)
                else:
                    revoked = authority.replace_keys(keys)
                    gone = 0 if authority.insecure else ingresses.revoke(keys)
                    log.info("SIGHUP: re-read %s (%d key(s)); %d node session(s) closed "
                             "for revoked keys", config.authorized_keys, len(keys),
                             len(revoked))
                    if gone:
                        log.info("SIGHUP: %d ingress session(s) closed for revoked keys",
                                 gone)
            else:
                log.info("received %s; shutting down", signal.Signals(signum).name)
                root.cancel()
                return


def main(opts: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, opts.log_level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every etcd request at INFO: several a second, nothing an operator needs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = config_from_args(opts)
        _load_keys(config, quiet=True)  # fail before anything listens
        _tls_context(config)
        _load_state(config)
        checked = _open_audit(config, quiet=True)  # refuse a broken log before listening
        if checked is not None:
            checked.close()
        trio.run(run_conductor, config)
    except StartError as exc:
        sys.stderr.write(f"error: START: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 0  # Ctrl-C before the signal handler was installed
    except BaseException as exc:  # the public edge: unwrap what the nurseries wrapped
        inner = sole_exception(exc)
        if isinstance(inner, StartError):
            sys.stderr.write(f"error: START: {inner}\n")
            return 2
        if isinstance(inner, ListenError):
            sys.stderr.write(f"error: START: {inner.strerror}\n")
            return 2
        if isinstance(inner, KeyboardInterrupt):
            return 0
        raise
    return 0
