"""User-facing diagnostics: ``path:line:col: error: text``, the source line, a caret under the spot.

Theory of operation
-------------------
A :class:`Diagnostic` is one message with where it applies and the source line it applies to, kept
as text so a message can be shown after the file is gone (a rule's line travels with the compiled
rule). Everything that checks files (:mod:`nfrewrite.config.tomlfile`, the loaders, the file-safety
checks, the kernel prefilter's size check) produces these, and ``nfrewrite check``, ``run`` and the
reload all print them the same way: :meth:`Diagnostic.format`.

This module reads no file and knows nothing about nfrewrite's schema.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "Diagnostic",
    "Severity",
    "has_errors",
    "type_name",
]

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One message for the user. ``line``/``col`` are 1-based; 0 means "the file as a whole"."""

    path: str
    line: int
    col: int
    severity: Severity
    message: str
    source: str = ""  # the offending source line, without its line ending

    def format(self) -> str:
        """``path:line:col: severity: message``, then the source line and a caret under ``col``."""
        if self.line <= 0:
            return f"{self.path}: {self.severity}: {self.message}"
        head = f"{self.path}:{self.line}:{self.col}: {self.severity}: {self.message}"
        if not self.source and self.col <= 1:
            return head
        # Copy tabs from the source so the caret lines up however tabs are displayed.
        pad = "".join("\t" if ch == "\t" else " " for ch in self.source[: max(self.col - 1, 0)])
        pad += " " * max(self.col - 1 - len(self.source), 0)
        return f"{head}\n    {self.source}\n    {pad}^"

    def __str__(self) -> str:
        return self.format()


def has_errors(diagnostics: Iterable[Diagnostic]) -> bool:
    return any(d.severity == "error" for d in diagnostics)


def type_name(value: object) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return "date/time"
    return type(value).__name__

