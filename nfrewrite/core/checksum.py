"""Internet checksums (RFC 1071) as modular arithmetic, fast in pure Python.

Theory of operation
-------------------
The one's-complement sum of 16-bit big-endian words is the same, modulo 0xFFFF, as the whole byte
string read as one big-endian integer: 2**16 == 1 (mod 0xFFFF), so every word lands on weight 1.
``int.from_bytes(data) % 0xFFFF`` is therefore the one's-complement sum computed by CPython's C
bignum code in one call, about 40x faster than a Python loop over words.

We keep every sum as a residue in 0..0xFFFE, where 0 stands for both one's-complement zeros
(0x0000 and 0xFFFF). A checksum field ``f`` is correct when the sum over the covered bytes, field
included, is 0 (mod 0xFFFF). The field value we write for a sum ``s`` of everything else is
``(-s) % 0xFFFF``: the same value Linux's ``csum_fold`` produces (never 0xFFFF).

Incremental update (RFC 1624, eqn. 3): ``HC' = ~(~HC + ~m + m')``; in residues this is
``HC' = HC + m - m'``. It is what lets an edit carry an existing checksum error through unchanged:
a packet that arrived corrupt leaves corrupt by exactly the same amount (never launder corruption),
and a correct one leaves correct.

A byte string that does not start at an even offset of the checksummed data is weighted by where
it sits: :func:`sum_at` takes the offset into account, so edits can be summed region by region.

This module is pure: bytes in, integers out.
"""

from __future__ import annotations

from nfrewrite.core.fields import Buffer

MOD = 0xFFFF


#: Above this many bytes ``ones_sum`` works in chunks (see there); below, one int is cheaper.
CHUNK = 4096


def ones_sum(data: Buffer) -> int:
    """One's-complement sum of ``data`` (zero-padded to even length) as a residue mod 0xFFFF.

    A GSO super-packet is up to 64 KB, and ``int % 0xFFFF`` on a 64 KB integer costs more than
    building it (one hardware division per 30-bit digit). Since 2**16 = 1 (mod 0xFFFF), chunks
    that start at even offsets can be summed as integers of their own and the total reduced once:
    on 64 KB ~95 us against ~190 us for the single integer (``python -m bench.bench_packet``
    prints both at 1448 and 64,000 bytes).
    """
    mv = memoryview(data)
    n = len(mv)
    if n <= CHUNK:
        value = int.from_bytes(mv, "big")
        return (value << 8 if n & 1 else value) % MOD
    # Little-endian is ~15 % cheaper to build and gives the byte-swapped words' sum, which is the
    # sum times 2**8 (mod 0xFFFF); times 2**8 again (2**16 = 1) undoes it. An odd last byte is
    # the high byte of its word, so the low byte of a swapped one.
    even = mv[: n - (n & 1)]
    from_bytes = int.from_bytes
    swapped = sum([from_bytes(even[i : i + CHUNK], "little") for i in range(0, n - 1, CHUNK)])
    if n & 1:
        swapped += mv[n - 1]
    return swapped % MOD * 256 % MOD


def sum_at(data: Buffer, offset: int) -> int:
    """Contribution of ``data`` lying at byte ``offset`` of a checksummed range (mod 0xFFFF).

    A byte at an even offset is the high byte of its word. ``int.from_bytes`` weighs the last byte
    by 1 (a low byte), so the value is right as it is when the data ends at an odd offset, i.e. when
    ``offset + len`` is even; otherwise every byte is one position off and we multiply by 256.
    """
    n = len(memoryview(data))
    if n > CHUNK:
        # at an odd offset every byte sits one place lower: the sum times 2**8 (mod 0xFFFF)
        total = ones_sum(data)
        return total * 256 % MOD if offset & 1 else total
    value = int.from_bytes(data, "big")
    if (offset + n) & 1:
        value <<= 8
    return value % MOD


def fold_field(total: int) -> int:
    """The field value that makes ``total`` (the sum of all else) verify: ``(-total) % MOD``."""
    return (-total) % MOD


def update(field: int, old_sum: int, new_sum: int) -> int:
    """RFC 1624 eqn. 3 over residues: the field after covered data summing ``old_sum`` became
    ``new_sum``. Carries any existing error through unchanged."""
    return (field + old_sum - new_sum) % MOD

