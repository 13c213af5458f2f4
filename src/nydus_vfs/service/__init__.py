"""The daemon service: lifecycle state and mounts (the HTTP API comes later).

* owns: ``Daemon`` (VFS + shared blob layer + state machine), config-to-objects wiring.
* does not own: transports, argv parsing, logging setup (``cli``).
"""
