"""``psfw ray``: a job's shards and worker processes as Ray actors.

Ray places and supervises; psfw's transports carry the tensors. Every shard and
worker process of the job is one bundle of one placement group, reserved before
anything starts, so a job gets all its places or says which it lacks
(``psfw.jobs.ray_cluster``: reaching Ray, the bundles, what a cluster lacks). Shards are named actors
(``psfw.jobs.ray_actors``): Ray restarts a dead one (``ray.restarts``), it restores
the newest checkpoint of the shared run folder, and the workers ask it where it
listens now. A worker process whose actor dies is restarted and rejoins its group,
as a restarted ``psfw worker --resume`` does.

The run folder, its checkpoints and records are those of ``psfw launch``; on a
cluster of several nodes, every node must see the run folder at the same path (a
shared filesystem): that is checked before training.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from psfw.base.console import say
from psfw.base.errors import PsfwError, UsageError
from psfw.jobs.config import Config
from psfw.jobs.outputs import CHECKPOINTS, new_run_dir
from psfw.jobs.ray_cluster import (
    PROBE_TIMEOUT_S,
    actor_options,
    cause,
    connect,
    first_line,
    get_all,
    get_quietly,
    place,
    probe,
    ray_module,
    refusal,
)
from psfw.jobs.reshard import reshard_for_config
from psfw.jobs.run_dir import check_run_dir, resume_hint
from psfw.jobs.supervisor import shard_checkpoints

log = logging.getLogger("psfw")


STOP_GRACE_S = 5.0
WATCH_EVERY_S = 1.0  # how often the shards are asked whether Ray restarted one


class RayRun(NamedTuple):
    """What ``run`` did: the run folder, process 0's final figures, the steps."""

    run_dir: Path
    summary: str
    steps: int


def train_on_ray(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    config_path: str | Path | None = None,
) -> RayRun:
    """Run the job ``config`` on Ray: on the cluster at ``address`` (``host:port``,
    ``auto``; default: the environment's ``RAY_ADDRESS``, else a Ray instance
    started here for the job).

    Args:
        config: the job (``psfw.load_config``).
        run_dir: the run folder (default: a new one under ``runs/``); on several
            nodes, an absolute path every node sees.
        address: the Ray cluster.
        resume: continue the run in ``run_dir`` from its newest checkpoint (also
            onto another ``cluster.servers``).
        overwrite: clear the run in ``run_dir`` first.
        config_path: the config's file, for the command an interrupted run names.

    Returns:
        A ``RayRun``.

    Raises:
        UsageError: Ray missing, no cluster at ``address``, places the cluster
            cannot give, a run folder some node does not see; one line each.
        PsfwError: a worker process or shard failed (its own line), or died more
            often than ``ray.restarts``.
        KeyboardInterrupt: interrupted; the job was stopped, its shards' final
            checkpoint written (the hint says how to continue).
    """
    ray = ray_module()
    folder = Path(run_dir) if run_dir is not None else None
    earlier = check_run_dir(folder, resume, overwrite=overwrite) if folder is not None else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        probe(address)
    inside = ray.is_initialized()  # called from a program that runs on Ray already: its session
    started_here = False if inside else connect(ray, address, config)
    made = folder is None
    try:
        folder = new_run_dir() if folder is None else folder
        job = Job(config, folder, resume, config_path, started_here)
        job.check_nodes(ray, not made)
        if earlier is not None:
            earlier.clear()
        resharded = reshard_for_config(folder / CHECKPOINTS, config) if resume else None
        if resharded is not None:
            log.warning("%s", resharded.line())
        return job.train(ray)
    except BaseException:
        if made and folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()  # refused before anything was written: leave nothing behind
        raise
    finally:
        if not inside:
            ray.shutdown()  # the end of a Ray instance started here; else this driver's leaving


@dataclass
class Job:
    """One ``psfw ray`` run: its config, run folder and actors."""

    config: Config
    folder: Path
    resume: bool
    config_path: str | Path | None
    started_here: bool
    name: str = ""
    nodes: int = 1
    marker: Path | None = None
    group: Any = None
    shards: list[Any] = field(default_factory=list)
    workers: list[Any] = field(default_factory=list)
    seen: dict[int, dict] = field(default_factory=dict)  # each shard's last answer: where it listens
    lost: dict[str, float] = field(default_factory=dict)  # actors out of reach: since when
    pids: dict[int, int] = field(default_factory=dict)  # each worker process's actor's process

    def check_nodes(self, ray: Any, named: bool) -> None:
        """On several nodes, the run folder must be an absolute path every node sees."""
        self.nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if self.nodes > 1 and named and not self.folder.is_absolute():
            raise UsageError(
                f"--run-dir {self.folder} is relative, and the Ray cluster has {self.nodes} nodes: give an absolute "
                "path on a filesystem every node mounts at the same place (its checkpoints restore restarted shards)"
            )
        self.folder = self.folder.resolve()

    def train(self, ray: Any) -> RayRun:
        from psfw.jobs.ray_actors import ShardActor, WorkerActor

        self.name = f"{self.config.name or 'job'}-{secrets.token_hex(3)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.marker = self.folder / f".psfw-ray-{self.name}"
        self.marker.write_text(self.name)
        try:
            self.group = place(ray, self.config, f"psfw-{self.name}")
            addresses = self._start_shards(ray, ShardActor)
            self._start_workers(ray, WorkerActor)
            self.marker.unlink()  # every node saw it; the run folder holds only the run's files
            outcome = self._watch(ray, addresses)
            print("psfw ray: every worker process finished", flush=True)
            return outcome
        except KeyboardInterrupt:
            self._stop(ray, interrupted=True)
            say(f"psfw ray: interrupted; every actor stopped; {self._resume_hint()}")
            raise
        finally:
            self._stop(ray)
            self.marker.unlink(missing_ok=True)

    def _start_shards(self, ray: Any, actor: Any) -> list[str]:
        from psfw.jobs.ray_actors import NAMESPACE, actor_name

        c, r = self.config.cluster, self.config.ray
        checkpoints = shard_checkpoints(self.config, self.folder, self.resume)
        settings = {
            # a Ray instance started for this job keeps psfw's sockets on loopback
            "host": "127.0.0.1" if self.started_here else None,
            "checkpoint_dir": str(checkpoints) if checkpoints is not None else None,
            "insecure": r.insecure,
            "tls_cert": r.tls_cert,
            "tls_key": r.tls_key,
            "token_file": r.token_file,
        }
        for i in range(c.servers):
            options = actor_options(self.config, self.group, i, r.shard)
            handle = actor.options(name=actor_name(self.name, i), namespace=NAMESPACE, **options).remote(
                i, c.servers, json.dumps(settings)
            )
            self.shards.append(handle)
        answers = get_all(ray, [s.start.remote(str(self.marker)) for s in self.shards], "the shards to start")
        addresses = []
        for i, text in enumerate(answers):
            answer = json.loads(text)
            if "refused" in answer:
                raise UsageError(f"shard {i} on node {answer['ip']} cannot start: {refusal(answer, self.folder)}")
            self.seen[i] = answer
            restored = f", restored step {answer['restored_step']}" if answer.get("restored_step") is not None else ""
            print(
                f"psfw ray: shard {i} on node {answer['ip']} ({answer['node'][:8]}) at {answer['address']}, "
                f"pid {answer['pid']}{restored}",
                flush=True,
            )
            addresses.append(answer["address"])
        return addresses

    def _start_workers(self, ray: Any, actor: Any) -> None:
        c = self.config.cluster
        text = self.config.model_dump_json()
        for p in range(c.worker_groups * c.processes_per_group):
            options = actor_options(self.config, self.group, c.servers + p, self.config.ray.worker)
            self.workers.append(actor.options(**options).remote(p, text, self.name))
        answers = get_all(
            ray, [w.where.remote(str(self.marker)) for w in self.workers], "the worker processes to start"
        )
        for p, text in enumerate(answers):
            answer = json.loads(text)
            if "refused" in answer:
                raise UsageError(
                    f"worker process {p} on node {answer['ip']} cannot start: {refusal(answer, self.folder)}"
                )
            self.pids[p] = answer["pid"]
            print(
                f"psfw ray: worker process {p} on node {answer['ip']} ({answer['node'][:8]}), pid {answer['pid']}",
                flush=True,
            )

    def _work(self, p: int, addresses: list[str], resume: bool) -> Any:
        """Worker process ``p``'s run, from the start or rejoining."""
        c, r = self.config.cluster, self.config.ray
        folder = str(self.folder) if p % c.processes_per_group == 0 else None  # each group's first: its records
        security = json.dumps({"tls_ca": r.tls_ca, "token_file": r.token_file})
        return self.workers[p].run.remote(addresses, folder, resume, security)

    def _watch(self, ray: Any, addresses: list[str]) -> RayRun:
        """Until every worker process finished: rejoin the ones whose actor Ray
        restarted; say where a restarted shard listens now."""
        running = {self._work(p, addresses, self.resume): p for p in range(len(self.workers))}
        later: dict[int, float] = {}  # worker processes to ask again: when
        asked: dict[Any, int] = {}  # where a worker process out of sight runs now: a restart?
        outcome = RayRun(self.folder, "", 0)
        probes: dict[Any, int] = {}
        next_probe = time.monotonic()
        while running or later:
            done, _ = ray.wait(list(running), num_returns=1, timeout=WATCH_EVERY_S) if running else ([], [])
            for ref in done:
                p = running.pop(ref)
                try:
                    answer = json.loads(ray.get(ref))
                except ray.exceptions.RayActorError:
                    # its process or node died (Ray restarts it, and the run asked again
                    # rejoins the group), or it was out of sight a while (the run asked
                    # again is the one that goes on): its pid tells which
                    later[p] = time.monotonic() + WATCH_EVERY_S
                    asked[self.workers[p].where.remote()] = p
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise PsfwError(f"worker process {p}: {cause(err)}") from None
                if "error" in answer:
                    raise PsfwError(f"worker process {p}: {answer['error']}")
                if p == 0:
                    outcome = RayRun(self.folder, answer["summary"], int(answer["steps"]))
            for p, when in list(later.items()):
                if time.monotonic() >= when:
                    del later[p]
                    running[self._work(p, self._addresses(), True)] = p
            self._check_restarts(ray, asked)
            if not done and not running:
                time.sleep(WATCH_EVERY_S / 4)
            if time.monotonic() >= next_probe:
                next_probe = time.monotonic() + WATCH_EVERY_S
                self._check_shards(ray, probes)
        self._last_look(ray, asked)
        return outcome

    def _last_look(self, ray: Any, asked: dict[Any, int]) -> None:
        """Say a restart that the job outran (the workers found the shard, or the
        worker process came back, before the driver's next look)."""
        if asked:
            ray.wait(list(asked), num_returns=len(asked), timeout=PROBE_TIMEOUT_S * 3)
            self._check_restarts(ray, asked)
        try:
            answers = ray.get([s.where.remote() for s in self.shards], timeout=PROBE_TIMEOUT_S * 3)
        except Exception as err:  # a shard out of reach now: its stop says so
            log.debug("last look at the shards: %s", err)
            return
        for i, text in enumerate(answers):
            answer = json.loads(text)
            if answer["address"]:
                self._seen_now(i, answer)

    def _check_restarts(self, ray: Any, asked: dict[Any, int]) -> None:
        """Say each worker process whose actor came back in a new process; one that
        died more often than Ray restarts it ends the job."""
        if not asked:
            return
        done, _ = ray.wait(list(asked), num_returns=len(asked), timeout=0)
        for ref in done:
            p = asked.pop(ref)
            try:
                answer = json.loads(ray.get(ref))
            except ray.exceptions.RayActorError as err:  # not back yet: asked again with its next run
                self._lost(f"worker process {p}", err)
                continue
            self.lost.pop(f"worker process {p}", None)
            if answer["pid"] != self.pids.get(p):
                self.pids[p] = answer["pid"]
                print(
                    f"psfw ray: worker process {p} died; Ray restarted it on node {answer['ip']} "
                    f"({answer['node'][:8]}), pid {answer['pid']}, and it rejoins its group",
                    flush=True,
                )

    def _lost(self, what: str, err: BaseException) -> None:
        """``what``'s actor cannot be reached: Ray restarts it (``ray.restarts``
        times), which may wait for a node with room; past ``ray.place_timeout_s``
        without it, the job ends saying so."""
        now = time.monotonic()
        since = self.lost.setdefault(what, now)
        wait = self.config.ray.place_timeout_s
        if now - since > wait:
            raise PsfwError(
                f"{what} has been gone for {wait:.0f} s (ray.place_timeout_s): Ray did not bring its actor back "
                f"(it restarts one ray.restarts = {self.config.ray.restarts} times, where a node has room): "
                f"{first_line(err)}"
            )

    def _addresses(self) -> list[str]:
        """Where each shard listens now, as the driver last saw it."""
        return [self.seen[i]["address"] for i in range(len(self.shards))]

    def _check_shards(self, ray: Any, probes: dict[Any, int]) -> None:
        """Ask each shard where it listens (one question each at a time); say a
        restart; a shard that died more often than Ray restarts it ends the job."""
        asking = set(probes.values())
        for i, shard in enumerate(self.shards):
            if i not in asking:
                probes[shard.start.remote()] = i
        done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=0)
        for ref in done:
            i = probes.pop(ref)
            try:
                answer = json.loads(ray.get(ref))
            except ray.exceptions.RayActorError as err:  # restarting: asked again next time
                self._lost(f"shard {i}", err)
                continue
            except ray.exceptions.RayTaskError as err:
                raise PsfwError(f"shard {i}: {cause(err)}") from None
            self.lost.pop(f"shard {i}", None)
            if "refused" in answer:
                raise PsfwError(f"shard {i} on node {answer['ip']} cannot start again: {answer['refused']}")
            self._seen_now(i, answer)

    def _seen_now(self, i: int, answer: dict) -> None:
        """Shard ``i`` answered ``answer``: a new process or address is a restart, said once."""
        before = self.seen.get(i, {})
        if answer.get("pid") != before.get("pid") or answer.get("address") != before.get("address"):
            restored = answer.get("restored_step")
            print(
                f"psfw ray: shard {i} restarted on node {answer['ip']} ({answer['node'][:8]}) at "
                f"{answer['address']}, pid {answer['pid']}, "
                + (f"restored step {restored}" if restored is not None else "no checkpoint to restore"),
                flush=True,
            )
            self.seen[i] = answer

    def _stop(self, ray: Any, interrupted: bool = False) -> None:
        """Stop the workers, then the shards (their final checkpoint), then end every
        actor and the placement group. Said once; a second call does nothing."""
        from ray.util.placement_group import remove_placement_group

        if interrupted:
            get_quietly(ray, [w.stop.remote() for w in self.workers], STOP_GRACE_S * 2)
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if not get_quietly(ray, [s.stop.remote(1.0) for s in self.shards], STOP_GRACE_S * 4):
            say(
                f"psfw ray: not every shard stopped within {STOP_GRACE_S * 4:.0f} s; the newest complete checkpoint "
                "may be older than the step the job reached"
            )
        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        self.workers, self.shards = [], []
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None

    def _resume_hint(self) -> str:
        command = ["psfw", "ray", str(self.config_path or "CONFIG"), *self.config.set_flags()]
        command += ["--run-dir", str(self.folder), "--resume"]
        c = self.config
        return resume_hint(shlex.join(command), self.folder / CHECKPOINTS, c.cluster.servers, c.train.checkpoint_every)
