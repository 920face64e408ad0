"""The Ray actors of a ``psfw ray`` job (``psfw.jobs.ray_run`` places them).

A ``ShardActor`` serves one shard (psfw's gRPC server and link) inside its own
process, on its node's address; a ``WorkerActor`` runs one worker process of the job
against the shards. Ray only places and supervises them: tensors move over psfw's
transports. Everything that crosses Ray is JSON text or plain numbers and strings:
no Python object of psfw's travels pickled.

A shard actor that Ray restarts (its process killed, its node gone) runs its
constructor again: its server starts on the first ``start`` call (the driver's or a
worker's, which ask where it listens),
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
from typing import Any

import ray

from psfw.base.console import StderrHandler
from psfw.base.errors import PsfwError
from psfw.base.security import Security
from psfw.jobs.run_settings import stored_config

NAMESPACE = "psfw"  # the Ray namespace of every psfw job's named actors
LOCATE_TIMEOUT_S = 10.0  # a restarting shard actor answers where it listens within this
STOP_S = 8.0  # a stopped worker process ends within this
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


def _in_config_words(refusal: str) -> str:
    """A shard's refusal to listen off loopback, in the words of ``psfw ray``'s config."""
    if "without TLS" not in refusal:
        return refusal
    first = refusal.split(": ", 1)[0]  # refusing to listen on HOST:0 without TLS
    return (
        f"{first}: give ray.tls_cert and ray.tls_key (and ray.tls_ca, ray.token_file), or set ray.insecure = true "
        "on a private network"
    )


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
                folder = self.settings["checkpoint_dir"]
                if not _sees(marker):
                    self.refusal = f"does not see {marker}"
                elif folder and not Path(folder).parent.is_dir():  # restarted on a node without the shared folder
                    self.refusal = f"does not see the run folder {Path(folder).parent}: nothing to restore from"
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
        """Where the shard listens, as ``start`` says it, but never starting it
        (``address`` empty when it does not serve)."""
        server = self.server
        if server is None:
            return json.dumps({**_node(), "address": ""})
        return json.dumps(
            {
                **_node(),
                "address": server.address,
                "restored_step": server.restored_step,
                "restored_from_shards": server.restored_from_shards or None,
            }
        )

    async def _serve(self) -> None:
        from psfw.services.server import ShardServer

        s = self.settings
        host = s["host"] or ray.util.get_node_ip_address()
        shown = f"[{host}]" if ":" in host else host
        try:  # a refusal is said by the driver, in one line
            security = Security.from_files(s.get("tls_cert"), s.get("tls_key"), None, s.get("token_file"))
            server = ShardServer(
                self.shard, self.shards, insecure=s["insecure"], checkpoint_dir=s["checkpoint_dir"], security=security
            )
            await server.start(f"{shown}:0")
        except PermissionError as err:
            self.refusal = _in_config_words(str(err))
            return
        except (PsfwError, OSError, ValueError) as err:
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
        self.process, self.job, self.text = process, job, config
        self.training: asyncio.Future | None = None  # the run, one at a time
        self.actors: dict[int, Any] = {}  # the shards' actors, once looked up

    def _config(self):
        return stored_config(json.loads(self.text), "config")

    def where(self, marker: str = "") -> str:
        """The node this actor runs on, as JSON (``refused``: it does not see
        ``marker``, a file of the shared folder, or cannot read the job)."""
        refused = "" if _sees(marker) else f"does not see {marker}"
        try:
            self._config()
        except PsfwError as err:
            refused = refused or f"cannot read the job: {err}"
        return json.dumps({**_node(), **({"refused": refused} if refused else {})})

    async def locate(self, shard: int) -> str:
        """Where shard ``shard`` listens now (its actor starts it if Ray restarted it)."""
        actor = self.actors.get(shard)
        if actor is None:
            actor = await asyncio.to_thread(ray.get_actor, actor_name(self.job, shard), NAMESPACE)
            self.actors[shard] = actor  # a restarted actor keeps its handle
        answer = json.loads(await asyncio.wait_for(actor.start.remote(), LOCATE_TIMEOUT_S))
        if "refused" in answer:
            raise RuntimeError(f"shard {shard} cannot start: {answer['refused']}")
        return answer["address"]

    async def run(self, addresses: list[str], run_dir: str | None, resume: bool, security: str) -> str:
        """Train this worker process to the end of the job; returns, as JSON, its
        group's final figures when it evaluates (process 0) and its run folder, or
        ``error``: its one-line failure. A second call while it trains (the driver
        lost sight of the actor for a while) waits for the same run."""
        if self.training is None or self.training.done():
            self.training = asyncio.ensure_future(self._train(addresses, run_dir, resume, json.loads(security)))
        return await asyncio.shield(self.training)

    async def _train(self, addresses: list[str], run_dir: str | None, resume: bool, s: dict) -> str:
        from psfw.jobs.embedded import train_async
        from psfw.runtime.threads import cause_of

        try:
            result = await train_async(
                self._config(),
                run_dir,
                progress=False,
                servers=addresses,
                processes=[self.process],
                resume=resume,
                security=Security.from_files(None, None, s.get("tls_ca"), s.get("token_file")),
                locate=self.locate,
            )
        except PsfwError as err:  # said by the driver; nothing of psfw's crosses Ray pickled
            return json.dumps({"error": str(err)})
        except (OSError, ValueError) as err:
            return json.dumps({"error": f"failed: {cause_of(err)}"})
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
