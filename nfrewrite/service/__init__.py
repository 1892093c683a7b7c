"""The daemon: ``daemon`` (supervisor, workers, signals, reloads), ``metrics`` (Prometheus),
``sdnotify`` (systemd's notify protocol), ``fdreserve`` (descriptors kept for the moments that
need them)."""
