"""``psfw launch`` when a worker process ends: a failed one is started again where
the config says ``cluster.restart``, its group is left out where groups may leave
(``cluster.group_timeout_s``; never group 0), and otherwise every process stops, as
when a shard ends. The children are stand-ins: no process starts."""

import asyncio
import signal

import pytest

from psfw.jobs.config import parse_config

pytestmark = pytest.mark.unit


class FakeProcess:
    """What ``psfw launch`` watches of a child: its end (``end``), a stop, a kill."""

    def __init__(self) -> None:
        self.returncode = None
        self._ended = asyncio.Event()

    async def wait(self) -> int:
        await self._ended.wait()
        return self.returncode

    def end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._ended.set()

    def terminate(self) -> None:
        self.end(-signal.SIGTERM)

    def kill(self) -> None:
        self.end(-signal.SIGKILL)


def _child(name: str, process: int = -1):
    from psfw.jobs.children import Tail
    from psfw.jobs.supervisor import Child

    args = None if process < 0 else ["worker", "job.toml", "--process", str(process)]
    return Child(name, FakeProcess(), Tail(name), args=args, process=process)


async def _launch_watch(monkeypatch, cluster: dict, events) -> tuple[int | None, list]:
    """``psfw launch``'s watch over a shard and the worker processes of ``cluster``
    (one per group) while ``events(workers, started)`` ends them; returns its exit
    code and the children it started again."""
    from psfw.jobs import supervisor

    started = []

    async def spawn(name, args, echo=True):
        started.append(_child(name, int(args[args.index("--process") + 1])))
        started[-1].args = args
        return started[-1]

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    config = parse_config({"cluster": {"workers_per_group": 1, "workers_per_process": 1, **cluster}})
    shard = _child("shard 0")
    workers = [_child(f"worker {p}", p) for p in range(config.cluster.worker_groups)]
    watch = supervisor._Watch(config, [shard, *workers], [shard], workers)
    running = asyncio.create_task(watch.until_done(asyncio.Event()))
    await events(workers, started)
    return await asyncio.wait_for(running, 10), started


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_launch_starts_a_dead_worker_process_again_where_the_config_says_restart(monkeypatch, capsys):
    async def events(workers, started):
        workers[1].proc.end(-signal.SIGKILL)
        await _settle()
        assert [c.args[-1] for c in started] == ["--resume"], "it rejoins its group"
        started[0].proc.end(0)
        workers[0].proc.end(0)

    code, _ = await _launch_watch(monkeypatch, {"worker_groups": 2, "restart": True}, events)
    assert code == 0
    assert "psfw launch: worker 1 was killed by SIGKILL; starting it again (1 of 3): it rejoins its group" in (
        capsys.readouterr().err
    )


@pytest.mark.asyncio
async def test_launch_stops_after_the_last_restart(monkeypatch, capsys):
    async def events(workers, started):
        workers[1].proc.end(1)
        for again in range(3):
            await _settle()
            started[again].proc.end(1)

    code, started = await _launch_watch(monkeypatch, {"worker_groups": 2, "restart": True}, events)
    assert code == 1 and len(started) == 3
    assert capsys.readouterr().err.splitlines()[-1] == "psfw launch: worker 1 exited with code 1; stopping the others"


@pytest.mark.asyncio
async def test_launch_leaves_a_dead_group_out_where_groups_may_leave(monkeypatch, capsys):
    async def events(workers, started):
        workers[2].proc.end(-signal.SIGKILL)
        await _settle()
        workers[0].proc.end(0)
        workers[1].proc.end(0)

    code, started = await _launch_watch(monkeypatch, {"worker_groups": 3, "group_timeout_s": 5}, events)
    assert code == 0 and not started
    assert "worker 2 was killed by SIGKILL; group 2 leaves the job and the others go on" in capsys.readouterr().err


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("cluster", "dies"),
    [({"worker_groups": 2}, 1), ({"worker_groups": 2, "group_timeout_s": 5}, 0)],
    ids=["by default", "group 0, which evaluates"],
)
async def test_launch_stops_every_process_when_a_group_may_not_leave(monkeypatch, capsys, cluster, dies):
    async def events(workers, started):
        workers[dies].proc.end(-signal.SIGKILL)

    code, started = await _launch_watch(monkeypatch, cluster, events)
    assert code == 1 and not started
    assert f"worker {dies} was killed by SIGKILL; stopping the others" in capsys.readouterr().err
