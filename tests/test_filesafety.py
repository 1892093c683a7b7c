"""The daemon refuses files that someone else could have written (sshd's StrictModes).

The config file, the rules directory and every rule file must be writable by their owner only and
owned by root or by the user the daemon runs as; ``[security] strict_permissions = false`` turns
the rules' problems into warnings, never the config file's own. Checked through the pure function,
through ``load_all`` (what the daemon and ``check`` call) and through the real ``nfrewrite check``.
Ownership tests chown to a uid nobody has (12345) and need root; ownership is restored after.
The race tests let a child running as uid 65534 swap files under 2,000 loads: what is read must be
what was checked (the check happens on the descriptor the loader reads).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfrewrite.config.diagnostics import Diagnostic, Severity
from nfrewrite.config.filesafety import SafeOpener, check_permissions
from nfrewrite.config.settings import load_all

STRANGER = 12345  # a uid that is neither root nor the daemon's user
RULE = '[[rule]]\nname = "ok"\nset = { ttl = 64 }\n'

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    """nfrewrite.toml (0644), rules/ (0755), rules/a.toml (0644), all owned by this user.
    Owner and mode are put back afterwards, whatever a test did to them."""
    (tmp_path / "nfrewrite.toml").write_text('rules_dir = "rules"\n')
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.toml").write_text(RULE)
    paths = [tmp_path / "nfrewrite.toml", tmp_path / "rules", tmp_path / "rules" / "a.toml"]
    for p in paths:
        p.chmod(0o755 if p.is_dir() else 0o644)
    yield tmp_path
    for p in paths:
        if p.exists():
            if os.geteuid() == 0:
                os.chown(p, 0, 0)
            p.chmod(0o755 if p.is_dir() else 0o644)


def _check(tree: Path, *, euid: int | None = None, strict: bool = True) -> list[str]:
    diags = check_permissions(
        str(tree / "nfrewrite.toml"), str(tree / "rules"), [str(tree / "rules" / "a.toml")],
        euid=euid, strict=strict,
    )
    assert all(d.line == 0 and d.col == 0 for d in diags)  # about the file as a whole
    return [d.format() for d in diags]


def test_files_writable_only_by_their_owner_pass(tree: Path) -> None:
    assert _check(tree) == []


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o666, "group and others"), (0o664, "group"), (0o646, "others"), (0o620, "group")],
)
def test_a_file_writable_by_group_or_others_is_an_error(tree: Path, mode: int, who: str) -> None:
    rule = tree / "rules" / "a.toml"
    rule.chmod(mode)
    assert _check(tree) == [
        f"{rule}: error: rule file is writable by {who} (mode {mode:04o}): anyone who can write "
        f"it controls what is rewritten; fix: chmod go-w {rule}"
    ]


def test_a_world_writable_rules_directory_and_config_are_errors(tree: Path) -> None:
    (tree / "rules").chmod(0o777)
    (tree / "nfrewrite.toml").chmod(0o666)
    found = _check(tree)
    assert len(found) == 2
    assert found[0].startswith(f"{tree}/nfrewrite.toml: error: config file is writable by group "
                               "and others (mode 0666)")
    assert found[1].startswith(f"{tree}/rules: error: rules directory is writable by group and "
                               "others (mode 0777)")


@needs_root
def test_a_file_owned_by_another_user_is_an_error(tree: Path) -> None:
    rule = tree / "rules" / "a.toml"
    os.chown(rule, STRANGER, -1)
    assert _check(tree) == [
        f"{rule}: error: rule file is owned by uid {STRANGER}, not root (the daemon's user); "
        f"fix: chown root {rule}"
    ]


@needs_root
def test_files_owned_by_the_daemons_own_user_pass(tree: Path) -> None:
    for p in (tree / "nfrewrite.toml", tree / "rules", tree / "rules" / "a.toml"):
        os.chown(p, STRANGER, -1)
    assert _check(tree, euid=STRANGER) == []
    # ... and root-owned files too, for a daemon running as that user
    os.chown(tree / "rules", 0, -1)
    assert _check(tree, euid=STRANGER) == []
    # another non-root user is not the daemon's
    found = _check(tree, euid=STRANGER + 1)
    assert len(found) == 2 and f"not root or uid {STRANGER + 1}" in found[0]


def test_strict_off_makes_the_rules_problems_warnings_but_not_the_configs(tree: Path) -> None:
    (tree / "rules" / "a.toml").chmod(0o666)
    (tree / "nfrewrite.toml").chmod(0o664)
    found = _check(tree, strict=False)
    assert found[0].startswith(f"{tree}/nfrewrite.toml: error: config file is writable by group")
    assert found[1].startswith(f"{tree}/rules/a.toml: warning: rule file is writable")


def test_a_path_that_cannot_be_checked_is_reported(tree: Path) -> None:
    diags = check_permissions(str(tree / "nfrewrite.toml"), None, [str(tree / "gone.toml")])
    assert [d.format() for d in diags] == [
        f"{tree}/gone.toml: error: cannot read: No such file or directory"
    ]


# -- through load_all (what the daemon calls at start and on reload) -------------------------------


def test_load_all_refuses_a_group_writable_rule_file(tree: Path) -> None:
    (tree / "rules" / "a.toml").chmod(0o664)
    config, ruleset, diags = load_all(str(tree / "nfrewrite.toml"))
    assert config is not None and ruleset is None
    assert [d.severity for d in diags] == ["error"]
    assert "rule file is writable by group" in diags[0].message


def test_load_all_refuses_a_world_writable_config_even_if_it_says_not_strict(tree: Path) -> None:
    cfg = tree / "nfrewrite.toml"
    cfg.write_text('rules_dir = "rules"\n[security]\nstrict_permissions = false\n')
    cfg.chmod(0o666)
    config, ruleset, diags = load_all(str(cfg))
    assert config is None and ruleset is not None
    assert [(d.path, d.severity) for d in diags] == [(str(cfg), "error")]


def test_load_all_with_strict_permissions_off_warns_about_rules(tree: Path) -> None:
    (tree / "nfrewrite.toml").write_text('rules_dir = "rules"\n[security]\n'
                                         "strict_permissions = false\n")
    (tree / "rules").chmod(0o775)
    config, ruleset, diags = load_all(str(tree / "nfrewrite.toml"))
    assert config is not None and ruleset is not None
    assert config.security.strict_permissions is False
    assert [(d.path, d.severity) for d in diags] == [(str(tree / "rules"), "warning")]


def test_strict_permissions_must_be_a_boolean(tree: Path) -> None:
    (tree / "nfrewrite.toml").write_text('[security]\nstrict_permissions = "no"\n')
    config, _, diags = load_all(str(tree / "nfrewrite.toml"))
    assert config is None
    assert [d.format().splitlines()[0] for d in diags] == [
        f"{tree}/nfrewrite.toml:2:22: error: security.strict_permissions must be true or false, "
        "not string"
    ]


def test_load_all_can_skip_the_check(tree: Path) -> None:
    (tree / "rules" / "a.toml").chmod(0o666)
    config, ruleset, diags = load_all(str(tree / "nfrewrite.toml"), permissions=False)
    assert config is not None and ruleset is not None and diags == []


# -- through the real command ----------------------------------------------------------------------


def nfrewrite_check(config: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("nfrewrite")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "nfrewrite"]
    return subprocess.run([*cmd, "check", "-c", str(config)], capture_output=True, text=True,
                          timeout=60, check=False)


@needs_root
def test_check_refuses_a_rule_file_owned_by_a_stranger_and_accepts_it_once_fixed(
    tree: Path,
) -> None:
    rule = tree / "rules" / "a.toml"
    os.chown(rule, STRANGER, -1)
    rule.chmod(0o666)
    proc = nfrewrite_check(tree / "nfrewrite.toml")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"{rule}: error: rule file is writable by group and others (mode 0666): anyone who can "
        f"write it controls what is rewritten; fix: chmod go-w {rule}",
        f"{rule}: error: rule file is owned by uid {STRANGER}, not root (the daemon's user); "
        f"fix: chown root {rule}",
        "nfrewrite: check failed: 2 errors",
    ]
    os.chown(rule, 0, -1)
    rule.chmod(0o644)
    proc = nfrewrite_check(tree / "nfrewrite.toml")
    assert (proc.returncode, proc.stdout.strip()) == (0, "1 rules in 1 files OK"), proc.stderr


def test_check_refuses_a_world_writable_config(tree: Path) -> None:
    (tree / "nfrewrite.toml").chmod(0o646)
    proc = nfrewrite_check(tree / "nfrewrite.toml")
    assert proc.returncode == 1
    assert f"{tree}/nfrewrite.toml: error: config file is writable by others (mode 0646)" in (
        proc.stderr
    )


# -- the race: checked, then swapped, then read ----------------------------------------------------

NOBODY = 65534
GOOD = '[[rule]]\nname = "good"\nset = { ttl = 64 }\n'
EVIL = '[[rule]]\nname = "evil"\nset = { ttl = 1 }\n'
RENAME_EXCHANGE = 2
AT_FDCWD = -100


def _exchange_forever(a: str, b: str) -> None:
    """In a child running as uid 65534: swap ``a`` and ``b`` atomically, as fast as it can."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    ea, eb = a.encode(), b.encode()
    while True:
        if libc.renameat2(AT_FDCWD, ea, AT_FDCWD, eb, RENAME_EXCHANGE) != 0:
            os._exit(3)


def _write(path: str, text: str, uid: int) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o644)
    os.chown(path, uid, uid)


@pytest.fixture
def base() -> Iterator[str]:
    """A root-owned 0755 directory in /tmp (others may look in, as the attacker must)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="nfr-race-")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _swapped_through_a_strangers_dir(base: str, layout: str) -> tuple[str, str, str]:
    """The config, and the two paths the stranger keeps swapping.

    "link": rules/a.toml is a symlink (set up by root) to evil/a.toml; evil/ belongs to the
    stranger, who swaps root's good file there with a file of their own.
    "dir": rules_dir is evil/rules, a root-owned directory inside the stranger's directory, which
    the stranger swaps with a symlink to a directory of their own.
    """
    evil = os.path.join(base, "evil")
    os.mkdir(evil, 0o755)
    os.chown(evil, NOBODY, NOBODY)
    config = os.path.join(base, "nfrewrite.toml")
    if layout == "link":
        _write(config, 'rules_dir = "rules"\n', 0)
        os.mkdir(os.path.join(base, "rules"), 0o755)
        _write(os.path.join(evil, "a.toml"), GOOD, 0)
        _write(os.path.join(evil, "spare"), EVIL, NOBODY)
        os.symlink(os.path.join(evil, "a.toml"), os.path.join(base, "rules", "a.toml"))
        return config, os.path.join(evil, "a.toml"), os.path.join(evil, "spare")
    _write(config, 'rules_dir = "evil/rules"\n', 0)
    os.mkdir(os.path.join(evil, "rules"), 0o755)
    _write(os.path.join(evil, "rules", "a.toml"), GOOD, 0)
    own = os.path.join(evil, "own")
    os.mkdir(own, 0o755)
    os.chown(own, NOBODY, NOBODY)
    _write(os.path.join(own, "a.toml"), EVIL, NOBODY)
    os.symlink(own, os.path.join(evil, "spare"))
    os.lchown(os.path.join(evil, "spare"), NOBODY, NOBODY)
    return config, os.path.join(evil, "rules"), os.path.join(evil, "spare")


@needs_root
@pytest.mark.parametrize("layout", ["link", "dir"])
def test_a_file_swapped_in_through_a_strangers_directory_is_never_accepted(
    base: str, layout: str
) -> None:
    """2,000 loads while uid 65534 swaps the file (or the rules directory) under them: not one
    is accepted, and every load names the problem and its fix."""
    import signal

    config, a, b = _swapped_through_a_strangers_dir(base, layout)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the attacker
        try:
            _exchange_forever(a, b)
        finally:
            os._exit(4)
    accepted = evil = 0
    refusals: list[str] = []
    try:
        for _ in range(2000):
            _, ruleset, diags = load_all(config)
            if ruleset is not None:
                accepted += 1
                evil += any(r.name == "evil" for r in ruleset.rules)
            else:
                refusals.append("\n".join(d.format() for d in diags))
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the swapping child died"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert (accepted, evil) == (0, 0)
    if layout == "link":
        expected = (f"{base}/rules/a.toml: error: rule file is a symbolic link: nfrewrite reads "
                    "no link (whoever can change it chooses the file); fix: cp "
                    "--remove-destination")
    else:
        expected = (f"{base}/evil: error: directory is owned by user 'nobody' (uid {NOBODY}), "
                    f"not root (the daemon's user); fix: chown root {base}/evil")
    assert all(expected in text for text in refusals), refusals[:3]


def test_a_group_writable_directory_above_is_an_error_a_sticky_one_is_not(tree: Path) -> None:
    tree.chmod(0o775)
    found = _check(tree)
    assert found == [f"{tree}: error: directory is writable by group (mode 0775): anyone who can "
                     f"write it can swap the files below it; fix: chmod go-w {tree}"]
    tree.chmod(0o1777)  # like /tmp: only an entry's owner may move it, and ours are root's
    assert _check(tree) == []
    tree.chmod(0o700)


def test_a_link_to_the_config_directory_is_followed_and_what_it_leads_to_checked(
    tree: Path,
) -> None:
    link = tree.parent / f"{tree.name}-link"
    link.symlink_to(tree)
    try:
        config, ruleset, diags = load_all(str(link / "nfrewrite.toml"))
        assert config is not None and ruleset is not None and diags == []
        (tree / "rules").chmod(0o777)
        _, ruleset, diags = load_all(str(link / "nfrewrite.toml"))
        assert ruleset is None
        assert [d.format() for d in diags][0].startswith(
            f"{link}/rules: error: rules directory is writable by group and others (mode 0777)")
    finally:
        link.unlink()


def test_a_symlinked_config_file_is_refused(tree: Path) -> None:
    (tree / "real.toml").write_text('rules_dir = "rules"\n')
    (tree / "linked.toml").symlink_to(tree / "real.toml")
    config, _, diags = load_all(str(tree / "linked.toml"))
    assert config is None
    assert diags[0].format() == (
        f"{tree}/linked.toml: error: config file is a symbolic link: nfrewrite reads no link "
        f"(whoever can change it chooses the file); fix: cp --remove-destination "
        f"\"$(readlink -f {tree}/linked.toml)\" {tree}/linked.toml")


def test_a_rules_directory_given_as_a_link_is_followed(tree: Path) -> None:
    (tree / "rules-link").symlink_to(tree / "rules")
    (tree / "nfrewrite.toml").write_text('rules_dir = "rules-link"\n')
    config, ruleset, diags = load_all(str(tree / "nfrewrite.toml"))
    assert config is not None and ruleset is not None and diags == []
    (tree / "rules").chmod(0o757)
    _, ruleset, diags = load_all(str(tree / "nfrewrite.toml"))
    assert ruleset is None
    assert diags[0].format().startswith(f"{tree}/rules-link: error: rules directory is writable "
                                        "by others (mode 0757)")


def _dotdot_tree(tmp_path: Path) -> Path:
    """base/link -> target/sub; base/f.toml says "lexical", target/f.toml says "real"."""
    (tmp_path / "base").mkdir()
    (tmp_path / "target" / "sub").mkdir(parents=True)
    (tmp_path / "base" / "f.toml").write_text("lexical")
    (tmp_path / "target" / "f.toml").write_text("real")
    (tmp_path / "base" / "link").symlink_to(tmp_path / "target" / "sub")
    return tmp_path


def _read(fd: int | None) -> str:
    assert fd is not None
    with os.fdopen(fd, "rb") as f:
        return f.read().decode()


def test_dotdot_after_a_link_leads_where_the_kernel_goes(tmp_path: Path) -> None:
    root = _dotdot_tree(tmp_path)
    path = f"{root}/base/link/../f.toml"
    with open(path) as f:
        assert f.read() == "real"  # the kernel: link first, then the target's parent
    fd, diags = SafeOpener().open(path, "rule file", "error")
    assert diags == [] and _read(fd) == "real"


def test_a_relative_path_goes_on_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _dotdot_tree(tmp_path)
    monkeypatch.chdir(root / "base")
    fd, diags = SafeOpener().open("link/../f.toml", "rule file", "error")
    assert diags == [] and _read(fd) == "real"
    monkeypatch.chdir(root / "base" / "link")  # getcwd() says target/sub: the kernel resolved it
    fd, diags = SafeOpener().open("../f.toml", "rule file", "error")
    assert diags == [] and _read(fd) == "real"
    fd, diags = SafeOpener().open("../../base/f.toml", "rule file", "error")
    assert diags == [] and _read(fd) == "lexical"


def test_rules_dir_dotdot_through_a_linked_config_directory_is_the_kernels(
    tmp_path: Path,
) -> None:
    """``rules_dir = "../rules"`` next to a config reached through a link to its directory: the
    rules read are those of the link target's parent (what ``cd link; ls ../rules`` shows), the
    same directory the listing and each file's open go through."""
    (tmp_path / "real" / "conf").mkdir(parents=True)
    (tmp_path / "real" / "rules").mkdir()
    (tmp_path / "rules").mkdir()
    (tmp_path / "real" / "conf" / "n.toml").write_text('rules_dir = "../rules"\n')
    (tmp_path / "real" / "rules" / "a.toml").write_text(RULE.replace('"ok"', '"real"'))
    (tmp_path / "rules" / "a.toml").write_text(RULE.replace('"ok"', '"lexical"'))
    (tmp_path / "rules" / "b.toml").write_text(RULE.replace('"ok"', '"only-lexical"'))
    (tmp_path / "link").symlink_to(tmp_path / "real" / "conf")
    config, ruleset, diags = load_all(str(tmp_path / "link" / "n.toml"))
    assert diags == [] and config is not None and ruleset is not None
    assert [r.name for r in ruleset.rules] == ["real"]
    assert os.path.samefile(config.rules_dir, tmp_path / "real" / "rules")


def test_the_rule_files_are_listed_in_the_directory_that_was_checked(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rules directory is replaced right after its check: the listing still comes from the
    checked one (through its descriptor), so no name seen only in the new one is loaded."""
    real_open = SafeOpener.open

    def open_then_swap(
        self: SafeOpener, path: str, what: str, severity: Severity, *, directory: bool = False
    ) -> tuple[int | None, list[Diagnostic]]:
        result = real_open(self, path, what, severity, directory=directory)
        if directory:
            (tree / "rules").rename(tree / "rules-old")
            (tree / "rules").mkdir()
            (tree / "rules" / "evil.toml").write_text(RULE.replace('"ok"', '"evil"'))
        return result

    monkeypatch.setattr(SafeOpener, "open", open_then_swap)
    _, ruleset, diags = load_all(str(tree / "nfrewrite.toml"))
    assert ruleset is None
    assert [d.format() for d in diags] == [
        f"{tree}/rules/a.toml: error: cannot read: No such file or directory"]
