"""Checks of the config beyond its types, each with the reason a user is told: the
seed's and the shard count's bounds."""

from __future__ import annotations

SEED_MAX = 2**32 - 1  # jax.random.PRNGKey(2**32) is PRNGKey(0)
MAX_SERVERS = 1024


def check_seed(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        # numpy's generators refuse a negative seed; JAX's key keeps only its low 32 bits
        raise ValueError(f"must be from 0 to {SEED_MAX}: a seed is 32 bits (a larger one makes a smaller one's key)")
    return seed


def check_servers(servers: int) -> int:
    if servers > MAX_SERVERS:
        raise ValueError(
            f"at most {MAX_SERVERS}: every worker process keeps a connection to each shard and sends each "
            "one Update a step (more shards than that cost more than they spread)"
        )
    return servers
