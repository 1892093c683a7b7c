"""The namespace lab (client -- appliance -- server) for tests, ``make bench`` and ``make demo``.

``netns`` builds and removes the namespaces and runs the daemon in them, ``peer`` is one end of a
TCP exchange, ``demo`` is ``make demo``. Test tooling: not part of the installed package.
"""
