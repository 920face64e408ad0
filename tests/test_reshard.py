"""A checkpoint is a state, not a shard layout: a run of 2 shards resumed on 3 or on 1
ends as the run never stopped (dense, SGD and Adam; tables with lazy Adam, last uses
and ids waiting for admission); the re-cut has the digest of the checkpoint it came
from; a checkpoint that cannot be re-cut is refused in one line and nothing is
written; a shard started by hand on another count refuses, naming both counts;
``psfw status`` and the logs say what happened."""

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from test_tables import MODEL, click_data

import psfw
from psfw.base.errors import UsageError
from psfw.compute.tables import route
from psfw.jobs.checkpoint_state import checkpoint_digest
from psfw.jobs.config import Config, load_config, parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job
from psfw.jobs.reshard import ModelForm, reshard_newest
from psfw.jobs.run_dir import check_run_dir
from psfw.services import checkpoint
from psfw.services.server import ShardServer
from psfw.tools.cluster import Cluster, format_status

from helpers import assert_params_close, psfw_command, read_params, reference

PSFW = [sys.executable, "-m", "psfw.cli"]

EVERY = 5
LIFETIME = {"admit_after": 2, "expire_after": 3}  # rows with last uses, ids that wait: all of it moves


def dense_config(steps: int, servers: int, optimizer: str) -> Config:
    """An MLP on the digits, cut into many slices (1 KB each), 2 workers in 2 processes."""
    return parse_config(
        {
            "seed": 3,
            "model": {"name": "mlp", "hidden": [16]},
            "train": {"batch_size": 32, "steps": steps, "log_every": 5, "checkpoint_every": EVERY},
            "optimizer": {"name": optimizer, "learning_rate": 0.05 if optimizer == "sgd" else 0.01},
            "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": servers, "slice_bytes": 1024},
        },
        source="job.toml",
    )


def table_settings(folder: Path, steps: int, servers: int) -> dict:
    """The tables' test model with rows of 32: Adam on the dense weights (out/w cut
    in two), lazy Adam on the rows, which are admitted at their second step and
    expire after 3 untouched."""
    adam = {"name": "adam", "learning_rate": 0.05}
    return {
        "seed": 5,
        "model": {"name": "custom", "path": str(MODEL), "options": {"dim": 32}},
        "data": {"path": str(click_data(folder))},
        "train": {"batch_size": 48, "steps": steps, "log_every": 1, "checkpoint_every": EVERY},
        "optimizer": adam,
        "tables": {"optimizer": adam, **LIFETIME},
        "cluster": {"workers_per_group": 2, "workers_per_process": 1, "servers": servers, "slice_bytes": 64},
    }


def table_config(folder: Path, steps: int, servers: int) -> Config:
    return parse_config(table_settings(folder, steps, servers), source="tables.toml")


def table_file(folder: Path, steps: int, servers: int) -> Path:
    """``table_config`` as a TOML file, for the command line."""
    lines = []
    for section, value in table_settings(folder, steps, servers).items():
        if not isinstance(value, dict):
            lines.insert(0, f"{section} = {json.dumps(value)}")
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in value.items() if not isinstance(v, dict)]
        for key, table in ((k, v) for k, v in value.items() if isinstance(v, dict)):
            lines.append(f"[{section}.{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / "tables.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def train(config, run_dir, **options):
    return train_async(config, run_dir, progress=False, **options)


def files_of(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder``: its size and modification time (what a refusal must leave)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("servers", [3, 1])
async def test_a_dense_run_of_2_shards_resumed_on_another_count_ends_as_never_stopped(
    tmp_path, caplog, optimizer, servers
):
    run = tmp_path / "run"
    await train(dense_config(10, 2, optimizer), run)
    root = run / "checkpoints"
    before = checkpoint_digest(root, 10, 2)
    with caplog.at_level(logging.WARNING, logger="psfw"):
        result = await train(dense_config(20, servers, optimizer), run, resume=True)
    assert_params_close(result.params, reference(dense_config(20, 2, optimizer), 20))
    assert checkpoint_digest(root, 10, servers) == before, "the re-cut holds the state it was cut from"
    assert checkpoint.complete_steps(root, 2) == [5, 10], "the old count's files stay until pruned"
    said = [r.getMessage() for r in caplog.records if r.name == "psfw"]
    assert f"restored the checkpoint of step 10 made on 2 shards onto {servers}" in said
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"]["cluster.servers"] == [2, servers]


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("servers", [3, 1])
async def test_a_table_run_of_2_shards_resumed_on_another_count_ends_as_never_stopped(tmp_path, servers):
    run, never_stopped = tmp_path / "run", tmp_path / "never-stopped"
    await train(table_config(tmp_path, 10, 2), run)
    before = checkpoint_digest(run / "checkpoints", 10, 2)
    result = await train(table_config(tmp_path, 20, servers), run, resume=True)
    assert checkpoint_digest(run / "checkpoints", 10, servers) == before
    expected = await train(table_config(tmp_path, 20, 2), never_stopped)
    assert_params_close(result.params, expected.params)
    for name in ("user", "item"):
        ids, rows = psfw.load_table(run, name)
        want_ids, want_rows = psfw.load_table(never_stopped, name)
        np.testing.assert_array_equal(ids, want_ids, err_msg=f"{name}: the rows admitted and expired")
        np.testing.assert_allclose(rows, want_rows, rtol=2e-5, atol=2e-6, err_msg=name)


LAUNCHED = """
seed = 3
[model]
hidden = [16]
[train]
batch_size = 32
steps = 10
log_every = 5
checkpoint_every = 5
[optimizer]
name = "adam"
learning_rate = 0.01
[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
slice_bytes = 1024
"""


@pytest.mark.slow
def test_launch_resumes_a_run_of_2_shards_on_3_and_says_so(tmp_path):
    job, run = tmp_path / "job.toml", tmp_path / "run"
    job.write_text(LAUNCHED)
    asyncio.run(train(load_config(job), run))
    resumed = subprocess.run(
        [*PSFW, "launch", str(job), "--set", "cluster.servers=3", "--set", "train.steps=20", "--run-dir", str(run)]
        + ["--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "psfw: restored the checkpoint of step 10 made on 2 shards onto 3" in resumed.stderr.splitlines()
    assert checkpoint.complete_steps(run / "checkpoints", 3) == [10, 15, 20]
    assert_params_close(read_params(run / "params.safetensors"), reference(load_config(job, ["train.steps=20"]), 20))


@pytest.fixture(scope="module")
def two_shard_run(tmp_path_factory) -> Path:
    """A table run of 2 shards, 5 steps: dense Adam (a step count in its state), lazy
    Adam rows with last uses and ids that wait; its checkpoint of step 5."""
    folder = tmp_path_factory.mktemp("two")
    asyncio.run(train(table_config(folder, EVERY, 2), folder / "run"))
    return folder / "run"


@pytest.fixture
def run(two_shard_run, tmp_path) -> Path:
    """A copy of the run of 2 shards for one test."""
    return Path(shutil.copytree(two_shard_run, tmp_path / "run", symlinks=True))


def form(folder: Path, servers: int = 3) -> ModelForm:
    return ModelForm.of(build_job(table_config(folder, EVERY, servers)))


def test_the_re_cut_holds_the_same_state_by_names_and_ids_and_its_shards_load_it(run, tmp_path):
    root = run / "checkpoints"
    before = checkpoint_digest(root, EVERY, 2)
    done = reshard_newest(root, form(tmp_path), 3)
    assert done is not None and done.line() == f"restored the checkpoint of step {EVERY} made on 2 shards onto 3"
    assert checkpoint.complete_steps(root, 3) == [EVERY] and checkpoint.complete_steps(root, 2) == [EVERY]
    assert checkpoint_digest(root, EVERY, 3) == before
    assert reshard_newest(root, form(tmp_path), 3) is None, "a step that has its set is not cut again"
    again = reshard_newest(root, form(tmp_path, 1), 1)  # from the set of 2 or of 3: the same state
    assert again is not None and checkpoint_digest(root, EVERY, 1) == before
    saved = {
        name: np.concatenate([checkpoint.load_table_rows(root, EVERY, s, name, 3)[0] for s in range(3)])
        for name in ("user", "item")
    }
    assert all(len(ids) for ids in saved.values()), "the run made rows"
    for shard in range(3):
        tensors, meta = checkpoint.load_shard(root, EVERY, shard, 3)
        assert (meta["shard"], meta["shards"], meta["resharded_from"]) == (shard, 3, 2)
        for name in ("user", "item"):
            ids = tensors[f"table/{name}/ids"]
            assert (route(name, ids, 3) == shard).all(), "each row on the shard route gives"
            assert f"table/{name}/last_used" in tensors and f"table/{name}/waiting/ids" in tensors


@pytest.mark.asyncio
async def test_shards_restored_from_a_re_cut_say_so_in_status_and_log(run, tmp_path, caplog, capsys):
    root = run / "checkpoints"
    config = table_file(tmp_path, EVERY, 2)
    done = psfw_command(capsys, "reshard", config, "--checkpoint-dir", root, "--shards", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"psfw reshard: the checkpoint of step {EVERY} made on 2 shards in {root}")
    again = psfw_command(capsys, "reshard", config, "--run-dir", run, "--set", "cluster.servers=3")
    assert again.returncode == 0 and "is of 2 and 3 shards: nothing to re-cut" in again.stdout, again.stdout
    shards = [ShardServer(i, 3, checkpoint_dir=root) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="psfw.server"):
        for shard in shards:
            await shard.start("127.0.0.1:0")
    try:
        async with Cluster([s.address for s in shards]) as cluster:
            rows = await cluster.status(interval_s=0)
    finally:
        for shard in shards:
            await shard.stop(0)
    assert [r["resharded"] for r in rows] == [{"step": EVERY, "from": 2}] * 3
    assert f"restored the checkpoint of step {EVERY} made on 2 shards onto 3" in format_status(rows).splitlines()
    said = [r.getMessage() for r in caplog.records]
    assert f"shard 2 of 3 restored from the checkpoint of step {EVERY} made on 2 shards" in said


@pytest.mark.unit
def test_a_shard_of_another_count_refuses_in_one_line_naming_both(tmp_path, capsys):
    for shard in range(2):
        checkpoint.save_shard(tmp_path, 40, shard, 2, {"value/0": np.zeros(2, np.float32)}, {})

    async def start() -> None:
        await ShardServer(1, 3, checkpoint_dir=tmp_path).start("127.0.0.1:0")

    with pytest.raises(ValueError, match=r"made on 2 shards, not 3: re-cut it for 3 with `psfw reshard CONFIG"):
        asyncio.run(start())
    done = psfw_command(
        capsys, "server", "--shard", "0", "--of", "3", "--listen", "127.0.0.1:0", "--checkpoint-dir", tmp_path
    )
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"psfw server: shard 0 of 3: the newest checkpoint in {tmp_path} is of step 40")
    assert "--checkpoint-dir" in done.stderr and "or start 2 shards" in done.stderr


def rewrite_meta(path: Path, change) -> None:
    """Rewrite a shard's file with ``change(meta, tensors)`` applied, at its old size
    (the manifest still holds it whole: only what is inside differs)."""
    tensors, meta = checkpoint.load_shard(path.parent.parent, int(path.parent.name[5:]), int(path.stem[6:]))
    change(meta, tensors)
    data = save(tensors, metadata={"psfw": json.dumps(meta)})
    assert len(data) == path.stat().st_size, "the same size, or the manifest would not hold it whole"
    path.write_bytes(data)


def one_step_on(meta, tensors):
    meta["groups"]["0"]["step"] += 1  # 5 -> 6: one digit, the same size


def count_plus_one(meta, tensors):
    index = next(i for i, e in enumerate(meta["slices"]) if e["key"] == "out/w")
    count = next(k for k in sorted(tensors) if k.startswith(f"opt/{index}/") and tensors[k].size == 1)
    tensors[count] = tensors[count] + 1


def other_version(meta, tensors):
    meta["slices"][0]["version"] += 1


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        ("missing", r"for 3: shard-1\.safetensors is missing or cut short; nothing was written$"),
        ("group", r"for 3: group 0 is at step 5 on shard 0 and 6 on shard 1 \(its update was on its way"),
        ("count", r"for 3: the optimizer's step count of out/w differs across its slices \(\[5, 6\]\)"),
        ("model", r"for 3: it holds another model \(out/w: float32\[32\] in the checkpoint, float32\[64\] in the"),
        ("tables", r"for 3: it holds another model \(table item: rows of 32 in the checkpoint, absent in the job\)"),
    ],
)
def test_a_checkpoint_that_cannot_be_re_cut_is_refused_in_one_line_and_nothing_is_written(run, tmp_path, damage, said):
    root = run / "checkpoints"
    step = checkpoint.step_dir(root, EVERY)
    shape = form(tmp_path)
    if damage == "missing":
        (step / "shard-1.safetensors").unlink()
    elif damage == "group":
        rewrite_meta(step / "shard-1.safetensors", one_step_on)
    elif damage == "count":  # out/w is cut in two: its slices on the two shards
        rewrite_meta(step / "shard-1.safetensors", count_plus_one)
    elif damage == "model":
        shape = shape._replace(params={**shape.params, "out/w": ((64,), "float32")})
    else:
        shape = shape._replace(tables={"user": shape.tables["user"]})
    untouched = files_of(root)
    with pytest.raises(UsageError, match=said) as refused:
        reshard_newest(root, shape, 3)
    line = str(refused.value)
    assert "\n" not in line and line.endswith("nothing was written"), line
    assert line.startswith(f"cannot re-cut the checkpoint of step 5 made on 2 shards in {root} for 3: ")
    assert files_of(root) == untouched, "nothing is written"


def test_a_folder_with_checkpoints_of_another_count_needs_resume_and_overwrite_clears_a_re_cut(run, tmp_path):
    root = run / "checkpoints"
    reshard_newest(root, form(tmp_path), 3)
    with pytest.raises(UsageError, match=r"holds checkpoints \(newest: step 5\): pass --resume"):
        check_run_dir(run, resume=False)
    check_run_dir(run, resume=False, overwrite=True).clear()
    assert not root.exists(), "the shards' files and the re-cut's, all psfw's, are gone"
