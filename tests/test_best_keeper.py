"""The best step kept apart (BestKeeper) on real checkpoint files: a best evaluated
again stays, offers from two threads keep the better, the rotation cannot take a
step linked aside, and a resumed run counts its evaluations since the best."""

import json
import threading

import numpy as np
import pytest

from psfw.jobs.best_step import BestKeeper, evaluations_since_best, read_best
from psfw.services.checkpoint import complete_steps, prune, save_shard

pytestmark = pytest.mark.unit


def _checkpoint(root, step, shards=2):
    for shard in range(shards):
        save_shard(root, step, shard, shards, {"value/0": np.full(4, step, np.float32)}, {"step": step})


def _keeper(root, **options):
    return BestKeeper(root, 2, "test_loss", "min", wait_s=5, **options)


def test_the_best_evaluated_again_stays_the_best(tmp_path):
    _checkpoint(tmp_path, 10)
    keeper = _keeper(tmp_path)
    keeper.hold(10)
    keeper.offer({"step": 10, "test_loss": 1.0})
    keeper.close()
    again = _keeper(tmp_path)  # a resumed run evaluates its restored step once more
    again.hold(10)
    again.offer({"step": 10, "test_loss": 1.0})
    again.close()
    assert read_best(tmp_path) == {"step": 10, "metric": "test_loss", "value": 1.0, "mode": "min"}
    assert complete_steps(tmp_path / "best", 2) == [10] and again.since_best == 0


def test_a_worse_step_leaves_nothing_and_the_rotation_cannot_take_the_best(tmp_path):
    _checkpoint(tmp_path, 10)
    keeper = _keeper(tmp_path)
    keeper.hold(10)
    keeper.offer({"step": 10, "test_loss": 1.0})
    for step in (20, 30, 40, 50):
        _checkpoint(tmp_path, step)
        keeper.hold(step)
        prune(tmp_path, 3, 2)  # the shards' rotation, while the evaluation runs
        keeper.offer({"step": step, "test_loss": 1.0 + step})
    keeper.close()
    assert complete_steps(tmp_path, 2) == [30, 40, 50]
    assert sorted(p.name for p in tmp_path.glob("best*")) == ["best", "best-00000010"]
    assert complete_steps(tmp_path / "best", 2) == [10] and keeper.since_best == 4


def test_offers_from_two_threads_keep_the_better_one(tmp_path):
    for step in (10, 20):
        _checkpoint(tmp_path, step)
    for _ in range(20):
        keeper = _keeper(tmp_path)
        errors = []

        def offer(step, value, keeper=keeper, errors=errors):
            try:
                keeper.offer({"step": step, "test_loss": value})
            except Exception as err:  # noqa: BLE001 - the test says what went wrong
                errors.append(err)

        threads = [threading.Thread(target=offer, args=a) for a in ((10, 2.0), (20, 1.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        keeper.close()
        assert not errors and read_best(tmp_path)["step"] == 20
        assert sorted(p.name for p in tmp_path.glob("best*")) == ["best", "best-00000020"]
        for left in tmp_path.glob("best*"):  # a fresh start for the next round
            left.unlink() if left.is_symlink() else __import__("shutil").rmtree(left)


def test_a_resumed_run_counts_the_evaluations_it_made_since_its_best(tmp_path):
    _checkpoint(tmp_path / "checkpoints", 10)
    keeper = _keeper(tmp_path / "checkpoints")
    keeper.offer({"step": 10, "test_loss": 1.0})
    keeper.close()
    records = [{"eval": True, "step": s, "test_loss": 2.0} for s in (0, 10, 20, 30, 40, 50)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # resumed from step 40: it evaluates 40 again, so 20 and 30 are the ones made since the best
    assert evaluations_since_best(tmp_path, tmp_path / "checkpoints", 40) == 2
    assert _keeper(tmp_path / "checkpoints", since_best=2).since_best == 2
