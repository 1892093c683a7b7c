"""Where is each key and value of a TOML document? (``tomllib`` does not say.)

Theory of operation
-------------------
``tomllib`` turns text into plain dicts and lists and forgets where anything was. Error messages
for the user must point at the offending key or value, so this module re-reads the same text with a
small scanner that understands TOML's *syntax* (not its semantics) and records, for every key path,
the line and column of the key and of the value::

    ("rule",)                            the first [[rule]] header
    ("rule", 2)                          the third [[rule]] table (its header)
    ("rule", 2, "match", "sport")        key ``sport`` inside ``match = { ... }``
    ("rule", 2, "match", "sport", 1)     the second element of ``sport = [..]``
    ("rule", 2, "replace", 0, "find")    ``find`` in the first inline table of ``replace = [..]``

Paths use the same shape as the parsed data: dict keys are ``str``, list indices are ``int``. An
array of tables (``[[x]]``) counts its elements the way ``tomllib`` appends them, and a later header
``[x.y]`` lands in the last element of ``x``, as TOML says.

The scanner is meant to run on text that ``tomllib`` has already accepted, so it never has to
diagnose anything. It is still written to be harmless on anything else: it never raises; on text it
does not understand it stops and returns what it recorded so far. Callers look a path up with
:func:`locate`, which falls back to the nearest recorded ancestor (and finally to line 1, column 1),
so a missing position costs precision, never a crash.

Strings are skipped with their real delimiters (basic, literal, and both multi-line kinds, with
escapes), so a ``#``, ``=``, ``{`` or quote inside a string is never mistaken for syntax.

Lines and columns are 1-based; a column counts characters (code points), not bytes. Lines are
separated by ``\\n`` only (a ``\\r`` before it belongs to the line ending), as in ``tomllib``.
"""

from __future__ import annotations

import bisect
import contextlib
from dataclasses import dataclass

Key = str | int
KeyPath = tuple[Key, ...]

__all__ = ["Key", "KeyPath", "Pos", "locate", "scan_positions"]


@dataclass(frozen=True, slots=True)
class Pos:
    """Position of one entry: where its key starts and where its value starts (both 1-based).

    For an array element both are the element's start. For a table header (``[t]`` / ``[[t]]``)
    the key is the last key segment inside the brackets and the value is the opening bracket.
    """

    key_line: int
    key_col: int
    line: int
    col: int


_BARE_KEY_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_SCALAR_END = frozenset(",]}#\n")
_SIMPLE_ESCAPES = {
    "b": "\b",
    "t": "\t",
    "n": "\n",
    "f": "\f",
    "r": "\r",
    "e": "\x1b",
    '"': '"',
    "\\": "\\",
}


class _Stop(Exception):
    """The scanner met something it does not understand: keep what was recorded, stop."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.line_starts = [0]
        for k, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(k + 1)
        self.out: dict[KeyPath, Pos] = {}
        self.aot_len: dict[KeyPath, int] = {}

    # -- positions ---------------------------------------------------------------------------

    def where(self, index: int) -> tuple[int, int]:
        row = bisect.bisect_right(self.line_starts, index) - 1
        return row + 1, index - self.line_starts[row] + 1

    def record(self, path: KeyPath, key_index: int, value_index: int, *, first: bool) -> None:
        if first and path in self.out:
            return
        kl, kc = self.where(key_index)
        vl, vc = self.where(value_index)
        self.out[path] = Pos(kl, kc, vl, vc)

    # -- low-level reading -------------------------------------------------------------------

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < self.n else ""

    def skip_ws(self) -> None:
        while self.i < self.n and self.s[self.i] in " \t":
            self.i += 1

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.s.find("\n", self.i)
            self.i = self.n if end < 0 else end

    def skip_ws_nl_comments(self) -> None:
        """Whitespace, newlines and comments, as allowed between array elements."""
        while self.i < self.n:
            ch = self.s[self.i]
            if ch in " \t\r\n":
                self.i += 1
            elif ch == "#":
                self.skip_comment()
            else:
                return

    def expect(self, text: str) -> None:
        if not self.s.startswith(text, self.i):
            raise _Stop
        self.i += len(text)

    # -- strings -----------------------------------------------------------------------------

    def read_basic_string(self) -> str:
        """A single-line basic string at ``self.i`` (on the opening quote); returns its value."""
        self.expect('"')
        out: list[str] = []
        while True:
            if self.i >= self.n:
                raise _Stop
            ch = self.s[self.i]
            if ch == '"':
                self.i += 1
                return "".join(out)
            if ch == "\n":
                raise _Stop
            if ch == "\\":
                out.append(self.read_escape())
                continue
            out.append(ch)
            self.i += 1

    def read_escape(self) -> str:
        esc = self.peek(1)
        if esc in _SIMPLE_ESCAPES:
            self.i += 2
            return _SIMPLE_ESCAPES[esc]
        width = {"x": 2, "u": 4, "U": 8}.get(esc)
        if width is None:
            raise _Stop
        digits = self.s[self.i + 2 : self.i + 2 + width]
        try:
            char = chr(int(digits, 16))
        except ValueError as exc:
            raise _Stop from exc
        self.i += 2 + width
        return char

    def read_literal_string(self) -> str:
        self.expect("'")
        end = self.s.find("'", self.i)
        if end < 0 or "\n" in self.s[self.i : end]:
            raise _Stop
        value = self.s[self.i : end]
        self.i = end + 1
        return value

    def skip_multiline(self, quote: str) -> None:
        """Skip a multi-line string; ``self.i`` is on its opening triple quote."""
        delim = quote * 3
        self.expect(delim)
        while True:
            end = self.s.find(delim, self.i)
            if end < 0:
                raise _Stop
            if quote == '"':
                # The delimiter counts only if the quote before it is not escaped.
                backslashes = 0
                k = end - 1
                while k >= self.i and self.s[k] == "\\":
                    backslashes += 1
                    k -= 1
                if backslashes % 2 == 1:
                    self.i = end + 1
                    continue
            self.i = end + 3
            # Up to two quotes right before the delimiter belong to the content.
            extra = 0
            while extra < 2 and self.peek() == quote:
                self.i += 1
                extra += 1
            return

    def skip_string(self) -> None:
        if self.s.startswith('"""', self.i):
            self.skip_multiline('"')
        elif self.s.startswith("'''", self.i):
            self.skip_multiline("'")
        elif self.peek() == '"':
            self.read_basic_string()
        else:
            self.read_literal_string()

    # -- keys ----------------------------------------------------------------------------------

    def read_key(self) -> list[tuple[str, int]]:
        """A (possibly dotted) key: list of (segment, index where the segment starts)."""
        parts: list[tuple[str, int]] = []
        while True:
            self.skip_ws()
            start = self.i
            ch = self.peek()
            if ch == '"':
                parts.append((self.read_basic_string(), start))
            elif ch == "'":
                parts.append((self.read_literal_string(), start))
            elif ch in _BARE_KEY_CHARS and ch:
                while self.i < self.n and self.s[self.i] in _BARE_KEY_CHARS:
                    self.i += 1
                parts.append((self.s[start : self.i], start))
            else:
                raise _Stop
            self.skip_ws()
            if self.peek() != ".":
                return parts
            self.i += 1

    # -- values --------------------------------------------------------------------------------

    def read_keyval(self, table: KeyPath) -> None:
        parts = self.read_key()
        self.expect("=")
        self.skip_ws()
        for depth in range(1, len(parts)):
            seg_index = parts[depth - 1][1]
            prefix = table + tuple(name for name, _ in parts[:depth])
            self.record(prefix, seg_index, seg_index, first=True)
        path = table + tuple(name for name, _ in parts)
        self.record(path, parts[-1][1], self.i, first=False)
        self.read_value(path)

    def read_value(self, path: KeyPath) -> None:
        ch = self.peek()
        if ch in "\"'":
            self.skip_string()
        elif ch == "[":
            self.read_array(path)
        elif ch == "{":
            self.read_inline_table(path)
        else:
            start = self.i
            while self.i < self.n and self.s[self.i] not in _SCALAR_END:
                self.i += 1
            if self.i == start:
                raise _Stop

    def read_array(self, path: KeyPath) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_ws_nl_comments()
            if self.peek() == "]":
                self.i += 1
                return
            elem = path + (index,)
            self.record(elem, self.i, self.i, first=False)
            self.read_value(elem)
            index += 1
            self.skip_ws_nl_comments()
            if self.peek() == ",":
                self.i += 1
            elif self.peek() != "]":
                raise _Stop

    def read_inline_table(self, path: KeyPath) -> None:
        self.expect("{")
        while True:
            self.skip_ws_nl_comments()  # newlines are TOML 1.1; harmless to accept
            if self.peek() == "}":
                self.i += 1
                return
            self.read_keyval(path)
            self.skip_ws_nl_comments()
            if self.peek() == ",":
                self.i += 1
            elif self.peek() != "}":
                raise _Stop

    # -- table headers -------------------------------------------------------------------------

    def read_header(self) -> KeyPath:
        bracket = self.i
        is_aot = self.s.startswith("[[", self.i)
        self.i += 2 if is_aot else 1
        parts = self.read_key()
        self.expect("]]" if is_aot else "]")
        path: KeyPath = ()
        for depth, (name, seg_index) in enumerate(parts, start=1):
            path = path + (name,)
            last = depth == len(parts)
            if last and is_aot:
                self.record(path, seg_index, bracket, first=True)
                count = self.aot_len.get(path, 0) + 1
                self.aot_len[path] = count
                path = path + (count - 1,)
                self.record(path, seg_index, bracket, first=False)
            elif last:
                self.record(path, seg_index, bracket, first=False)
            else:
                self.record(path, seg_index, bracket, first=True)
                if path in self.aot_len:
                    path = path + (self.aot_len[path] - 1,)
        return path

    # -- document ------------------------------------------------------------------------------

    def run(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_ws_nl_comments()
            if self.i >= self.n:
                return
            if self.peek() == "[":
                table = self.read_header()
            else:
                self.read_keyval(table)
            self.skip_ws()
            self.skip_comment()
            if self.i < self.n and self.s[self.i] not in "\r\n":
                raise _Stop


def scan_positions(text: str) -> dict[KeyPath, Pos]:
    """Positions of every key path in ``text`` (a TOML document). Never raises.

    On text the scanner does not understand, the result holds what was recorded before that point.
    """
    scanner = _Scanner(text)
    # _Stop, or anything unforeseen: positions are best effort, never fatal.
    with contextlib.suppress(Exception):
        scanner.run()
    return scanner.out


def locate(positions: dict[KeyPath, Pos], path: KeyPath, *, key: bool = False) -> tuple[int, int]:
    """Line and column of ``path`` (its value, or its key with ``key=True``).

    Falls back to the nearest recorded ancestor, then to (1, 1). Never raises.
    """
    for depth in range(len(path), 0, -1):
        pos = positions.get(path[:depth])
        if pos is not None:
            if key and depth == len(path):
                return pos.key_line, pos.key_col
            return pos.line, pos.col
    return 1, 1
