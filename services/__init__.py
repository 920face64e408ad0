"""The deployable gRPC side of psfw: shard store, servicer, server process."""

from psfw.services.server import ShardServer, serve
from psfw.services.store import ShardStore

__all__ = ["ShardServer", "ShardStore", "serve"]
