"""The daemon: ``daemon`` (supervisor, workers, signals, reloads), ``metrics`` (Prometheus),
``control`` (the control socket: ``nfrewrite status`` and ``nfrewrite trace``), ``trace`` (the
worker's side of a trace), ``flowstore`` (each worker's sequence records kept across restarts),
``sdnotify`` (systemd's notify protocol), ``fdreserve`` (descriptors kept for the moments that
need them)."""
