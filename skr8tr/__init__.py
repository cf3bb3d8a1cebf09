"""skr8tr: run bare processes on a fleet of machines, update them without dropping a request."""

__version__ = "0.1.0"
