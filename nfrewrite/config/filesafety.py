"""Ownership and permission checks of the files that tell the daemon what to rewrite (sshd-style).

What it is for
--------------
nfrewrite runs as root (or with CAP_NET_ADMIN) and rewrites other people's traffic as its rule
files say. Whoever can write the config file, a rule file, the rules directory or any directory
above them can therefore rewrite that traffic. Like sshd's ``StrictModes``, the daemon refuses to
start (and a reload is refused) when one of them is

* writable by group or others (``chmod go-w`` fixes it; a directory *above* may be writable by
  others when it has the sticky bit, as ``/tmp`` has: then only an entry's owner can move it), or
* owned by a user other than root and the user the daemon runs as (``chown root`` fixes it), or
* (the config and rule files) a symbolic link: a link is read as the file it points at *now*,
  so it is refused (``cp --remove-destination TARGET LINK`` fixes it); links to directories
  (the rules directory, those above) are followed, and what they lead through is checked like
  the rest.

It must not change anything on disk or decide policy beyond those rules. It returns
:class:`~nfrewrite.config.diagnostics.Diagnostic` values in the loaders' ``path:line:col`` form,
line 0 meaning "the file as a whole".

Theory of operation
-------------------
Checking a path and then opening it again by name is a race: whoever controls a directory on the
way can swap the file between the two. So the check *is* the open: :class:`SafeOpener` walks the
path from ``/`` one component at a time with ``openat(parent_fd, name, O_NOFOLLOW)`` (a relative
path is put after the working directory, ``os.getcwd()``, which the kernel has resolved already),
judges each opened descriptor with ``fstat`` (owner, mode, type), and hands the caller the
descriptor of the last component; the loaders read the file from that descriptor and from nothing
else (:meth:`nfrewrite.config.tomlfile.TomlFile.read`'s ``opener``). A symbolic link in a
directory component is read with ``readlinkat`` in its (already checked) parent and its target
walked the same way, at most 40 of them. A ``..`` is opened the same way, ``openat(fd, "..")`` on
the directory reached so far, so it leads where the kernel's own lookup would: after a link to a
directory, to the parent of the link's *target* (the text of the path is never folded, which
would read another file than ``open()`` of the same path). Every directory passed through must
be owned by root or the daemon's user and not writable by group/others unless sticky; every entry
reached (directory, link, file) must be owned by root or the daemon's user, so nobody else can
rename it.

Each problem path is reported once per :class:`SafeOpener` (the config's directories are also the
rules'), with the severity of the first file that met it. ``euid`` defaults to the process's
effective uid.

``strict=False`` (the config's ``[security] strict_permissions = false``) turns the problems of
the rules directory and the rule files (and the directories above them that are not above the
config file) into warnings: still shown, no longer fatal. The config file's own problems stay
errors whatever it says: the switch is read from that very file, and a file that someone else may
have written cannot vouch for itself. There is deliberately no way around that from inside the
config.

:func:`~nfrewrite.config.settings.load_all` opens the config file and every rule file through one
:class:`SafeOpener`, so ``nfrewrite check``, the daemon's start and its reload all apply the same
rules; the severity is the same for ``check`` run by root or by another user (a check that passes
where the daemon would refuse is worse than one that is strict). :func:`check_permissions` runs
the same walk on given paths without reading them.
"""

from __future__ import annotations

import errno
import os
import pwd
import shlex
import stat
from collections.abc import Iterable

from nfrewrite.config.diagnostics import Diagnostic, Severity
from nfrewrite.config.tomlfile import Opener

__all__ = ["SafeOpener", "check_permissions"]

MAX_LINKS = 40  # symbolic links followed in one path, as the kernel allows
_DIR_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


class SafeOpener:
    """Opens the config and rule files for reading, checking every step on the open descriptor.

    ``euid``: the user the daemon runs as (default: this process's effective uid).
    """

    def __init__(self, euid: int | None = None) -> None:
        self.uid = os.geteuid() if euid is None else euid
        self._reported: set[str] = set()

    def opener(self, what: str, severity: Severity) -> Opener:
        """:meth:`open` with ``what`` and ``severity`` fixed, for a loader's ``opener``."""
        return lambda path: self.open(path, what, severity)

    def open(
        self, path: str, what: str, severity: Severity, *, directory: bool = False
    ) -> tuple[int | None, list[Diagnostic]]:
        """A read-only descriptor of ``path`` (None if it cannot be opened or is not a regular
        file, or a directory with ``directory``) and the problems found on the way to it.

        Problems of owner and mode do not stop the open: the caller reads the file (to report
        its other mistakes too) and discards what it read when an error was reported.
        """
        out: list[Diagnostic] = []
        result = self._walk(path, what, severity, directory, out)
        if isinstance(result, OSError):
            reason = result.strerror or str(result)
            if result.errno == errno.ELOOP and not result.filename:
                out.append(Diagnostic(
                    path, 0, 0, severity,
                    f"{what} is a symbolic link: nfrewrite reads no link (whoever can change it "
                    f"chooses the file); fix: cp --remove-destination \"$(readlink -f "
                    f"{_quote(path)})\" {_quote(path)}"))
            elif result.filename:
                out.append(Diagnostic(path, 0, 0, severity,
                                      f"cannot read: {result.filename}: {reason}"))
            else:
                out.append(Diagnostic(path, 0, 0, severity, f"cannot read: {reason}"))
            return None, out
        return result, out

    # -- the walk ------------------------------------------------------------------------------

    def _walk(
        self, path: str, what: str, severity: Severity, directory: bool, out: list[Diagnostic]
    ) -> int | OSError:
        """The descriptor of ``path`` (read-only), or why it cannot be opened."""
        held = [os.open("/", _DIR_FLAGS | os.O_DIRECTORY)]  # the one descriptor open right now
        handed_over = False
        try:
            found = self._descend(held, path, what, severity, directory, out)
            if isinstance(found, OSError):
                return found
            if not directory:
                handed_over = True
                return found
            # an O_PATH descriptor cannot be listed; the directory itself can
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=found)
        except OSError as exc:
            return exc
        finally:
            if not handed_over:
                os.close(held[0])

    def _descend(
        self, held: list[int], path: str, what: str, severity: Severity, directory: bool,
        out: list[Diagnostic],
    ) -> int | OSError:
        """Walk from the root descriptor ``held[0]``, keeping ``held[0]`` the one descriptor open
        (the caller closes it); return the last component's (that same one) or the error."""
        fd = held[0]
        # not abspath: it folds "link/.." away, where the kernel goes to the link target's parent
        start = path if path.startswith("/") else os.getcwd() + "/" + path
        parts = [p for p in start.split("/") if p]
        shown = "/"
        links = 0
        self._judge_dir(fd, shown, severity, out)
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            last = not parts
            # ``shown`` holds no link (a link's target replaces it), so its dirname is where
            # openat(fd, "..") leads
            child = os.path.join(shown, name) if name != ".." else os.path.dirname(shown)
            try:
                flags = _FILE_FLAGS if last and not directory else _DIR_FLAGS
                nfd = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                exc.filename = None if last else child  # the walk's name, not openat's
                return exc
            try:
                st = os.fstat(nfd)
            except BaseException:
                os.close(nfd)
                raise
            if stat.S_ISLNK(st.st_mode):
                os.close(nfd)  # (also a rules directory given as a link: followed like one above)
                self._judge_owner(st, child, child, "directory", severity, out)
                links += 1
                if links > MAX_LINKS:
                    return OSError(errno.ELOOP, os.strerror(errno.ELOOP), child)
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    root = os.open("/", _DIR_FLAGS | os.O_DIRECTORY)
                    os.close(fd)
                    fd = held[0] = root
                    shown = "/"
                parts[:0] = [p for p in target.split("/") if p]
                continue
            os.close(fd)
            fd = held[0] = nfd
            shown = child
            if last and not directory:
                if not stat.S_ISREG(st.st_mode):
                    return OSError(errno.EINVAL, f"not a regular file ({_kind(st)})")
                self._judge_target(st, path, shown, what, severity, out)
            elif not stat.S_ISDIR(st.st_mode):
                return OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), None if last else child)
            elif last:
                self._judge_target(st, path, shown, what, severity, out)
            else:
                self._judge_dir(fd, shown, severity, out)
        return fd

    def _judge_dir(self, fd: int, shown: str, severity: Severity, out: list[Diagnostic]) -> None:
        """A directory passed through: its owner, and group/other write unless sticky."""
        st = os.fstat(fd)
        self._judge_owner(st, shown, shown, "directory", severity, out)
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
            self._report(out, shown, shown, "mode", severity,
                         f"directory is writable by {_who(mode)} (mode {mode:04o}): anyone who "
                         f"can write it can swap the files below it; fix: chmod go-w "
                         f"{_quote(shown)}")

    def _judge_target(
        self, st: os.stat_result, path: str, shown: str, what: str, severity: Severity,
        out: list[Diagnostic],
    ) -> None:
        """The file (or rules directory) itself: group/other write, sticky or not, and owner.
        ``path`` as the caller gave it (for the message), ``shown`` where the walk found it."""
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            self._report(out, path, shown, "mode", severity,
                         f"{what} is writable by {_who(mode)} (mode {mode:04o}): anyone who can "
                         f"write it controls what is rewritten; fix: chmod go-w {_quote(path)}")
        self._judge_owner(st, path, shown, what, severity, out)

    def _judge_owner(
        self, st: os.stat_result, path: str, shown: str, what: str, severity: Severity,
        out: list[Diagnostic],
    ) -> None:
        if st.st_uid in (0, self.uid):
            return
        runs_as = "root" if self.uid == 0 else f"root or {_user(self.uid)}"
        self._report(out, path, shown, "owner", severity,
                     f"{what} is owned by {_user(st.st_uid)}, not {runs_as} (the daemon's user); "
                     f"fix: chown root {_quote(path)}")

    def _report(
        self, out: list[Diagnostic], path: str, shown: str, kind: str, severity: Severity,
        message: str,
    ) -> None:
        """Once per place the walk reached (``shown``, no link or ``..`` in it) and kind."""
        key = f"{shown}\0{kind}"
        if key not in self._reported:
            self._reported.add(key)
            out.append(Diagnostic(path, 0, 0, severity, message))


def check_permissions(
    config_path: str,
    rules_dir: str | None,
    rule_files: Iterable[str],
    *,
    euid: int | None = None,
    strict: bool = True,
) -> list[Diagnostic]:
    """Problems with who may write the config file, the rules directory, the rule files and the
    directories above them, found by the same walk the loaders open the files with.

    ``rules_dir`` None skips the directory (it was invalid and is reported elsewhere). ``euid``:
    the user the daemon runs as (default: this process's effective uid). ``strict=False`` makes
    the rules' problems warnings; the config file's are always errors (see the module doc).
    """
    rules_severity: Severity = "error" if strict else "warning"
    opener = SafeOpener(euid)
    out: list[Diagnostic] = []
    jobs: list[tuple[str, str, Severity, bool]] = [(config_path, "config file", "error", False)]
    if rules_dir is not None:
        jobs.append((rules_dir, "rules directory", rules_severity, True))
    jobs += [(path, "rule file", rules_severity, False) for path in rule_files]
    for path, what, severity, directory in jobs:
        fd, found = opener.open(path, what, severity, directory=directory)
        if fd is not None:
            os.close(fd)
        out += found
    return out


def _kind(st: os.stat_result) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(st.st_mode):
            return name
    return "not a file"


def _who(mode: int) -> str:
    loose = mode & (stat.S_IWGRP | stat.S_IWOTH)
    return {stat.S_IWGRP: "group", stat.S_IWOTH: "others"}.get(loose, "group and others")


def _user(uid: int) -> str:
    try:
        return f"user '{pwd.getpwuid(uid).pw_name}' (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _quote(path: str) -> str:
    """The path as a shell word (quoted only when it needs it)."""
    return shlex.quote(path)
