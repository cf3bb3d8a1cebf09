"""The node agent: dials the conductor, starts, watches and stops processes.

Modules, each named for what it does:

- :mod:`.agent` — configuration, the reconnect loop, ``main`` for ``skr8tr node``;
- :mod:`.session` — one WebSocket session with the conductor (handshake,
  heartbeats, commands);
- :mod:`.supervisor` — replicas: launch, readiness, stop, exit, re-adoption, reports;
- :mod:`.process` — one workload process: spawning it, stopping its process group;
- :mod:`.health` — HTTP health probes and the ready/unhealthy state machine;
- :mod:`.logs` — per-replica log files, rotation and the in-memory tail;
- :mod:`.records` — replica records in the data dir (atomic writes);
- :mod:`.adopt` — after a restart: is a recorded pid still the replica
  (pid and start time), and watching and signalling it without being its parent;
- :mod:`.backoff`, :mod:`.sysinfo` — reconnect delays, machine figures.

Nothing here imports :mod:`skr8tr.conductor`; the two share only
:mod:`skr8tr.core.node_protocol`.
"""
