"""``psfw ray``: a job's shards and worker processes as Ray actors.

Ray places and supervises; psfw's transports carry the tensors. Every shard and
worker process of the job is one bundle of one placement group, reserved before
anything starts, so a job gets all its places or says which it lacks
(``cluster.placement``: pack, spread, strict_pack, strict_spread; ``[ray.shard]``
and ``[ray.worker]``: what each reserves). Shards are named actors
(``psfw.jobs.ray_actors``): Ray restarts a dead one (``ray.restarts``), it restores
the newest checkpoint of the shared run folder, and the workers ask it where it
listens now. A worker process whose actor dies is restarted and rejoins its group,
as a restarted ``psfw worker --resume`` does.

The run folder, its checkpoints and records are those of ``psfw launch``; on a
cluster of several nodes, every node must see the run folder at the same path (a
shared filesystem): that is checked before training.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from psfw.base.console import say
from psfw.base.errors import PsfwError, UsageError
from psfw.jobs.config import Config
from psfw.jobs.outputs import CHECKPOINTS, new_run_dir
from psfw.jobs.reshard import reshard_for_config
from psfw.jobs.run_dir import check_run_dir, resume_hint
from psfw.jobs.supervisor import shard_checkpoints

log = logging.getLogger("psfw")

PROBE_TIMEOUT_S = 3.0  # an --address where nothing answers is said within this
START_TIMEOUT_S = 180.0  # shards start (a checkpoint loads) and workers are placed within this
STOP_GRACE_S = 5.0
WATCH_EVERY_S = 1.0  # how often the shards are asked whether Ray restarted one
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}


class RayRun(NamedTuple):
    """What ``run`` did: the run folder, process 0's final figures, the steps."""

    run_dir: Path
    summary: str
    steps: int


def ray_module():
    """Ray, or one line that says how to get it."""
    # read when Ray is imported: every worker's progress line, not "repeated 64x"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise UsageError('Ray is not installed: pip install "psfw[ray]"') from None
    return ray


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
        _probe(address)
    inside = ray.is_initialized()  # called from a program that runs on Ray already: its session
    started_here = False if inside else _connect(ray, address, config)
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


def _probe(address: str) -> None:
    """One line within seconds where nothing listens at ``address`` (Ray itself
    would retry for a long time)."""
    host, _, port = address.rpartition(":")
    if host.startswith("ray://"):
        return  # Ray Client: its own protocol
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            pass
    except ValueError:
        raise UsageError(
            f"--address {address}: give the Ray cluster's head as HOST:PORT (port 6379 by default)"
        ) from None
    except OSError as err:
        raise UsageError(
            f"no Ray cluster answers at {address} ({err.strerror or err}): start one with `ray start --head`, "
            "or leave --address out to run the job on a Ray instance started here"
        ) from None


def _connect(ray: Any, address: str | None, config: Config | None) -> bool:
    """Join the cluster at ``address``, else start a Ray instance here sized for the
    job (its CPUs and custom resources are logical: it may ask more CPUs than the
    machine has, as ``psfw launch`` runs more processes than cores). Returns whether
    the instance was started here."""
    options: dict[str, Any] = {"namespace": _namespace(), "logging_level": logging.WARNING, "log_to_driver": True}
    with _own_signals():
        return _init(ray, address, config, options)


@contextlib.contextmanager
def _own_signals():
    """Keep this process's Ctrl-C and SIGTERM handling: Ray's core installs handlers
    of its own when it starts, which end the driver at once, leaving the job's
    shards no graceful stop."""
    main = threading.current_thread() is threading.main_thread()
    kept = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            if handler is not None:
                signal.signal(sig, handler)


def _init(ray: Any, address: str | None, config: Config | None, options: dict[str, Any]) -> bool:
    try:
        if address or config is None:
            ray.init(address=address, **options)
            return False
        need = _needs(config)
        custom = {k: v for k, v in need.items() if k not in ("CPU", "GPU", "memory")}
        ray.init(
            address="local",  # a new instance, never a cluster left running on this machine
            num_cpus=max(os.cpu_count() or 1, int(-(-need.get("CPU", 0) // 1))),
            resources=custom or None,
            include_dashboard=False,
            **options,
        )
        return True
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"the Ray cluster at {address}" if address else "a Ray instance here"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = (
            " (a cluster with token authentication needs its token: RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
            if "auth" in str(err).lower()
            else ""
        )
        raise UsageError(f"cannot join {where}: {first}{hint}") from None


def _namespace() -> str:
    from psfw.jobs.ray_actors import NAMESPACE

    return NAMESPACE


def _needs(config: Config) -> dict[str, float]:
    """The resources of every bundle of the job, summed."""
    total: dict[str, float] = {}
    for bundle in _bundles(config):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def _bundles(config: Config) -> list[dict[str, float]]:
    """One bundle per shard, then one per worker process."""
    c = config.cluster
    return [config.ray.shard.bundle() for _ in range(c.servers)] + [
        config.ray.worker.bundle() for _ in range(c.worker_groups * c.processes_per_group)
    ]


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
            self.group = self._place(ray)
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

    def _place(self, ray: Any) -> Any:
        """The job's placement group, ready; one line naming what is missing when the
        cluster cannot give it within ``ray.place_timeout_s``."""
        from ray.util.placement_group import placement_group, remove_placement_group

        bundles = _bundles(self.config)
        strategy = PLACEMENTS[self.config.cluster.placement]
        group = placement_group(bundles, strategy=strategy, name=f"psfw-{self.name}")
        wait = self.config.ray.place_timeout_s
        ready, _ = ray.wait([group.ready()], timeout=wait)
        if not ready:
            why = _missing(ray, self.config, bundles)
            remove_placement_group(group)
            raise UsageError(f"Ray cannot place the job within {wait:.0f} s (ray.place_timeout_s): {why}")
        return group

    def _options(self, ray: Any, index: int, wants: Any) -> dict[str, Any]:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {
            "num_cpus": wants.num_cpus,
            "num_gpus": wants.num_gpus,
            **({"memory": wants.memory} if wants.memory else {}),
            **({"resources": dict(wants.resources)} if wants.resources else {}),
            "max_restarts": self.config.ray.restarts,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        }

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
            options = self._options(ray, i, r.shard)
            handle = actor.options(name=actor_name(self.name, i), namespace=NAMESPACE, **options).remote(
                i, c.servers, json.dumps(settings)
            )
            self.shards.append(handle)
        answers = _get(ray, [s.start.remote(str(self.marker)) for s in self.shards], "the shards to start")
        addresses = []
        for i, text in enumerate(answers):
            answer = json.loads(text)
            if "refused" in answer:
                raise UsageError(f"shard {i} on node {answer['ip']} cannot start: {_refusal(answer, self.folder)}")
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
            options = self._options(ray, c.servers + p, self.config.ray.worker)
            self.workers.append(actor.options(**options).remote(p, text, self.name))
        answers = _get(ray, [w.where.remote(str(self.marker)) for w in self.workers], "the worker processes to start")
        for p, text in enumerate(answers):
            answer = json.loads(text)
            if "refused" in answer:
                raise UsageError(
                    f"worker process {p} on node {answer['ip']} cannot start: {_refusal(answer, self.folder)}"
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
                    raise PsfwError(f"worker process {p}: {_cause(err)}") from None
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
                f"{_first_line(err)}"
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
                raise PsfwError(f"shard {i}: {_cause(err)}") from None
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
            _get_quietly(ray, [w.stop.remote() for w in self.workers], STOP_GRACE_S * 2)
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        if not _get_quietly(ray, [s.stop.remote(1.0) for s in self.shards], STOP_GRACE_S * 4):
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


def _get(ray: Any, refs: list[Any], what: str) -> list[Any]:
    try:
        return ray.get(refs, timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise PsfwError(f"Ray did not start {what} within {START_TIMEOUT_S:.0f} s") from None
    except ray.exceptions.RayTaskError as err:
        raise PsfwError(f"{what.removeprefix('the ')}: {_cause(err)}") from None
    except ray.exceptions.RayActorError as err:
        raise PsfwError(f"{what.removeprefix('the ')}: an actor died: {_first_line(err)}") from None


def _get_quietly(ray: Any, refs: list[Any], timeout: float) -> bool:
    """Whether every call of ``refs`` ended within ``timeout`` (an actor already gone
    counts as ended: nothing left to stop)."""
    try:
        ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return False
    except Exception as err:
        log.debug("stopping: %s", err)
    return True


def _cause(err: Any) -> str:
    """The worker's own one-line error inside Ray's task error."""
    cause = getattr(err, "cause", None)
    return _first_line(cause if cause is not None else err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _refusal(answer: dict, folder: Path) -> str:
    if answer["refused"].startswith("does not see"):
        return (
            f"the run folder {folder} is not shared: this node does not see it. Put it on a filesystem every node "
            "mounts at the same path (its checkpoints restore restarted shards)"
        )
    return answer["refused"]


def _missing(ray: Any, config: Config, bundles: list[dict[str, float]]) -> str:
    """What the cluster lacks for ``bundles``, in words."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    need = _needs(config)
    for key, value in need.items():
        if totals.get(key, 0.0) < value:
            return f"the job needs {_amount(key, value)} in all, the cluster has {_amount(key, totals.get(key, 0.0))}"
    kinds = [("shard", config.ray.shard.bundle()), ("worker process", config.ray.worker.bundle())]
    for what, bundle in kinds:
        if not any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
            wanted = ", ".join(_amount(k, v) for k, v in bundle.items())
            return f"a {what} needs {wanted} on one node, and no node has that much"
    placement = config.cluster.placement
    smallest = min(bundles, key=lambda b: sum(b.values()))
    holding = [n for n in nodes if all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in smallest.items())]
    if placement == "strict_spread" and len(bundles) > len(holding):
        return (
            f"cluster.placement = strict_spread puts each of the {len(bundles)} shards and worker processes on a "
            f"node of its own, and the cluster has {len(holding)} nodes that can hold one"
        )
    if placement == "strict_pack":
        return "cluster.placement = strict_pack puts the whole job on one node, and no node has room for all of it"
    return "the cluster's free resources do not hold the job now (other jobs hold some): wait, or ask for less"


def _amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.1f} GiB of memory"
    shown = f"{value:g}"
    return {"CPU": f"{shown} CPUs", "GPU": f"{shown} GPUs"}.get(key, f"{shown} of {key}")


def ray_jobs(address: str) -> dict[str, list[str | None]]:
    """The psfw jobs running on the Ray cluster at ``address``: each job's shard
    addresses in shard order, None for a shard that does not answer now (between
    restarts) (``psfw status --ray``)."""
    ray = ray_module()
    from psfw.jobs.ray_actors import NAMESPACE

    if address != "auto":
        _probe(address)
    _connect(ray, address, None)
    try:
        named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        shards: dict[str, dict[int, Any]] = {}
        for name in named:
            job, _, index = name.rpartition("-shard-")
            if job and index.isdigit():
                shards.setdefault(job, {})[int(index)] = ray.get_actor(name, NAMESPACE).where.remote()
        found: dict[str, list[str | None]] = {}
        for job, refs in sorted(shards.items()):
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S * 3)
            answers = {}
            for i, ref in refs.items():
                try:
                    answers[i] = json.loads(ray.get(ref))["address"] or None if ref in ready else None
                except Exception as err:  # an actor between restarts: shown as not answering
                    log.info("shard %d of %s does not answer: %s", i, job, _first_line(err))
                    answers[i] = None
            found[job] = [answers.get(i) for i in range(max(refs) + 1)]
        return found
    finally:
        ray.shutdown()
