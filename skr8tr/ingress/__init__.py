"""The HTTP ingress: routes requests to ready, non-draining replicas (``skr8tr ingress``).

routes.py    pure: longest-prefix routes, the replica table and round robin
upstreams.py the replica table kept live from the conductor's /v1/watch
pool.py      keep-alive connections to replicas
limits.py    pure: connection caps per address and in all, the descriptor budget
proxy.py     the h11 reverse proxy (limits, retries, streaming)
traffic.py   pure: what users saw of each replica, counted per interval
reporter.py  those counts to the conductor on /v1/ingress (with --key)
daemon.py    ``main(opts)``: flags, the root nursery, graceful shutdown
"""
