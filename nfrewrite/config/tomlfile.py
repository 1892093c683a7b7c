"""One TOML config or rule file, read safely and parsed with every key's position.

Theory of operation
-------------------
A :class:`TomlFile` is one file read from disk: its text, the data ``tomllib`` made of it, the
positions :mod:`nfrewrite.config.tomlpos` recovered for every key path, and the
:class:`~nfrewrite.config.diagnostics.Diagnostic` list that validation appends to. Validators never
raise on bad input; they call :meth:`TomlFile.error` or :meth:`TomlFile.warning` with the *key
path* of the offending entry, and the file turns the path into a line and column (the value's, or
the key's with ``key=True``). That keeps every check a one-liner and guarantees every message names
the exact spot.

The small typed accessors (:meth:`TomlFile.want_int`, :meth:`TomlFile.want_str`, ...) check a
value's type and range and report a precise message when it is wrong, returning ``None``; the caller
then simply skips that value and goes on, so one run reports every mistake.

A file larger than :data:`MAX_FILE_SIZE` (1 MiB) is refused before it is read or parsed: tomllib
would otherwise spend seconds on a 10 MB string before any validator could say it is too long.

This module knows nothing about nfrewrite's schema; :mod:`nfrewrite.config.settings` and
:mod:`nfrewrite.config.rulefiles` do.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from nfrewrite.config.diagnostics import Diagnostic, Severity, type_name
from nfrewrite.config.ifname import ifname_problem
from nfrewrite.config.tomlpos import KeyPath, Pos, locate, scan_positions

__all__ = [
    "MAX_FILE_SIZE",
    "Opener",
    "TomlFile",
]

MAX_FILE_SIZE = 1024 * 1024  # bytes; a bigger config or rule file is refused before it is read

#: ``path`` -> (a read-only descriptor of it or None, problems found opening it)
Opener = Callable[[str], "tuple[int | None, list[Diagnostic]]"]


def _size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"

_TOML_ERROR_AT = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_ERROR_END = re.compile(r"^(?P<msg>.*) \(at end of document\)$", re.S)


@dataclass
class TomlFile:
    """One TOML file, its parsed data (``None`` if unreadable), positions and diagnostics."""

    path: str
    text: str = ""
    data: dict[str, object] | None = None
    positions: dict[KeyPath, Pos] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    # -- reading ---------------------------------------------------------------------------------

    @classmethod
    def read(
        cls, path: str, max_size: int = MAX_FILE_SIZE, *, opener: Opener | None = None
    ) -> TomlFile:
        """Read and parse ``path``. Problems become diagnostics; ``data`` is then ``None``.

        A file larger than ``max_size`` bytes is refused before it is read (its size from
        ``fstat``; at most ``max_size + 1`` bytes are ever read, for files that do not know their
        size), so a huge file costs nothing: no config or rule file is that large by accident.

        ``opener`` (``nfrewrite.config.filesafety.SafeOpener``) opens the file and reports what it
        found on the way; the text is read from the descriptor it returns and from nothing else.
        """
        doc = cls(path)
        if opener is not None:
            fd, found = opener(path)
            doc.diagnostics.extend(found)
            if fd is None:
                return doc
        else:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                doc._add("error", 0, 0, f"cannot read: {exc.strerror or exc}")
                return doc
        try:
            with os.fdopen(fd, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                raw = b"" if size > max_size else fh.read(max_size + 1)
        except OSError as exc:
            doc._add("error", 0, 0, f"cannot read: {exc.strerror or exc}")
            return doc
        if size > max_size or len(raw) > max_size:
            shown = f"{_size(size)}, " if size > max_size else ""
            doc._add("error", 0, 0, f"file is too large ({shown}more than {_size(max_size)}, the "
                                    "limit for a config or rule file): is this the right file?")
            return doc
        return cls.parse(path, raw, doc)

    @classmethod
    def parse(cls, path: str, raw: bytes, doc: TomlFile | None = None) -> TomlFile:
        doc = doc or cls(path)
        try:
            doc.text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            doc.text = raw.decode("utf-8", errors="replace")
            doc.lines = [ln.rstrip("\r") for ln in doc.text.split("\n")]
            before = raw[: exc.start].decode("utf-8", errors="replace")
            line = before.count("\n") + 1
            col = len(before) - (before.rfind("\n") + 1) + 1
            doc._add("error", line, col, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x})")
            return doc
        doc.lines = [ln.rstrip("\r") for ln in doc.text.split("\n")]
        try:
            doc.data = tomllib.loads(doc.text)
        except tomllib.TOMLDecodeError as exc:
            doc._syntax_error(exc)
            return doc
        doc.positions = scan_positions(doc.text)
        return doc

    def _syntax_error(self, exc: tomllib.TOMLDecodeError) -> None:
        text = str(exc)
        line: int | None = getattr(exc, "lineno", None)  # Python >= 3.14 carries these
        col: int | None = getattr(exc, "colno", None)
        msg = getattr(exc, "msg", None) if line is not None else None
        if line is None:
            m = _TOML_ERROR_AT.match(text)
            if m:
                msg, line, col = m["msg"], int(m["line"]), int(m["col"])
            else:
                m = _TOML_ERROR_END.match(text)
                msg = m["msg"] if m else text
                line, col = self._end_position()
        if not isinstance(msg, str):
            msg = text
        col = col or 1
        if msg.startswith("Cannot overwrite a value") and 0 < line <= len(self.lines):
            # tomllib points after the second value; the key at the start of the line is the spot.
            src = self.lines[line - 1]
            col = len(src) - len(src.lstrip(" \t")) + 1
            msg = "duplicate key (this key already has a value)"
        msg = msg[:1].lower() + msg[1:]
        self._add("error", line, col, f"invalid TOML: {msg}")

    def _end_position(self) -> tuple[int, int]:
        lines = self.lines
        n = len(lines)
        while n > 1 and not lines[n - 1].strip():
            n -= 1
        return n, len(lines[n - 1]) + 1 if lines else 1

    # -- reporting ---------------------------------------------------------------------------

    def _add(self, severity: Severity, line: int, col: int, message: str) -> None:
        source = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        self.diagnostics.append(Diagnostic(self.path, line, col, severity, message, source))

    def at(self, path: KeyPath, *, key: bool = False) -> tuple[int, int]:
        """Line and column of a key path's value (or key), falling back to its nearest ancestor."""
        if not self.positions:
            return (1, 1) if self.lines else (0, 0)
        return locate(self.positions, path, key=key)

    def error(self, path: KeyPath, message: str, *, key: bool = False, offset: int = 0) -> None:
        """Report an error at ``path``. ``offset`` moves the column right (inside a string)."""
        line, col = self.at(path, key=key)
        self._add("error", line, col + offset, message)

    def warning(self, path: KeyPath, message: str, *, key: bool = False, offset: int = 0) -> None:
        line, col = self.at(path, key=key)
        self._add("warning", line, col + offset, message)

    def string_offset(self, path: KeyPath, value: str, index: int) -> int:
        """Column offset of ``value[index]`` from the string's opening quote, if it can be known.

        Exact only when the source spells the string plainly (no escapes); otherwise 0 (the quote).
        """
        line, col = self.at(path)
        if not 0 < line <= len(self.lines):
            return 0
        src = self.lines[line - 1]
        for quote in ('"', "'"):
            if src.startswith(quote + value + quote, col - 1):
                return 1 + index
        return 0

    def sort(self) -> None:
        self.diagnostics.sort(key=lambda d: (d.line, d.col))

    # -- typed access ----------------------------------------------------------------------------

    def check_keys(
        self, path: KeyPath, table: Mapping[str, object], allowed: Sequence[str], where: str
    ) -> None:
        """Every key of ``table`` must be in ``allowed``; suggest the closest one if not."""
        for k in table:
            if k in allowed:
                continue
            close = difflib.get_close_matches(k, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "allowed: " + ", ".join(allowed)
            self.error(path + (k,), f"unknown key '{k}' in {where} ({hint})", key=True)

    def want_table(self, path: KeyPath, value: object, what: str) -> dict[str, object] | None:
        if isinstance(value, dict):
            return value
        self.error(path, f"{what} must be a table, not {type_name(value)}")
        return None

    def tables_in(
        self, path: KeyPath, entries: Sequence[object], what: str, allowed: Sequence[str]
    ) -> Iterator[tuple[KeyPath, dict[str, object]]]:
        """Each entry of an array that is a table, with its key path, its keys checked against
        ``allowed``; an entry that is not a table is an error and skipped."""
        for i, entry in enumerate(entries):
            epath = path + (i,)
            table = self.want_table(epath, entry, what)
            if table is not None:
                self.check_keys(epath, table, allowed, what)
                yield epath, table

    def want_str(self, path: KeyPath, value: object, what: str) -> str | None:
        if isinstance(value, str):
            return value
        self.error(path, f"{what} must be a string, not {type_name(value)}")
        return None

    def want_bool(self, path: KeyPath, value: object, what: str) -> bool | None:
        if isinstance(value, bool):
            return value
        self.error(path, f"{what} must be true or false, not {type_name(value)}")
        return None

    def want_int(self, path: KeyPath, value: object, what: str, lo: int, hi: int) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = ""
            if isinstance(value, str) and value.strip().isdigit():
                hint = f" (write {value.strip()} without quotes)"
            self.error(path, f"{what} must be an integer, not {type_name(value)}{hint}")
            return None
        if not lo <= value <= hi:
            self.error(path, f"{what} {value} is out of range ({lo}..{hi})")
            return None
        return value

    def want_ifname(self, path: KeyPath, value: object, what: str) -> str | None:
        """An interface name the daemon can use (see :func:`ifname_problem`)."""
        name = self.want_str(path, value, what)
        if name is None:
            return None
        problem = ifname_problem(name)
        if problem is not None:
            self.error(path, f"{what} {name!r} is not a valid interface name: {problem}; pick "
                             "another (ip link set dev OLD name NEW renames an existing link)")
            return None
        return name
