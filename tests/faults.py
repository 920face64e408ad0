"""``python tests/faults.py KIND psfw-arguments...``: the ``psfw`` command with one
fault injected where no input can cause one: ``shard`` (the shard's update raises
at its third step), ``stub`` (the stub's reading of the next step's table ids raises
StopIteration, in a thread, at step 2), ``worker`` (worker 1's step raises
StopIteration in its thread). Used by tests/test_stops.py."""

import sys

from psfw.cli.main import entry


def shard() -> None:
    from psfw.services.rounds import ShardRounds

    applied = ShardRounds._run_kernel
    calls = [0]

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] >= 3:
            raise RuntimeError("an injected fault in the shard's update")
        return applied(self, *args, **kwargs)

    ShardRounds._run_kernel = failing


def worker() -> None:
    from psfw.runtime import worker

    compute = worker._compute

    def failing(spec, index, values, rows):
        if spec.order.group == 0 and index == 1:
            next(iter({}))  # StopIteration, in the worker's thread
        return compute(spec, index, values, rows)

    worker._compute = failing


def stub() -> None:
    from psfw.runtime.table_feed import TableFeed

    original = TableFeed.headers

    def headers(self, header, step, *args, **kwargs):
        if step >= 2:
            raise StopIteration
        return original(self, header, step, *args, **kwargs)

    TableFeed.headers = headers


if __name__ == "__main__":
    {"shard": shard, "stub": stub, "worker": worker}[sys.argv[1]]()
    sys.argv[1:] = sys.argv[2:]
    entry()
