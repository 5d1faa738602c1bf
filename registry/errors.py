"""A small error hierarchy. Errors that reach a client carry their reply code.

Like h11's ``error_status_hint``: the place that detects a problem knows which
reply it deserves, and the edge that catches it only formats it.
"""

from __future__ import annotations

from registry.model import Code


class RegistryError(Exception):
    """Base of every error raised by registry code."""


class ProtocolError(RegistryError):
    """The request bytes are unacceptable; ``code`` is the ERROR/DENIED reply code."""

    def __init__(self, code: Code, explanation: str) -> None:
        super().__init__(explanation)
        self.code = code
        self.explanation = explanation

    def __repr__(self) -> str:
        return f"ProtocolError({self.code.value!r}, {self.explanation!r})"


class ConfigError(RegistryError):
    """The configuration is invalid; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
