"""Where a worker's sequence records live so that neither its death nor a restart takes them.

Theory of operation
-------------------
Each worker owns one file in the runtime directory, ``flows-netns-<inode>-q<queue>.state``
(the network namespace in the name, as for the sysctl record, so two daemons sharing the
directory never read each other's).  The bytes are :mod:`nfrewrite.core.flowstate`'s.

* While the worker runs the file is a *journal*: a header, a snapshot of the table when it was
  opened, then one frame per flow record that changed, appended with one ``write(2)``
  (``O_APPEND``).  The table notes what changed (``FlowTable.changed``); a flow that recorded an
  edit or began anew sets ``urgent`` and the worker's packet handler writes it *before* it returns
  the packet's verdict.  Everything else that changed (the highest byte seen, ACKs, collapsed
  edits, ends, removals) is written from the idle hook (at least twice a second).  When the
  journal has grown to four times its last snapshot (and past 1 MiB), the idle hook writes a
  fresh snapshot to a temporary file and renames it over the journal.
* A graceful stop (SIGTERM) writes a complete snapshot (with its end frame) the same way.
* A worker that starts reads the file if it is at most ``[flows] state_max_age`` seconds old
  (its modification time: the idle hook touches the journal every few seconds, so the time is
  when the writer stopped), restores what it holds, counts it (``flows_restored``) and starts a
  new journal with it.  A file that cannot be read (damaged, truncated, another version) is
  refused with one log line and renamed aside (``.refused``); the worker starts empty.

Why a file written with ``write(2)`` and not a shared memory map: the page cache of
``/run`` (a tmpfs) belongs to the kernel, so whatever a process wrote is there after a
``kill -9`` exactly as with a map, with no size to fix in advance (a record ranges from 200 bytes
to megabytes for a dense flow), and a frame is whole or, at the very end, torn (the reader drops
a torn last frame).  The supervisor need not hold anything: the file outlives every process.

What a crash costs
------------------
A crash between an edit and its record: the record is written before the verdict, so the packet
that carries the edit has no verdict yet; the kernel drops it with the queue, the sender
retransmits it, and the next worker records the same edit (an edit is a function of the stream,
not of the worker).  Nothing is lost.  A crash loses only what the idle hook had not written yet
(under half a second): ACK progress (edits that could have been collapsed are still kept: more
memory for a while, the same mapping), window edges (a newer right edge is learnt from the next
ACK; until then the old one plus ``WINDOW_SLACK`` bounds data), flow ends (an ended flow comes
back as live and idles out), removals (a removed flow comes back and idles out).  While no worker
runs, ``--queue-bypass`` passes packets unadjusted: data sent across that gap on an offset flow
breaks it (see README); an idle one survives.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable

from nfrewrite.config.settings import Config
from nfrewrite.core import flowstate
from nfrewrite.core.rules import RuleSet
from nfrewrite.core.seqadj import FlowTable
from nfrewrite.kernel import netsetup

#: The journal is compacted once it is this many times its last snapshot, and past COMPACT_MIN.
COMPACT_FACTOR = 4
COMPACT_MIN = 1 << 20
#: Seconds between touches of the journal (its modification time dates the last writer).
TOUCH_EVERY = 2.0


def rules_digest(ruleset: RuleSet) -> bytes:
    """A digest of what the rules replace (the records' replacements come from them)."""
    h = hashlib.sha256()
    for rule in ruleset.rules:
        for r in rule.replaces:
            h.update(len(r.find).to_bytes(4, "little") + r.find)
            h.update(len(r.with_).to_bytes(4, "little") + r.with_)
            if r.regex is not None:  # the same text as a regex, or with another bound
                h.update(b"regex %d" % r.regex.max_len)
    return h.digest()


def replacements(ruleset: RuleSet) -> dict[bytes, bytes]:
    """The rule set's replacement byte strings, to share with restored records."""
    return {r.with_: r.with_ for rule in ruleset.rules for r in rule.replaces}


def state_path(directory: str, queue_num: int) -> str:
    netns = os.stat("/proc/self/ns/net").st_ino
    return os.path.join(directory, f"flows-netns-{netns}-q{queue_num}.state")


class FlowStore:
    """The file of one worker's records (see the module doc)."""

    def __init__(self, directory: str, queue_num: int, table: FlowTable, ruleset: RuleSet,
                 max_age: float, log: Callable[[str], None]) -> None:
        self.directory = directory
        self.path = state_path(directory, queue_num)
        self.queue_num = queue_num
        self.table = table
        self.max_age = max_age
        self.log = log
        self.digest = rules_digest(ruleset)
        self._fd = -1
        self._size = 0
        self._snapshot_size = 0
        self._touched = 0.0

    # -- start ------------------------------------------------------------------------------------

    def load(self, ruleset: RuleSet) -> int:
        """Restore the records in the file, if it is fresh enough and readable; returns how
        many flows were restored (also in ``table.flows_restored``)."""
        where = f"queue {self.queue_num}: sequence records {self.path}"
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return 0
        except OSError as e:
            self.log(f"{where}: cannot be read ({e.strerror}); starting with no records")
            return 0
        age = time.time() - st.st_mtime
        if age > self.max_age:
            self.log(f"{where}: {age:.0f} s old (more than flows.state_max_age "
                     f"{self.max_age:g} s): ignored")
            return 0
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            loaded = flowstate.decode_state(data, time.monotonic(),
                                            intern=replacements(ruleset))
        except (OSError, flowstate.StateError) as e:
            self.log(f"{where}: refused ({e}); starting with no records")
            with contextlib.suppress(OSError):
                os.replace(self.path, self.path + ".refused")
            return 0
        restored = flowstate.restore(self.table, loaded.flows.values())
        notes = []
        if not loaded.complete:
            notes.append("from the journal of a worker that did not stop cleanly")
        if loaded.torn:
            notes.append("its torn last record dropped")
        if loaded.digest != self.digest:
            notes.append("written under other rules (the records still map sequence numbers)")
        if restored < len(loaded.flows):
            notes.append(f"{len(loaded.flows) - restored} did not fit the table")
        self.log(f"{where}: {restored} flows restored ({age:.1f} s old"
                 + "".join(f"; {n}" for n in notes) + ")")
        return restored

    def open(self) -> None:
        """Start the journal: a snapshot of the table as it is, then changes appended."""
        self._replace(flowstate.encode_table(self.table, self.digest, complete=False),
                      complete=False)
        if self._fd >= 0:
            self.table.changed = {}
            self.table.urgent = False

    # -- running ----------------------------------------------------------------------------------

    def write_changed(self) -> None:
        """Append the record of every flow that changed (the handler calls it when ``urgent``:
        before the verdict of the packet that changed it)."""
        table = self.table
        changed = table.changed
        table.urgent = False
        if not changed or self._fd < 0:
            return
        frames = [flowstate.encode_tombstone(key) if flow is None else flowstate.encode_flow(flow)
                  for key, flow in changed.items()]
        changed.clear()
        data = b"".join(frames)
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            self._give_up(e)
            return
        self._size += len(data)

    def idle(self) -> None:
        """The worker's idle hook: write what changed, compact a long journal, date it."""
        if self._fd < 0:
            return
        self.write_changed()
        if self._size > max(COMPACT_MIN, COMPACT_FACTOR * self._snapshot_size):
            self.open()
            return
        now = time.monotonic()
        if now - self._touched >= TOUCH_EVERY:
            self._touched = now
            with contextlib.suppress(OSError):
                os.utime(self._fd)

    def set_rules(self, ruleset: RuleSet) -> None:
        """A reload: the records stay as they are; only the digest written from now on changes."""
        self.digest = rules_digest(ruleset)

    # -- stop -------------------------------------------------------------------------------------

    def save(self) -> int:
        """A graceful stop: the whole table as a complete snapshot; returns the flows saved."""
        self.table.changed = None
        self._replace(flowstate.encode_table(self.table, self.digest), complete=True)
        self.close()
        return len(self.table)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- files ------------------------------------------------------------------------------------

    def _replace(self, data: bytes, *, complete: bool) -> None:
        """Write ``data`` to a new file and rename it over the state (a reader sees the old one or
        the new one, never a mix); keep it open for appending unless ``complete``."""
        tmp = f"{self.path}.tmp"
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
        except OSError as e:
            self._give_up(e)
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.replace(tmp, self.path)
        except OSError as e:
            os.close(fd)
            self._give_up(e)
            return
        self.close()
        if complete:
            os.close(fd)
        else:
            self._fd = fd
        self._size = self._snapshot_size = len(data)
        self._touched = time.monotonic()

    def _give_up(self, error: OSError) -> None:
        """The file cannot be written (a full or read-only directory): the worker goes on
        without it (its records are then lost with it), said once."""
        self.log(f"queue {self.queue_num}: cannot write the sequence records to {self.path}: "
                 f"{error.strerror or error}; they will not survive this worker")
        self.close()
        self.table.changed = None
        self.table.urgent = False



def open_store(queue_num: int, config: Config, ruleset: RuleSet, table: FlowTable,
               log: Callable[[str], None]) -> FlowStore | None:
    """A starting worker's store: the records restored into ``table`` and the journal begun;
    None when ``[flows] state_max_age`` is 0 (records are not kept)."""
    if config.flows.state_max_age <= 0:
        return None
    store = FlowStore(netsetup.state_dir(), queue_num, table, ruleset,
                      config.flows.state_max_age, log)
    store.load(ruleset)
    store.open()
    return store
