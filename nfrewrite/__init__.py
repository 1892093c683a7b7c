"""nfrewrite: a transparent Linux bridge that rewrites TCP traffic in flight (NFQUEUE)."""

__version__ = "0.1.0"
