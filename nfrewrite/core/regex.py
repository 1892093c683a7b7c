"""Regular-expression rules (``find_regex``): what is accepted, and the expressions Hyperscan runs.

Theory of operation
-------------------
A ``find_regex`` is parsed by Python's own regular-expression parser (``re._parser``, pure: the
same syntax as ``re``, over *bytes*) into a small tree of four kinds of node: a set of bytes
(a literal, ``.``, a class, ``\\d``; case-insensitivity is folded into the set, ASCII only, as
``re`` does for bytes), a concatenation, an alternation, and a repetition ``{m,n}`` (``n``
``None``: unbounded). Groups are transparent in the tree (they only matter for ``\\1``..``\\9``
in ``with``). Everything a linear-time matcher cannot do, or that means nothing in a TCP stream
whose packet edges are not the text's, is refused with its position: backreferences,
lookaround, conditionals, atomic groups and possessive or lazy repetitions, anchors and word
boundaries (``^ $ \\A \\Z \\b \\B``), a pattern that can match the empty string, a class
that matches no byte.

Semantics: leftmost-longest, each match at most ``max_len`` bytes. Among the positions where a
match (of at most ``max_len`` bytes) begins, the leftmost wins, and there the longest such match
is taken; the search goes on after its end, so matches never overlap. (Across several patterns
of a packet's rules: the leftmost start wins, ties go to rule order; see
:mod:`nfrewrite.core.rules`.) The bound makes a match's decision depend on at most ``max_len``
bytes, which is what lets the stream matcher hold back no more than that. To keep it exact
without ever trying each start position on its own, the length of a match must be bounded by
the pattern itself, with one exception: the pattern's *last* item may be an unbounded
repetition of one set of bytes (``Server: [^\\r\\n]*``, ``PHP/[0-9.]+``). Then every match
longer than ``max_len`` has one that is exactly ``max_len`` long (its head followed by fewer
repetitions), so "the longest match of at most ``max_len`` bytes" is the longest match cut at
``max_len``. Any other unbounded repetition (``(a|aa)+b``, ``a.*b``) is refused: write a bound,
``{1,100}``. A pattern whose longest match is longer than ``max_len`` is refused too (raise
``max_len`` or bound the pattern).

What Hyperscan runs (compiled by :class:`~nfrewrite.core.rules.Selection`, on first use):

* ``forward``: what every match begins with (the pattern; for one ending in ``C{m,}``, the
  pattern up to ``C{m}``), scanned forward without start of match: its reports say where
  matches can be, and only those windows get the next scan. (Hyperscan's cost per byte for a
  bounded repetition depends on the input: ``b(?:a|aa){1,100}`` over 64 KB of ``a`` takes ~3 ms
  with no match at all, this scan ~12 us.)
* ``reverse``: the pattern reversed, searched over each window reversed, with
  ``HS_FLAG_SOM_LEFTMOST``. Hyperscan reports every end of a reversed match -- every *start*
  of a forward match -- once, with its leftmost start: the forward match's *longest* end. That
  is exactly what leftmost-longest needs, per start, in one linear scan (a forward scan gives
  the leftmost start per *end* instead, which can hide a later start behind an earlier,
  overlapping match).
* ``prefix_end``: the non-empty proper prefixes of the pattern followed by ``\\z``, scanned
  over the last ``max_len - 1`` bytes with leftmost start of match: one report, the earliest
  position from which the rest of the payload is a proper prefix of a possible match, i.e.
  where a match may begin that the next segment completes or lengthens. Where Hyperscan
  cannot compile that with start of match (large bounded repetitions), ``prefix``: the same
  prefixes reversed and anchored (``\\A``) over the tail reversed, a report per candidate.
  The prefixes are built from the tree: prefixes(AB) =
  prefixes(A) | A prefixes(B); prefixes(A|B) = prefixes(A) | prefixes(B);
  prefixes(A{m,n}) = A{0,n-1} prefixes(A); a set of bytes: only the empty string.

Groups (``\\1``..``\\9`` in ``with``): Hyperscan does not capture, so for a match found the
groups come from Python's ``re`` matching the pattern against exactly the match's bytes (at most
``max_len``), as ``re`` assigns them. ``re`` backtracks: to keep that bounded by the match's
length and not exponential in it, a ``with`` that uses groups is refused for a pattern with a
repetition of something that itself repeats or has alternatives (``(a|aa)+``, ``(a+)*``). What
remains costs at most polynomially in ``max_len``, and only per match found.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

# Python's own parser of regular expressions (no public name; typeshed has no stubs for it)
P: Any = importlib.import_module("re._parser")
C: Any = importlib.import_module("re._constants")

__all__ = ["DEFAULT_MAX_LEN", "MAX_MAX_LEN", "Regex", "RegexError", "compile_regex"]

#: a match's longest length when a rule gives no ``max_len``
DEFAULT_MAX_LEN = 256
#: the largest ``max_len`` a rule may give (what may be held back per match)
MAX_MAX_LEN = 4096

ALL = (1 << 256) - 1
_NEWLINE = 1 << 10

# A node: ("set", mask) | ("cat", tuple) | ("alt", tuple) | ("rep", node, m, n | None).
Node = tuple[Any, ...]
EPS: Node = ("cat", ())


class RegexError(ValueError):
    """A pattern refused: ``offset`` is the character of the pattern it is about (None: the
    pattern as a whole)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


def _bits(*values: int) -> int:
    mask = 0
    for v in values:
        mask |= 1 << v
    return mask


def _range(lo: int, hi: int) -> int:
    return ((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1)


_DIGIT = _range(0x30, 0x39)
_WORD = _DIGIT | _range(0x41, 0x5A) | _range(0x61, 0x7A) | _bits(0x5F)
_SPACE = _bits(0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D)
_CATEGORIES = {
    C.CATEGORY_DIGIT: _DIGIT, C.CATEGORY_NOT_DIGIT: ALL ^ _DIGIT,
    C.CATEGORY_WORD: _WORD, C.CATEGORY_NOT_WORD: ALL ^ _WORD,
    C.CATEGORY_SPACE: _SPACE, C.CATEGORY_NOT_SPACE: ALL ^ _SPACE,
}
_UPPER = _range(0x41, 0x5A)
_LOWER = _range(0x61, 0x7A)


def _fold(mask: int) -> int:
    """``mask`` with both cases of every ASCII letter in it."""
    return mask | ((mask & _UPPER) << 32) | ((mask & _LOWER) >> 32)


# -- from re's parse tree to ours ----------------------------------------------------------------

_REFUSED = {
    C.GROUPREF: "backreferences (\\N, (?P=name)) need a backtracking matcher: not supported",
    C.GROUPREF_EXISTS: "conditionals (?(N)...) are not supported",
    C.ASSERT: "lookaround ((?=...), (?<=...)) is not supported: the matcher is linear-time",
    C.ASSERT_NOT: "lookaround ((?!...), (?<!...)) is not supported: the matcher is linear-time",
    C.AT: "anchors and word boundaries (^ $ \\A \\Z \\b \\B) are not supported: a packet's "
          "edges are not the text's",
    C.MIN_REPEAT: "lazy repetitions (*? +? ?? {m,n}?) mean nothing here: a match is the "
                  "longest (write * + ? {m,n})",
}
for _name, _why in (("POSSESSIVE_REPEAT", "possessive repetitions (*+ ++ ?+) are not supported"),
                    ("ATOMIC_GROUP", "atomic groups (?>...) are not supported")):
    if hasattr(C, _name):
        _REFUSED[getattr(C, _name)] = _why

# where in the text each refused construct is spelt (for the position of the message)
_SPELLING = {
    C.GROUPREF: re.compile(r"\\[1-9]|\(\?P="),
    C.GROUPREF_EXISTS: re.compile(r"\(\?\("),
    C.ASSERT: re.compile(r"\(\?<?="),
    C.ASSERT_NOT: re.compile(r"\(\?<?!"),
    C.AT: re.compile(r"[$^]|\\[AZbBz]"),
    C.MIN_REPEAT: re.compile(r"[*+?}]\?"),
}


def _mask_of_in(items: list[tuple[Any, Any]], icase: bool) -> int:
    mask = 0
    negate = False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            mask |= 1 << av
        elif op is C.RANGE:
            mask |= _range(av[0], av[1])
        elif op is C.CATEGORY:
            mask |= _CATEGORIES[av]
        else:  # pragma: no cover - nothing else appears in a class
            raise RegexError(f"unsupported item in a class: {op}")
    if icase:
        mask = _fold(mask)
    return ALL ^ mask if negate else mask


class _Converter:
    def __init__(self, text: str) -> None:
        self.text = text
        self.groups = 0

    def refuse(self, op: Any) -> RegexError:
        spelt = _SPELLING.get(op)
        where = _outside_classes(self.text, spelt) if spelt is not None else 0
        if op in _REFUSED:
            return RegexError(_REFUSED[op], where)
        return RegexError(f"{str(op).lower()} is not supported", where)

    def seq(self, sub: Any, flags: int) -> Node:
        items: list[Node] = []
        for op, av in sub:
            node = self.item(op, av, flags)
            if node[0] == "cat":
                items.extend(node[1])
            else:
                items.append(node)
        return items[0] if len(items) == 1 else ("cat", tuple(items))

    def item(self, op: Any, av: Any, flags: int) -> Node:
        icase = bool(flags & C.SRE_FLAG_IGNORECASE)
        if op is C.LITERAL:
            return ("set", _fold(1 << av) if icase else 1 << av)
        if op is C.NOT_LITERAL:
            return ("set", ALL ^ (_fold(1 << av) if icase else 1 << av))
        if op is C.ANY:
            return ("set", ALL if flags & C.SRE_FLAG_DOTALL else ALL ^ _NEWLINE)
        if op is C.IN:
            return ("set", _mask_of_in(av, icase))
        if op is C.BRANCH:
            return ("alt", tuple(self.seq(b, flags) for b in av[1]))
        if op is C.SUBPATTERN:
            group, add, delete, sub = av
            if group is not None:
                self.groups = max(self.groups, group)
            return self.seq(sub, (flags | add) & ~delete)
        if op is C.MAX_REPEAT:
            lo, hi, sub = av
            return ("rep", self.seq(sub, flags), lo, None if hi == C.MAXREPEAT else hi)
        raise self.refuse(op)


def _outside_classes(text: str, spelt: re.Pattern[str]) -> int:
    """Index of the first match of ``spelt`` in ``text`` outside ``[...]`` and escapes' reach."""
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "[":
            j = i + 1
            if j < n and text[j] == "^":
                j += 1
            if j < n and text[j] == "]":
                j += 1
            while j < n and text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        m = spelt.match(text, i)
        if m:
            return i
        i += 2 if ch == "\\" else 1
    return 0


_UNBOUNDED = re.compile(r"[*+](?![?+])|\{\d*,\}")


def _unbounded_at(text: str) -> int:
    """Where the first unbounded repetition is spelt (0 when none is found)."""
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "[":
            j = i + 1
            j += text[j:j + 1] == "^"
            j += text[j:j + 1] == "]"
            while j < n and text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if ch != "\\" and _UNBOUNDED.match(text, i):
            return i
        i += 2 if ch == "\\" else 1
    return 0


# -- properties of the tree ------------------------------------------------------------------------


def width(node: Node) -> tuple[int, int | None]:
    """Shortest and longest length of a match of ``node`` (None: unbounded)."""
    kind = node[0]
    if kind == "set":
        return 1, 1
    if kind == "cat":
        lo = 0
        hi: int | None = 0
        for item in node[1]:
            a, b = width(item)
            lo += a
            hi = None if hi is None or b is None else hi + b
        return lo, hi
    if kind == "alt":
        ws = [width(b) for b in node[1]]
        his = [b for _, b in ws]
        return min(a for a, _ in ws), None if None in his else max(h for h in his if h is not None)
    _, body, m, n = node
    a, b = width(body)
    if n == 0:
        return 0, 0
    return a * m, None if n is None or b is None else b * n


def _count_unbounded(node: Node) -> int:
    kind = node[0]
    if kind == "set":
        return 0
    if kind in ("cat", "alt"):
        return sum(_count_unbounded(i) for i in node[1])
    return (node[3] is None) + _count_unbounded(node[1])


def _nested(node: Node, under_rep: bool = False) -> bool:
    """Whether a repetition contains a repetition or an alternation (re's exponential shapes)."""
    kind = node[0]
    if kind == "set":
        return False
    if kind == "alt":
        return under_rep or any(_nested(b, under_rep) for b in node[1])
    if kind == "cat":
        return any(_nested(i, under_rep) for i in node[1])
    if node[3] == 0 or (node[2] == node[3] == 1):
        return _nested(node[1], under_rep)
    return under_rep or _nested(node[1], True)


def _nonempty(node: Node) -> bool:
    """Whether ``node`` can match a non-empty string."""
    kind = node[0]
    if kind == "set":
        return True
    if kind in ("cat", "alt"):
        return any(_nonempty(i) for i in node[1])
    return node[3] != 0 and _nonempty(node[1])


def prefixes(node: Node) -> Node | None:
    """The proper prefixes of ``node``'s matches (the empty one included), None: there are none
    (a node that only matches the empty string)."""
    kind = node[0]
    if kind == "set":
        return EPS
    if kind == "alt":
        parts = [p for p in (prefixes(b) for b in node[1]) if p is not None]
        return ("alt", tuple(parts)) if parts else None
    if kind == "rep":
        _, body, _, n = node
        if n == 0 or not _nonempty(body):
            return None
        inner = prefixes(body)
        assert inner is not None  # a non-empty body has the empty prefix at least
        return ("cat", (("rep", body, 0, None if n is None else n - 1), inner))
    items = node[1]
    if not items:
        return None
    head, rest = items[0], ("cat", items[1:])
    parts = []
    first = prefixes(head)
    if first is not None:
        parts.append(first)
    later = prefixes(rest) if len(items) > 1 else None
    if later is not None:
        parts.append(("cat", (head, later)))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ("alt", tuple(parts))


def _nullable(node: Node) -> bool:
    return width(node)[0] == 0


def nonempty(node: Node | None) -> Node | None:
    """The non-empty strings of ``node`` (None: there are none)."""
    if node is None:
        return None
    kind = node[0]
    if kind == "set":
        return node
    if kind == "alt":
        parts = [p for p in (nonempty(b) for b in node[1]) if p is not None]
        return ("alt", tuple(parts)) if parts else None
    if kind == "rep":
        _, body, m, n = node
        first = nonempty(body)
        if n == 0 or first is None:
            return None
        return ("cat", (first, ("rep", body, max(m - 1, 0), None if n is None else n - 1)))
    items = node[1]
    if not items:
        return None
    head, rest = items[0], ("cat", items[1:])
    parts = []
    first = nonempty(head)
    if first is not None:
        parts.append(("cat", (first, rest)))
    if _nullable(head) and len(items) > 1:
        later = nonempty(rest)
        if later is not None:
            parts.append(later)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else ("alt", tuple(parts))


def reverse(node: Node) -> Node:
    kind = node[0]
    if kind == "set":
        return node
    if kind == "cat":
        return ("cat", tuple(reverse(i) for i in reversed(node[1])))
    if kind == "alt":
        return ("alt", tuple(reverse(b) for b in node[1]))
    return ("rep", reverse(node[1]), node[2], node[3])


# -- Hyperscan's syntax ------------------------------------------------------------------------


def _emit_set(mask: int) -> bytes:
    if mask & (mask - 1) == 0:
        return b"\\x%02x" % (mask.bit_length() - 1)
    if mask == ALL:
        return b"[\\x00-\\xff]"
    out = [b"["]
    v = 0
    while v < 256:
        if mask >> v & 1:
            w = v
            while w + 1 < 256 and mask >> (w + 1) & 1:
                w += 1
            out.append(b"\\x%02x" % v if w == v else b"\\x%02x-\\x%02x" % (v, w))
            v = w + 1
        else:
            v += 1
    out.append(b"]")
    return b"".join(out)


def emit(node: Node) -> bytes:
    """``node`` in Hyperscan's syntax: every byte as ``\\xHH``, every group non-capturing."""
    kind = node[0]
    if kind == "set":
        return _emit_set(node[1])
    if kind == "cat":
        return b"".join(_atom(i) if i[0] == "alt" else emit(i) for i in node[1])
    if kind == "alt":
        branches = [b for b in node[1] if b != EPS]
        body = b"|".join(emit(b) for b in branches)
        return body if len(branches) == len(node[1]) else b"(?:" + body + b")?"
    _, body, m, n = node
    if n == 0:
        return b""
    suffix = (b"*" if m == 0 else b"+" if m == 1 else b"{%d,}" % m) if n is None else (
        b"?" if (m, n) == (0, 1) else b"{%d}" % m if m == n else b"{%d,%d}" % (m, n))
    if (m, n) == (1, 1):
        return emit(body)
    return _atom(body) + suffix


def _atom(node: Node) -> bytes:
    text = emit(node)
    return text if node[0] == "set" else b"(?:" + text + b")"


# -- the compiled rule -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Regex:
    """One ``find_regex`` replace, ready for the matcher (plain data: pickled to workers)."""

    source: bytes  # the pattern as written (UTF-8)
    max_len: int
    min_width: int
    max_width: int  # the longest match (max_len when ``cut``)
    cut: bool  # its last item repeats without bound: a longer match is cut at max_len
    forward: bytes = field(repr=False)  # Hyperscan: what every match begins with (see doc)
    forward_min: int  # the shortest and longest match of ``forward``
    forward_max: int
    reverse: bytes = field(repr=False)  # Hyperscan expression: the pattern reversed
    prefix: bytes = field(repr=False)  # Hyperscan: its proper prefixes reversed, anchored
    prefix_end: bytes = field(repr=False)  # its non-empty proper prefixes, at the end (\z)
    template: tuple[bytes | int, ...] = field(repr=False)  # ``with``: bytes and group numbers
    groups: int = 0
    literal: bytes | None = None  # bytes every match contains (a kernel prefilter may use them)
    _re: re.Pattern[bytes] | None = field(default=None, compare=False)  # for groups only

    @property
    def uses_groups(self) -> bool:
        return any(isinstance(t, int) for t in self.template)

    @property
    def max_replacement(self) -> int:
        """The longest replacement a match can get."""
        return sum(len(t) if isinstance(t, bytes) else self.max_len for t in self.template)

    def replacement(self, payload: bytes | bytearray, start: int, end: int) -> bytes:
        """What the match ``payload[start:end]`` becomes."""
        template = self.template
        if len(template) == 1 and isinstance(template[0], bytes):
            return template[0]
        m = self._re.fullmatch(payload, start, end) if self._re is not None else None
        if m is None:  # cannot happen for a match the matcher found; keep the text as it is
            return bytes(payload[start:end])
        return b"".join(t if isinstance(t, bytes) else (m.group(t) or b"") for t in template)


def parse_template(text: str) -> tuple[tuple[bytes | int, ...], int | None]:
    r"""``with`` of a ``find_regex``: ``\1``..``\9`` insert groups, ``\\`` is a backslash.
    Returns (parts, None) or ((), index of a bad escape)."""
    parts: list[bytes | int] = []
    buf: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            buf.append(ch)
            i += 1
            continue
        nxt = text[i + 1: i + 2]
        if nxt == "\\":
            buf.append("\\")
        elif nxt in tuple("123456789"):
            if buf:
                parts.append("".join(buf).encode())
                buf = []
            parts.append(int(nxt))
        else:
            return (), i
        i += 2
    if buf or not parts:
        parts.append("".join(buf).encode())
    return tuple(parts), None


def compile_regex(pattern: str, template: tuple[bytes | int, ...] = (b"",),
                  max_len: int = DEFAULT_MAX_LEN) -> Regex:
    """Check ``pattern`` and build what the matcher needs. Raises :class:`RegexError`."""
    source = pattern.encode()
    try:
        parsed = P.parse(source, 0)
    except re.error as exc:
        raise RegexError(f"not a valid regular expression: {exc.msg}", exc.pos) from None
    flags = parsed.state.flags
    if flags & C.SRE_FLAG_LOCALE:
        raise RegexError("the L (locale) flag is not supported")
    conv = _Converter(pattern)
    node = conv.seq(parsed, flags)
    _check_sets(node, pattern)
    lo, hi = width(node)
    if lo == 0:
        raise RegexError("the pattern can match the empty string (it would match everywhere)")
    cut = _check_bound(node, pattern, hi, max_len)
    for part in template:
        if isinstance(part, int) and part > conv.groups:
            raise RegexError(f"with uses group \\{part} and the pattern has "
                             f"{conv.groups} group(s)")
    uses_groups = any(isinstance(t, int) for t in template)
    if uses_groups and _nested(node):
        where = _unbounded_at(pattern)
        raise RegexError("groups in with (\\1..\\9) are filled by re, which backtracks: a "
                         "repetition of something that repeats or has alternatives is refused "
                         "then (write it without the nesting, or without \\N)", where)
    pre = prefixes(node)
    assert pre is not None
    prefix = b"\\A" + _atom(reverse(pre))
    head = _head(node) if cut else node
    head_min, head_max = width(head)
    assert head_max is not None
    proper = nonempty(pre)
    prefix_end = b"" if proper is None else _atom(proper) + b"\\z"
    return Regex(source, max_len, lo, max_len if hi is None else hi, cut, emit(head), head_min,
                 head_max, emit(reverse(node)), prefix, prefix_end, template, conv.groups,
                 _required_literal(node), re.compile(source) if uses_groups else None)


def _head(node: Node) -> Node:
    """A pattern ending in ``C{m,}`` without its unbounded part: ``... C{m}`` (every match
    begins with a match of it)."""
    items = node[1] if node[0] == "cat" else (node,)
    _, body, m, _ = items[-1]
    return ("cat", (*items[:-1], ("rep", body, m, m)))


def _check_sets(node: Node, pattern: str) -> None:
    kind = node[0]
    if kind == "set":
        if node[1] == 0:
            raise RegexError("a class matches no byte", max(pattern.find("["), 0))
    elif kind in ("cat", "alt"):
        for i in node[1]:
            _check_sets(i, pattern)
    else:
        _check_sets(node[1], pattern)


def _check_bound(node: Node, pattern: str, hi: int | None, max_len: int) -> bool:
    """Whether matches are cut at ``max_len`` (see the module docstring); refuses what cannot be
    bounded exactly."""
    if hi is not None:
        if hi > max_len:
            raise RegexError(f"a match can be {hi} bytes long, more than max_len = {max_len}: "
                             "raise max_len or bound the pattern")
        return False
    items = node[1] if node[0] == "cat" else (node,)
    last = items[-1]
    ok = (_count_unbounded(node) == 1 and last[0] == "rep" and last[3] is None
          and last[1][0] == "set")
    if not ok:
        raise RegexError(
            "an unbounded repetition (* + {m,}) is allowed only as the pattern's last item and "
            "on one character or class (e.g. [^\\r\\n]*): elsewhere no match length can be "
            "bounded by max_len exactly; write a bound such as {1,100}",
            _unbounded_at(pattern))
    head = ("cat", items[:-1])
    _, head_hi = width(head)
    assert head_hi is not None
    if head_hi + last[2] > max_len:
        raise RegexError(f"the pattern before its last repetition can be {head_hi} bytes and "
                         f"that needs {last[2]} more: more than max_len = {max_len}")
    return True


def _required_literal(node: Node) -> bytes | None:
    """The longest run of single bytes in the pattern's top-level sequence (every match contains
    it), or None."""
    items = node[1] if node[0] == "cat" else (node,)
    best: list[int] = []
    run: list[int] = []
    for item in items:
        mask = item[1] if item[0] == "set" else 0
        if mask and mask & (mask - 1) == 0:
            run.append(mask.bit_length() - 1)
            if len(run) > len(best):
                best = list(run)
        else:
            run = []
    return bytes(best) if best else None
