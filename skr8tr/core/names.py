"""What an app's name may be, in one place: manifests, requests, node messages, routes;
and how long an id may be (request ids, node ids, replica ids)."""

from __future__ import annotations

import re

__all__ = ["APP_NAME_MAX_CHARS", "APP_NAME_PATTERN", "APP_NAME_RE", "MAX_ID_CHARS"]

APP_NAME_MAX_CHARS = 63
APP_NAME_PATTERN = f"[a-z0-9][a-z0-9-]{{0,{APP_NAME_MAX_CHARS - 1}}}"
APP_NAME_RE = re.compile(APP_NAME_PATTERN)
MAX_ID_CHARS = 128  # a request id on /v1/cli; a node, replica or logs request id on /v1/node
