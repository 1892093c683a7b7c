"""``make demo``: the appliance end to end in a namespace lab, with the shipped ``rules/``.

client ns -- [appliance ns: br0 + ``nfrewrite run``] -- server ns, built by :mod:`lab.netns`
and torn down on exit (also on failure or Ctrl-C). Shows, with real programs and real packets:

1. HTTP: ``python3 -m http.server`` answers ``curl``; its ``Server:`` header is shortened in flight
   (a length-changing edit: the rest of the response, a file, still arrives intact);
2. SMTP: a banner rewritten with the same length;
3. a header edit: the MSS option of the client's SYN, as sent and as the server received it;
4. the lines of ``/metrics`` that changed.

Exit status 0 only if every step showed what it should.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

from lab.netns import Daemon, Lab, tcp_exchange

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
rules_dir = "{rules}"

[[bridge]]
name  = "br0"
ports = ["nfr0", "nfr1"]

[metrics]
listen = "127.0.0.1:9640"
"""

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = RESET = ""


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str) -> None:
    say(f"\n{BOLD}== {title}{RESET}")


def check(ok: bool, what: str) -> bool:
    say(f"   {GREEN + 'ok' if ok else RED + 'FAILED'}{RESET}  {what}")
    return ok


def scrape(lab: Lab) -> dict[str, float]:
    """nfrewrite_* samples from /metrics (read inside the appliance namespace)."""
    code = (
        "import urllib.request,sys;"
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9640/metrics',timeout=5)"
        ".read().decode())"
    )
    text = lab.run("appliance", [sys.executable, "-c", code]).stdout
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if not s.name.startswith("nfrewrite_") or s.name.endswith(("_bucket", "_created")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def syn_mss(lab: Lab, role: str, pcap: str) -> int | None:
    out = subprocess.run(
        ["tshark", "-r", pcap, "-Y", "tcp.flags.syn == 1 && tcp.flags.ack == 0 && "
         "tcp.dstport == 8080", "-T", "fields", "-e", "tcp.options.mss_val"],
        capture_output=True, text=True, check=False, timeout=30,
    ).stdout.split()
    return int(out[0]) if out else None


def run_demo() -> int:
    ok = True
    t0 = time.monotonic()
    with Lab(prefix="nfrdemo") as lab, tempfile.TemporaryDirectory(prefix="nfrdemo-") as work:
        os.chmod(work, 0o700)
        config = os.path.join(work, "nfrewrite.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(rules=os.path.join(REPO, "rules")))
        os.chmod(config, 0o600)
        step("lab: client 198.18.0.1 -- [appliance: br0] -- server 198.18.0.2 (namespaces "
             f"{', '.join(lab.namespaces)})")
        say(f"   rules from {os.path.join(REPO, 'rules')}:")
        for name in sorted(os.listdir(os.path.join(REPO, "rules"))):
            say(f"     {name}")
        with Daemon(lab, config) as daemon:
            say(f"{DIM}" + "".join(f"   {x}\n" for x in daemon.log().splitlines()) + RESET,)
            lab.wait_reachable()
            before = scrape(lab)

            # captures of the client's SYN on both sides of the appliance
            caps = {}
            for role in ("client", "server"):
                pcap = os.path.join(work, f"{role}.pcap")
                proc = lab.tcpdump(role, ["-U", "-i", "eth0", "-w", pcap, "tcp port 8080"],
                                   stdout=subprocess.DEVNULL)
                caps[role] = (proc, pcap)
            time.sleep(0.5)

            step("HTTP: curl -> python3 -m http.server, through the appliance")
            www = os.path.join(work, "www")
            os.mkdir(www)
            blob = os.urandom(1_000_000)
            with open(os.path.join(www, "file.bin"), "wb") as f:
                f.write(blob)
            server = lab.popen("server", [sys.executable, "-m", "http.server", "8080",
                                          "--bind", lab.server_v4, "--directory", www])
            out = os.path.join(work, "file.out")
            res = None
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                res = lab.run("client", ["curl", "-sS", "-D", "-", "-o", out, "--max-time", "30",
                                         f"http://{lab.server_v4}:8080/file.bin"], check=False)
                if res.returncode == 0:
                    break
                time.sleep(0.2)
            server.send_signal(signal.SIGTERM)
            assert res is not None
            sent = f"Server: SimpleHTTP/0.6 Python/{sys.version.split()[0]}"
            got = next((h for h in res.stdout.splitlines() if h.startswith("Server:")), "(none)")
            say(f"   server sent:    {sent}")
            say(f"   client got:     {BOLD}{got}{RESET}")
            ok &= check(res.returncode == 0 and got.startswith("Server: httpd/"),
                        "header rewritten in flight (5 bytes shorter)")
            with open(out, "rb") as f:
                same = hashlib.sha256(f.read()).digest() == hashlib.sha256(blob).digest()
            ok &= check(same, "the 1 MB file after it arrived intact (sha256 equal): sequence "
                              "numbers adjusted for the rest of the connection")

            for proc, _ in caps.values():
                time.sleep(0.3)
                proc.send_signal(signal.SIGINT)
                proc.wait(5)

            step("header edit: MSS option of the client's SYN (rule mss-clamp)")
            sent_mss = syn_mss(lab, "client", caps["client"][1])
            got_mss = syn_mss(lab, "server", caps["server"][1])
            say(f"   client sent MSS {sent_mss}, server received MSS {BOLD}{got_mss}{RESET}")
            ok &= check(got_mss == 1360 and sent_mss != got_mss, "MSS clamped to 1360")

            step("SMTP: a banner, same-length rewrite (rule smtp-banner)")
            banner = b"220 mx.example.org ESMTP Postfix (Debian/GNU)\r\n"
            r = tcp_exchange(lab, b"QUIT\r\n", banner, port=25)
            say(f"   server sent:    {banner!r}")
            say(f"   client got:     {BOLD}{r.client_received!r}{RESET}")
            ok &= check(r.client_received == banner.replace(b" ESMTP Postfix", b" ESMTP mailer "),
                        "banner rewritten")

            step("metrics that changed (curl 127.0.0.1:9640/metrics in the appliance)")
            after = scrape(lab)
            for key in sorted(after):
                if after[key] != before.get(key) and not key.startswith(
                    ("nfrewrite_packet_processing_seconds_sum", "nfrewrite_build")
                ):
                    say(f"   {key} {before.get(key, 0):g} -> {after[key]:g}")
            ok &= check(after.get('nfrewrite_rule_applied_total{rule="python-http-server-banner"}',
                                  0) >= 1, "per-rule counter moved")
            rc = daemon.stop()
            ok &= check(rc == 0, "daemon stopped cleanly (firewall rules removed)")
    step(f"done in {time.monotonic() - t0:.0f} s; lab removed")
    say(f"{GREEN}demo OK{RESET}" if ok else f"{RED}demo FAILED{RESET}")
    return 0 if ok else 1


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (network namespaces)", file=sys.stderr)
        return 2
    try:
        return run_demo()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
