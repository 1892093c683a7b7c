"""Position recovery: every key and value of a TOML document is found at its exact line:col.

Hand-written cases cover each syntax the rule files use; a Hypothesis test generates documents
(nested tables, arrays of tables, inline tables, dotted and quoted keys, every string kind,
comments, multi-line arrays), serialises them with its own writer that notes where it put each
key and value, and checks that the scanner finds exactly those spots — and that tomllib reads the
same data back.
"""

from __future__ import annotations

import random
import re
import tomllib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfrewrite.config.tomlpos import KeyPath, Pos, locate, scan_positions


def spot(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    """Line and column (1-based) of the nth occurrence of ``needle`` in ``text``."""
    index = -1
    for _ in range(nth + 1):
        index = text.index(needle, index + 1)
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


DOC = """\
# a comment with = and { and "quotes"
rules_dir = "r#=\\"{"   # trailing comment
[[rule]]
name = 'a{b'
match = { sport = [80, "1-2"], a."b c" = 1, 'lit.key' = true }
replace = [ { find = \"\"\"x"#{\"\"\"\", with = '''y='''' }, # comment between elements
  {find='z', with="w"},   # and another
]
[rule.set]
ttl = 64
[[rule]]
 name   =   "second"
 match.dport = 443
[ queue ]
num = 1
"""


def test_every_key_of_a_realistic_document_is_found() -> None:
    pos = scan_positions(DOC)
    assert tomllib.loads(DOC)  # the fixture is valid TOML
    assert pos[("rules_dir",)] == Pos(*spot(DOC, "rules_dir"), *spot(DOC, '"r#='))
    assert pos[("rule",)] == Pos(*spot(DOC, "rule]]"), *spot(DOC, "[[rule]]"))
    assert pos[("rule", 0)] == Pos(*spot(DOC, "rule]]"), *spot(DOC, "[[rule]]"))
    assert pos[("rule", 1)] == Pos(*spot(DOC, "rule]]", 1), *spot(DOC, "[[rule]]", 1))
    assert pos[("rule", 0, "name")] == Pos(*spot(DOC, "name"), *spot(DOC, "'a{b'"))
    assert pos[("rule", 0, "match", "sport")] == Pos(*spot(DOC, "sport"), *spot(DOC, "[80"))
    assert pos[("rule", 0, "match", "sport", 1)] == Pos(*spot(DOC, '"1-2"'), *spot(DOC, '"1-2"'))
    assert pos[("rule", 0, "match", "a")] == Pos(*spot(DOC, "a."), *spot(DOC, "a."))
    assert pos[("rule", 0, "match", "a", "b c")] == Pos(*spot(DOC, '"b c"'), *spot(DOC, "1,"))
    assert pos[("rule", 0, "match", "lit.key")] == Pos(*spot(DOC, "'lit.key'"), *spot(DOC, "true"))
    assert pos[("rule", 0, "replace", 0)] == Pos(*spot(DOC, "{ find"), *spot(DOC, "{ find"))
    with_ = Pos(*spot(DOC, "with = '''"), *spot(DOC, "'''y"))
    assert pos[("rule", 0, "replace", 0, "with")] == with_
    assert pos[("rule", 0, "replace", 1, "find")] == Pos(*spot(DOC, "find='z'"), *spot(DOC, "'z'"))
    assert pos[("rule", 0, "replace", 1, "with")] == Pos(*spot(DOC, 'with="w"'), *spot(DOC, '"w"'))
    assert pos[("rule", 0, "set")] == Pos(*spot(DOC, "set]"), *spot(DOC, "[rule.set]"))
    assert pos[("rule", 0, "set", "ttl")] == Pos(*spot(DOC, "ttl"), *spot(DOC, "64"))
    assert pos[("rule", 1, "name")] == Pos(*spot(DOC, "name", 1), *spot(DOC, '"second"'))
    assert pos[("rule", 1, "match")] == Pos(*spot(DOC, "match.dport"), *spot(DOC, "match.dport"))
    assert pos[("rule", 1, "match", "dport")] == Pos(*spot(DOC, "dport ="), *spot(DOC, "443"))
    assert pos[("queue", "num")] == Pos(*spot(DOC, "num"), *spot(DOC, "1\n"))


def test_multiline_strings_do_not_hide_or_invent_keys() -> None:
    text = 'a = """\nb = 1\n[t]\n"""\nc = \'\'\'\n# x = {\n\'\'\'\nd = 2\n'
    pos = scan_positions(text)
    assert set(pos) == {("a",), ("c",), ("d",)}
    assert pos[("d",)] == Pos(8, 1, 8, 5)


def test_escaped_quotes_in_strings() -> None:
    text = 'a = "x\\"# y = 1"\nb = """q\\"""" # c\ne = "\\\\"\nf = 3\n'
    assert tomllib.loads(text)["f"] == 3
    pos = scan_positions(text)
    assert set(pos) == {("a",), ("b",), ("e",), ("f",)}
    assert pos[("f",)] == Pos(4, 1, 4, 5)


def test_multiline_arrays_with_comments_and_nested_inline_tables() -> None:
    text = "x = [ # open\n  1,\n  # only a comment\n  [2, 3],\n  { k = { m = 4 } },\n]\ny = 5\n"
    assert tomllib.loads(text)["x"][2]["k"]["m"] == 4
    pos = scan_positions(text)
    assert pos[("x", 0)] == Pos(2, 3, 2, 3)
    assert pos[("x", 1, 1)] == Pos(4, 7, 4, 7)
    assert pos[("x", 2, "k", "m")] == Pos(5, 11, 5, 15)
    assert pos[("y",)] == Pos(7, 1, 7, 5)


def test_headers_after_an_array_of_tables_land_in_its_last_element() -> None:
    text = "[[a]]\nx = 1\n[[a]]\n[a.b]\ny = 2\n[[a.c]]\n[[a.c]]\nz = 3\n"
    assert tomllib.loads(text)["a"][1]["c"][1]["z"] == 3
    pos = scan_positions(text)
    assert pos[("a", 1, "b", "y")] == Pos(5, 1, 5, 5)
    assert pos[("a", 1, "c", 1, "z")] == Pos(8, 1, 8, 5)
    assert pos[("a", 1, "c")] == Pos(6, 5, 6, 1)


def test_crlf_line_endings_and_tabs() -> None:
    text = "a\t=\t1\r\n[t]\r\n\tb = 'x'\r\n"
    pos = scan_positions(text)
    assert pos[("a",)] == Pos(1, 1, 1, 5)
    assert pos[("t", "b")] == Pos(3, 2, 3, 6)


def test_columns_count_characters_not_bytes() -> None:
    text = 'k = { "é" = 1, x = 2 }\n'
    assert scan_positions(text)[("k", "x")] == Pos(1, 16, 1, 20)


def test_garbage_never_raises_and_keeps_what_came_before() -> None:
    text = "a = 1\nb = [1, 2\nc = 3\n"
    pos = scan_positions(text)
    assert pos[("a",)] == Pos(1, 1, 1, 5)
    for junk in ["", "[", "[[", "a", "a =", '"', "a = '''", "a = {", "[a", "= 1", "\\u", "a.=1"]:
        scan_positions(junk)


def test_locate_falls_back_to_the_nearest_known_ancestor() -> None:
    pos = {("rule",): Pos(1, 3, 1, 1), ("rule", 0, "match"): Pos(3, 1, 3, 9)}
    assert locate(pos, ("rule", 0, "match", "sport", 4)) == (3, 9)
    assert locate(pos, ("rule", 0, "match"), key=True) == (3, 1)
    assert locate(pos, ("rule", 5, "name")) == (1, 1)
    assert locate(pos, ("nothing",)) == (1, 1)
    assert locate({}, ()) == (1, 1)


def _python_lines_run(text: str) -> int:
    """How many lines of ``nfrewrite.config.tomlpos`` the interpreter runs to scan ``text``."""
    import sys

    import nfrewrite.config.tomlpos as tomlpos

    count = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal count
        if frame.f_code.co_filename != tomlpos.__file__:
            return None
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        scan_positions(text)
    finally:
        sys.settrace(None)
    return count


def test_scan_work_grows_with_tokens_not_with_characters() -> None:
    """A 100 KB string, comment, literal or multi-line string costs the scanner no more Python
    steps than a short one: long runs of characters are consumed by regular expressions in C.
    (50 x 1 MiB of rule files made mostly of long strings took ~0.16 s/MiB when the scanner
    walked characters in Python, and the reload that read them starved the watchdog.)"""

    def doc(n: int) -> str:
        filler = "x" * n
        return (
            f"# {filler}\n"
            "[[rule]]\n"
            f'name = "{filler}\\"\\u00e9{filler}"\n'
            f"match = {{ dport = 80, src = '{filler}' }}   # {filler}\n"
            f'replace = [ {{ find = """{filler}\\""{filler}""", with = \'\'\'{filler}\'\'\' }} ]\n'
            f'"{filler}\\u00e9" = 1\n'
            f"y{filler} = 2\n"
        )

    short, long = doc(10), doc(100_000)
    assert tomllib.loads(long)["rule"][0]["name"] == "x" * 100_000 + '"\u00e9' + "x" * 100_000
    pos = scan_positions(long)
    with_ = pos[("rule", 0, "replace", 0, "with")]
    assert (with_.key_line, with_.key_col) == spot(long, "with = ")
    quoted = '"' + "x" * 100_000 + '\\u00e9"'
    key = ("rule", 0, "x" * 100_000 + "\u00e9")
    assert pos[key] == Pos(*spot(long, quoted), *spot(long, "1\n"))
    assert pos[("rule", 0, "y" + "x" * 100_000)] == Pos(*spot(long, "yx"), *spot(long, "2\n"))
    assert _python_lines_run(long) == _python_lines_run(short), (
        "scanning long strings or comments runs Python code per character"
    )


# ---------------------------------------------------------------------------------------------
# Generated documents
# ---------------------------------------------------------------------------------------------

KEY_CHARS = "abz09_-. #=\"'[]{}\\é\t"
STR_CHARS = "ab z\n\t\"'#={}[],\\\x01é"

scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.text(alphabet=STR_CHARS, max_size=12),
)
keys = st.text(alphabet=KEY_CHARS, min_size=1, max_size=5)


def tables(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(keys, children, max_size=4)


values = st.recursive(
    scalars | st.lists(scalars, max_size=3),
    lambda inner: st.one_of(
        tables(inner),
        st.lists(tables(inner), min_size=1, max_size=3),
        st.lists(inner, max_size=3),
    ),
    max_leaves=25,
)
documents = tables(values)

BARE = re.compile(r"[A-Za-z0-9_-]+")


class Writer:
    """Serialises a dict to TOML in randomly chosen styles, noting where each key/value goes."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.parts: list[str] = []
        self.line = 1
        self.col = 1
        self.expected: dict[KeyPath, Pos] = {}

    # -- output with position tracking --

    def put(self, text: str) -> None:
        self.parts.append(text)
        newlines = text.count("\n")
        if newlines:
            self.line += newlines
            self.col = len(text) - text.rfind("\n")
        else:
            self.col += len(text)

    def here(self) -> tuple[int, int]:
        return self.line, self.col

    def ws(self) -> None:
        self.put(self.rnd.choice(["", " ", "  ", "\t"]))

    def end_line(self) -> None:
        if self.rnd.random() < 0.3:
            self.put(self.rnd.choice([" ", "\t"]) + "# note = { [x] '\"")
        self.put(self.rnd.choice(["\n", "\n", "\r\n", "\n\n", "\n# comment\n"]))

    def note(self, path: KeyPath, key: tuple[int, int], value: tuple[int, int]) -> None:
        self.expected[path] = Pos(*key, *value)

    def note_first(self, path: KeyPath, key: tuple[int, int], value: tuple[int, int]) -> None:
        if path not in self.expected:
            self.note(path, key, value)

    # -- tokens --

    def key(self, name: str) -> tuple[int, int]:
        at = self.here()
        if BARE.fullmatch(name) and self.rnd.random() < 0.8:
            self.put(name)
        elif "'" not in name and "\n" not in name and self.rnd.random() < 0.5:
            self.put(f"'{name}'")
        else:
            self.put(basic(name))
        return at

    def string(self, s: str) -> None:
        kinds = ["basic"]
        if "'" not in s and "\n" not in s and not has_ctl(s):
            kinds.append("literal")
        if "\r" not in s and "'''" not in s and "''" not in s and not has_ctl(s) and not (
            s.endswith("'")
        ):
            kinds.append("ml-literal")
        kinds.append("ml-basic")
        kind = self.rnd.choice(kinds)
        if kind == "basic":
            self.put(basic(s))
        elif kind == "literal":
            self.put(f"'{s}'")
        elif kind == "ml-literal":
            self.put("'''" + self.first_newline(s) + s + "'''")
        else:
            body = "".join(
                "\\\\" if c == "\\" else '\\"' if c == '"' else escape_ctl(c) if c != "\n" else c
                for c in s
            )
            self.put('"""' + self.first_newline(s) + body + '"""')

    def first_newline(self, s: str) -> str:
        """A newline right after the opening delimiter is trimmed: sometimes add one."""
        return "\n" if s.startswith("\n") or self.rnd.random() < 0.5 else ""

    def value(self, path: KeyPath, v: Any) -> None:
        if isinstance(v, bool):
            self.put("true" if v else "false")
        elif isinstance(v, int):
            self.put(self.rnd.choice([str(v), f"{v:_}"]) if v >= 0 else str(v))
        elif isinstance(v, str):
            self.string(v)
        elif isinstance(v, dict):
            self.inline_table(path, v)
        else:
            self.array(path, v)

    def array(self, path: KeyPath, items: list[Any]) -> None:
        multiline = self.rnd.random() < 0.5
        self.put("[")
        for i, item in enumerate(items):
            if multiline:
                self.put("\n" + self.rnd.choice(["  ", "\t", "  # c ] , {\n  "]))
            else:
                self.ws()
            at = self.here()
            self.note(path + (i,), at, at)
            self.value(path + (i,), item)
            self.ws()
            if i < len(items) - 1 or self.rnd.random() < 0.3:
                self.put(",")
        if multiline:
            self.put("\n")
        self.ws()
        self.put("]")

    def inline_table(self, path: KeyPath, table: dict[str, Any]) -> None:
        self.put("{")
        for i, (k, v) in enumerate(table.items()):
            self.put(" " if self.rnd.random() < 0.7 else "")
            self.keyval(path, [k], v)
            if i < len(table) - 1:
                self.put(",")
        self.put(" }" if table and self.rnd.random() < 0.7 else "}")

    def keyval(self, table: KeyPath, names: list[str], v: Any) -> None:
        """``a.b.c = v`` relative to ``table``: notes the intermediate and the final paths."""
        for depth, name in enumerate(names, start=1):
            at = self.key(name)
            path = table + tuple(names[:depth])
            if depth < len(names):
                self.note_first(path, at, at)
                self.put(self.rnd.choice([".", " . ", "."]))
        self.ws()
        self.put("=")
        self.ws()
        path = table + tuple(names)
        self.note(path, at, self.here())
        self.value(path, v)

    # -- block structure --

    def block(self, path: KeyPath, header_keys: list[str], table: dict[str, Any]) -> None:
        """The body of a table (root or after its header): key/values first, then sub-tables."""
        deferred: list[tuple[str, Any]] = []
        for k, v in table.items():
            if isinstance(v, dict) and self.rnd.random() < 0.5:
                if v and dottable(v) and self.rnd.random() < 0.5:
                    self.dotted(path, [k], v)
                else:
                    deferred.append((k, v))
            elif is_table_list(v) and self.rnd.random() < 0.5:
                deferred.append((k, v))
            else:
                self.ws()
                self.keyval(path, [k], v)
                self.end_line()
        for k, v in deferred:
            if isinstance(v, dict):
                self.header(path + (k,), header_keys + [k], v, aot=False)
            else:
                for i, element in enumerate(v):
                    self.header(path + (k, i), header_keys + [k], element, aot=True)

    def dotted(self, table: KeyPath, names: list[str], v: dict[str, Any]) -> None:
        for k, child in v.items():
            if isinstance(child, dict) and child and dottable(child):
                self.dotted(table, names + [k], child)
            else:
                self.ws()
                self.keyval(table, names + [k], child)
                self.end_line()

    def header(
        self, path: KeyPath, header_keys: list[str], table: dict[str, Any], aot: bool
    ) -> None:
        bracket = self.here()
        self.put("[[" if aot else "[")
        self.ws()
        at = bracket
        for depth, name in enumerate(header_keys, start=1):
            at = self.key(name)
            if depth < len(header_keys):
                self.put(self.rnd.choice([".", " . "]))
        self.ws()
        self.put("]]" if aot else "]")
        if aot:
            self.note_first(path[:-1], at, bracket)
        self.note(path, at, bracket)
        self.end_line()
        self.block(path, header_keys, table)

    def document(self, doc: dict[str, Any]) -> str:
        if self.rnd.random() < 0.3:
            self.put("# leading comment = [x]\n\n")
        self.block((), [], doc)
        return "".join(self.parts)


def has_ctl(s: str) -> bool:
    return any((ord(c) < 32 and c not in "\t\n") or ord(c) == 127 for c in s)


def escape_ctl(c: str) -> str:
    return f"\\u{ord(c):04x}" if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c


def basic(s: str) -> str:
    body = "".join("\\\\" if c == "\\" else '\\"' if c == '"' else escape_ctl(c) for c in s)
    return f'"{body}"'


def dottable(v: dict[str, Any]) -> bool:
    """True if every nested table of ``v`` can be written with dotted keys (none is empty)."""
    return all(not isinstance(c, dict) or (c and dottable(c)) for c in v.values())


def is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, st.randoms(use_true_random=False))
def test_generated_documents_every_recorded_position_is_exact(
    doc: dict[str, Any], rnd: random.Random
) -> None:
    writer = Writer(rnd)
    text = writer.document(doc)
    assert tomllib.loads(text) == doc, text  # the writer itself is right
    found = scan_positions(text)
    for path, pos in writer.expected.items():
        assert found.get(path) == pos, (path, text)
