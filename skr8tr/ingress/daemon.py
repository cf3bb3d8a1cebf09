"""``skr8tr ingress``: the root nursery of the HTTP ingress and everything it owns.

The root nursery holds the watch follower (:mod:`skr8tr.ingress.upstreams`),
with ``--key`` the traffic reporter (:mod:`skr8tr.ingress.reporter`, the counts
of :mod:`skr8tr.ingress.traffic`), the idle-connection sweeper of the pool, the
task that logs the tail of a burst of refusals and, in a child nursery, the
client connections. The listener
starts at once: until the first snapshot arrives every routed request gets a
503 saying the conductor has not been heard from.

At start the soft ``RLIMIT_NOFILE`` is raised to the hard limit, and the
client connection cap is kept within what the descriptors allow
(:mod:`skr8tr.ingress.limits`), so that ``accept`` never runs out of them.

SIGTERM/SIGINT shut down gracefully: the listener closes, idle keep-alive
connections close, requests in flight get up to :data:`SHUTDOWN_GRACE_S` to
finish (their responses say ``Connection: close``), then whatever is left is
cancelled; with ``--key`` the interval under way is reported at once. The last
log lines sum up what was served and reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import resource
import signal
import sys
from dataclasses import dataclass, field

import trio

from skr8tr import __version__, client
from skr8tr.core import hostport
from skr8tr.core.keys import KeyFileError
from skr8tr.core.signatures import Signer
from skr8tr.daemon_errors import sole_exception
from skr8tr.failover import conductor_urls
from skr8tr.ingress.limits import ProxyLimits, connection_cap
from skr8tr.ingress.pool import Pool
from skr8tr.ingress.proxy import Proxy
from skr8tr.ingress.reporter import NAME_RE, Reporter, default_name
from skr8tr.ingress.routes import BackendTable, Route, RouteError, RouteTable, parse_route
from skr8tr.ingress.traffic import TrafficCounter
from skr8tr.ingress.upstreams import run_upstreams
from skr8tr.keyfiles import load_signing_key
from skr8tr.wire import DEFAULT_CONDUCTOR_URL

log = logging.getLogger("skr8tr.ingress")

SHUTDOWN_GRACE_S = 10.0
FD_LIMIT_WHEN_UNLIMITED = 1 << 20  # asked for when the hard limit is RLIM_INFINITY


class IngressStartError(Exception):
    """The ingress refuses to start; the message is one line for the operator."""


@dataclass(frozen=True)
class IngressConfig:
    listen: tuple[str, int]
    routes: tuple[Route, ...]
    conductor_url: str = DEFAULT_CONDUCTOR_URL
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    connect_timeout_s: float = 2.0
    ca_file: str | None = None  # verifies a wss:// conductor
    ignore_drain: bool = False  # test knob: see BackendTable
    signer: Signer | None = None  # --key: report traffic to the conductor, signed by it
    name: str = field(default_factory=default_name)  # --name: as the conductor knows it


def parse_listen(text: str) -> tuple[str, int]:
    try:
        return hostport.parse_hostport(text, "--listen", "127.0.0.1:8080")
    except ValueError as exc:
        raise IngressStartError(str(exc)) from None


def config_from_args(opts: argparse.Namespace) -> IngressConfig:
    """The config of ``skr8tr ingress`` flags. Raises IngressStartError on a bad value."""
    try:
        routes = tuple(parse_route(text) for text in opts.route)
        RouteTable(routes)  # refuses a prefix given twice
    except RouteError as exc:
        raise IngressStartError(str(exc)) from None
    url = getattr(opts, "conductor", DEFAULT_CONDUCTOR_URL)
    try:
        urls = conductor_urls(url)
        for one in urls:
            client.endpoint_url(one, "/v1/watch")
    except ValueError as exc:
        raise IngressStartError(f"--conductor: {exc}") from None
    except client.ClientError as exc:
        raise IngressStartError(f"--conductor: {exc.message}") from None
    ca_file = getattr(opts, "ca", None)
    if ca_file is not None and not any(one.startswith("wss://") for one in urls):
        raise IngressStartError(f"--ca goes with a wss:// conductor URL; {url} is not encrypted")
    defaults = ProxyLimits()
    limits = ProxyLimits(
        max_connections=getattr(opts, "max_connections", None) or defaults.max_connections,
        max_connections_per_address=getattr(opts, "max_connections_per_address", None)
        or defaults.max_connections_per_address,
        idle_timeout_s=getattr(opts, "idle_timeout", None) or defaults.idle_timeout_s,
        header_timeout_s=getattr(opts, "header_timeout", None) or defaults.header_timeout_s,
        body_timeout_s=getattr(opts, "body_timeout", None) or defaults.body_timeout_s,
        upstream_timeout_s=getattr(opts, "upstream_timeout", None)
        or defaults.upstream_timeout_s,
        retries=defaults.retries if getattr(opts, "retries", None) is None else opts.retries,
    )
    signer = None
    key_path = getattr(opts, "key", None)  # None unless given (daemon_config.NO_DEFAULT)
    if key_path:
        try:
            signer = load_signing_key(key_path)
        except KeyFileError as exc:
            raise IngressStartError(f"--key: {exc}") from None
    name = getattr(opts, "name", None) or default_name()
    if NAME_RE.fullmatch(name) is None:
        raise IngressStartError(f"--name {name!r}: expected 1..64 of A-Z a-z 0-9 . _ -")
    return IngressConfig(
        listen=parse_listen(opts.listen), routes=routes, conductor_url=url, limits=limits,
        connect_timeout_s=getattr(opts, "connect_timeout", None) or 2.0,
        ca_file=ca_file, ignore_drain=bool(getattr(opts, "ignore_drain", False)),
        signer=signer, name=name,
    )


async def run_ingress(config: IngressConfig, *, shutdown: trio.Event | None = None,
                      synced: trio.Event | None = None,
                      task_status=trio.TASK_STATUS_IGNORED) -> Proxy:
    """Serve until ``shutdown`` is set (then gracefully) or until cancelled.

    ``task_status.started(port)`` once listening; ``synced`` is set after the
    first snapshot from the conductor. Returns the proxy (its ``stats``).
    Raises OSError when the listen address cannot be bound.
    """
    shutdown = trio.Event() if shutdown is None else shutdown
    limits = _limits_within_fd_budget(config.limits)
    routes = RouteTable(config.routes)
    table = BackendTable(ignore_drain=config.ignore_drain)
    pool = Pool(table.is_routable, connect_timeout_s=config.connect_timeout_s,
                max_idle=limits.max_connections)
    counter = reporter = None
    if config.signer is not None:
        counter = TrafficCounter()
        reporter = Reporter(config.conductor_url, counter, config.signer, config.name,
                            ca_file=config.ca_file)
    proxy = Proxy(routes, table, pool, limits, traffic=counter)
    host, port = config.listen
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    if config.ignore_drain:
        log.warning("--ignore-drain: draining replicas stay in rotation until they exit; "
                    "this exists to demonstrate what draining prevents, never use it")
    try:
        async with trio.open_nursery() as root:
            await root.start(functools.partial(run_upstreams, synced=synced,
                                               ca_file=config.ca_file),
                             config.conductor_url, table, pool)
            if reporter is not None:
                await root.start(reporter.run)
            else:
                log.info("no --key: this ingress reports no traffic to the conductor, so a "
                         "rollout's analysis cannot see the requests it routes")
            await root.start(pool.run_sweeper)
            await root.start(proxy.run_limit_logs)
            async with trio.open_nursery() as conns:
                accept_scope = trio.CancelScope()

                async def accept() -> None:
                    with accept_scope:
                        await trio.serve_listeners(proxy.serve_connection, listeners,
                                                   handler_nursery=conns)

                conns.start_soon(accept)
                log.info("skr8tr ingress %s on http://%s:%d; routes: %s; following %s",
                         __version__, host, bound,
                         ", ".join(f"{r.prefix} -> {r.app}" for r in routes.routes),
                         config.conductor_url)
                log.info("limits: %d client connection(s), %d per address; first request "
                         "head within %g s of connecting; keep-alive idle %g s; open-file "
                         "limit %s", limits.max_connections,
                         limits.max_connections_per_address, limits.header_timeout_s,
                         limits.idle_timeout_s, _fd_soft_limit() or "unlimited")
                task_status.started(bound)
                await shutdown.wait()
                log.info("shutting down: %d connection(s) open; waiting up to %g s for "
                         "requests in flight", proxy.active, SHUTDOWN_GRACE_S)
                accept_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                proxy.begin_shutdown()
                conns.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S
            if reporter is not None:
                await reporter.finish()  # the requests just finished: counted, not dropped
            root.cancel_scope.cancel()
    finally:
        pool.close_all()
        log.info("served %s", proxy.stats.summary())
        if reporter is not None:
            log.info("sent %s", reporter.stats.summary())
    return proxy


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as far as the system allows;
    logs what it did. Never fails: the limit in force is what the caps are fitted to."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return
    # An unlimited hard limit (macOS) is not a value the kernel accepts for the soft one.
    target = hard if hard != resource.RLIM_INFINITY else FD_LIMIT_WHEN_UNLIMITED
    if soft != resource.RLIM_INFINITY and soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return
    log.info("open-file limit raised from %d to %d", soft, target)


def _fd_soft_limit() -> int | None:
    """The soft RLIMIT_NOFILE in force; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _limits_within_fd_budget(limits: ProxyLimits) -> ProxyLimits:
    """``limits`` with ``max_connections`` lowered to the descriptor budget, if it must be."""
    soft = _fd_soft_limit()
    cap = connection_cap(limits.max_connections, soft)
    if cap == limits.max_connections:
        return limits
    log.warning("--max-connections %d lowered to %d: the open-file limit is %d, and each "
                "client connection may need three descriptors (raise the hard limit: "
                "ulimit -Hn, LimitNOFILE=)", limits.max_connections, cap, soft)
    return dataclasses.replace(limits, max_connections=cap)


async def _serve_until_signalled(config: IngressConfig) -> None:
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        async def watch_signals(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task_status.started()
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    shutdown.set()
                    return

        await nursery.start(watch_signals)
        await run_ingress(config, shutdown=shutdown)
        nursery.cancel_scope.cancel()


def main(opts: argparse.Namespace) -> int:
    """``skr8tr ingress``: 0 after a clean shutdown, 2 when it cannot start."""
    logging.basicConfig(
        level=getattr(logging, str(getattr(opts, "log_level", "info")).upper()),
        stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(opts)
        raise_fd_limit()
        trio.run(_serve_until_signalled, config)
    except IngressStartError as exc:
        sys.stderr.write(f"error: START: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:  # the public edge: unwrap what the nurseries wrapped
        inner = sole_exception(exc)
        if isinstance(inner, OSError):
            sys.stderr.write(f"error: START: cannot listen on {opts.listen}: "
                             f"{inner.strerror or inner}\n")
            return 2
        if isinstance(inner, KeyboardInterrupt):
            return 0
        raise
    return 0

