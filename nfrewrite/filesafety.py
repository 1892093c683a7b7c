"""Ownership and permission checks of the files that tell the daemon what to rewrite (sshd-style).

What it is for
--------------
nfrewrite runs as root (or with CAP_NET_ADMIN) and rewrites other people's traffic as its rule
files say. Whoever can write the config file, a rule file or the rules directory can therefore
rewrite that traffic. Like sshd's ``StrictModes``, the daemon refuses to start (and a reload is
refused) when one of them is

* writable by group or others (``chmod go-w`` fixes it), or
* owned by a user other than root and the user the daemon runs as (``chown root`` fixes it).

It must not read or open the files (the loaders do that), change anything on disk, or decide
policy beyond those two rules: it only stats and returns :class:`~nfrewrite.diagnostics.Diagnostic`
values in the loaders' ``path:line:col`` form, line 0 meaning "the file as a whole".

Theory of operation
-------------------
:func:`check_permissions` stats (following symlinks: what counts is the file that will be read)
the config file, the rules directory and each rule file, in that order, and reports each problem
once per path. ``euid`` defaults to the process's effective uid: a file owned by root or by that
user is fine. What a directory entry points at is judged, not the directories above it: a file
swapped in through a writable parent directory is owned by whoever swapped it and is caught by the
ownership rule (sshd also checks the parents; that is left out here on purpose, to keep
``/etc/nfrewrite`` and a checkout in a home directory equally usable).

``strict=False`` (the config's ``[security] strict_permissions = false``) turns the problems of
the rules directory and the rule files into warnings: still shown, no longer fatal. The config
file's own problems stay errors whatever it says: the switch is read from that very file, and a
file that someone else may have written cannot vouch for itself. Whoever needs a group-writable
config file must make it not so; there is deliberately no way around that from inside the config.

:func:`~nfrewrite.config.load_all` calls this between reading the config and reading the rules,
so ``nfrewrite check``, the daemon's start and its reload all apply the same rules; the severity
is the same for ``check`` run by root or by another user (a check that passes where the daemon
would refuse is worse than one that is strict).
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
from collections.abc import Callable, Iterable

from nfrewrite.diagnostics import Diagnostic, Severity

__all__ = ["check_permissions"]

StatFn = Callable[[str], os.stat_result]


def check_permissions(
    config_path: str,
    rules_dir: str | None,
    rule_files: Iterable[str],
    *,
    euid: int | None = None,
    strict: bool = True,
    stat_fn: StatFn = os.stat,
) -> list[Diagnostic]:
    """Problems with who may write the config file, the rules directory and the rule files.

    ``rules_dir`` None skips the directory (it was invalid and is reported elsewhere). ``euid``:
    the user the daemon runs as (default: this process's effective uid). ``strict=False`` makes
    the rules' problems warnings; the config file's are always errors (see the module doc).
    """
    uid = os.geteuid() if euid is None else euid
    rules_severity: Severity = "error" if strict else "warning"
    out: list[Diagnostic] = []
    _check(config_path, "config file", uid, "error", stat_fn, out)
    if rules_dir is not None:
        _check(rules_dir, "rules directory", uid, rules_severity, stat_fn, out)
    for path in rule_files:
        _check(path, "rule file", uid, rules_severity, stat_fn, out)
    return out


def _check(
    path: str, what: str, uid: int, severity: Severity, stat_fn: StatFn, out: list[Diagnostic]
) -> None:
    try:
        st = stat_fn(path)
    except OSError as exc:
        out.append(Diagnostic(path, 0, 0, severity,
                              f"cannot check the {what}'s owner and mode: {exc.strerror or exc}"))
        return
    mode = stat.S_IMODE(st.st_mode)
    loose = mode & (stat.S_IWGRP | stat.S_IWOTH)
    if loose:
        who = {stat.S_IWGRP: "group", stat.S_IWOTH: "others"}.get(loose, "group and others")
        out.append(Diagnostic(
            path, 0, 0, severity,
            f"{what} is writable by {who} (mode {mode:04o}): anyone who can write it controls "
            f"what is rewritten; fix: chmod go-w {_quote(path)}",
        ))
    if st.st_uid not in (0, uid):
        runs_as = "root" if uid == 0 else f"root or {_user(uid)}"
        out.append(Diagnostic(
            path, 0, 0, severity,
            f"{what} is owned by {_user(st.st_uid)}, not {runs_as} (the daemon's user); "
            f"fix: chown root {_quote(path)}",
        ))


def _user(uid: int) -> str:
    try:
        return f"user '{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _quote(path: str) -> str:
    """The path as a shell word (quoted only when it needs it)."""
    return shlex.quote(path)
