"""Run folders never mix: a folder holding another run (or anything psfw did not
write) is refused without --resume; a resume keeps each step once and refuses a
config that changes what was trained; an interrupt says how to continue."""

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from psfw.base.errors import PsfwError, UsageError
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.outputs import read_records
from psfw.jobs.run_dir import resume_hint
from psfw.services.checkpoint import complete_steps

PSFW = [sys.executable, "-m", "psfw.cli"]


def config(steps=20, hidden=32, lr=0.05, checkpoint_every=5):
    return parse_config(
        {
            "seed": 1,
            "model": {"name": "mlp", "hidden": [hidden]},
            "train": {"batch_size": 32, "steps": steps, "log_every": 5, "checkpoint_every": checkpoint_every},
            "optimizer": {"name": "sgd", "learning_rate": lr},
        },
        source="job.toml",
    )


async def train(cfg, run_dir, **options):
    return await train_async(cfg, run_dir, progress=False, **options)


@pytest.mark.asyncio
async def test_a_folder_that_holds_a_run_is_refused_without_resume(tmp_path):
    run = tmp_path / "run"
    await train(config(steps=10, checkpoint_every=0), run)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(
        UsageError,
        match=r"holds the outputs of a finished run and no checkpoint to continue it from: pass --overwrite to "
        r"start it again, or use a new --run-dir",
    ):
        await train(config(steps=10, checkpoint_every=0), run)
    with pytest.raises(UsageError, match=r"no complete checkpoint to continue from: start it again with --overwrite"):
        await train(config(steps=10, checkpoint_every=0), run, resume=True)
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.unit
@pytest.mark.asyncio
async def test_a_folder_with_files_psfw_did_not_write_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "theirs"
    run.mkdir()
    (run / "metrics.jsonl").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(UsageError, match=r"holds files that are not a psfw run \(metrics.jsonl\): use a new or empty"):
        await train(config(steps=5), run)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file: give a folder"):
        await train(config(steps=5), tmp_path / "file")


@pytest.mark.asyncio
async def test_a_resume_keeps_every_step_once_and_records_what_changed(tmp_path):
    run = tmp_path / "run"
    await train(config(steps=20), run)
    (run / "psfw-run.json").unlink()  # a run of a psfw from before the marker resumes too
    # as if killed after step 22 with the checkpoint of step 10 the newest
    for step in (15, 20):
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"group": 0, "step": 25, "loss": 9.0}\n{"group": 0, "st')  # cut short by the kill
    result = await train(config(steps=30), run, resume=True)
    records = read_records(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert records[-2]["loss"] != 9.0, "the abandoned history's record of step 25 is gone"
    finals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert len(finals) == 1 and finals[0]["step"] == 30 == result.steps
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history == [{"resumed_at_step": 10, "changed": {"train.steps": [20, 30]}}]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 30


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "said"),
    [({"hidden": 16}, "model.hidden: [32] -> [16]"), ({"lr": 0.01}, "optimizer.learning_rate: 0.05 -> 0.01")],
)
async def test_a_resume_that_changes_what_was_trained_is_refused_in_one_line(tmp_path, change, said):
    run = tmp_path / "run"
    await train(config(steps=10), run)
    saved = (run / "config.json").read_text()
    with pytest.raises(UsageError) as err:
        await train(config(steps=10, **change), run, resume=True)
    message = str(err.value)
    assert said in message and "resume with that run's settings" in message and "\n" not in message
    assert (run / "config.json").read_text() == saved


@pytest.mark.slow
def test_an_interrupted_run_says_its_newest_checkpoint_and_how_to_continue(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(
        "seed = 1\n[model]\nhidden = [32]\n[train]\nbatch_size = 32\nsteps = 100000\nlog_every = 5\n"
        "checkpoint_every = 5\n"
    )
    run = tmp_path / "run"
    with subprocess.Popen(
        [*PSFW, "train", str(job), "--run-dir", str(run), "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    ) as proc:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "step 20 " in line:
                break
            assert time.monotonic() < deadline, "training did not start"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("psfw: interrupted; the newest checkpoint is of step "), err
    assert last.endswith(f"continue with: psfw train {job} --run-dir {run} --resume")


def reference_with_a_change(cfg_before, cfg_after, switch: int) -> dict:
    """Plain training: ``switch`` steps with the first optimizer, then the rest with
    the second, its state carried over."""
    import jax
    import numpy as np
    import optax

    from psfw.compute.optimizers import build_optimizer
    from psfw.compute.params import flatten_params
    from psfw.jobs.job import build_job

    job = build_job(cfg_after)
    params = job.model.init(jax.random.PRNGKey(cfg_after.seed))
    before, after = (build_optimizer(c.optimizer.model_dump()) for c in (cfg_before, cfg_after))
    state = before.init(params)
    order = job.order(0)
    for s in range(job.steps):
        opt = before if s < switch else after
        rows = order.indices(s)
        x, y = job.data.x_train[rows], job.data.y_train[rows]
        grads = jax.grad(lambda p, x=x, y=y: job.model.loss(p, x, y)[0])(params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    flat, _ = flatten_params(params)
    return {n: np.asarray(v) for n, v in flat.items()}


def adam(steps, lr):
    return parse_config(
        {
            "seed": 1,
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"batch_size": 32, "steps": steps, "log_every": 5, "checkpoint_every": 5},
            "optimizer": {"name": "adam", "learning_rate": lr},
        },
        source="job.toml",
    )


@pytest.mark.asyncio
async def test_a_resume_may_change_the_optimizer_settings_when_told_and_records_it(tmp_path):
    from helpers import assert_params_close

    run = tmp_path / "run"
    await train(adam(10, 0.01), run)
    with pytest.raises(UsageError, match="or pass --change-optimizer to go on with the new optimizer settings"):
        await train(adam(20, 0.002), run, resume=True)
    result = await train(adam(20, 0.002), run, resume=True, change_optimizer=True)
    assert_params_close(result.params, reference_with_a_change(adam(10, 0.01), adam(20, 0.002), 10))
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history == [
        {
            "resumed_at_step": 10,
            "changed": {"optimizer.learning_rate": [0.01, 0.002], "train.steps": [10, 20]},
        }
    ]
    # a state of another form (adam's moments for sgd) cannot go on; config.json stays
    sgd = adam(30, 0.01).model_copy(update={"optimizer": config().optimizer})
    with pytest.raises(UsageError, match="--change-optimizer: shard 0: the new optimizer keeps its state in another"):
        await train(sgd, run, resume=True, change_optimizer=True)
    assert json.loads((run / "config.json").read_text())["optimizer"]["name"] == "adam"


@pytest.mark.asyncio
async def test_what_the_checkpoint_holds_decides_a_resumed_optimizer(tmp_path):
    """A run stopped after switching its learning rate but before a checkpoint of it
    comes back with the old rate: the next resume says so, and can switch again."""
    run = tmp_path / "run"
    await train(adam(10, 0.01), run)
    await train(adam(12, 0.002), run, resume=True, change_optimizer=True)
    shutil.rmtree(run / "checkpoints" / f"step-{12:08d}")  # as if killed before a checkpoint of step 12
    with pytest.raises(UsageError) as err:
        await train(adam(14, 0.002), run, resume=True)
    assert "the checkpoint of step 10 trains with other optimizer settings than the config" in str(err.value)
    assert "(optimizer.learning_rate: 0.01 -> 0.002): pass --change-optimizer" in str(err.value)
    result = await train(adam(14, 0.002), run, resume=True, change_optimizer=True)
    assert result.steps == 14


def psfw_lines(caplog) -> list[str]:
    """The warnings psfw's own logger wrote (what the command line shows as ``psfw: ...``)."""
    return [r.getMessage() for r in caplog.records if r.name == "psfw" and r.levelno >= logging.WARNING]


async def stopped_early(cfg, run, after: int = 6, **options) -> int:
    """Run ``cfg`` into ``run`` and cancel it (what Ctrl-C does) after ``after``
    steps; returns the steps it completed."""
    done: dict[int, int] = {}
    task = asyncio.create_task(train(cfg, run, done=done, **options))
    for _ in range(1200):  # up to 120 s for the first steps
        if done.get(0, 0) >= after or task.done():
            break
        await asyncio.sleep(0.1)
    assert not task.done() and done.get(0, 0) >= after, "the run did not start training"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return done[0]


@pytest.mark.asyncio
async def test_a_run_stopped_before_its_first_checkpoint_leaves_a_folder_that_can_be_run_again(tmp_path, caplog):
    """Nothing in it could be continued: --resume says to run it again, and running
    it again says it reuses the folder, whose records are then this run's alone."""
    run = tmp_path / "run"
    await stopped_early(config(steps=100000, checkpoint_every=0), run)
    assert (run / "config.json").exists() and not (run / "params.safetensors").exists()
    with pytest.raises(UsageError, match=r"holds no complete checkpoint to continue from: run without --resume to"):
        await train(config(steps=10, checkpoint_every=0), run, resume=True)
    (run / "notes.txt").write_text("mine")  # a file psfw did not write stays
    from psfw.services.checkpoint import save_shard

    save_shard(run / "checkpoints", 3, 0, 2, {"w": np.zeros(2, np.float32)}, {})  # one shard's of two: incomplete
    result = await train(config(steps=10, checkpoint_every=0), run)
    assert result.steps == 10
    reused = [line for line in psfw_lines(caplog) if line.startswith("reusing")]
    assert reused == [
        f"reusing {run}: it holds no checkpoint and no finished run (an earlier run stopped before its first "
        "checkpoint): removing the earlier run's .metrics.jsonl.lock, config.json, metrics.jsonl, psfw-run.json and "
        "the incomplete checkpoint of step 3"
    ], psfw_lines(caplog)
    assert not (run / "checkpoints").exists()
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == [5, 10]
    assert len(json.loads((run / "psfw-run.json").read_text())["commands"]) == 1
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.asyncio
async def test_overwrite_starts_a_finished_run_again_removing_only_what_psfw_wrote(tmp_path, caplog):
    run = tmp_path / "run"
    await train(config(steps=20, checkpoint_every=5), run)
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step-00000020" / "notes.txt").write_text("mine too")
    with pytest.raises(UsageError) as err:
        await train(config(steps=10), run)
    assert str(err.value) == (
        f"{run} holds checkpoints (newest: step 20): pass --resume to continue that run, --overwrite to start it "
        "again, or use a new --run-dir"
    )
    with pytest.raises(UsageError, match="--overwrite starts .* again and --resume continues it: give one of them"):
        await train(config(steps=30), run, resume=True, overwrite=True)
    result = await train(config(steps=10, checkpoint_every=5), run, overwrite=True)
    assert result.steps == 10
    removed = [line for line in psfw_lines(caplog) if line.startswith("--overwrite")]
    assert removed == [
        f"--overwrite {run}: removing the earlier run's .metrics.jsonl.lock, config.json, curves.png, metrics.jsonl, "
        "net.json, net.png, params.safetensors, partition.json, psfw-run.json and the checkpoints of steps 10, 15, 20"
    ], psfw_lines(caplog)
    assert [r["step"] for r in read_records(run / "metrics.jsonl")] == [5, 10]
    finals = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert len(finals) == 1 and json.loads(finals[0])["step"] == 10
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step-00000005",
        "step-00000010",
        "step-00000020",
    ]
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000020").iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine"


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
@pytest.mark.parametrize("mistake", ["another job", "servers"])
async def test_a_refused_worker_writes_nothing_to_its_run_folder(tmp_path, mistake):
    """``psfw worker`` refused by the shards (another job there, a wrong number of
    --servers) leaves its --run-dir as it was: a new one is not made."""
    from psfw.services.server import ShardServer

    shards = [ShardServer(i, 2) for i in range(2)]
    for shard in shards:
        await shard.start("127.0.0.1:0")
    try:
        addresses = [s.address for s in shards]
        await train(config(steps=5, checkpoint_every=0), None, servers=addresses, outputs=False)
        run = tmp_path / "run"
        cfg, given = (config(steps=5, hidden=16), addresses) if mistake == "another job" else (config(), addresses[:1])
        with pytest.raises(PsfwError, match="holds job|2 shards, but 1 shard addresses"):
            await train(cfg, run, servers=given, processes=[0])
        assert not run.exists()
    finally:
        for shard in shards:
            await shard.stop(0)


@pytest.mark.asyncio
async def test_a_resume_whose_target_is_behind_the_run_is_refused_and_changes_nothing(tmp_path):
    """The shards are at step 20: a resume that asks for 10 steps would train nothing
    and record step 10 beside step 20's parameters."""
    run = tmp_path / "run"
    await train(config(steps=20), run)
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "config.json", "psfw-run.json")}
    with pytest.raises(UsageError) as err:
        await train(config(steps=10), run, resume=True)
    assert str(err.value) == (
        f"--resume: {run} is at step 20 already, and the config asks for 10 steps: raise train.epochs/train.steps "
        "to train on"
    )
    assert {name: (run / name).read_bytes() for name in before} == before
    again = await train(config(steps=20), run, resume=True)  # at its target: evaluated again, recorded at 20
    finals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in line]
    assert again.steps == 20 and [f["step"] for f in finals] == [20]


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
async def test_a_worker_resuming_shards_past_its_target_is_refused(tmp_path):
    from psfw.services.server import ShardServer

    shard = ShardServer(0, 1)
    await shard.start("127.0.0.1:0")
    try:
        cfg = config(steps=20, checkpoint_every=0).model_copy()
        one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"servers": 1})})
        await train(one, None, servers=[shard.address], outputs=False)
        short = one.model_copy(update={"train": one.train.model_copy(update={"steps": 10})})
        with pytest.raises(PsfwError) as err:
            await train(short, tmp_path / "run", servers=[shard.address], processes=[0], resume=True)
        assert "at step 20 already, and the config asks for 10 steps: raise train.epochs/train.steps" in str(err.value)
        assert not (tmp_path / "run").exists()
    finally:
        await shard.stop(0)


def interrupt_when(path, step: int, limit_s: float = 120.0) -> threading.Thread:
    """SIGINT to this process (a Ctrl-C) once the records in ``path`` reach ``step``,
    or after ``limit_s`` whatever they say."""

    def watch() -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if path.exists() and any(r["step"] >= step for r in read_records(path)):
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_interrupt_names_the_checkpoint_its_graceful_stop_wrote_and_resumes_it(tmp_path, capsys, caplog):
    """Ctrl-C long before train.checkpoint_every: the shards' graceful stop saves the
    step they are at, and the line names that step, which the resume restores."""
    from psfw.cli.main import main

    job = tmp_path / "job.toml"
    job.write_text(
        "seed = 1\n[model]\nhidden = [32]\n[train]\nbatch_size = 32\nsteps = 100000\nlog_every = 5\n"
        "checkpoint_every = 100000\n"
    )
    run = tmp_path / "run"
    watcher = interrupt_when(run / "metrics.jsonl", 20)
    code = main(["train", str(job), "--run-dir", str(run), "--no-progress"])
    watcher.join(5)
    assert code == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    said = re.fullmatch(r"psfw: interrupted; the newest checkpoint is of step (\d+); continue with: (.*)", last)
    assert said, last
    step = int(said.group(1))
    assert step >= 20 and complete_steps(run / "checkpoints", 2)[-1] == step
    assert said.group(2) == f"psfw train {job} --run-dir {run} --resume"
    assert main(["train", str(job), "--set", f"train.steps={step + 2}", "--run-dir", str(run), "--resume"]) == 0
    assert f"restored from its checkpoint of step {step}" in caplog.text
    assert main(["train", str(job), "--run-dir", str(run), "--overwrite", "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "psfw train: --overwrite starts the run in --run-dir again and --resume continues it: give one of them"
    )


@pytest.mark.unit
def test_a_checkpoint_every_not_reached_yet_is_not_called_unset(tmp_path):
    """The hint of a run stopped before its first checkpoint (one its stop did not
    write either: a second Ctrl-C, a kill) says so, and where it stopped."""
    checkpoints = tmp_path / "checkpoints"
    assert resume_hint("psfw train job.toml --resume", checkpoints, 2, 50, "step 20") == (
        "no checkpoint was reached yet (train.checkpoint_every = 50, stopped at step 20)"
    )
    assert resume_hint("psfw train job.toml --resume", checkpoints, 2, 0, "step 20") == (
        "no checkpoint was written (set train.checkpoint_every to have them)"
    )
    from psfw.services.checkpoint import save_shard

    for shard in range(2):
        save_shard(checkpoints, 40, shard, 2, {"w": np.zeros(2, np.float32)}, {})
    assert resume_hint("psfw train job.toml --resume", checkpoints, 2, 50, "step 42") == (
        "the newest checkpoint is of step 40; continue with: psfw train job.toml --resume"
    )


LAUNCHED = """seed = 5
[model]
hidden = [32]
[train]
batch_size = 40
steps = 100000
log_every = 1
wait_s = 60
checkpoint_every = 100000
[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
"""


@pytest.mark.slow
def test_an_interrupted_launch_names_the_checkpoint_its_stop_wrote_in_one_hint(tmp_path):
    """The line comes after every process stopped, so it names the step the shards'
    graceful stop saved, which the resume restores; the workers print no hints."""
    job = tmp_path / "job.toml"
    job.write_text(LAUNCHED)
    run = tmp_path / "run"
    with subprocess.Popen(
        [*PSFW, "launch", str(job), "--run-dir", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # like a shell's foreground job: Ctrl-C goes to the whole group
    ) as launch:
        deadline = time.monotonic() + 120
        for line in launch.stdout:
            if line.startswith("[worker 0] group 0 step 20 "):
                break
            assert time.monotonic() < deadline, "training did not start"
        os.killpg(launch.pid, signal.SIGINT)
        rest = launch.stdout.read()
        assert launch.wait(60) == 130
    assert "run the same command with --resume" not in rest, rest[-3000:]
    assert rest.count("continue with:") == 1, rest[-3000:]
    lines = rest.strip().splitlines()
    assert "psfw launch: interrupted, stopping every process" in lines, rest[-3000:]
    said = re.fullmatch(
        r"psfw launch: every process stopped; the newest checkpoint is of step (\d+); continue with: (.*)", lines[-1]
    )
    assert said, rest[-3000:]
    step = int(said.group(1))
    assert step >= 20 and complete_steps(run / "checkpoints", 2)[-1] == step
    assert said.group(2) == f"psfw launch {job} --run-dir {run} --resume"
    resumed = subprocess.run(
        [*PSFW, "launch", str(job), "--set", f"train.steps={step + 2}", "--run-dir", str(run), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"restored step {step}" in resumed.stdout, resumed.stdout[-3000:]


@pytest.mark.asyncio
@pytest.mark.usefixtures("short_twin_watch")
async def test_a_worker_overwrites_its_run_folder_only_once_the_shards_took_the_job(tmp_path, caplog):
    """``psfw worker --overwrite``: the earlier run's files go when the shards accept
    this job, not before (a refusal leaves them), and its checkpoints are the shards'."""
    from psfw.services.server import ShardServer

    run = tmp_path / "run"
    await train(config(steps=10, checkpoint_every=5), run)
    shard = ShardServer(0, 1)
    await shard.start("127.0.0.1:0")
    try:
        cfg = config(steps=5, checkpoint_every=0)
        one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"servers": 1})})
        with pytest.raises(UsageError, match="holds the outputs of a finished run: pass --resume to continue that run"):
            await train(one, run, servers=[shard.address], processes=[0])
        await train(one, None, servers=[shard.address], outputs=False)  # the shards now hold a finished job
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(PsfwError, match="pass --resume to continue it, or start the shards fresh"):
            await train(one, run, servers=[shard.address], processes=[0], overwrite=True)
        assert sorted(p.name for p in run.iterdir()) == before and not psfw_lines(caplog)
    finally:
        await shard.stop(0)
    shard = ShardServer(0, 1)
    await shard.start("127.0.0.1:0")
    try:
        result = await train(one, run, servers=[shard.address], processes=[0], overwrite=True)
    finally:
        await shard.stop(0)
    assert result.steps == 5 and [r["step"] for r in read_records(run / "metrics.jsonl")] == [5]
    assert [line.split(": removing")[0] for line in psfw_lines(caplog)] == [f"--overwrite {run}"]
    assert complete_steps(run / "checkpoints", 2) == [5, 10], "the checkpoints stay"


@pytest.mark.asyncio
async def test_a_worker_reuses_the_folder_of_a_run_that_never_finished_once_fresh_shards_take_the_job(tmp_path, caplog):
    from psfw.services.server import ShardServer

    run = tmp_path / "run"
    cfg = config(steps=100000, checkpoint_every=0)
    one = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"servers": 1})})
    for attempt in range(2):
        shard = ShardServer(0, 1)
        await shard.start("127.0.0.1:0")
        try:
            if attempt == 0:
                await stopped_early(one, run, servers=[shard.address], processes=[0])
            else:
                short = one.model_copy(update={"train": one.train.model_copy(update={"steps": 5})})
                result = await train(short, run, servers=[shard.address], processes=[0])
        finally:
            await shard.stop(0)
    assert result.steps == 5 and [r["step"] for r in read_records(run / "metrics.jsonl")] == [5]
    assert [line.split(": removing")[0] for line in psfw_lines(caplog)] == [
        f"reusing {run}: it holds no finished run, and the shards start this job afresh"
    ]


@pytest.mark.unit
def test_overwrite_never_follows_a_link_out_of_the_run_folder(tmp_path):
    """A step folder or a best that is a link psfw did not make is left as it is, and
    nothing it points to is removed."""
    from psfw.jobs.outputs import mark_run_dir
    from psfw.jobs.run_dir import check_run_dir
    from psfw.services.checkpoint import save_shard

    other = tmp_path / "other"
    save_shard(other, 10, 0, 1, {"value/0": np.zeros(2, np.float32)}, {})
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    mark_run_dir(run)
    (run / "params.safetensors").write_bytes(b"x")  # a finished run
    (run / "checkpoints" / "step-00000010").symlink_to(other / "step-00000010")
    (run / "checkpoints" / "best").symlink_to(other)
    earlier = check_run_dir(run, resume=False, overwrite=True)
    earlier.clear()
    assert complete_steps(other, 1) == [10]  # the other run's checkpoint is whole
    assert (run / "checkpoints" / "step-00000010").is_symlink() and (run / "checkpoints" / "best").is_symlink()
    assert not (run / "params.safetensors").exists()
