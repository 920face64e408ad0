"""A client script: connect to running shards, follow the job, read a parameter.

    python examples/watch_cluster.py examples/deploy/cluster.toml \\
        127.0.0.1:50051,127.0.0.1:50052 dense0/w

Prints each shard's state and the job's progress every few seconds until the job's
last step, then the parameter's statistics.
"""

import argparse
import asyncio

import numpy as np

import psfw


async def watch(config_path: str, servers: str, name: str, every_s: float) -> None:
    config = psfw.load_config(config_path)
    addresses = [a.strip() for a in servers.split(",") if a.strip()]
    async with psfw.Cluster(addresses, config) as cluster:
        while True:
            rows = await cluster.status(interval_s=every_s)
            print(psfw.format_status(rows), flush=True)
            steps = [step for row in rows for step in row["groups"].values()]
            if steps and min(steps) > 0 and all(r["updates_per_s"] == 0 for r in rows):
                break  # nothing moved during the last interval: the job is done or stalled
        value = await cluster.read(name)
        print(f"{name}: shape {value.shape}, mean {np.mean(value):+.5f}, std {np.std(value):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="the job's TOML config")
    parser.add_argument("servers", help="shard addresses host:port, comma-separated")
    parser.add_argument("param", help="parameter name, e.g. dense0/w")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between reports")
    args = parser.parse_args()
    asyncio.run(watch(args.config, args.servers, args.param, args.every))


if __name__ == "__main__":
    main()
