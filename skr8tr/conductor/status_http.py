"""The routes of the conductor's HTTP listener: the status page, ``/api/*``, ``/metrics``.

Everything here is read-only: no route needs a key and none changes the
cluster. The page itself (``skr8tr/web/``) is static; it asks ``/api/config``
where the WebSocket API is, follows ``/v1/watch`` there, and re-reads
``/api/state`` after each burst of events.

| path | what |
|---|---|
| ``/`` | the status page (``web/index.html``); ``/static/NAME`` its other files |
| ``/healthz`` | ``ok``; a follower: ``{"role":"follower","leader":URL}`` |
| ``/api/state`` | what ``skr8tr status --json`` prints |
| ``/api/config`` | where the page finds ``/v1/watch``, the node timeout, the version |
| ``/api/events`` | the last 200 events, newest first, as in ``/v1/watch`` |
| ``/metrics`` | Prometheus text format 0.0.4 |
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from skr8tr import __version__
from skr8tr.conductor import metrics, traffic_metrics, views
from skr8tr.conductor.cluster import Cluster
from skr8tr.conductor.http import Response
from skr8tr.conductor.origins import WILDCARD_HOSTS
from skr8tr.conductor.rollout_record import analysis_gauges
from skr8tr.core import protocol, replica_state

if TYPE_CHECKING:
    from skr8tr.conductor.accept import Admission
    from skr8tr.conductor.api import CliApi
    from skr8tr.conductor.origins import HostPolicy

log = logging.getLogger("skr8tr.conductor")

WEB_PACKAGE = "skr8tr"
WEB_DIR = "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# The page loads only its own files and talks only to the conductor: the
# WebSocket API listens on another port, hence ws:/wss: in connect-src.
PAGE_HEADERS = (
    ("Content-Security-Policy",
     "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; "
     "frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
)
REPLICA_STATES = replica_state.STATES
REFUSAL_CODES = ("BAD_REQUEST", "UNAUTHORIZED", "EXPIRED", "REPLAY")
NOT_FOUND_TEXT = (b"not found; try / (the status page), /api/state, /api/config, /api/events, "
                  b"/metrics or /healthz\n")


def load_web_files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name, read once from the package (raises if one is missing)."""
    folder = importlib.resources.files(WEB_PACKAGE).joinpath(WEB_DIR)
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    if "index.html" not in files:
        raise FileNotFoundError(f"the status page is missing from the package: {folder}")
    return files


class StatusSite:
    """The HTTP handler: ``site(method, path) -> Response``; ``count_rollouts`` counts
    finished rollouts.

    ``ws_port`` returns the port the WebSocket API is bound to (asked at
    request time, since with ``--listen HOST:0`` it is known only once bound).
    ``admission`` and ``policy`` (both listeners') feed ``/metrics``.
    """

    def __init__(self, cluster: Cluster, api: CliApi, *, listen: tuple[str, int],
                 ws_port: Callable[[], int] | None = None, tls: bool = False,
                 admission: Admission | None = None, policy: HostPolicy | None = None) -> None:
        self.api = api  # its cluster is the current term's (a follower's: an empty one)
        self.admission = admission
        self.policy = policy
        self.listen = listen
        self.tls = tls
        self.ws_port = ws_port or (lambda: listen[1])
        self.started_wall = cluster.wall()
        self.files = load_web_files()
        self.rollouts_finished = metrics.Counter(
            "skr8tr_rollouts_total", "Rollouts ended since the conductor started, by final state.",
            labels=("state",), preset=[{"state": s} for s in protocol.ROLLOUT_FINAL_STATES])

    @property
    def cluster(self) -> Cluster:
        return self.api.cluster

    # ------------------------------------------------------------------ background

    async def count_rollouts(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Count ``rollout.finished`` events until cancelled. It follows one term's event
        bus: the daemon runs it with each term's loops (not as the listener's ``run``)."""
        task_status.started()
        while True:
            with self.cluster.events.subscribe() as events:
                async for ev in events:
                    if ev.event == "rollout.finished":
                        self.rollouts_finished.inc(state=str(ev.data.get("state", "unknown")))
            # The bus cut us off (we fell far behind): subscribe again.
            log.warning("the metrics event counter was cut off; subscribing again")
            await trio.sleep(0)

    # ------------------------------------------------------------------ routes

    def __call__(self, method: str, path: str) -> Response:
        if path in ("/", "/index.html"):
            return self._file("index.html")
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name in self.files and name != "index.html":
                return self._file(name)
        elif path == "/healthz":
            seat = self.cluster.seat
            if seat.leading:
                return Response(200, b"ok\n")
            return Response.json({"role": seat.role, "leader": seat.leader})
        elif path == "/api/state":
            return Response.json(views.status(self.cluster))
        elif path == "/api/config":
            return Response.json(self.config())
        elif path == "/api/events":
            return Response.json(self.recent_events())
        elif path == "/metrics":
            return Response(200, self.metrics_text().encode(), metrics.CONTENT_TYPE)
        return Response(404, NOT_FOUND_TEXT)

    def _file(self, name: str) -> Response:
        body, content_type = self.files[name]
        headers = PAGE_HEADERS if name == "index.html" else ()
        return Response(200, body, content_type, headers)

    def config(self) -> dict[str, Any]:
        """Where the page finds ``/v1/watch``; ``ws_host`` is null when the API listens on
        every address (the page then uses the host it was loaded from)."""
        host = self.listen[0]
        ws_host = None if host in WILDCARD_HOSTS else host
        port = self.ws_port()
        url = None
        if ws_host is not None:
            scheme = "wss" if self.tls else "ws"
            url = f"{scheme}://{f'[{ws_host}]' if ':' in ws_host else ws_host}:{port}/v1/watch"
        return {
            "ws_url": url, "ws_host": ws_host, "ws_port": port, "ws_path": "/v1/watch",
            "node_timeout_s": self.cluster.node_timeout_s,
            "heartbeat_s": self.cluster.heartbeat_s, "version": __version__,
            "started": self.started_wall, "now": self.cluster.wall(),
            "role": self.cluster.seat.role, "leader": self.cluster.seat.leader,
        }

    def recent_events(self) -> list[dict[str, Any]]:
        """The bus's recent events (the last 200), newest first."""
        return [{"seq": ev.seq, "ts": ev.ts, "event": ev.event, "data": ev.data}
                for ev in reversed(self.cluster.events.recent)]

    # ------------------------------------------------------------------ /metrics

    def metrics_text(self) -> str:
        cluster = self.cluster
        build = metrics.Gauge("skr8tr_build_info", "The conductor's version.", ("version",))
        build.set(1, version=__version__)
        uptime = metrics.Gauge("skr8tr_uptime_seconds", "Seconds since the conductor started.")
        uptime.set(max(0.0, cluster.wall() - self.started_wall))

        nodes = metrics.Gauge(
            "skr8tr_nodes", "Known nodes: live (session open), disconnected (session closed, "
            "not yet expired) or expired (silent past --node-timeout).", ("state",))
        counts = {"live": 0, "disconnected": 0, "expired": 0}
        for node in cluster.nodes.values():
            state = "expired" if node.expired else "live" if node.connected else "disconnected"
            counts[state] += 1
        for state, n in counts.items():
            nodes.set(n, state=state)
        live = metrics.Gauge("skr8tr_nodes_live", "Nodes with an open session, not expired.")
        live.set(counts["live"])

        apps = metrics.Gauge("skr8tr_apps", "Apps the conductor keeps running.")
        apps.set(len(cluster.apps))
        replicas = metrics.Gauge("skr8tr_replicas", "Replicas the conductor tracks, by state.",
                                 ("state",))
        by_state = dict.fromkeys(REPLICA_STATES, 0)
        for r in cluster.replicas.values():
            by_state[r.state] = by_state.get(r.state, 0) + 1
        for state, n in by_state.items():
            replicas.set(n, state=state)

        app_replicas = metrics.Gauge(
            "skr8tr_app_replicas", "Replicas of each app: desired (the count it keeps), ready "
            "(serving, any generation), starting, draining, stopping.", ("app", "state"))
        for row in views.app_rows(cluster):
            for state in ("desired", "ready", "starting", "draining", "stopping"):
                app_replicas.set(row[state], app=row["app"], state=state)

        running = metrics.Gauge("skr8tr_rollouts_running", "Rollouts in progress.")
        running.set(len(self.api.rollouts.active))

        refused = metrics.Counter(
            "skr8tr_requests_refused_total",
            "Requests and node sessions refused before any command ran, by error code.",
            ("reason",), preset=[{"reason": c} for c in REFUSAL_CODES])
        for code, n in self.api.refusals.by_code.items():
            refused.set_total(n, reason=code)

        events = metrics.Counter("skr8tr_events_total", "Events published on /v1/watch.")
        events.set_total(cluster.events.seq)

        closed = metrics.Counter(
            "skr8tr_connections_closed_total",
            "Connections the conductor closed because they broke a limit (size, rate, "
            "connections per address or in all, handshake, idle, unanswered pings, slow "
            "watcher, slow HTTP client) or their key was revoked, by reason.", ("reason",))
        counter = getattr(self.api, "closed", None)
        for reason, n in (counter.by_reason if counter is not None else {}).items():
            closed.set_total(n, reason=reason)
        paused = metrics.Counter(
            "skr8tr_node_reads_paused_total",
            "Times the conductor paused reading a node session for sending more than "
            "--max-node-bytes-per-s (the node is slowed down, not closed).")
        paused.set_total(getattr(getattr(self.api, "policing", None), "slowed", 0))
        families = [build, uptime, nodes, live, apps, replicas, app_replicas, running,
                    self.rollouts_finished, refused, self.api.command_seconds, events, closed,
                    paused]
        families += traffic_metrics.families(cluster)
        families += analysis_gauges(self.api.rollouts.active, cluster.clock())
        if self.admission is not None:
            open_now = metrics.Gauge(
                "skr8tr_connections_open",
                "Connections open on the API and HTTP listeners together.")
            open_now.set(self.admission.gate.open)
            cap = metrics.Gauge(
                "skr8tr_connections_max",
                "Connections the conductor serves at once (--max-connections, fitted under "
                "the open-file limit).")
            cap.set(self.admission.gate.limit)
            accept_errors = metrics.Counter(
                "skr8tr_accept_errors_total",
                "Times accept() failed for want of descriptors or memory (EMFILE, ENFILE, "
                "ENOMEM, ENOBUFS); the listener backs off and goes on.")
            accept_errors.set_total(self.admission.accept_errors)
            families += [open_now, cap, accept_errors]
        if self.policy is not None:
            foreign = metrics.Counter(
                "skr8tr_foreign_requests_total",
                "HTTP requests (421) and WebSocket handshakes (421, 403) refused for a Host "
                "or Origin that is not this conductor's, by header.", ("header",))
            for header, n in self.policy.refused.items():
                foreign.set_total(n, header=header)
            families.append(foreign)

        audit_log = getattr(self.api, "audit_log", None)
        if audit_log is not None:
            entries = metrics.Gauge("skr8tr_audit_entries",
                                    "Entries in the audit log (--audit-log).")
            entries.set(audit_log.head.entries)
            errors = metrics.Counter("skr8tr_audit_write_errors_total",
                                     "Audit log lines or head files that could not be written.")
            errors.set_total(audit_log.write_errors)
            families += [entries, errors]
        return metrics.render(families)
