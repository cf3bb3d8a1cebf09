"""``/metrics`` of what the ingresses report: traffic per (app, generation), and the
ingress sessions themselves.

The label sets are bounded by what the conductor holds: the apps it runs and, for
each, the generations its traffic book keeps (``GENERATIONS_KEPT``); a report row
for anything else never reaches the book. Pure: reads the cluster and the desk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from skr8tr.conductor import metrics
from skr8tr.conductor.ingress_sessions import REFUSED_REASONS

if TYPE_CHECKING:
    from skr8tr.conductor.cluster import Cluster


def families(cluster: Cluster) -> list[metrics.Gauge | metrics.Counter]:
    """The traffic counters and p99 per (app, generation) and the ingress metrics."""
    requests = metrics.Counter(
        "skr8tr_traffic_requests_total",
        "Requests the ingresses routed to the replicas of each app and generation.",
        ("app", "generation"))
    errors = metrics.Counter(
        "skr8tr_traffic_errors_total",
        "5xx answers the ingresses got from each app and generation.", ("app", "generation"))
    failed = metrics.Counter(
        "skr8tr_traffic_failed_total",
        "Requests to each app and generation that got no response head (refused, reset, "
        "timed out).", ("app", "generation"))
    p99 = metrics.Gauge(
        "skr8tr_traffic_p99_seconds",
        "The 99th percentile of the answers' latency (to the response head), over all "
        "the time each app and generation was reported.", ("app", "generation"))
    for app in sorted(cluster.apps):
        for generation, counts in cluster.traffic.generations(app).items():
            labels = {"app": app, "generation": str(generation)}
            requests.set_total(counts.requests, **labels)
            errors.set_total(counts.errors, **labels)
            failed.set_total(counts.failed, **labels)
            ms = counts.p99_ms
            if ms is not None:
                p99.set(ms / 1000.0, **labels)

    desk = cluster.ingresses
    sessions = metrics.Gauge("skr8tr_ingress_sessions",
                             "Ingress sessions open on /v1/ingress.")
    sessions.set(len(desk.sessions))
    reports = metrics.Counter("skr8tr_ingress_reports_total",
                              "Traffic reports accepted from ingresses.")
    reports.set_total(desk.reports)
    unknown = metrics.Counter(
        "skr8tr_ingress_report_rows_unknown_total",
        "Report rows naming a replica this conductor does not hold (skipped), this term.")
    unknown.set_total(cluster.traffic.rows_unknown)
    refused = metrics.Counter(
        "skr8tr_ingress_refused_total",
        "Ingress sessions refused or closed, and reports refused or dropped, by reason.",
        ("reason",), preset=[{"reason": r} for r in REFUSED_REASONS])
    for reason, n in desk.refused.items():
        refused.set_total(n, reason=reason)
    paused = metrics.Counter(
        "skr8tr_ingress_reads_paused_total",
        "Times the conductor paused reading an ingress session for sending more bytes a "
        "second than its limit (slowed, not closed).")
    paused.set_total(desk.paused)
    return [requests, errors, failed, p99, sessions, reports, unknown, refused, paused]
