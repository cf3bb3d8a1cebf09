"""The node agent: ``skr8tr node``. Dials the conductor and keeps dialling.

The agent's root nursery holds the :class:`~skr8tr.node.supervisor.Supervisor`
(replicas) and the connection loop; each conductor session lives in a child
nursery, so replicas outlive sessions. Between sessions the agent waits a
jittered exponential backoff (0.5 s doubling up to 10 s, ±25 %), which starts
over after a session the conductor welcomed. A refusal is logged at error
level and retried the same way: the key may be authorized later.

``--conductor`` may list several conductors (DESIGN.md §9): the agent dials
them in order (:class:`skr8tr.failover.LeaderSearch`; the backoff comes
between passes over the list, the conductor that last welcomed it first),
goes straight to the leader a follower's ``refused`` NOT_LEADER names, and
closes a session offered under a leadership term lower than the highest one
it was welcomed under (:class:`~skr8tr.node.session.Terms`, in memory), then
tries the others. Replicas run on through all of it.

On start, before the first session, the supervisor re-adopts the replicas
recorded in the data dir whose processes still run (pid and start time both
match), so the first ``hello`` lists them; a ``kill -9`` of the agent leaves
the workloads running for the next agent to find.

SIGINT/SIGTERM (in :func:`main`) cancel the agent: the session is closed
cleanly and the workloads keep running, unless ``stop_workloads``, in which
case every replica is stopped (SIGTERM, grace, SIGKILL, waited for) first.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from urllib.parse import urlsplit

import trio

from skr8tr import DEFAULT_CONDUCTOR_URL, DEFAULT_KEY_FILE, tls
from skr8tr.core.keys import KeyFileError
from skr8tr.core.node_protocol import is_host_or_ip
from skr8tr.core.signatures import Signer, fingerprint
from skr8tr.failover import LeaderSearch, conductor_urls
from skr8tr.heap import release_free_heap
from skr8tr.keyfiles import load_signing_key
from skr8tr.node.backoff import Backoff
from skr8tr.node.logs import KEEP_FILES_PER_APP
from skr8tr.node.process import RunAs, RunAsError, resolve_run_as
from skr8tr.node.session import (
    ConductorSilent,
    Refused,
    SessionError,
    StaleTerm,
    Terms,
    run_session,
)
from skr8tr.node.supervisor import open_supervisor
from skr8tr.node.sysinfo import prime_cpu
from skr8tr.ws import trio_client

log = logging.getLogger("skr8tr.node")

NODE_PATH = "/v1/node"
EXIT_USAGE = 2

_NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHOWN_CHARS = 80  # of a bad flag value, quoted in the error line


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs; see ``skr8tr node --help``."""

    conductor_url: str
    key_path: str
    node_id: str
    data_dir: str
    advertise: str | None
    stop_workloads: bool = False
    ca_file: str | None = None  # wss://: verify the conductor against this CA (PEM)
    run_as: str | None = None  # start workloads as this user
    keep_logs: int = KEEP_FILES_PER_APP  # finished replicas per app whose log files stay


class AgentConfigError(Exception):
    """The agent cannot start; printed as ``error: CODE: message``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def default_node_id() -> str:
    """The host name reduced to ``[A-Za-z0-9._-]`` (``node`` if nothing is left)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "", socket.gethostname()).lstrip("._-")[:128]
    return name or "node"


def default_data_dir(node_id: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".skr8tr", f"node-{node_id}")


def node_url(conductor_url: str) -> str:
    """``ws[s]://host:port`` (a trailing ``/`` or ``/v1/node`` is fine) + ``/v1/node``.

    Raises AgentConfigError BAD_URL for anything but a ws:// or wss:// URL with a host.
    """
    base = conductor_url.strip().rstrip("/")
    if base.endswith(NODE_PATH):
        base = base[: -len(NODE_PATH)]
    try:
        parts = urlsplit(base)
        ok = parts.scheme in ("ws", "wss") and bool(parts.hostname)
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError:
        ok = False
    if not ok:
        raise AgentConfigError(
            "BAD_URL",
            f"conductor URL {conductor_url!r} must be ws://HOST:PORT or wss://HOST:PORT "
            f"(for example {DEFAULT_CONDUCTOR_URL})",
        )
    return base + NODE_PATH


def node_urls(conductor: str) -> tuple[str, ...]:
    """:func:`node_url` of each conductor of ``URL[,URL...]``; AgentConfigError BAD_URL."""
    try:
        listed = conductor_urls(conductor)
    except ValueError as exc:
        raise AgentConfigError("BAD_URL", str(exc)) from None
    return tuple(node_url(url) for url in listed)


def prepare(config: AgentConfig) -> tuple[Signer, str]:
    """Check *config* and create the data dir; return the signing key and the node
    URL(s) (comma-separated when several conductors are listed).

    Raises AgentConfigError: BAD_NODE_ID, BAD_ADVERTISE, BAD_URL, BAD_KEY (the
    message says how to make or pass a key), BAD_CA, BAD_RUN_AS or BAD_DATA_DIR.
    """
    if _NODE_ID_RE.fullmatch(config.node_id) is None:
        raise AgentConfigError(
            "BAD_NODE_ID",
            f"node id {config.node_id[:_SHOWN_CHARS]!r} must be 1-128 characters of "
            "A-Z a-z 0-9 . _ - starting with a letter or digit; pass --node-id ID",
        )
    if config.advertise is not None and not is_host_or_ip(config.advertise):
        # The conductor would refuse every hello carrying it.
        raise AgentConfigError(
            "BAD_ADVERTISE",
            f"--advertise {config.advertise[:_SHOWN_CHARS]!r} is not a host name or an IP "
            "address; pass the address other machines reach this node at, for example "
            "10.0.0.5, fd00::5 or node1.example.com",
        )
    url = ",".join(node_urls(config.conductor_url))
    security(config)
    try:
        signing_key = load_signing_key(config.key_path)
    except KeyFileError as exc:
        raise AgentConfigError("BAD_KEY", str(exc)) from None
    data_dir = config.data_dir
    try:
        for sub in ("", "logs", "replicas"):
            os.makedirs(os.path.join(data_dir, sub), mode=0o700, exist_ok=True)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise AgentConfigError(
            "BAD_DATA_DIR",
            f"cannot use data dir {data_dir}: {exc.strerror or exc}; pass --data-dir DIR",
        ) from None
    return signing_key, url


def security(config: AgentConfig) -> tuple[ssl.SSLContext | None, RunAs | None]:
    """The TLS context for a ``wss://`` conductor (``--ca``) and the ``--run-as`` user.

    Raises AgentConfigError BAD_CA (unreadable CA file, or ``--ca`` with a
    ``ws://`` URL) or BAD_RUN_AS (unknown user, or the agent is not root).
    """
    ssl_context = None
    if any(url.startswith("wss://") for url in _listed(config.conductor_url)):
        try:
            ssl_context = tls.client_context(config.ca_file)
        except tls.TlsError as exc:
            raise AgentConfigError("BAD_CA", str(exc)) from None
    elif config.ca_file is not None:
        raise AgentConfigError("BAD_CA", f"--ca goes with a wss:// conductor URL; "
                               f"{config.conductor_url} is not encrypted")
    run_as = None
    if config.run_as is not None:
        try:
            run_as = resolve_run_as(config.run_as)
        except RunAsError as exc:
            raise AgentConfigError("BAD_RUN_AS", str(exc)) from None
    return ssl_context, run_as


def _listed(conductor: str) -> tuple[str, ...]:
    try:
        return conductor_urls(conductor)
    except ValueError:
        return ()


async def run_agent(config: AgentConfig, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the node agent until cancelled; ``task_status.started()`` once it is set up.

    Raises AgentConfigError (before starting anything) when *config* is
    unusable. Connection trouble never ends it: it reconnects with backoff.
    On cancellation the session is closed cleanly; with
    ``config.stop_workloads`` every replica is stopped and waited for
    (shielded, bounded by each replica's stop grace) before Cancelled
    propagates, otherwise the workloads keep running.
    """
    signing_key, shown = prepare(config)
    urls = node_urls(config.conductor_url)
    ssl_context, run_as = security(config)
    data_dir = os.path.abspath(config.data_dir)  # replicas may run in it; cwd must not matter
    prime_cpu()
    log.info("node %s: starting (conductor %s, key %s, data dir %s%s%s)", config.node_id, shown,
             fingerprint(signing_key.public), data_dir,
             ", workloads stop with the agent" if config.stop_workloads else "",
             f", workloads run as {run_as.name} (uid {run_as.uid})" if run_as else "")
    try:
        async with open_supervisor(data_dir, stop_on_exit=config.stop_workloads,
                                   run_as=run_as, keep_logs=config.keep_logs) as supervisor:
            task_status.started()
            search = LeaderSearch(urls, backoff=Backoff())
            terms = Terms()
            while True:
                attempt = search.next()
                if attempt.wait_s > 0:
                    log.info("node %s: reconnecting to %s in %.2f s", config.node_id,
                             attempt.url, attempt.wait_s)
                    await trio.sleep(attempt.wait_s)
                url = attempt.url
                try:
                    await run_session(url, node_id=config.node_id, signing_key=signing_key,
                                      advertise=config.advertise, supervisor=supervisor,
                                      on_welcome=partial(_welcomed, search),
                                      ssl_context=ssl_context if url.startswith("wss://")
                                      else None, terms=terms,
                                      leave_when_silent=len(urls) > 1)
                except Exception as exc:  # the loop's job is to survive it, whatever it is
                    refused = next((e for e in _leaves(exc) if isinstance(e, Refused)), None)
                    if refused is not None and refused.code == "NOT_LEADER":
                        _follow(config.node_id, url, refused, search)
                        continue
                    if refused is not None and refused.code == "UNAVAILABLE":
                        search.answered()  # alive, without etcd: try again soon
                    _log_session_end(config.node_id, url, exc)
                    if any(isinstance(e, ConductorSilent) for e in _leaves(exc)):
                        search.went_silent()  # frozen: dial the others first
                        continue
                search.failed()
    finally:
        log.info("node %s: stopped", config.node_id)


def _welcomed(search: LeaderSearch) -> None:
    search.served()  # the backoff starts over; this conductor is dialled first next time
    release_free_heap()  # the start-up's garbage: ~1 MB of an idle agent's RSS


def _follow(node_id: str, url: str, refused: Refused, search: LeaderSearch) -> None:
    """A follower answered: on to the leader it names, or to the next listed conductor."""
    hint = refused.leader and node_url_or_none(refused.leader)
    target = search.not_leader(hint) if hint else None
    if target is not None:
        log.info("node %s: %s is a follower; going to the leader %s", node_id, url, target)
    else:
        search.answered()  # alive: a leader is due within a lease TTL, so come back soon
        search.failed()
        log.info("node %s: %s is a follower and names no leader it can follow (%s); "
                 "trying the others", node_id, url, refused.leader or "none elected yet")


def node_url_or_none(url: str) -> str | None:
    """:func:`node_url` of a leader a follower named, None if it is not usable."""
    try:
        return node_url(url)
    except AgentConfigError:
        return None


_EXPECTED = (OSError, SessionError, trio_client.HandshakeError, trio_client.ConnectionClosed,
             trio.BrokenResourceError)


def _log_session_end(node_id: str, url: str, exc: BaseException) -> None:
    leaves = list(_leaves(exc))
    first = leaves[0] if leaves else exc
    if isinstance(first, StaleTerm):
        return  # Terms.check logged it, naming both terms
    if isinstance(first, Refused):
        log.error("node %s: the conductor at %s refused this node: %s: %s", node_id, url,
                  first.code, first.message)
    elif all(isinstance(e, _EXPECTED) for e in leaves):
        log.warning("node %s: session with %s ended: %s", node_id, url, _describe(first))
    else:
        log.error("node %s: session with %s failed unexpectedly", node_id, url, exc_info=exc)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _describe(exc: BaseException) -> str:
    if isinstance(exc, trio_client.HandshakeError):
        # "the handshake was refused with HTTP 404", "... no `Upgrade: websocket`", ...
        return f"WebSocket handshake failed: {exc}"
    if isinstance(exc, trio_client.ConnectionClosed):
        why = f": {exc.reason}" if exc.reason else ""
        return f"connection closed (code {exc.code}{why})"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- command line


async def serve_until_signal(config: AgentConfig) -> None:
    """Run the agent until SIGINT or SIGTERM, then shut it down as :func:`run_agent` says."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async def agent() -> None:
                await run_agent(config)
                nursery.cancel_scope.cancel()

            nursery.start_soon(agent)
            async for signum in signals:
                log.info("node %s: %s received; shutting down%s", config.node_id,
                         signal.Signals(signum).name,
                         " and stopping the workloads" if config.stop_workloads else
                         " (the workloads keep running)")
                nursery.cancel_scope.cancel()
                break


def config_from_options(opts: argparse.Namespace) -> AgentConfig:
    """An AgentConfig from the ``skr8tr node`` arguments, with the documented defaults."""
    node_id = getattr(opts, "node_id", None) or default_node_id()
    data_dir = getattr(opts, "data_dir", None) or default_data_dir(node_id)
    return AgentConfig(
        conductor_url=getattr(opts, "conductor", None) or DEFAULT_CONDUCTOR_URL,
        key_path=os.path.expanduser(getattr(opts, "key", None) or DEFAULT_KEY_FILE),
        node_id=node_id,
        data_dir=os.path.abspath(os.path.expanduser(data_dir)),
        advertise=getattr(opts, "advertise", None) or None,
        stop_workloads=bool(getattr(opts, "stop_workloads", False)),
        ca_file=getattr(opts, "ca", None) or None,
        run_as=getattr(opts, "run_as", None) or None,
        keep_logs=int(getattr(opts, "keep_logs", None) or KEEP_FILES_PER_APP),
    )


def main(opts: argparse.Namespace) -> int:
    """``skr8tr node``: 0 after a clean shutdown, 2 (one ``error:`` line) if it cannot start."""
    level = str(getattr(opts, "log_level", None) or "info").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_options(opts)
    try:
        prepare(config)
        trio.run(serve_until_signal, config)
    except Exception as exc:
        refusal = next((e for e in _leaves(exc) if isinstance(e, AgentConfigError)), None)
        if refusal is None:
            raise
        print(f"error: {refusal.code}: {refusal.message}", file=sys.stderr)
        return EXIT_USAGE
    return 0
