"""skr8tr: run bare processes on a fleet of machines, update them without dropping a request."""

__version__ = "0.2.0"

# Where the CLI, node agents and the ingress look for the conductor unless told.
DEFAULT_CONDUCTOR_URL = "ws://127.0.0.1:7771"
# The signing key the CLI and the node agent use unless told (--key, SKR8TR_KEY).
DEFAULT_KEY_FILE = "~/.skr8tr/signing.sec"
