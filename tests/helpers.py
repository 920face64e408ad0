"""Constants and small helpers shared by the tests."""

import json
import logging
import socket
import subprocess
from pathlib import Path

import jax
import numpy as np
import optax

from psfw.compute.optimizers import build_optimizer
from psfw.compute.params import flatten_params
from psfw.jobs.job import build_job
from psfw.protocol.messages import UpdateHeader

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SGD = json.dumps({"name": "sgd", "learning_rate": 0.1})


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
