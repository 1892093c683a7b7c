"""The pure core: bytes and numbers in, bytes and numbers out.

``packet`` (IPv4/IPv6 + TCP views over a bytearray, named ``fields``, ``checksum`` arithmetic),
``rules`` (the compiled rule set: which rules apply, where their patterns are), ``engine`` (one
packet in, a verdict and maybe new bytes out) and ``seqadj`` (sequence, acknowledgement and SACK
numbers of flows whose length changed); ``constants`` are what the core and the shell agree on.
No module here opens a socket or a file, starts a process or reads a clock (``now`` comes in as an
argument): the fuzzer, the benchmarks and ``nfrewrite replay`` drive it exactly as the queue loop
does, and ``tests/test_layout.py`` fails if an import would change that.
"""
