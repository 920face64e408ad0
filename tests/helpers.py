"""Constants and small helpers shared by the tests."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.compute.params import flatten_params
from psfw.jobs.job import build_job
from psfw.protocol.messages import UpdateHeader
from psfw.services import checkpoint

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SGD = json.dumps({"name": "sgd", "learning_rate": 0.1})


def read_params(path: str | Path) -> dict[str, np.ndarray]:
    """The flat parameters (by name) of a run's ``params.safetensors``."""
    from safetensors.numpy import load_file

    return load_file(str(path))


def reference(config, steps: int) -> dict[str, np.ndarray]:
    """Plain training on the whole batch, one jitted step, the same data order."""
    job = build_job(config)
    opt = build_optimizer(config.optimizer.model_dump())
    params = job.model.init(jax.random.PRNGKey(config.seed))
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(lambda p: job.model.loss(p, x, y)[0])(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    order = job.order(0)
    for s in range(steps):
        rows = order.indices(s)
        params, state = step(params, state, job.data.x_train[rows], job.data.y_train[rows])
    flat, _ = flatten_params(params)
    return {n: np.asarray(v) for n, v in flat.items()}


def assert_params_close(actual: dict, expected: dict) -> None:
    """Equal up to float rounding, parameter by parameter."""
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=2e-5, atol=2e-6, err_msg=name)


def data_job(data: dict, steps=5, model=None, **train) -> dict:
    """The settings of a small job on ``data`` (an MLP of 16 units unless ``model``,
    batches of 30, Adam, one group of 2 workers on 2 shards) for parse_config."""
    return {
        "seed": 2,
        "model": model or {"name": "mlp", "hidden": [16]},
        "data": data,
        "train": {"batch_size": 30, "steps": steps, "log_every": 1, **train},
        "optimizer": {"name": "adam", "learning_rate": 0.01},
        "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
    }


def expect4(key) -> tuple[np.dtype, tuple[int, ...]]:
    """What the tests' small shards hold: float32[4] slices."""
    return np.dtype("float32"), (4,)


async def send(client, values: dict, *, step=0, process=0, rows=1, workers_per_group=1, wait_s=5.0, **options):
    """One Update from one worker: ``values`` maps slice indices of parameter "w" to
    its float32[4] gradient sums."""
    header = UpdateHeader(
        group=0,
        step=step,
        process=process,
        workers=1,
        rows=rows,
        workers_per_group=workers_per_group,
        wait_s=wait_s,
        **options,
    )
    return await client.update(header, {("w", index): value for index, value in values.items()}, expect4)


async def contribute(client, process=0, processes=1, grad=1.0, epoch=0):
    """Process ``process``'s Update of step 0 in a group of ``processes`` processes
    of one worker each: every element of slice w[0]'s gradient is ``grad``."""
    values = {0: np.full(4, grad, np.float32)}
    return await send(
        client, values, process=process, workers_per_group=processes, group_processes=processes, epoch=epoch
    )


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shm_region(*sizes: int):
    """A process's shared-memory region for one float32 parameter ``w`` cut into
    slices of ``sizes`` elements, all on shard 0 (the caller releases it)."""
    from psfw.protocol.layout import Layout, ParamSpec, SliceSpec
    from psfw.runtime.step_region import StepRegion

    bounds = np.cumsum((0, *sizes)).tolist()
    slices = tuple(SliceSpec("w", i, a, b, 0) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])))
    layout = Layout({"w": ParamSpec("w", (bounds[-1],), "float32", 0, slices)}, 1)
    return StepRegion(layout).acquire()


def link_calls(server, monkeypatch) -> list[tuple[str, str]]:
    """The calls a shard's link hands to its request core from now on, as (method,
    peer) pairs: the link's only way in (gRPC calls the core's verbs directly), so
    what is listed came over the link; the core serves them as it would anyway."""
    calls = []
    answer = server.requests.answer

    async def served(method, payloads, peer):
        calls.append((method, peer))
        return await answer(method, payloads, peer)

    monkeypatch.setattr(server.requests, "answer", served)
    return calls


def psfw_command(capsys, *args) -> subprocess.CompletedProcess:
    """``psfw ARGS`` run in this process (``psfw.cli.main.main``), as a shell would see
    it: the exit status (argparse's exits included) and what it wrote to stdout and
    stderr, its log lines with them: while it runs, the command's own log handler
    stands in for pytest's, as it does in a process of its own."""
    from psfw.cli.main import main

    argv = [str(a) for a in args]
    root, psfw_log = logging.getLogger(), logging.getLogger("psfw")
    handlers, level, psfw_level = root.handlers[:], root.level, psfw_log.level
    for handler in handlers:  # main's logging.basicConfig installs its handler on a bare root only
        root.removeHandler(handler)
    capsys.readouterr()  # what the test wrote before is not the command's
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse: --help, --version, a flag it refuses
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
        psfw_log.setLevel(psfw_level)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["psfw", *argv], code, out, err)


# -- the processes of the kill-and-restart tests (test_kills, test_table_recovery) --

_PSFW = [sys.executable, "-m", "psfw.cli"]
_UNBUFFERED = {**os.environ, "PYTHONUNBUFFERED": "1"}


def recovery_job(path, *, steps, workers=3, per_process=3, every=7, wait_s=60):
    """The job of the recovery tests (an MLP on the digits, Adam, 2 shards, a
    checkpoint every ``every`` steps), written to ``path``."""
    path.write_text(
        f"""
seed = 2
[model]
hidden = [32]
[train]
batch_size = 50
steps = {steps}
log_every = 1
checkpoint_every = {every}
wait_s = {wait_s}
retries = 3
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
workers_per_group = {workers}
workers_per_process = {per_process}
servers = 2
slice_bytes = 4096
"""
    )
    return path


def wait_for_step(proc, step: int, prefix: str = "", timeout_s: float = 180) -> None:
    """Read the process's log until it reports ``step``."""
    deadline = time.monotonic() + timeout_s
    pattern = f"{prefix}group 0 step {step} "
    for line in proc.stdout:
        if line.startswith(pattern):
            return
        assert time.monotonic() < deadline, f"no step {step} within {timeout_s} s"
    raise AssertionError(f"the process ended before step {step}")


def kill_and_resume(config_path, run_dir, kill_at: int) -> None:
    """``psfw train`` killed (SIGKILL) once it reports ``kill_at``, then resumed to the end."""
    with subprocess.Popen(
        [*_PSFW, "train", str(config_path), "--run-dir", str(run_dir), "--no-progress"],
        stdout=subprocess.PIPE,
        text=True,
        env=_UNBUFFERED,
    ) as proc:
        wait_for_step(proc, kill_at)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert not (run_dir / "params.safetensors").exists(), f"the run finished before the kill at step {kill_at}"
    saved = checkpoint.complete_steps(run_dir / "checkpoints", 2)
    assert saved and saved[-1] >= 7, saved
    done = subprocess.run(
        [*_PSFW, "train", str(config_path), "--run-dir", str(run_dir), "--no-progress", "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def free_ports(count: int) -> list[int]:
    """``count`` different ports of 127.0.0.1 that nothing listens on (now)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_shard(index: int, port: int, folder, grace: float = 0) -> subprocess.Popen:
    """``psfw server`` shard ``index`` of 2; ``grace``: seconds its stop gives in-flight RPCs."""
    proc = subprocess.Popen(
        [*_PSFW, "server", "--shard", str(index), "--of", "2", "--listen", f"127.0.0.1:{port}", "--grace", str(grace)]
        + ["--checkpoint-dir", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
        env=_UNBUFFERED,
    )
    assert "listening on" in proc.stdout.readline()
    return proc


def start_worker(config_path, process: int, addresses: list[str], run_dir, resume=False) -> subprocess.Popen:
    """A ``psfw worker``; ``resume``: a restarted process, which continues the job."""
    return subprocess.Popen(
        [*_PSFW, "worker", str(config_path), "--process", str(process), "--servers", ",".join(addresses)]
        + ["--run-dir", str(run_dir)]
        + (["--resume"] if resume else []),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_UNBUFFERED,
    )


def stop_all(procs) -> None:
    """Stop ``procs`` (SIGTERM, then SIGKILL after 30 s) and close their pipes."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()
