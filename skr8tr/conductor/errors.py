"""The error a command is refused with: a wire error code and a message for people."""

from __future__ import annotations


class CommandError(Exception):
    """A command refused: ``code`` is the error code of the reply (``NOT_FOUND``,
    ``CONFLICT``, ``NO_CAPACITY``, ...), ``message`` says why and what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

