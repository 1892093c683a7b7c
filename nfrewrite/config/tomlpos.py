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

Cost: the scanner runs Python code per *token* (key, value, bracket, comma), never per character:
every run of characters (a string, a comment, whitespace, a bare key or scalar) is consumed by one
regular expression or ``str.find``. A 1 MiB file of long strings or comments scans in a few
milliseconds, about a twentieth of what ``tomllib`` takes to parse it; a file dense with tiny
tokens (thousands of one-line rules) costs about 1.3 times what ``tomllib`` takes (0.4 s/MiB).
Escapes are decoded only in quoted keys, whose value the paths need; a string value is skipped.

Lines and columns are 1-based; a column counts characters (code points), not bytes. Lines are
separated by ``\\n`` only (a ``\\r`` before it belongs to the line ending), as in ``tomllib``.
"""

from __future__ import annotations

import bisect
import contextlib
import re
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


# Every run of characters is consumed by one regular expression (or ``str.find``), never by a
# Python loop over characters: the scan costs per token, not per character, so a 60 KB string or a
# 1 MiB comment block costs about as much as a short one.
_WS = re.compile(r"[ \t]*")
# whitespace, newlines and comments; unambiguous, so it never backtracks
_WS_NL_COMMENTS = re.compile(r"[ \t\r\n]*(?:#[^\n]*[ \t\r\n]*)*")
# a key segment: bare, basic string (its body, escapes undecoded) or literal string
_KEY_SEGMENT = re.compile(
    r"""[ \t]*(?:([A-Za-z0-9_-]+)|"([^"\\\n]*(?:\\.[^"\\\n]*)*)"|'([^'\n]*)')[ \t]*"""
)
_EQUALS = re.compile(r"=[ \t]*")
_SCALAR = re.compile(r"[^,\]}#\n]+")
# a single-line basic string, escapes included ("unrolled": linear, never backtracks far)
_BASIC_STRING = re.compile(r'"([^"\\\n]*(?:\\.[^"\\\n]*)*)"')
_ESCAPE = re.compile(r'\\(?:([btnfre"\\])|x([0-9A-Fa-f]{2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))')
_ESCAPE_PAIR = re.compile(r"\\.")  # a backslash and what follows it
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


def _decode_basic(body: str) -> str:
    """The value of a basic string's ``body`` (between its quotes)."""
    if "\\" not in body:
        return body
    value, count = _ESCAPE.subn(_unescape, body)
    if count != len(_ESCAPE_PAIR.findall(body)):  # an escape that _ESCAPE does not know
        raise _Stop
    return value


def _unescape(match: re.Match[str]) -> str:
    simple, *hexes = match.groups()
    if simple is not None:
        return _SIMPLE_ESCAPES[simple]
    digits = next(h for h in hexes if h is not None)
    try:
        return chr(int(digits, 16))
    except ValueError as exc:  # beyond U+10FFFF
        raise _Stop from exc


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self.i = 0
        self.line_starts = [0]
        self.line_starts.extend(m.end() for m in re.finditer("\n", text))
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
        start = self.line_starts[kl - 1]
        if start <= value_index and self.s.find("\n", key_index, value_index) < 0:
            self.out[path] = Pos(kl, kc, kl, value_index - start + 1)  # the usual: one line
        else:
            self.out[path] = Pos(kl, kc, *self.where(value_index))

    # -- low-level reading -------------------------------------------------------------------

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < self.n else ""

    def skip(self, pattern: re.Pattern[str]) -> None:
        """Past what ``pattern`` matches here; :class:`_Stop` if it does not match."""
        m = pattern.match(self.s, self.i)
        if m is None:
            raise _Stop
        self.i = m.end()

    def skip_ws(self) -> None:
        self.skip(_WS)  # matches the empty string too: never stops

    def skip_comment(self) -> None:
        if self.peek() == "#":
            end = self.s.find("\n", self.i)
            self.i = self.n if end < 0 else end

    def skip_ws_nl_comments(self) -> None:
        """Whitespace, newlines and comments, as allowed between array elements."""
        self.skip(_WS_NL_COMMENTS)  # matches the empty string too: never stops

    def expect(self, text: str) -> None:
        if not self.s.startswith(text, self.i):
            raise _Stop
        self.i += len(text)

    # -- strings -----------------------------------------------------------------------------

    def read_literal_string(self) -> str:
        self.expect("'")
        end = self.s.find("'", self.i)
        if end < 0 or self.s.find("\n", self.i, end) >= 0:
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
        elif self.s[self.i : self.i + 1] == '"':
            self.skip(_BASIC_STRING)
        else:
            self.read_literal_string()

    # -- keys ----------------------------------------------------------------------------------

    def read_key(self) -> list[tuple[str, int]]:
        """A (possibly dotted) key: list of (segment, index where the segment starts)."""
        parts: list[tuple[str, int]] = []
        while True:
            m = _KEY_SEGMENT.match(self.s, self.i)  # one segment and the blanks around it
            if m is None:
                raise _Stop
            kind = m.lastindex
            if kind == 1:
                parts.append((m[1], m.start(1)))
            elif kind == 2:
                parts.append((_decode_basic(m[2]), m.start(2) - 1))
            else:
                parts.append((m[3], m.start(3) - 1))
            self.i = m.end()
            if not self.s.startswith(".", self.i):
                return parts
            self.i += 1

    # -- values --------------------------------------------------------------------------------

    def read_keyval(self, table: KeyPath) -> None:
        parts = self.read_key()
        self.skip(_EQUALS)
        if len(parts) == 1:
            path = (*table, parts[0][0])
        else:
            for depth in range(1, len(parts)):
                seg_index = parts[depth - 1][1]
                prefix = table + tuple(name for name, _ in parts[:depth])
                self.record(prefix, seg_index, seg_index, first=True)
            path = table + tuple(name for name, _ in parts)
        self.record(path, parts[-1][1], self.i, first=False)
        self.read_value(path)

    def read_value(self, path: KeyPath) -> None:
        ch = self.s[self.i : self.i + 1]
        if ch in "\"'":
            self.skip_string()
        elif ch == "[":
            self.read_array(path)
        elif ch == "{":
            self.read_inline_table(path)
        else:
            self.skip(_SCALAR)

    def read_array(self, path: KeyPath) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_ws_nl_comments()
            if self.s[self.i : self.i + 1] == "]":
                self.i += 1
                return
            elem = path + (index,)
            self.record(elem, self.i, self.i, first=False)
            self.read_value(elem)
            index += 1
            self.skip_ws_nl_comments()
            if self.s[self.i : self.i + 1] == ",":
                self.i += 1
            elif self.s[self.i : self.i + 1] != "]":
                raise _Stop

    def read_inline_table(self, path: KeyPath) -> None:
        self.expect("{")
        while True:
            self.skip_ws_nl_comments()  # newlines are TOML 1.1; harmless to accept
            if self.s[self.i : self.i + 1] == "}":
                self.i += 1
                return
            self.read_keyval(path)
            self.skip_ws_nl_comments()
            if self.s[self.i : self.i + 1] == ",":
                self.i += 1
            elif self.s[self.i : self.i + 1] != "}":
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
            if self.s[self.i : self.i + 1] == "[":
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
