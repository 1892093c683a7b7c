"""A lab TCP connection that stays open while a test changes things around it.

The client in the client namespace sends each line the test gives it as one segment
(TCP_NODELAY) and says "sent"; the server in the server namespace writes what arrives to its
stdout as it comes. With ``reply=True`` the server also answers every line with ``back `` and
the line as it arrived, and the client reports that answer, so the connection carries data (and
sequence offsets) both ways. Used to watch one live connection across a reload, a crash or a
restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lab.netns import Lab, read_line

SERVER = r"""
import socket, sys
reply = sys.argv[3] == "reply"
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1); print("READY", flush=True)
c, _ = srv.accept(); c.settimeout(120)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
pending = b""
while True:
    try:
        d = c.recv(65536)
    except OSError as e:
        sys.stderr.write(f"{e}\n"); break
    if not d:
        break
    sys.stdout.buffer.write(d); sys.stdout.flush()
    pending += d
    while reply and b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        c.sendall(b"back " + line + b"\n")
"""

CLIENT = r"""
import socket, sys
reply = sys.argv[3] == "reply"
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
print("READY", flush=True)
got = b""
for line in sys.stdin:
    s.sendall(line.encode())
    if reply:
        while b"\n" not in got:
            d = s.recv(65536)
            if not d:
                break
            got += d
        answer, _, got = got.partition(b"\n")
        print("sent " + (answer + b"\n").hex(), flush=True)
    else:
        print("sent", flush=True)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):
    pass
"""


class LineConn:
    """One open connection client -> server:``port``; :meth:`send` one line at a time."""

    def __init__(self, lab: Lab, port: int = 8080, *, reply: bool = False) -> None:
        env = lab.python_env()
        mode = "reply" if reply else "quiet"
        self.server = lab.popen("server", [sys.executable, "-c", SERVER, lab.server_v4,
                                           str(port), mode], env=env, stdin=subprocess.DEVNULL)
        assert read_line(self.server, 10).strip() == b"READY"
        assert self.server.stdout is not None
        os.set_blocking(self.server.stdout.fileno(), False)
        self.client = lab.popen("client", [sys.executable, "-c", CLIENT, lab.server_v4,
                                           str(port), mode], env=env, stdin=subprocess.PIPE)
        assert read_line(self.client, 10).strip() == b"READY"
        self.received = b""  # everything that arrived at the server
        self.replies = b""  # everything that arrived back at the client (``reply=True``)
        self.reply = b""  # the answer to the last line

    def send(self, line: bytes, wait: float = 5.0) -> bytes:
        """Send one line; return what arrived at the server for it within ``wait`` seconds
        (as soon as a newline arrived; b"" if nothing did). With ``reply``, the server's answer
        (as the client got it) is then in ``self.reply``."""
        assert self.client.stdin is not None and self.server.stdout is not None
        self.client.stdin.write(line + b"\n")
        self.client.stdin.flush()
        said = read_line(self.client, 10).strip().split(b" ")
        assert said[0] == b"sent", said
        self.reply = bytes.fromhex(said[1].decode()) if len(said) > 1 else b""
        self.replies += self.reply
        start = len(self.received)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            piece = self.server.stdout.read()
            if piece:
                self.received += piece
                if self.received.endswith(b"\n"):
                    break
            time.sleep(0.02)
        return self.received[start:]

    def close(self) -> None:
        """Half-close from the client; both ends finish."""
        assert self.client.stdin is not None
        self.client.stdin.close()
        self.client.wait(10)
        self.server.wait(10)


#: 8 records make one full segment (MSS 1448 on the lab's 1500-byte veths, with timestamps): when
#: a backlog coalesces records, segments still end on record boundaries, so no pattern is split
RECORD = 181

#: Record stream server: accept one connection, append everything to argv[2] until EOF.
RECORD_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 8080)); srv.listen(1); print("READY", flush=True)
c, _ = srv.accept(); c.settimeout(60)
with open(sys.argv[2], "wb") as out:
    while True:
        d = c.recv(65536)
        if not d:
            break
        out.write(d); out.flush()
"""

#: Client: a record every 2 ms from a thread; on "mark" prints how many were sent; on "end"
#: stops, closes and prints the total.
RECORD_CLIENT = r"""
import socket, sys, threading, time
s = socket.create_connection((sys.argv[1], 8080), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = 0
stop = False
def rec(i):
    head = b"%08d apple " % i
    return head + b"x" * (int(sys.argv[2]) - len(head) - 1) + b"\n"
def run():
    global n
    while not stop:
        s.sendall(rec(n)); n += 1
        time.sleep(0.002)
t = threading.Thread(target=run); t.start()
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() == "end":
        break
    print(n, flush=True)
stop = True; t.join()
s.shutdown(socket.SHUT_WR); s.settimeout(30)
while s.recv(65536):
    pass
print(n, flush=True)
"""

def record(i: int) -> bytes:
    head = b"%08d apple " % i
    return head + b"x" * (RECORD - len(head) - 1) + b"\n"



class RecordStream:
    """A steady stream of numbered records (one every 2 ms, ``apple`` in each) client -> server
    port 8080, written by the server to ``received``; :meth:`mark` tells how many were sent."""

    def __init__(self, lab: Lab, received: str) -> None:
        env = lab.python_env()
        self.server = lab.popen("server", [sys.executable, "-c", RECORD_SERVER, lab.server_v4,
                                           received], env=env, stdin=subprocess.DEVNULL)
        assert read_line(self.server, 10).strip() == b"READY"
        self.client = lab.popen("client", [sys.executable, "-c", RECORD_CLIENT, lab.server_v4,
                                           str(RECORD)], env=env, stdin=subprocess.PIPE)
        assert read_line(self.client, 10).strip() == b"READY"

    def mark(self) -> int:
        """How many records the client has sent so far."""
        assert self.client.stdin is not None
        self.client.stdin.write(b"mark\n")
        self.client.stdin.flush()
        return int(read_line(self.client, 10))

    def end(self) -> int:
        """Stop sending, close, wait for both ends; the total number of records sent."""
        assert self.client.stdin is not None
        self.client.stdin.write(b"end\n")
        self.client.stdin.flush()
        total = int(read_line(self.client, 40))
        assert self.client.wait(10) == 0 and self.server.wait(40) == 0
        return total
