"""Our NFQUEUE rules into the kernel: iptables-restore transactions, atomic swap, exact removal.

Theory of operation
-------------------
What our rules are, how they are laid out in our chains and how many there may be is
:mod:`nfrewrite.kernel.ruletext` (pure: it writes text). This module runs the host's iptables tools
with that text, in the current network namespace.

How rules get into the kernel: one ``iptables-restore --noflush`` (and one ``ip6tables-restore
--noflush``) transaction per install or swap. In ``--noflush`` mode a chain declaration line
(``:NFREWRITE - [0:0]``) creates the chain or flushes *only that chain*; the rules that follow
refill it, and the whole table is committed at once (nf_tables: one netlink batch; legacy: one
table replace), so a swap is atomic and a failing swap leaves the previous rules in place. The
jumps are added only when ``iptables-save`` shows them missing, and surplus copies (left by a crash
between two starts) are deleted, so there is always exactly one. Host mode's three jumps (mangle
``INPUT``/``OUTPUT``, see :mod:`~nfrewrite.kernel.ruletext`) are there exactly when the plan has
host chains; a plan without them deletes jumps and chains a crashed host-mode run left.
``remove()`` deletes the jumps and flushes and deletes our chains (the two, host mode's and any
bucket or tree chains), nothing else. (What cannot
be undone: if the ``mangle`` table did not exist before, the kernel keeps it with empty built-in
chains and ACCEPT policies; that changes no packet's fate.)

The host's ``iptables`` is either the nf_tables or the legacy variant; ``iptables -V`` says which
(``(nf_tables)`` / ``(legacy)``), and we use the matching ``*-restore``/``*-save`` binaries so our
rules live where the administrator's tools look. ``variant=`` forces one.

Why not pyroute2.nftables (evaluated on this kernel, 6.18, pyroute2 0.9.7): it can add an xt
``NFQUEUE`` target through nf_tables compat (raw ``xt_NFQ_info_v3`` bytes) and a ``connmark``
match, but (1) a multi-message transaction (``begin()``/``request_put()``/``commit()``) never reads
the kernel's answers: a batch adding a good rule and a rule into a missing chain "succeeds" in
Python while the kernel aborts it, so a swap cannot know whether it happened; (2)
``NFTA_RULE_COMPAT`` (needed for ``-p tcp`` and thus the ``tcp`` port match) cannot be passed
through its rule API ("argument for 's' must be a bytes object"; without it the kernel answers
EINVAL); (3) every xt match's info struct would have to be hand-packed to the kernel ABI (string,
physdev, multiport); (4) it cannot drive the legacy x_tables backend at all. iptables-restore does
all four.

What it must not do: use a shell, flush or delete anything it did not create, touch the ``filter``
table, or leave a second copy of a jump behind.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from typing import Literal

from nfrewrite.kernel.ruletext import (
    CHAIN,
    FORWARD_JUMP,
    HOST_JUMPS,
    POST_CHAIN,
    POST_JUMP,
    TABLE,
    FirewallError,
    Plan,
    QueueMatch,
    is_our_chain,
    plan,
    queue_target,
    render,
    restore_text,
)

Variant = Literal["nft", "legacy"]


def _chains(save_lines: Iterable[str]) -> set[str]:
    """Chain names declared in ``iptables-save`` output."""
    return {ln[1:].split()[0] for ln in save_lines if ln.startswith(":")}


def detect_variant(binary: str = "iptables") -> Variant:
    """``nft`` or ``legacy``, from ``iptables -V`` ("iptables v1.8.9 (nf_tables)")."""
    try:
        proc = subprocess.run(
            [binary, "-V"], capture_output=True, text=True, timeout=10, check=False
        )
    except FileNotFoundError as e:
        raise FirewallError(f"{binary} not found: install iptables") from e
    text = proc.stdout + proc.stderr
    if "(nf_tables)" in text:
        return "nft"
    if "(legacy)" in text:
        return "legacy"
    raise FirewallError(f"cannot tell the iptables variant from {text.strip()!r}")


def _tool(family: int, variant: Variant, what: Literal["save", "restore"]) -> str:
    base = "iptables" if family == 4 else "ip6tables"
    return f"{base}-{variant}-{what}"


class Firewall:
    """Our NFQUEUE rules for IPv4 and IPv6 in the current network namespace."""

    def __init__(
        self, queue_num: int = 0, workers: int = 1, variant: Variant | None = None
    ) -> None:
        queue_target(queue_num, workers)  # validates
        self.queue_num = queue_num
        self.workers = workers
        self.variant: Variant = variant or detect_variant()
        if self.variant not in ("nft", "legacy"):
            raise ValueError(f"variant must be 'nft' or 'legacy', not {variant!r}")
        #: per family: did the mangle table exist before we first loaded rules? (None: not known)
        self._table_existed: dict[int, bool] = {}

    # -- public ---------------------------------------------------------------------------
    def install(
        self, matches_v4: Iterable[QueueMatch] | Plan, matches_v6: Iterable[QueueMatch] = ()
    ) -> None:
        """Create/refill our chains and make sure each jump exists exactly once: of a
        :class:`Plan` made for this firewall's queues, or of the two families' QueueMatches.
        Raises :class:`~nfrewrite.kernel.ruletext.TooManyRules` (nothing loaded) when
        :func:`~nfrewrite.kernel.ruletext.plan` does."""
        self._load(self._plan(matches_v4, matches_v6))

    def swap(
        self, matches_v4: Iterable[QueueMatch] | Plan, matches_v6: Iterable[QueueMatch] = ()
    ) -> None:
        """Atomically replace our rules (per family), as ``install`` takes them; on failure the
        old rules stay."""
        self._load(self._plan(matches_v4, matches_v6))

    def _plan(
        self, matches_v4: Iterable[QueueMatch] | Plan, matches_v6: Iterable[QueueMatch]
    ) -> Plan:
        if isinstance(matches_v4, Plan):
            if (matches_v4.queue_num, matches_v4.workers) != (self.queue_num, self.workers):
                raise ValueError(
                    f"plan for queue {matches_v4.queue_num} x{matches_v4.workers}, firewall for "
                    f"queue {self.queue_num} x{self.workers}"
                )
            return matches_v4
        return plan(matches_v4, matches_v6, self.queue_num, self.workers)

    def remove(self) -> None:
        """Delete our jumps and chains (both families); a no-op for what is already gone."""
        errors = []
        for family in (4, 6):
            try:
                self._remove_family(family)
            except FirewallError as e:
                errors.append(str(e))
        if errors:
            raise FirewallError("; ".join(errors))

    def render(
        self, matches_v4: Iterable[QueueMatch], matches_v6: Iterable[QueueMatch]
    ) -> str:
        return render(matches_v4, matches_v6, self.queue_num, self.workers)

    def save(self, family: int) -> str:
        """``iptables-save -t mangle`` text of the family (our variant)."""
        return self._run(_tool(family, self.variant, "save"), ["-t", TABLE], None)

    # -- internals ------------------------------------------------------------------------
    def _run(self, binary: str, args: list[str], stdin: str | None) -> str:
        try:
            proc = subprocess.run(
                [binary, *args], input=stdin, capture_output=True, text=True, timeout=30,
                check=False,
            )
        except FileNotFoundError as e:
            raise FirewallError(f"{binary} not found: install iptables ({self.variant})") from e
        except subprocess.TimeoutExpired as e:
            raise FirewallError(f"{binary} did not finish within 30 s") from e
        if proc.returncode != 0:
            where = ""
            if stdin is not None:
                m = re.search(r"line:? (\d+)", proc.stderr)
                if m:
                    lines = stdin.splitlines()
                    n = int(m.group(1))
                    if 1 <= n <= len(lines):
                        where = f" (input line {n}: {lines[n - 1]})"
            raise FirewallError(f"{binary} failed: {proc.stderr.strip()}{where}")
        return proc.stdout

    def _restore(self, family: int, text: str) -> None:
        args = ["--noflush"]
        if self.variant == "legacy":
            args += ["--wait", "10"]
        self._run(_tool(family, self.variant, "restore"), args, text)

    def _load(self, p: Plan) -> None:
        for family in (4, 6):
            if family not in self._table_existed:
                everything = self._run(_tool(family, self.variant, "save"), [], None)
                self._table_existed[family] = f"*{TABLE}" in everything.splitlines()
            lines = self.save(family).splitlines()
            fwd, post = lines.count(FORWARD_JUMP), lines.count(POST_JUMP)
            deletes = [FORWARD_JUMP] * max(0, fwd - 1) + [POST_JUMP] * max(0, post - 1)
            host = p.host_family(family)
            # host mode: each jump once; off: none left (a run with it on may have crashed)
            keep = 0 if host is None else 1
            for jump in HOST_JUMPS:
                deletes += [jump] * max(0, lines.count(jump) - keep)
            text = restore_text(
                p.family(family), family,
                add_forward_jump=fwd == 0, add_post_jump=post == 0, delete_jumps=deletes,
                existing_chains=_chains(lines), host=host,
                add_host_jumps=[j for j in HOST_JUMPS if j not in lines],
            )
            self._restore(family, text)

    def _remove_family(self, family: int) -> None:
        lines = self.save(family).splitlines()
        chains = _chains(lines)
        cmds = ["-D" + FORWARD_JUMP[2:]] * lines.count(FORWARD_JUMP)
        cmds += ["-D" + POST_JUMP[2:]] * lines.count(POST_JUMP)
        for jump in HOST_JUMPS:
            cmds += ["-D" + jump[2:]] * lines.count(jump)
        ours = [c for c in (CHAIN, POST_CHAIN) if c in chains]
        ours += sorted(c for c in chains if is_our_chain(c))  # host mode's too
        cmds += [f"-F {chain}" for chain in ours] + [f"-X {chain}" for chain in ours]
        if cmds:
            self._restore(family, "\n".join([f"*{TABLE}", *cmds, "COMMIT"]) + "\n")
        self._drop_table_we_created(family)

    def _drop_table_we_created(self, family: int) -> None:
        """nf_tables only: if installing our rules created the mangle table and it is as empty as
        we found the host (built-in chains, ACCEPT policies, no rules), delete it again, so that
        ``iptables-save`` is exactly as before. (Legacy tables are kernel modules: they stay.)"""
        if self.variant != "nft" or self._table_existed.get(family, True):
            return
        lines = [ln for ln in self.save(family).splitlines() if ln and not ln.startswith("#")]
        pristine = all(
            ln in (f"*{TABLE}", "COMMIT") or (ln.startswith(":") and " ACCEPT " in ln)
            for ln in lines
        )
        if pristine:
            self._run("nft", ["delete", "table", "ip" if family == 4 else "ip6", TABLE], None)
