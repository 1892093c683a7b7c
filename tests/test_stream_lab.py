"""A pattern split across TCP segments, on real packets: every split point is rewritten.

In the namespace lab the client writes a token in two parts (the first ``k`` bytes, a 2 ms pause,
the rest; TCP_NODELAY, so they travel as separate segments), for every ``k``; the server echoes
what it gets, and the echo (on a port no rule names) must hold the rewritten stream exactly.
Also: a request that ends in the beginning of the token is echoed in well under 50 ms (it was
held, then released by the deadline, unchanged), and a 2 MB stream with the token every ~700
bytes at random write sizes arrives byte-exact, every token rewritten. And a ``find_regex``
rule: the ``Server:`` header of python's ``http.server`` as ``curl`` sees it, and a header split
at every point of its line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from lab.demo import scrape
from lab.netns import Daemon, Lab, read_line, write_lab_config

pytestmark = pytest.mark.privileged

TOKEN = b"SECRET-TOKEN-7f3a9c"

RULES = """
[[rule]]
name = "redact"
match = {{ dport = 8080 }}
replace = [ {{ find = "{token}", with = "{with_}" }} ]
"""

ECHO_SERVER = r"""
import socket, sys, threading
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(family); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 8080)); srv.listen(64); print("READY", flush=True)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d:
            break
        c.sendall(d)
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, random, socket, sys, threading, time
host, mode, token = sys.argv[1], sys.argv[2], sys.argv[3].encode()

def connect():
    s = socket.create_connection((host, 8080), timeout=20)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

def read_all(s, into):
    while True:
        d = s.recv(65536)
        if not d:
            return
        into.append(d)

out = {}
if mode == "split":
    for k in range(1, len(token)):
        s = connect()
        s.sendall(b"GET /?q=" + token[:k]); time.sleep(0.002)
        s.sendall(token[k:] + b" HTTP/1.1\r\n\r\n"); s.shutdown(socket.SHUT_WR)
        got = []; read_all(s, got); s.close()
        out[k] = b"".join(got).decode("latin-1")
elif mode == "prefix":
    s = connect()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        s.sendall(b"ping " + token[:7])
        got = b""
        while len(got) < 5 + 7:
            got += s.recv(65536)
        times.append(time.perf_counter() - t0)
        out.setdefault("echo", []).append(got.decode("latin-1"))
    out["times"] = times
    s.close()
else:
    rng = random.Random(7)
    pieces = []; size = 0
    while size < 2 << 20:
        filler = bytes(rng.choice(b"abcdefghij") for _ in range(rng.randint(500, 900)))
        pieces.append(filler + token); size += len(filler) + len(token)
    stream = b"".join(pieces)
    s = connect(); got = []
    reader = threading.Thread(target=read_all, args=(s, got)); reader.start()
    pos = 0
    while pos < len(stream):
        n = rng.randint(1, 3000); s.sendall(stream[pos:pos + n]); pos += n
    s.shutdown(socket.SHUT_WR); reader.join(60)
    out["sent"] = stream.decode("latin-1"); out["echo"] = b"".join(got).decode("latin-1")
print(json.dumps(out), flush=True)
"""


def _hold_past_scheduler_noise(config: str) -> str:
    """The split and bulk tests are about joining segments, not about the deadline: the client's
    2 ms pause on a 2-core machine that also runs the server, the daemon and pytest has stretched
    past the default 5 ms deadline (one split point of 36 released unjoined, ``hold_expired`` 1),
    which is the documented limit, and the 2 MB stream left one token of ~2,800 once in a full
    suite run (not reproduced alone). A 50 ms deadline keeps the tests about what they assert; the
    default is exercised by the prefix test below."""
    with open(config, "a") as f:
        f.write("\n[flows]\nhold_ms = 50\n")
    return config


def _hold_outcomes(lab: Lab, leaked: bool) -> dict[str, float]:
    """When a token got through: ``nfrewrite_stream_holds_total`` by outcome, for the failure
    message (a split token can only pass through a hold that expired, was flushed or refused)."""
    if not leaked:
        return {}
    time.sleep(1.2)  # the worker moves its tallies at least every idle interval
    return {k: v for k, v in scrape(lab).items() if k.startswith("nfrewrite_stream_holds_total")}


def _run(lab: Lab, family: int, mode: str, token: bytes = TOKEN) -> dict[str, object]:
    env = lab.python_env()
    server = lab.popen("server", [sys.executable, "-c", ECHO_SERVER, lab.addr("server", family)],
                       env=env)
    try:
        assert read_line(server, 10).strip() == b"READY"
        client = lab.run("client", [sys.executable, "-c", CLIENT, lab.addr("server", family),
                                    mode, token.decode()], env=env, timeout=120)
        result: dict[str, object] = json.loads(client.stdout)
        return result
    finally:
        server.kill()
        server.wait(5)


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("with_", ["[redacted]", "X" * len(TOKEN)])
def test_every_split_point_is_rewritten(lab: Lab, workdir: str, family: int,
                                        with_: str) -> None:
    config = _hold_past_scheduler_noise(write_lab_config(
        workdir, {"10-redact.toml": RULES.format(token=TOKEN.decode(), with_=with_)}))
    with Daemon(lab, config):
        lab.wait_reachable()
        got = _run(lab, family, "split")
        left = [k for k, echo in got.items() if TOKEN.decode() in str(echo)]
        holds = _hold_outcomes(lab, bool(left))
    want = f"GET /?q={with_} HTTP/1.1\r\n\r\n"
    assert len(got) == len(TOKEN) - 1
    assert left == [], f"tokens left at split points {left}; holds {holds}"
    assert all(echo == want for echo in got.values()), got


@pytest.mark.parametrize("family", [4, 6])
def test_a_request_ending_in_a_prefix_is_answered_quickly(lab: Lab, workdir: str,
                                                         family: int) -> None:
    config = write_lab_config(workdir, {"10-redact.toml": RULES.format(token=TOKEN.decode(),
                                                                         with_="[redacted]")})
    with Daemon(lab, config):
        lab.wait_reachable()
        got = _run(lab, family, "prefix")
    assert got["echo"] == ["ping " + TOKEN[:7].decode()] * 5
    times = got["times"]
    assert isinstance(times, list)
    assert max(times) < 0.05, times


@pytest.mark.parametrize("family", [4, 6])
def test_a_2mb_stream_at_random_write_sizes_is_rewritten_byte_exact(
        lab: Lab, workdir: str, family: int) -> None:
    config = _hold_past_scheduler_noise(write_lab_config(
        workdir, {"10-redact.toml": RULES.format(token=TOKEN.decode(), with_="[redacted]")}))
    with Daemon(lab, config):
        lab.wait_reachable()
        got = _run(lab, family, "bulk")
        sent, echo = str(got["sent"]), str(got["echo"])
        holds = _hold_outcomes(lab, TOKEN.decode() in echo)
    assert echo.count(TOKEN.decode()) == 0, f"holds {holds}"
    assert echo == sent.replace(TOKEN.decode(), "[redacted]")


REGEX_RULES = """
[[rule]]
name = "server-header"
match = {{ {side} = {port} }}
replace = [ {{ find_regex = 'Server: [^\\r\\n]*', with = 'Server: web' }} ]
"""


@pytest.mark.parametrize("family", [4, 6])
def test_a_regex_rewrites_the_server_header_of_http_server_as_curl_sees_it(
        lab: Lab, workdir: str, family: int) -> None:
    config = write_lab_config(workdir, {"10-server.toml": REGEX_RULES.format(side="sport",
                                                                           port=8000)})
    root = os.path.join(workdir, "www")
    os.mkdir(root)
    body = bytes(range(256)) * 64 + b"\r\nServer: abc"  # 16 KB, binary, and a match
    with open(os.path.join(root, "f.bin"), "wb") as f:
        f.write(body)
    addr = lab.addr("server", family)
    server = lab.popen("server", [sys.executable, "-m", "http.server", "-b", addr, "-d", root,
                                  "8000"], env=lab.python_env())
    head_path, body_path = os.path.join(workdir, "head.txt"), os.path.join(workdir, "body.bin")
    try:
        with Daemon(lab, config):
            lab.wait_reachable()
            url = f"http://[{addr}]:8000/f.bin" if family == 6 else f"http://{addr}:8000/f.bin"
            for _ in range(50):  # the server may still be starting
                done = lab.run("client", ["curl", "-sS", "-g", "--max-time", "10", "-D",
                                          head_path, "-o", body_path, url],
                               check=False, timeout=20)
                if done.returncode == 0:
                    break
                time.sleep(0.1)
            assert done.returncode == 0, done.stderr
    finally:
        server.kill()
        server.wait(5)
    with open(head_path, "rb") as f:
        head = f.read()
    with open(body_path, "rb") as f:
        received = f.read()
    assert b"\r\nServer: web\r\n" in head, head
    assert b"SimpleHTTP" not in head and b"Python/" not in head
    # the body's last line is a match too (as long as its replacement: Content-Length holds)
    assert received == body.replace(b"Server: abc", b"Server: web")


@pytest.mark.parametrize("family", [4, 6])
def test_a_regex_split_at_every_point_is_rewritten(lab: Lab, workdir: str, family: int) -> None:
    config = _hold_past_scheduler_noise(write_lab_config(
        workdir, {"10-server.toml": REGEX_RULES.format(side="dport", port=8080)}))
    token = b"Server: nginx/1.2"
    with Daemon(lab, config):
        lab.wait_reachable()
        got = _run(lab, family, "split", token)
    assert len(got) == len(token) - 1
    want = "GET /?q=Server: web\r\n\r\n"  # the match runs to the end of the line
    assert all(echo == want for echo in got.values()), got


BULK = r"""
import socket, sys, threading, time
s = socket.create_connection((sys.argv[1], 8080), timeout=20)
got = [0]
def read():
    while True:
        d = s.recv(65536)
        if not d:
            return
        got[0] += len(d)
reader = threading.Thread(target=read); reader.start()
print("READY", flush=True)
end = time.monotonic() + float(sys.argv[2])
chunk = b"b" * 65536
sent = 0
while time.monotonic() < end:
    s.sendall(chunk); sent += len(chunk)
s.shutdown(socket.SHUT_WR); reader.join(30)
print(sent, got[0], flush=True)
"""


def test_a_held_split_pattern_is_not_passed_by_the_batch_verdicts_of_other_packets(
        lab: Lab, workdir: str) -> None:
    """Batch verdicts accept every queued packet up to an id: one must never cover a packet the
    engine holds. A bulk flow on the same queue (so runs of unchanged packets are accepted in
    batches) while every split point of the token is held and completed: all are rewritten, and
    the kernel refused no verdict (a held packet a batch had passed would be refused later)."""
    config = write_lab_config(workdir, {"10-redact.toml": RULES.format(token=TOKEN.decode(),
                                                                         with_="[redacted]")})
    with open(config, "a") as f:  # a deadline no pause of a loaded machine reaches
        f.write("\n[flows]\nhold_ms = 500\n")
    env = lab.python_env()
    with Daemon(lab, config) as daemon:
        lab.wait_reachable()
        server = lab.popen("server", [sys.executable, "-c", ECHO_SERVER, lab.server_v4], env=env)
        try:
            assert read_line(server, 10).strip() == b"READY"
            bulk = lab.popen("client", [sys.executable, "-c", BULK, lab.server_v4, "6"], env=env)
            assert read_line(bulk, 10).strip() == b"READY"
            client = lab.run("client", [sys.executable, "-c", CLIENT, lab.server_v4, "split",
                                        TOKEN.decode()], env=env, timeout=120)
            sent, echoed = map(int, read_line(bulk, 60).split())
            bulk.wait(30)
        finally:
            server.kill()
            server.wait(5)
        queued = lab.run("appliance", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        log = daemon.log()
    got = json.loads(client.stdout)
    want = "GET /?q=[redacted] HTTP/1.1\r\n\r\n"
    assert len(got) == len(TOKEN) - 1
    assert all(echo == want for echo in got.values()), got
    assert sent > 1 << 20 and echoed == sent  # the bulk flow went through the queue, whole
    assert int(queued.split()[7]) > 1000, queued  # packets the queue saw
    assert "VerdictRefused" not in log and "VerdictFailed" not in log, log[-2000:]
