"""Where the tail of a payload may begin a literal pattern: the stream matcher's hold decision.

Theory of operation
-------------------
A segment must be held back when its payload ends in a proper prefix of some pattern
(:mod:`nfrewrite.core.stream`): the rest of the match may come in the next segment. The
question, asked for every segment of a port with ``replace`` rules, is therefore: at which
positions ``i`` of ``payload`` is ``payload[i:]`` a proper prefix of one of the literals?

The obvious index, the set of every proper prefix of every literal, costs memory quadratic in
a literal's length (a 60 KB literal alone has 1.8 GB of prefixes) and a slice per length per
packet. This one is linear in the literals' total length:

* tails of at most ``HEAD`` bytes are looked up in the set of the literals' proper prefixes up
  to ``HEAD`` bytes (at most ``HEAD`` entries per literal);
* a longer tail begins with ``HEAD`` bytes that some literal begins with: those positions are
  found in one ``re`` scan (a lookahead over the literals' distinct heads, in C) of the window
  the longest literal can reach back, and each is confirmed against the literals with that
  head (their last ``HEAD`` bytes there first, then the whole tail).

The cost per packet is a few dict lookups plus the scan of the window for an ordinary payload.
A literal made of one short period (``aaaa...b``) against a payload of that period confirms at
every position of the window, copying the tail each time: quadratic in the literal's length,
which only the rule's author can choose.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

#: tails up to this long are looked up whole; longer ones by their first HEAD bytes
HEAD = 8


class Prefixes:
    """The proper prefixes of some literals, indexed for :meth:`candidates`."""

    __slots__ = ("_heads", "_long", "_short", "longest")

    def __init__(self, literals: Iterable[bytes]) -> None:
        literals = list(dict.fromkeys(literals))
        #: the longest proper prefix: how far back from a payload's end a candidate can begin
        self.longest = max((len(p) for p in literals), default=1) - 1
        self._short = frozenset(p[:k] for p in literals for k in range(1, min(len(p), HEAD + 1)))
        long: dict[bytes, list[bytes]] = {}
        for p in literals:
            if len(p) > HEAD + 1:  # has proper prefixes longer than HEAD
                long.setdefault(p[:HEAD], []).append(p)
        self._long = long
        self._heads = (re.compile(b"(?=" + b"|".join(re.escape(h) for h in long) + b")")
                       if long else None)

    def candidates(self, payload: bytes) -> list[int]:
        """Every position ``i``, ascending, from which ``payload[i:]`` (not empty) is a proper
        prefix of one of the literals."""
        n = len(payload)
        found: list[int] = []
        heads = self._heads
        if heads is not None and n > HEAD:
            last = n - HEAD - 1  # the last position with a tail longer than HEAD
            end = payload[n - HEAD:]
            for m in heads.finditer(payload, max(0, n - self.longest)):
                i = m.start()
                if i > last:
                    break
                k = n - i
                for p in self._long[payload[i:i + HEAD]]:
                    if len(p) > k and p[k - HEAD:k] == end and p.startswith(payload[i:]):
                        found.append(i)
                        break
        short = self._short
        found.extend(n - k for k in range(min(HEAD, n, self.longest), 0, -1)
                     if payload[n - k:] in short)
        return found
