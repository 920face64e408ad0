"""The peer ``psfw bench`` compares with: PyTorch DDP over gloo, where torch is
installed (an optional extra; psfw never needs it).

The same job as the benchmark's psfw variants: an MLP 784-1024-1024-10 (float32) on
the same synthetic data, global batch 256 split over 2 OS processes of one thread each
(the 2 cores), SGD at the same learning rate. DDP all-reduces the gradients in
buckets while the backward pass runs; every process then applies the same update.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from typing import Any

WORLD = 2


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_process(rank: int, port: int, steps: int, warmup: int, batch: int, lr: float, out: Any) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch import nn

    from psfw.compute.datasets import synthetic

    torch.set_num_threads(1)  # one core each: the best of the settings tried on 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=lr)
        data = synthetic(features=784, classes=10, train=8192, test=256, seed=0)
        x, y = torch.from_numpy(np.asarray(data.x_train)), torch.from_numpy(np.asarray(data.y_train)).long()
        per = batch // WORLD
        loss_fn = nn.CrossEntropyLoss()
        started = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                dist.barrier()
                started = time.perf_counter()
            start = (step * batch + rank * per) % (len(x) - per)
            opt.zero_grad(set_to_none=True)
            loss_fn(ddp(x[start : start + per]), y[start : start + per]).backward()
            opt.step()
        dist.barrier()
        if rank == 0:
            out.put(steps * batch / (time.perf_counter() - started))
    finally:
        dist.destroy_process_group()


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
