"""The ``psfw`` command (``psfw.cli.main``)."""

import os

# Before gRPC loads (it reads this once): unless told otherwise, gRPC's C core logs
# every failed TLS handshake at INFO on stderr, so a flood of junk connections would
# flood a shard's log and a client's output. ERROR is gRPC's documented default; a
# GRPC_VERBOSITY the user sets (DEBUG, with GRPC_TRACE, to debug gRPC) wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
