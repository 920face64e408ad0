"""``psfw plan``: the step model's floors are the cost model's, it names the
bottleneck and the shard hosts a job needs, counts a table's rows a step moves, refuses
bad flags in one line, and runs on the shipped configs; ``--calibrate`` writes
constants that then load."""

import json

import pytest

from psfw.cli.main import main
from psfw.tools.plan_calibrate import read_constants
from psfw.tools.plan_model import Cluster, Constants, Workload, predict, ring_step, shard_hosts_needed

from helpers import EXAMPLES

M = 7_454_760
GBIT = 10**9
# no CPU cost, no message cost: the link floors alone
FREE = Constants({}, 1.0, 0.0, 0.0, 0.0, {"sgd": 0.0, "adam": 0.0}, 0, [1, 2], [0.0, 0.0])


def _work(dense=M, table=0.0, total=None, compute=0.0, share=1.0) -> Workload:
    return Workload("test", 256, dense, table, total, share, "sgd", 1 << 20, compute)


@pytest.mark.unit
def test_the_whole_step_is_push_then_pull_at_the_busiest_link():
    plan = predict(_work(), Cluster(4, 2, GBIT, "whole"), FREE)
    assert plan["push_s"] == pytest.approx(4 * M / 2 / (GBIT / 8))  # the shard host's link takes n M / k
    assert plan["step_s"] == pytest.approx(2 * 4 * M / 2 / (GBIT / 8))
    assert plan["bottleneck_key"] == "shard link down"


@pytest.mark.unit
def test_the_pipelined_step_overlaps_the_directions_and_adds_a_part_of_every_flow_to_fill_and_drain():
    plan = predict(_work(), Cluster(4, 4, GBIT, "pipelined"), FREE)
    part = 1 << 20
    # the links up and down at once, and one part of each of a link's 4 flows (a worker
    # host's link carries them interleaved) before the first answer
    assert plan["step_s"] == pytest.approx(M / (GBIT / 8) + 4 * part / (GBIT / 8))
    whole = predict(_work(), Cluster(4, 4, GBIT, "whole"), FREE)
    single = predict(_work()._replace(slice_bytes=M), Cluster(4, 4, GBIT, "pipelined"), FREE)
    assert single["step_s"] == pytest.approx(whole["step_s"]), "a shard's share in one part: nothing to pipeline"


@pytest.mark.unit
def test_bf16_halves_the_push_and_tables_count_the_rows_a_step_moves():
    plan = predict(_work(table=1000.0, share=0.5), Cluster(2, 2, GBIT, "whole"), FREE)
    assert plan["bytes"]["worker_up"] == M / 2 + 1000
    assert plan["bytes"]["worker_down"] == M + 1000


@pytest.mark.unit
def test_ring_all_reduce_moves_two_n_minus_one_over_n_of_the_model_each_way():
    ring = ring_step(_work(compute=0.01), Cluster(8, 8, GBIT, "whole"), FREE)
    assert ring["comm_s"] == pytest.approx(2 * 7 / 8 * M / (GBIT / 8))
    assert ring["step_s"] == pytest.approx(ring["comm_s"] + 0.01)
    assert ring_step(_work(table=10.0, total=None), Cluster(8, 8, GBIT, "whole"), FREE)["step_s"] is None


@pytest.mark.unit
def test_shard_hosts_needed_is_where_the_shards_stop_being_busier_than_a_worker_host():
    assert shard_hosts_needed(_work(), Cluster(16, 1, GBIT, "whole"), FREE) == 16
    costs = FREE._replace(update_s_per_byte={"sgd": 1e-9, "adam": 1e-9}, push_s_per_byte=1e-10)
    slow_update = shard_hosts_needed(_work(), Cluster(16, 1, 100 * GBIT, "whole"), costs)
    assert slow_update > 16  # the update's CPU needs more shards than the link does


@pytest.mark.unit
def test_compute_bound_and_cpu_bound_steps_are_named():
    assert predict(_work(compute=10.0), Cluster(2, 2, GBIT, "whole"), FREE)["bottleneck"] == "compute of a sub-batch"
    costs = FREE._replace(push_s_per_byte=1e-9, pull_s_per_byte=1e-9)
    plan = predict(_work(), Cluster(2, 2, 100 * GBIT, "pipelined"), costs)
    assert plan["bottleneck_key"] in ("worker cpu", "shard cpu")


@pytest.mark.unit
def test_the_shipped_constants_load_and_say_where_they_came_from():
    costs = read_constants()
    assert {"cpu", "cores", "date", "psfw"} <= set(costs.machine)
    assert costs.bench_compute(128) > 0


@pytest.mark.unit
def test_plan_on_the_bench_prints_the_step_and_all_reduce(capsys):
    assert main(["plan", "--bench", "--hosts", "8", "--link", "10gbit"]) == 0
    out = capsys.readouterr().out
    assert "8 worker hosts x 8 shard hosts" in out and "ring all-reduce: step" in out
    assert "shard hosts needed:" in out and "bottleneck:" in out


@pytest.mark.unit
@pytest.mark.parametrize("config", ["digits_mlp.toml", "lm.toml", "recsys.toml"])
def test_plan_on_a_shipped_config_gives_json(capsys, config):
    argv = ["plan", str(EXAMPLES / config), "--hosts", "2,4", "--shard-hosts", "1", "--link", "1gbit"]
    assert main([*argv, "--compute-ms", "5", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert [p["worker_hosts"] for p in figures["plans"]] == [2, 4]
    assert all(p["step_s"] > 0.005 for p in figures["plans"])
    if config == "recsys.toml":  # the rows its sub-batch uses, not the tables
        rows = figures["plans"][0]["workload"]["table_bytes_per_worker"]
        assert 0 < rows < (10_000 + 1_000) * (17 * 4 + 8)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bench", "--link", "1gbit"], "--hosts N"),
        (["--bench", "--hosts", "2"], "--link RATE"),
        (["--bench", "--hosts", "0", "--link", "1gbit"], "--hosts 0: every count must be at least 1"),
        (["--bench", "--hosts", "2", "--link", "fast"], "--link: link rate 'fast'"),
        (["--bench", "--hosts", "2,4", "--shard-hosts", "1,2,3", "--link", "1gbit"], "--shard-hosts 1,2,3"),
        (["--bench", "--hosts", "2", "--link", "1gbit", "--whole", "--pipelined"], "give one of them"),
        (["--bench", "--hosts", "512", "--link", "1gbit"], "--hosts 512: the batch of 256 rows"),
        (["--hosts", "2", "--link", "1gbit"], "give a CONFIG to plan, or --bench"),
        (["--bench", "--hosts", "2", "--link", "1gbit", "--constants", "/nonexistent"], "--constants /nonexistent"),
        (["--bench", "--hosts", "2", "--link", "1gbit", "--out", "x.json"], "--out names where --calibrate"),
    ],
)
def test_bad_flags_are_refused_in_one_line_naming_the_flag(capsys, argv, says):
    assert main(["plan", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines


def test_calibrate_writes_constants_that_plan_then_reads(tmp_path, capsys):
    out = tmp_path / "here.json"
    assert main(["plan", "--calibrate", "--out", str(out)]) == 0
    costs = read_constants(out)
    assert costs.per_message_s > 0 and costs.push_s_per_byte > 0 and len(costs.compute_s) >= 2
    capsys.readouterr()
    argv = ["plan", "--bench", "--hosts", "2", "--link", "1gbit", "--constants", str(out), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["constants"]["cores"] >= 1
