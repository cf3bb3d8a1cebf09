"""The pure core: decisions without I/O.

Nothing under ``skr8tr.core`` imports trio, opens a socket, starts a process or
reads the wall clock; time and state come in as arguments.
"""
