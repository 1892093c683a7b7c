"""Interface names: which ones the kernel, iptables and nfrewrite all accept.

Theory of operation
-------------------
A bridge or port name goes three ways: to the kernel when a link is created or renamed
(:mod:`nfrewrite.kernel.netsetup`), into iptables rules (``--physdev-in``, see
:mod:`nfrewrite.kernel.ruletext`), and into log lines and metric labels. :func:`ifname_problem` is
the one check for all of them, and ``nfrewrite check`` runs the same one on the config and rules
(:meth:`nfrewrite.config.tomlfile.TomlFile.want_ifname`): every name ``check`` accepts, the daemon
can create and match on. Pure: it asks the kernel nothing.
"""

from __future__ import annotations

__all__ = ["IFNAMSIZ", "ifname_problem"]

IFNAMSIZ = 16  # Linux: names are at most IFNAMSIZ - 1 bytes
#: the bytes the kernel's isspace() is true for (its ctype table is Latin-1: 0xa0 is a space too,
#: so a UTF-8 name holding that byte, such as "\u00e0", is refused by the kernel)
_KERNEL_SPACES = frozenset(b"\t\n\v\f\r \xa0")


def ifname_problem(name: str) -> str | None:
    """Why ``name`` cannot be a bridge or port name of the daemon, or ``None`` if it can.

    The one validator for ``check``, start-up (:mod:`nfrewrite.kernel.netsetup`) and the kernel
    rules (:class:`nfrewrite.kernel.ruletext.QueueMatch`). It accepts what the kernel accepts for a
    new link (``dev_valid_name``: 1..15 bytes, not "." or "..", no '/', ':' or space byte) except

    * a trailing '+': iptables reads ``--physdev-in lan+`` as "every name starting with lan";
    * '%': the kernel turns "br%d" into the first free "br0", "br1", ... when it creates a link;
    * characters that are not printable (a log line or a metrics label could not show them).

    Everything else works end to end ("lan+0", "wan#1", "é"): iptables-restore gets the name
    quoted (see ``nfrewrite.kernel.ruletext``).
    """
    if not name:
        return "it is empty"
    raw = name.encode("utf-8", errors="surrogatepass")
    if len(raw) > IFNAMSIZ - 1:
        return f"longer than {IFNAMSIZ - 1} bytes ({len(raw)})"
    if name in (".", ".."):
        return "reserved name"
    for ch in name:
        if ch in "/:" or ch.isspace() or not ch.isprintable():
            return f"contains {ch!r}"
    for ch in name:
        if _KERNEL_SPACES.intersection(ch.encode("utf-8", errors="surrogatepass")):
            return f"contains {ch!r}, whose UTF-8 bytes the kernel counts as a space"
    if "%" in name:
        return "contains '%' (the kernel would turn it into a number when creating the link)"
    if name.endswith("+"):
        return "ends with '+' (iptables would match every name that starts with the rest)"
    return None
