"""Sparse embedding tables: rows pulled and pushed per step, row-wise optimizers on
the shards. The anchor: with SGD and Adagrad, training a table row by row equals
training it as a dense parameter (lookups by ``jnp.take``), to float rounding."""

from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import psfw
from psfw.compute.optimizers import build_optimizer
from psfw.compute.tables import TableSpec, initial_rows
from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.job import build_job

MODEL = Path(__file__).parent / "models" / "table_model.py"
STEPS = 5


def click_data(folder: Path, rows: int = 240, users: int = 40, items: int = 25, seed: int = 0) -> Path:
    """Integer rows (user, item, item) with many repeated ids, and float targets."""
    rng = np.random.default_rng(seed)
    x = np.stack(
        [rng.zipf(1.5, rows) % users, rng.integers(0, 5, rows) * 4 % items, rng.integers(0, items, rows)], axis=1
    ).astype(np.int64)
    y = rng.normal(size=rows).astype(np.float32)
    path = folder / "clicks.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:60], y_test=y[:60])
    return path


def make_config(folder: Path, optimizer: dict, workers=2, per_process=2, servers=3, transport="auto", **more):
    return parse_config(
        {
            "seed": 5,
            "model": {"name": "custom", "path": str(MODEL), "options": more.pop("options", {})},
            "data": {"path": str(click_data(folder))},
            "train": {"batch_size": 48, "steps": STEPS, "log_every": 1, **more.pop("train", {})},
            "optimizer": optimizer,
            "tables": {"optimizer": optimizer, **more.pop("tables", {})},
            "cluster": {
                "workers_per_group": workers,
                "workers_per_process": per_process,
                "servers": servers,
                "transport": transport,
            },
        }
    )


def dense_reference(config, steps: int):
    """Plain single-process training with the tables as dense parameters."""
    import sys

    sys.path.insert(0, str(MODEL.parent))
    from table_model import dense_loss

    job = build_job(config)
    opt = build_optimizer(config.optimizer.model_dump())
    params = job.model.init(jax.random.PRNGKey(config.seed))
    tables = {
        name: initial_rows(config.seed, name, np.arange(spec.rows), spec) for name, spec in job.model.tables.items()
    }
    state = opt.init((params, tables))

    @jax.jit
    def step(params, tables, state, x, y):
        grads = jax.grad(lambda p, t: dense_loss(p, t, x, y)[0], argnums=(0, 1))(params, tables)
        updates, state = opt.update(grads, state, (params, tables))
        params, tables = optax.apply_updates((params, tables), updates)
        return params, tables, state

    order = job.order(0)
    for s in range(steps):
        rows = order.indices(s)
        params, tables, state = step(params, tables, state, job.data.x_train[rows], job.data.y_train[rows])
    return jax.tree.map(np.asarray, params), {k: np.asarray(v) for k, v in tables.items()}


OPTIMIZERS = {
    "sgd": {"name": "sgd", "learning_rate": 0.5},
    "adagrad": {"name": "adagrad", "learning_rate": 0.3},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize(
    ("workers", "per_process", "transport"),
    [(2, 2, "auto"), (3, 1, "grpc")],
)
async def test_sparse_training_equals_dense_training(tmp_path, optimizer, workers, per_process, transport):
    """Duplicate ids inside a row, a sub-batch and across sub-batches and processes
    add up as the dense gradient does; untouched rows stay as they were."""
    config = make_config(tmp_path, OPTIMIZERS[optimizer], workers, per_process, transport=transport)
    run_dir = tmp_path / "run"
    result = await train_async(config, run_dir, progress=False)
    params, tables = dense_reference(config, STEPS)
    np.testing.assert_allclose(result.params["out/w"], params["out"]["w"], rtol=2e-5, atol=2e-6)
    for name, table in tables.items():
        ids, rows = psfw.load_table(run_dir, name)
        np.testing.assert_allclose(rows, table[ids], rtol=2e-5, atol=2e-6, err_msg=name)
        spec: TableSpec = build_job(config).model.tables[name]
        start = initial_rows(config.seed, name, np.arange(spec.rows), spec)
        untouched = np.setdiff1d(np.arange(spec.rows), ids)
        np.testing.assert_array_equal(table[untouched], start[untouched])  # the reference did not move them either
        assert np.abs(rows - start[ids]).max() > 1e-3, "training must move the rows it touched"


@pytest.mark.asyncio
async def test_a_table_run_writes_its_tables_into_partition_net_and_checkpoints(tmp_path):
    import json

    config = make_config(tmp_path, OPTIMIZERS["sgd"], train={"eval_every": 2})
    run_dir = tmp_path / "run"
    result = await train_async(config, run_dir, progress=False)
    partition = json.loads((run_dir / "partition.json").read_text())
    tables = {t["name"]: t for t in partition["tables"]}
    assert tables["user"]["rows"] == 40 and tables["item"]["dim"] == 4
    assert tables["user"]["optimizer"]["name"] == "sgd" and tables["user"]["seed"] == 5
    net = json.loads((run_dir / "net.json").read_text())
    nodes = {n["id"]: n for n in net["nodes"]}
    assert nodes["table:user"]["kind"] == "table"
    held = {(link["source"], link["target"]) for link in net["links"] if link["kind"] == "held_by"}
    assert {("table:user", "shard:0"), ("table:user", "shard:1"), ("table:user", "shard:2")} <= held
    assert (run_dir / "net.png").stat().st_size > 0
    evals = [r for r in result.evals]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(np.isfinite(r["test_loss"]) for r in evals)
    # psfw eval reads the rows back from the final checkpoint: the run's own final figures
    from psfw.jobs.trained import evaluate_run

    again = evaluate_run(run_dir, config)
    assert again["step"] == STEPS
    assert abs(again["test_loss"] - result.test_loss) < 1e-6


@pytest.mark.asyncio
async def test_psfw_eval_reads_zeros_for_the_ids_waiting_for_admission_as_the_shards_did(tmp_path):
    """Under admit_after 3 most ids of 5 steps hold no row at the end: the shards read
    zeros for them, and so does psfw eval from the checkpoint (not their initial
    values), so it gives the run's own final figures."""
    config = make_config(tmp_path, OPTIMIZERS["sgd"])
    config = config.model_copy(update={"tables": config.tables.model_copy(update={"admit_after": 3})})
    run_dir = tmp_path / "run"
    result = await train_async(config, run_dir, progress=False)
    saved = psfw.load_table(run_dir, "item")[0]
    assert 0 < len(saved) < 25, "some item ids wait for admission at the end"
    from psfw.jobs.trained import evaluate_run

    again = evaluate_run(run_dir, config)
    assert abs(again["test_loss"] - result.test_loss) < 1e-7


@pytest.mark.asyncio
async def test_async_groups_with_staleness_train_the_tables(tmp_path):
    """Two groups, each at most one step ahead of the other, on the same rows."""
    config = make_config(tmp_path, OPTIMIZERS["adagrad"], workers=1, per_process=1, train={"steps": 12})
    config = config.model_copy(
        update={"cluster": config.cluster.model_copy(update={"worker_groups": 2, "staleness": 1})}
    )
    run_dir = tmp_path / "run"
    result = await train_async(config, run_dir, progress=False)
    leads = [r["lead"] for r in result.records if "lead" in r]
    assert leads and max(leads) <= 2
    groups = {r["group"] for r in result.records}
    assert groups == {0, 1}
    ids, rows = psfw.load_table(run_dir, "user")
    assert len(ids) > 5


@pytest.mark.asyncio
async def test_the_shards_report_their_tables_in_status_and_metrics(tmp_path):
    from psfw.services.metrics import ShardMetrics
    from psfw.services.server import ShardServer
    from psfw.tools.cluster import Cluster, format_status

    config = make_config(tmp_path, OPTIMIZERS["sgd"], servers=2)
    servers = [ShardServer(i, 2) for i in range(2)]
    for server in servers:
        await server.start("127.0.0.1:0")
    try:
        await train_async(config, servers=[s.address for s in servers], progress=False, outputs=False)
        async with Cluster([s.address for s in servers]) as cluster:
            rows = await cluster.status(interval_s=0)
        held = sum(r["tables"]["user"]["rows"] for r in rows)
        x = np.load(tmp_path / "clicks.npz")["x_train"]
        assert 0 < held <= len(np.unique(x[:, 0]))
        assert all(r["tables"]["item"]["updates"] == STEPS for r in rows)
        assert "rows held" in format_status(rows)
        from prometheus_client import generate_latest

        text = generate_latest(ShardMetrics(servers[0].store).registry).decode()
        assert 'psfw_table_rows{shard="0",table="user"}' in text
        assert "psfw_table_rows_touched" in text and "psfw_table_bytes" in text
    finally:
        for server in servers:
            await server.stop(0)


@pytest.mark.asyncio
async def test_rows_admitted_expired_and_evicted_are_reported_and_add_up_to_the_rows_held(tmp_path):
    """With admission, expiry and a cap, every shard says how many rows it admitted,
    let expire and evicted and how many ids wait, in its status and its metrics; what
    it admitted less what went is what it holds; the cap evicted rows; and the same
    training on 1 shard holds the same ids (the cap aside: it is per shard)."""
    from prometheus_client import generate_latest

    from psfw.services.metrics import ShardMetrics
    from psfw.services.server import ShardServer
    from psfw.tools.cluster import Cluster, format_status

    rules = {"admit_after": 2, "expire_after": 3, "per_table": {"item": {"max_rows": 12}}}
    held_ids = {}
    for servers in (3, 1):
        config = make_config(tmp_path, OPTIMIZERS["sgd"], servers=servers, tables=rules, train={"steps": 12})
        shards = [ShardServer(i, servers) for i in range(servers)]
        for shard in shards:
            await shard.start("127.0.0.1:0")
        try:
            await train_async(config, servers=[s.address for s in shards], progress=False, outputs=False)
            async with Cluster([s.address for s in shards]) as cluster:
                rows = await cluster.status(interval_s=0)
            for row in rows:
                for name, t in row["tables"].items():
                    assert t["admitted"] - t["expired"] - t["evicted"] == t["rows"], (name, t)
            assert sum(r["tables"]["user"]["expired"] for r in rows) > 0
            assert sum(r["tables"]["user"]["waiting"] for r in rows) > 0
            assert sum(r["tables"]["item"]["evicted"] for r in rows) > 0
            assert "waiting" in format_status(rows)
            text = generate_latest(ShardMetrics(shards[0].store).registry).decode()
            for family in ("psfw_table_ids_waiting", "psfw_table_rows_admitted", "psfw_table_rows_expired"):
                assert (
                    f'{family}{{shard="0",table="user"}}' in text or f'{family}_total{{shard="0",table="user"}}' in text
                )
            held_ids[servers] = sorted(
                int(i) for s in shards for i in s.store.tables.tables["user"].ids[: s.store.tables.tables["user"].count]
            )
        finally:
            for shard in shards:
                await shard.stop(0)
    assert held_ids[3] == held_ids[1], "admission and expiry do not depend on the number of shards"


@pytest.mark.unit
def test_a_table_model_that_cannot_train_is_refused_before_anything_runs(tmp_path):
    from psfw.base.errors import ConfigError

    config = make_config(tmp_path, OPTIMIZERS["sgd"], options={"users": 3})  # ids go up to 39
    with pytest.raises(ConfigError, match=r"table user: id \d+ is outside 0..2"):
        build_job(config)
    with pytest.raises(ConfigError, match="tables.optimizer.name"):
        make_config(tmp_path, {"name": "momentum", "learning_rate": 0.1})


@pytest.mark.asyncio
async def test_the_recommendation_example_comes_within_002_of_the_teachers_auc(tmp_path):
    """examples/recsys.toml: a factorization machine over 10,000 user and 1,000 item
    rows, one pass over 3M Zipf-distributed clicks, against the hidden teacher's own
    AUC on the same held-out clicks."""
    from psfw.compute.clicks import teacher_auc
    from psfw.jobs.config import load_config

    config = load_config(Path(__file__).parent.parent / "examples" / "recsys.toml")
    result = await train_async(config, tmp_path / "run", progress=False)
    d = config.data
    best = teacher_auc(users=d.users, items=d.items, train=d.rows[0], test=d.rows[1], alpha=d.alpha, seed=config.seed)
    assert result.test_metrics["auc"] > best - 0.02, (result.test_metrics, best)
    aucs = [r["test_auc"] for r in result.evals]
    assert aucs[0] < 0.6 < aucs[-1], aucs  # it learned, step by step


@pytest.mark.unit
def test_a_tables_section_for_a_model_without_tables_is_refused(tmp_path):
    from psfw.base.errors import ConfigError

    config = parse_config({"model": {"name": "mlp"}, "tables": {"materialize": True}})
    with pytest.raises(ConfigError, match="declares no embedding tables: drop"):
        build_job(config)
