"""The Ray actors of a ``psfw ray`` job (``psfw.jobs.ray_run`` places them).

A ``ShardActor`` serves one shard (psfw's gRPC server and link) inside its own
process, on its node's address; a ``WorkerActor`` runs one worker process of the job
against the shards. Ray only places and supervises them: tensors move over psfw's
transports. Everything that crosses Ray is JSON text or plain numbers and strings:
no Python object of psfw's travels pickled.

A shard actor that Ray restarts (its process killed, its node gone) runs its
constructor again: its server starts on the first call that asks where it listens,
restoring the newest complete checkpoint of the shared checkpoint folder, on a new
port. Workers ask the named actor (``actor_name``) where a shard listens whenever it
cannot be reached (``psfw.runtime.grpc_channel``'s ``locate``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import ray

from psfw.base.console import StderrHandler
from psfw.base.security import Security
from psfw.jobs.run_settings import stored_config

NAMESPACE = "psfw"  # the Ray namespace of every psfw job's named actors
LOCATE_TIMEOUT_S = 10.0
STOP_S = (
    8.0  # a stopped worker process ends within this  # a restarting shard actor answers where it listens within this
)
log = logging.getLogger("psfw")


def actor_name(job: str, shard: int) -> str:
    """The Ray name of shard ``shard`` of the psfw job ``job``."""
    return f"{job}-shard-{shard}"


def _node() -> dict[str, str]:
    context = ray.get_runtime_context()
    return {"node": context.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}


def _psfw_logs() -> None:
    """psfw's notes (transports, restores, moves) on the actor's stderr, which Ray
    shows on the driver's terminal behind the actor's name, as ``psfw worker`` shows
    them."""
    logger = logging.getLogger("psfw")
    if not logger.handlers:
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _sees(marker: str) -> bool:
    return not marker or Path(marker).is_file()


@ray.remote
class ShardActor:
    """Shard ``shard`` of ``shards``: ``settings`` is JSON (``host``: where to listen,
    None: the node's address; ``checkpoint_dir``; ``insecure``; ``tls_cert``,
    ``tls_key``, ``token_file``; ``grace``)."""

    def __init__(self, shard: int, shards: int, settings: str):
        _psfw_logs()
        self.shard, self.shards = shard, shards
        self.settings = json.loads(settings)
        self.server = None
        self.starting = asyncio.Lock()
        self.refusal = ""

    async def start(self, marker: str = "") -> str:
        """Start the shard unless it runs; returns where it listens, as JSON
        (``address``, ``ip``, ``node``, ``pid``, ``restored_step``,
        ``restored_from_shards``; ``refused``: why it cannot start). ``marker``: a
        file of the shared folder that this node must see."""
        async with self.starting:
            if self.server is None and not self.refusal:
                if not _sees(marker):
                    self.refusal = f"does not see {marker}"
                else:
                    await self._serve()
        if self.refusal:
            return json.dumps({**_node(), "refused": self.refusal})
        server = self.server
        return json.dumps(
            {
                **_node(),
                "address": server.address,
                "restored_step": server.restored_step,
                "restored_from_shards": server.restored_from_shards or None,
            }
        )

    def where(self) -> str:
        """Where the shard listens, as JSON; never starts it (``address`` empty when
        it does not serve)."""
        server = self.server
        return json.dumps({**_node(), "address": server.address if server is not None else ""})

    async def _serve(self) -> None:
        from psfw.services.server import ShardServer

        s = self.settings
        host = s["host"] or ray.util.get_node_ip_address()
        security = Security.from_files(s.get("tls_cert"), s.get("tls_key"), None, s.get("token_file"))
        server = ShardServer(
            self.shard, self.shards, insecure=s["insecure"], checkpoint_dir=s["checkpoint_dir"], security=security
        )
        shown = f"[{host}]" if ":" in host else host
        try:
            await server.start(f"{shown}:0")
        except (PermissionError, OSError, ValueError) as err:
            self.refusal = str(err)
            return
        self.server = server

    async def stop(self, grace: float) -> bool:
        """Stop serving (in-flight calls get ``grace`` seconds; the final checkpoint
        is written); whether it was serving."""
        server, self.server = self.server, None
        if server is None:
            return False
        await server.stop(grace)
        return True


@ray.remote
class WorkerActor:
    """Worker process ``process`` of the job ``config`` (the config's JSON), its
    shards the named actors of ``job``."""

    def __init__(self, process: int, config: str, job: str):
        _psfw_logs()
        self.process, self.job = process, job
        self.config = stored_config(json.loads(config), "config")
        self.training: asyncio.Task | None = None

    def where(self, marker: str = "") -> str:
        """The node this actor runs on, as JSON (``refused``: it does not see
        ``marker``, a file of the shared folder)."""
        return json.dumps({**_node(), **({} if _sees(marker) else {"refused": f"does not see {marker}"})})

    async def locate(self, shard: int) -> str:
        """Where shard ``shard`` listens now (its actor starts it if Ray restarted it)."""
        actor = await asyncio.to_thread(ray.get_actor, actor_name(self.job, shard), NAMESPACE)
        answer = json.loads(await asyncio.wait_for(actor.start.remote(), LOCATE_TIMEOUT_S))
        if "refused" in answer:
            raise RuntimeError(f"shard {shard} cannot start: {answer['refused']}")
        return answer["address"]

    async def run(self, addresses: list[str], run_dir: str | None, resume: bool, security: str) -> str:
        """Train this worker process to the end of the job; returns, as JSON, its
        group's final figures when it evaluates (process 0) and its run folder."""
        from psfw.jobs.embedded import train_async

        s = json.loads(security)
        self.training = asyncio.current_task()
        result = await train_async(
            self.config,
            run_dir,
            progress=False,
            servers=addresses,
            processes=[self.process],
            resume=resume,
            security=Security.from_files(None, None, s.get("tls_ca"), s.get("token_file")),
            locate=self.locate,
        )
        self.training = None
        folder = str(result.run_dir) if result.run_dir is not None else None
        summary = result.summary() if self.process == 0 else ""
        return json.dumps({"summary": summary, "run_dir": folder, "steps": result.steps})

    async def stop(self) -> bool:
        """Stop training as ``psfw worker`` does on a signal: the Updates on their way
        reach every shard first. Whether it was training."""
        task = self.training
        if task is None or task.done():
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_S)
        return True
