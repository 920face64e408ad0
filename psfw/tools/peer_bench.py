"""The peer ``psfw bench`` compares with: PyTorch DDP over gloo, where torch is
installed (an optional extra; psfw never needs it).

The same job as the benchmark's psfw variants: an MLP 784-1024-1024-10 (float32) on
the same synthetic data, global batch 256 split over 2 OS processes of one thread each
(the 2 cores), SGD at the same learning rate. DDP all-reduces the gradients in
buckets while the backward pass runs; every process then applies the same update.
Between emulated hosts (``psfw bench --hosts``), one rank runs on each worker host:
``python -m psfw.tools.peer_bench --rank R --world N --master HOST:PORT --steps S``.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import timedelta
from typing import Any

WORLD = 2


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_steps(rank: int, world: int, master: str, port: int, batch: int, lr: float) -> Iterator[int]:
    """Train the benchmark job as DDP rank ``rank`` of ``world`` (the rank-0 process
    at ``master:port``), one step per iteration: yields each step's number (from 1)
    once it is done; the process group ends with the iteration. Each rank trains on
    ``batch // world`` rows of the global batch."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn

    from psfw.compute.datasets import synthetic

    torch.set_num_threads(1)  # one core each: the best of the settings tried on 2 cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        data = synthetic(features=784, classes=10, train=8192, test=256, seed=0)
        x, y = torch.from_numpy(np.asarray(data.x_train)), torch.from_numpy(np.asarray(data.y_train)).long()
        per = batch // world
        loss_fn = nn.CrossEntropyLoss()
        step = 0
        while True:
            start = (step * batch + rank * per) % (len(x) - per)
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(x[start : start + per]), y[start : start + per]).backward()
            opt.step()
            step += 1
            yield step
    finally:
        dist.destroy_process_group()


def _ddp_process(rank: int, port: int, steps: int, warmup: int, batch: int, lr: float, out: Any) -> None:
    import torch.distributed as dist

    started = 0.0
    with closing(ddp_steps(rank, WORLD, "127.0.0.1", port, batch, lr)) as trained:
        for step in trained:
            if step == warmup:
                dist.barrier()
                started = time.perf_counter()
            if step == warmup + steps:
                dist.barrier()
                if rank == 0:
                    out.put(steps * batch / (time.perf_counter() - started))
                break


def run_ddp(steps: int = 60, warmup: int = 10, batch: int = 256, lr: float = 0.01) -> float | None:
    """Samples/s of PyTorch DDP (gloo, 2 OS processes), or None without torch."""
    if not torch_installed():
        return None
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    out = context.SimpleQueue()
    port = _free_port()
    procs = [
        context.Process(target=_ddp_process, args=(rank, port, steps, warmup, batch, lr, out)) for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"the DDP run failed (exit codes {[p.exitcode for p in procs]})")
    return out.get()


def main(argv: list[str] | None = None) -> None:
    """One DDP rank on one emulated host (``psfw bench --hosts``): ``--steps`` steps,
    rank 0 printing ``ddp step K`` as each ends, then a barrier."""
    p = argparse.ArgumentParser(prog="python -m psfw.tools.peer_bench")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--master", required=True, help="rank 0's address, HOST:PORT")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args(argv)
    import torch.distributed as dist

    host, port = args.master.rsplit(":", 1)
    with closing(ddp_steps(args.rank, args.world, host, int(port), args.batch, args.lr)) as trained:
        for step in trained:
            if args.rank == 0:
                print(f"ddp step {step}", flush=True)
            if step == args.steps:
                dist.barrier()
                break


if __name__ == "__main__":
    main()
