"""Reaching a Ray cluster for ``psfw ray`` (``psfw.jobs.ray_run``): Ray itself (or
one line naming the extra), a quick probe of ``--address``, joining a cluster or
starting an instance sized for the job (psfw keeps its own Ctrl-C), the job's
placement-group bundles and, in words, what a cluster lacks for them; and the psfw
jobs a cluster runs (``psfw status --ray``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from psfw.base.errors import PsfwError, UsageError
from psfw.jobs.config import Config

log = logging.getLogger("psfw")

PROBE_TIMEOUT_S = 3.0  # an --address where nothing answers is said within this
START_TIMEOUT_S = 180.0  # shards start (a checkpoint loads) and workers are placed within this
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD", "strict_pack": "STRICT_PACK", "strict_spread": "STRICT_SPREAD"}


def ray_module():
    """Ray, or one line that says how to get it."""
    # read when Ray is imported: every worker's progress line, not "repeated 64x"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise UsageError('Ray is not installed: pip install "psfw[ray]"') from None
    return ray


def probe(address: str) -> None:
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


def connect(ray: Any, address: str | None, config: Config | None) -> bool:
    """Join the cluster at ``address``, else start a Ray instance here sized for the
    job (its CPUs and custom resources are logical: it may ask more CPUs than the
    machine has, as ``psfw launch`` runs more processes than cores). Returns whether
    the instance was started here."""
    options: dict[str, Any] = {"namespace": namespace(), "logging_level": logging.WARNING, "log_to_driver": True}
    with own_signals():
        return init_ray(ray, address, config, options)


@contextlib.contextmanager
def own_signals():
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


def init_ray(ray: Any, address: str | None, config: Config | None, options: dict[str, Any]) -> bool:
    try:
        if address or config is None:
            ray.init(address=address, **options)
            return False
        need = needs(config)
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


def namespace() -> str:
    from psfw.jobs.ray_actors import NAMESPACE

    return NAMESPACE


def needs(config: Config) -> dict[str, float]:
    """The resources of every bundle of the job, summed."""
    total: dict[str, float] = {}
    for bundle in job_bundles(config):
        for key, value in bundle.items():
            total[key] = total.get(key, 0.0) + value
    return total


def job_bundles(config: Config) -> list[dict[str, float]]:
    """One bundle per shard, then one per worker process."""
    c = config.cluster
    return [config.ray.shard.bundle() for _ in range(c.servers)] + [
        config.ray.worker.bundle() for _ in range(c.worker_groups * c.processes_per_group)
    ]


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def missing(ray: Any, config: Config, bundles: list[dict[str, float]]) -> str:
    """What the cluster lacks for ``bundles``, in words."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    need = needs(config)
    for key, value in need.items():
        if totals.get(key, 0.0) < value:
            return f"the job needs {amount(key, value)} in all, the cluster has {amount(key, totals.get(key, 0.0))}"
    kinds = [("shard", config.ray.shard.bundle()), ("worker process", config.ray.worker.bundle())]
    for what, bundle in kinds:
        if not any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in bundle.items()) for n in nodes):
            wanted = ", ".join(amount(k, v) for k, v in bundle.items())
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


def amount(key: str, value: float) -> str:
    if key == "memory":
        return f"{value / 2**30:.1f} GiB of memory"
    shown = f"{value:g}"
    return {"CPU": f"{shown} CPUs", "GPU": f"{shown} GPUs"}.get(key, f"{shown} of {key}")


def place(ray: Any, config: Config, name: str) -> Any:
    """The job's placement group (one bundle per shard, then per worker process),
    ready; one line naming what is missing when the cluster cannot give it within
    ``ray.place_timeout_s``."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = job_bundles(config)
    group = placement_group(bundles, strategy=PLACEMENTS[config.cluster.placement], name=name)
    wait = config.ray.place_timeout_s
    ready, _ = ray.wait([group.ready()], timeout=wait)
    if not ready:
        why = missing(ray, config, bundles)
        remove_placement_group(group)
        raise UsageError(f"Ray cannot place the job within {wait:.0f} s (ray.place_timeout_s): {why}")
    return group


def get_all(ray: Any, refs: list[Any], what: str) -> list[Any]:
    try:
        return ray.get(refs, timeout=START_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise PsfwError(f"Ray did not start {what} within {START_TIMEOUT_S:.0f} s") from None
    except ray.exceptions.RayTaskError as err:
        raise PsfwError(f"{what.removeprefix('the ')}: {cause(err)}") from None
    except ray.exceptions.RayActorError as err:
        raise PsfwError(f"{what.removeprefix('the ')}: an actor died: {first_line(err)}") from None


def get_quietly(ray: Any, refs: list[Any], timeout: float) -> bool:
    """Whether every call of ``refs`` ended within ``timeout`` (an actor already gone
    counts as ended: nothing left to stop)."""
    try:
        ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return False
    except Exception as err:
        log.debug("stopping: %s", err)
    return True


def cause(err: Any) -> str:
    """The worker's own one-line error inside Ray's task error."""
    cause = getattr(err, "cause", None)
    return first_line(cause if cause is not None else err)


def actor_options(config: Config, group: Any, index: int, wants: Any) -> dict[str, Any]:
    """The Ray options of the actor in bundle ``index`` of the placement group
    ``group``, reserving ``wants`` (``[ray.shard]`` or ``[ray.worker]``)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "num_cpus": wants.num_cpus,
        "num_gpus": wants.num_gpus,
        **({"memory": wants.memory} if wants.memory else {}),
        **({"resources": dict(wants.resources)} if wants.resources else {}),
        "max_restarts": config.ray.restarts,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index),
    }


def refusal(answer: dict, folder: Path) -> str:
    """An actor's refusal to start, in words: a run folder its node does not see."""
    if answer["refused"].startswith("does not see"):
        return (
            f"the run folder {folder} is not shared: this node does not see it. Put it on a filesystem every node "
            "mounts at the same path (its checkpoints restore restarted shards)"
        )
    return answer["refused"]


def ray_jobs(address: str) -> dict[str, list[str | None]]:
    """The psfw jobs running on the Ray cluster at ``address``: each job's shard
    addresses in shard order, None for a shard that does not answer now (between
    restarts) (``psfw status --ray``)."""
    ray = ray_module()
    from psfw.jobs.ray_actors import NAMESPACE

    if address != "auto":
        probe(address)
    connect(ray, address, None)
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
                    log.info("shard %d of %s does not answer: %s", i, job, first_line(err))
                    answers[i] = None
            found[job] = [answers.get(i) for i in range(max(refs) + 1)]
        return found
    finally:
        ray.shutdown()
