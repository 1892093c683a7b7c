"""Kernel rules stay bounded: a rule's value lists cost their sum, not their product; past the cap
``check`` and the daemon refuse alike, at the rule's ``path:line:col``.

The big rule is the one of the report this guards against: 64 src CIDRs x 64 dst CIDRs x 300
destination ports x 50 find patterns, a 6.7 KB file that once compiled to 4.3 million rules.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from lab.netns import Daemon, Lab, tcp_exchange, write_lab_config
from nfrewrite.kernel.ruletext import (
    CHAIN,
    MAX_KERNEL_RULES,
    Layout,
    QueueMatch,
    TooManyRules,
    layout,
    plan,
)

REPO = Path(__file__).resolve().parent.parent
VARIANTS = ["nft", "legacy"]


def big_rule() -> str:
    srcs = ", ".join(f'"198.18.{2 * i}.0/28"' for i in range(64))  # not adjacent: no merging
    dsts = ", ".join(f'"198.19.{2 * i}.0/28"' for i in range(64))
    ports = ", ".join(str(10000 + 3 * i) for i in range(300))
    finds = ",\n  ".join(f'{{ find = "secret-{i:02d}", with = "public-{i:02d}" }}'
                         for i in range(50))
    return (f'[[rule]]\nname = "big"\nreplace = [\n  {finds},\n]\n'
            f'[rule.match]\nsrc = [{srcs}]\ndst = [{dsts}]\ndport = [{ports}]\n')


def huge_rule() -> str:
    """26,000 single addresses, none adjacent to another: past the cap, even as a tree."""
    base = int(ipaddress.ip_address("198.18.0.0"))
    srcs = ", ".join(f'"{ipaddress.ip_address(base + 2 * i)}/32"' for i in range(26000))
    return ('# a list too long for the kernel\n\n[[rule]]\nname = "huge"\n'
            'replace = [ { find = "a", with = "b" } ]\n'
            f'[rule.match]\ndport = 8080\nsrc = [{srcs}]\n')


NORMAL = """
[[rule]]
name = "server-header"
match = { sport = [80, 8080] }
replace = [ { find = "Server: nginx", with = "Server: webby" } ]

[[rule]]
name = "request"
match = { dport = 8080, dst = ["198.18.0.2/32", "2001:2::2/128"] }
replace = [ { find = "GET /secret", with = "GET /public" }, { find = "a", with = "bb" } ]
"""


def nfrewrite(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NFREWRITE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "nfrewrite", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def chain_counts(text: str) -> dict[int, Counter[str]]:
    """Rules per prefilter chain of ours, per family, in ``--show-kernel-rules`` output."""
    out: dict[int, Counter[str]] = {4: Counter(), 6: Counter()}
    family = 4
    for line in text.splitlines():
        if line.startswith("# IPv"):
            family = int(line[5])
        elif line.startswith(f"-A {CHAIN}") and not line.startswith(f"-A {CHAIN}_POST "):
            out[family][line.split()[1]] += 1
    return out


# -- compiling (no kernel) -------------------------------------------------------------------


def test_the_big_rule_file_compiles_to_a_few_hundred_rules(tmp_path: Path) -> None:
    cfg = write_lab_config(str(tmp_path), {"big.toml": big_rule()})
    assert os.path.getsize(tmp_path / "rules" / "big.toml") < 8192
    res = nfrewrite("check", "-c", cfg, "--show-kernel-rules", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    counts = chain_counts(res.stdout)
    assert sum(counts[4].values()) <= 2000
    # entry + 20 port chunks + 64 src + 64 dst, beside the connmark rule (no string match per
    # pattern: the stream matcher must see every segment of the port, see kernel/prefilter.py)
    assert sum(counts[4].values()) == 1 + 1 + 20 + 64 + 64
    assert sum(counts[6].values()) == 1
    assert "# IPv4: iptables-restore --noflush (jumps added only if missing); 150 rules" \
        in res.stdout


def test_past_the_cap_check_refuses_at_the_rule(tmp_path: Path) -> None:
    cfg = write_lab_config(str(tmp_path), {"huge.toml": huge_rule()})
    res = nfrewrite("check", "-c", cfg, cwd=tmp_path)
    assert res.returncode == 1
    first = res.stderr.splitlines()[0]
    assert first.startswith(f"{tmp_path}/rules/huge.toml:3:1: error: the kernel prefilter would "
                            f"need 26002 IPv4 iptables rules, more than {MAX_KERNEL_RULES}")
    assert "merge its src/dst addresses" in first
    assert res.stderr.splitlines()[1].strip() == "[[rule]]"


def test_the_refusal_names_the_rule_with_the_largest_share() -> None:
    small = QueueMatch(dports=[(80, 80)], origin=("a.toml", 1, 1))
    many = [QueueMatch(src=[f"198.18.{i // 256}.{i % 256}/32" for i in range(0, 60000, 2)],
                       origin=("b.toml", 7, 1))]
    with pytest.raises(TooManyRules) as caught:
        plan([small, *many], [])
    assert caught.value.origin == ("b.toml", 7, 1) and caught.value.own == 30000


def test_adjacent_and_nested_cidrs_are_merged_before_counting() -> None:
    m = QueueMatch(src=["198.18.0.0/25", "198.18.0.128/25", "198.18.0.7/32", "2001:2::/64"])
    lay = layout([m], 4, 0, 1)
    assert lay.main[1][:4] == ["-p", "tcp", "-s", "198.18.0.0/24"] and lay.count == 2


# A model of the kernel's walk over our chains, for the arguments we emit.
Packet = dict[str, object]
_net = functools.lru_cache(maxsize=None)(ipaddress.ip_network)
_addr = functools.lru_cache(maxsize=None)(ipaddress.ip_address)


def _match(rule: list[str], pkt: Packet) -> bool:
    i = 0
    while i < len(rule):
        a = rule[i]
        if a in ("-j", "-g"):
            return True
        if a == "-p" or a == "-m" or a == "--algo":
            i += 2
            continue
        v = rule[i + 1]
        if a in ("-s", "-d"):
            ok = _addr(pkt[a]) in _net(v)
        elif a in ("--sport", "--dport", "--sports", "--dports"):
            port = pkt[a[:7].rstrip("s")]
            ok = any(int(r.split(":")[0]) <= port <= int(r.split(":")[-1])  # type: ignore[operator]
                     for r in v.split(","))
        elif a == "--mark":
            ok = False
        elif a in ("--physdev-in", "--physdev-out"):
            ok = pkt[a] == v
        elif a == "--tcp-flags":
            ok, i = bool(pkt["syn"]), i + 1
        elif a == "--hex-string":
            ok = bytes.fromhex(v.strip("|")) in pkt["payload"]  # type: ignore[operator]
        else:
            raise AssertionError(f"model does not know {a}")
        if not ok:
            return False
        i += 2
    raise AssertionError(f"rule without target: {rule}")


def queued_by_layout(lay: Layout, pkt: Packet) -> bool:
    chains = {CHAIN: lay.main, **lay.chains}

    def call(name: str) -> bool:  # True: queued; False: fell off, back to the caller
        current = name
        while True:
            for rule in chains[current]:
                if not _match(rule, pkt):
                    continue
                kind, what = rule[rule.index("-j") if "-j" in rule else rule.index("-g"):][:2]
                if what == "NFQUEUE":
                    return True
                if kind == "-j":
                    if call(what):
                        return True
                    continue
                current = what  # goto: falling off that chain returns from this call
                break
            else:
                return False

    return call(CHAIN)


def queued_by_matches(matches: list[QueueMatch], pkt: Packet) -> bool:
    def has(nets: object, addr: object) -> bool:
        return nets is None or any(
            _addr(addr) in _net(n) for n in nets  # type: ignore[attr-defined]
        )

    def ports(ranges: object, port: object) -> bool:
        return ranges is None or any(lo <= port <= hi for lo, hi in ranges)  # type: ignore[attr-defined]

    return any(
        has(m.src, pkt["-s"]) and has(m.dst, pkt["-d"]) and ports(m.sports, pkt["--sport"])
        and ports(m.dports, pkt["--dport"])
        and (m.in_port is None or m.in_port == pkt["--physdev-in"])
        and (m.literal is None or m.literal in pkt["payload"])  # type: ignore[operator]
        and (not m.syn_only or bool(pkt["syn"]))
        for m in matches
    )


def test_chain_trees_queue_exactly_what_the_matches_describe() -> None:
    """Random groups of several src, dst, ports and patterns (overlapping CIDRs, port ranges,
    buckets, flat and tree groups together); every packet's fate through the compiled chains,
    walked as the kernel does (``-j`` returns, ``-g`` returns to the caller's caller), equals
    "some QueueMatch matches it"."""
    rnd = random.Random(7)
    nets = ["198.18.0.0/24", "198.18.0.0/28", "198.18.0.16/28", "198.18.1.0/24", "198.18.0.7/32",
            "198.19.0.0/16"]
    addrs = ["198.18.0.1", "198.18.0.7", "198.18.0.20", "198.18.1.5", "198.19.3.3", "198.18.9.9"]
    pool = [b"alpha", b"bravo", b"charlie", b"delta"]
    trees = 0
    for _ in range(25):
        matches: list[QueueMatch] = []
        for _ in range(rnd.randint(1, 40)):
            def some(xs: list[str]) -> list[str] | None:
                return None if rnd.random() < 0.25 else rnd.sample(xs, rnd.randint(1, len(xs)))

            starts = rnd.sample(range(1000, 1060), rnd.randint(1, 30))
            dports = None if rnd.random() < 0.2 else [
                (p, p + rnd.choice([0, 0, 5])) for p in starts]
            sports = None if rnd.random() < 0.6 else [(p, p) for p in rnd.sample(range(80, 90), 3)]
            base = dict(src=some(nets), dst=some(nets), dports=dports, sports=sports,
                        in_port=rnd.choice([None, None, "nfr0"]), syn_only=rnd.random() < 0.1)
            for lit in rnd.sample([None, *pool], rnd.randint(1, 4)):
                matches.append(QueueMatch(**base, literal=lit))  # type: ignore[arg-type]
        lay = layout(matches, 4, 0, 1)
        trees += sum(name.startswith(f"{CHAIN}_T") for name in lay.chains)
        for _ in range(150):
            pkt: Packet = {
                "-s": rnd.choice(addrs), "-d": rnd.choice(addrs),
                "--sport": rnd.choice([80, 81, 85, 40000]),
                "--dport": rnd.choice([rnd.randint(995, 1070), 8080]),
                "--physdev-in": rnd.choice(["nfr0", "nfr1"]), "--physdev-out": "nfr1",
                "syn": rnd.random() < 0.3,
                "payload": b"xx" + b"".join(rnd.sample(pool, rnd.randint(0, 2))) + b"yy",
            }
            assert queued_by_layout(lay, pkt) == queued_by_matches(matches, pkt), (pkt, matches)
    assert trees > 20  # the property was exercised on trees, not only on flat rules


# -- in the kernel ---------------------------------------------------------------------------


def _queued(lab: Lab, variant: str, family: int) -> int:
    """Packets that reached an NFQUEUE rule of a tree chain (from the kernel's counters)."""
    tool = f"{'iptables' if family == 4 else 'ip6tables'}-{variant}-save"
    out = lab.run("appliance", [tool, "-c", "-t", "mangle"]).stdout
    return sum(int(m.group(1)) for m in re.finditer(
        rf"^\[(\d+):\d+\] -A {CHAIN}_T\d+_\d+ .*-j NFQUEUE", out, re.M))


def _install(lab: Lab, variant: str, op: str, src4: list[str], src6: list[str]) -> None:
    code = textwrap.dedent(f"""
        from nfrewrite.kernel.firewall import Firewall
        from nfrewrite.kernel.ruletext import QueueMatch
        # two multiport chunks, both holding 8080
        ports = [(8070, 8090)] + [(p, p) for p in range(8000, 8020)] + [(8080, 8080)]
        def group(src, dst):
            return [QueueMatch(src=src, dst=dst, dports=ports, literal=lit)
                    for lit in (b"alpha", b"bravo", b"charlie")]
        v4 = group({src4!r}, ["198.18.0.2/32", "198.18.7.0/24", "198.18.8.0/24"])
        v6 = group({src6!r}, ["2001:2::2/128", "2001:2:7::/64", "2001:2:8::/64"])
        fw = Firewall(0, 1, variant={variant!r})
        getattr(fw, {op!r})(v4, v6)
    """)
    lab.run("appliance", [sys.executable, "-c", code], env=lab.python_env())


@pytest.mark.privileged
@pytest.mark.parametrize("lab", [{"make_bridge": True}], indirect=True)
@pytest.mark.parametrize("variant", VARIANTS)
def test_a_chain_tree_queues_the_packets_with_a_pattern_and_no_others(
    lab: Lab, variant: str
) -> None:
    """src x dst x 2 port chunks (overlapping) x 3 patterns: a tree in the kernel; only
    the client's segment carrying a pattern, to a listed port, from a listed source, reaches the
    queue (with no listener, ``--queue-bypass`` lets it through)."""
    _install(lab, variant, "install", ["198.18.0.1/32", "198.18.0.64/26", "198.18.5.0/24"],
             ["2001:2::1/128", "2001:2::100/120", "2001:2:5::/64"])
    text = lab.run("appliance", [f"iptables-{variant}-save", "-t", "mangle"]).stdout
    assert f":{CHAIN}_T0_4 " in text  # dports, src, dst, patterns
    lab.wait_reachable()
    for family in (4, 6):
        before = _queued(lab, variant, family)
        res = tcp_exchange(lab, b"GET /bravo HTTP/1.0\r\n\r\n", b"ok", family=family, port=8080)
        assert res.server_received == b"GET /bravo HTTP/1.0\r\n\r\n"
        hit = _queued(lab, variant, family)
        assert hit == before + 1  # the one data segment, once, though two port chunks match
        tcp_exchange(lab, b"GET /delta HTTP/1.0\r\n\r\n", b"alpha", family=family, port=8080)
        tcp_exchange(lab, b"GET /alpha HTTP/1.0\r\n\r\n", b"ok", family=family, port=8095)
        assert _queued(lab, variant, family) == hit  # no pattern; port not listed
    # the client's address no longer listed (the rest alike): nothing is queued
    _install(lab, variant, "swap", ["198.18.9.0/24", "198.18.5.0/24", "198.18.0.128/25"],
             ["2001:2:9::/64", "2001:2:5::/64", "2001:2::100/120"])
    for family in (4, 6):
        before = _queued(lab, variant, family)
        tcp_exchange(lab, b"GET /alpha HTTP/1.0\r\n\r\n", b"ok", family=family, port=8080)
        assert _queued(lab, variant, family) == before


def _kernel_counts(lab: Lab) -> dict[int, Counter[str]]:
    out: dict[int, Counter[str]] = {}
    for family, tool in ((4, "iptables-save"), (6, "ip6tables-save")):
        text = lab.run("appliance", [tool, "-t", "mangle"]).stdout
        out[family] = Counter(ln.split()[1] for ln in text.splitlines()
                              if ln.startswith(f"-A {CHAIN}") and not
                              ln.startswith(f"-A {CHAIN}_POST"))
    return out


@pytest.mark.privileged
@pytest.mark.parametrize("which", ["big", "normal"])
def test_start_loads_exactly_the_rules_check_shows(lab: Lab, workdir: str, which: str) -> None:
    rules = {"big.toml": big_rule()} if which == "big" else {"10.toml": NORMAL}
    cfg = write_lab_config(workdir, rules)
    shown = nfrewrite("check", "-c", cfg, "--show-kernel-rules", cwd=Path(workdir))
    assert shown.returncode == 0, shown.stderr
    expected = chain_counts(shown.stdout)
    with Daemon(lab, cfg):
        assert _kernel_counts(lab) == expected
    if which == "big":
        assert sum(expected[4].values()) == 150  # no string match per pattern (prefilter.py)


@pytest.mark.privileged
def test_start_refuses_what_check_refuses_with_the_same_position(lab: Lab, workdir: str) -> None:
    cfg = write_lab_config(workdir, {"huge.toml": huge_rule()})
    checked = nfrewrite("check", "-c", cfg, cwd=Path(workdir))
    assert checked.returncode == 1
    started = lab.run("appliance", [sys.executable, "-m", "nfrewrite", "run", "-c", cfg],
                      env=lab.python_env(), check=False, timeout=120)
    assert started.returncode == 1
    position = f"{workdir}/rules/huge.toml:3:1: error: the kernel prefilter would need 26002 IPv4"
    assert checked.stderr.splitlines()[0].startswith(position)
    assert started.stderr.splitlines()[0] == checked.stderr.splitlines()[0]
    # nothing was set up: no chain of ours, no bridge
    assert CHAIN not in lab.run("appliance", ["iptables-save"]).stdout
    assert "br0" not in lab.run("appliance", ["ip", "-o", "link"]).stdout


@pytest.mark.privileged
def test_reload_refuses_it_too_and_keeps_the_running_rules(lab: Lab, workdir: str) -> None:
    cfg = write_lab_config(workdir, {"10.toml": NORMAL})
    with Daemon(lab, cfg) as daemon:
        before = _kernel_counts(lab)
        write_lab_config(workdir, {"10.toml": huge_rule()})
        tail = daemon.reload(timeout=60)
        assert f"{workdir}/rules/10.toml:3:1: error: the kernel prefilter would need 26002" in tail
        assert "reload failed: keeping the running rules" in tail
        assert _kernel_counts(lab) == before


def test_the_refusal_shows_the_rules_line_as_loaded_not_as_the_file_says_now(
    tmp_path: Path,
) -> None:
    """The refused rule's line comes from the text that was loaded: the file replaced since (here
    by a link to another file) is not read again, by name or through the link."""
    from nfrewrite.config.rulefiles import load_rules
    from nfrewrite.kernel.prefilter import kernel_rules

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "huge.toml").write_text(huge_rule())
    ruleset, diags = load_rules(str(tmp_path / "rules"))
    assert ruleset is not None and diags == []
    (tmp_path / "other.toml").write_text("one\ntwo\nTHREE, read through a link\n")
    (tmp_path / "rules" / "huge.toml").unlink()
    (tmp_path / "rules" / "huge.toml").symlink_to(tmp_path / "other.toml")
    plan_, refusal = kernel_rules(ruleset)
    assert plan_ is None
    assert [(d.path, d.line, d.source) for d in refusal] == [
        (f"{tmp_path}/rules/huge.toml", 3, "[[rule]]")]
