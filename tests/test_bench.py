"""``psfw bench`` runs and reports every figure it promises (tiny sizes: this checks
the harness, not the speed)."""

import json
import subprocess
import sys

import pytest

from psfw.tools.bench_command import parse_size

from helpers import psfw_command

PSFW = [sys.executable, "-m", "psfw.cli", "bench", "--json"]


@pytest.mark.unit
def test_sizes_parse_with_units():
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("1GB") == 10**9
    assert parse_size("4096") == 4096
    assert parse_size("1.5 KiB") == 1536
    for text in ("lots", "1.2.3", "-1", ""):
        with pytest.raises(ValueError, match="use a number with an optional unit"):
            parse_size(text)


@pytest.mark.slow
def test_bench_reports_every_variant_and_ratio():
    done = subprocess.run(
        [*PSFW, "--steps", "4", "--warmup", "2", "--rounds", "1"], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["devices"] and figures["rounds"] == 1
    variants = ("embedded", "separate_processes", "grpc", "tcp", "tcp_compressed", "tls", "two_groups")
    for key in ("single_process", "data_parallel_bound", *variants):
        assert figures[key] > 0
        if key != "single_process":
            assert figures[f"{key}_ratio"] == pytest.approx(figures[key] / figures["single_process"])
            assert len(figures[f"{key}_round_ratios"]) == 1
        if key not in ("single_process", "data_parallel_bound"):
            assert figures[f"{key}_of_bound"] == pytest.approx(figures[key] / figures["data_parallel_bound"])
    # bfloat16 gradients with error feedback: close to the uncompressed run, not equal to it
    assert 0 < figures["tcp_compressed_param_gap"] < 0.05
    assert figures["tcp_param_gap"] == 0, "the link carries the same bytes as gRPC"
    assert figures["tls_param_gap"] == 0, "the link in TLS carries the same bytes as gRPC"


@pytest.mark.slow
def test_bench_transfer_reports_both_directions():
    done = subprocess.run([*PSFW, "--transfer", "4MiB"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["transfer_bytes"] == 4 * 2**20
    assert all(
        figures[k] > 0
        for k in ("grpc_push_gb_s", "grpc_pull_gb_s", "tcp_push_gb_s", "tcp_pull_gb_s", "in_process_push_gb_s")
    )


@pytest.mark.unit
def test_bench_refuses_counts_it_cannot_time(capsys):
    done = psfw_command(capsys, "bench", "--json", "--warmup", "0")
    assert done.returncode == 2
    assert "--warmup 0" in done.stderr and "at least 1" in done.stderr
    done = psfw_command(capsys, "bench", "--json", "--transfer", "lots")
    assert done.returncode == 2
    assert "use a number with an optional unit" in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--events", "5"], "--events belongs to the stream: run psfw bench --sparse --stream --events"),
        (["--sparse", "--plot", "x.png"], "--plot belongs to the stream"),
        (["--stream"], "--stream measures embedding tables: run psfw bench --sparse --stream"),
        (["--sparse", "--stream", "--scale"], "--stream runs alone"),
        (["--sparse", "--stream", "--events", "1000", "--uncapped-events", "2000"], "at most --events (1,000)"),
        (["--sparse", "--stream", "--events", "50000", "--distinct", "40000"], "raise --events or lower --distinct"),
    ],
)
def test_the_stream_flags_are_refused_where_they_do_not_belong(args, says, capsys):
    done = psfw_command(capsys, "bench", "--json", *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert says in done.stderr


@pytest.mark.unit
@pytest.mark.parametrize(
    ("flag", "size", "least"), [("--transfer", "0", 8), ("--transfer", "7", 8), ("--memory", "0", 4)]
)
def test_bench_refuses_sizes_below_what_it_measures(flag, size, least, capsys):
    done = psfw_command(capsys, "bench", "--json", flag, size)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"psfw bench: {flag} {size}: the smallest size it measures is {least} bytes" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("size", ["8", "1KiB"])
def test_bench_transfers_models_smaller_than_a_slice(size):
    """A model under 2 MiB is cut into smaller slices, so both shards hold some."""
    done = subprocess.run([*PSFW, "--transfer", size], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures.pop("transfer_bytes") == parse_size(size)
    assert all(value > 0 for value in figures.values()), figures


def test_the_sparse_bench_moves_the_same_bytes_whatever_the_table_size():
    """Only the rows a batch uses travel: a table 10x larger moves about the same
    bytes per step, while the dense path would move the whole table both ways."""
    from psfw.tools.sparse_bench import run_sparse

    figures = run_sparse(sizes=(10**5, 10**6), steps=3, warmup=2, dense_limit=64 << 20)
    small, large = figures["sparse_100000_bytes_per_step"], figures["sparse_1000000_bytes_per_step"]
    assert 0 < small <= large < 1.3 * small
    assert figures["dense_100000_bytes_per_step"] >= 2 * 10**5 * 64 * 4 > 5 * small
    assert figures["dense_100000_samples_per_s"] > 0 and figures["dense_1000000_samples_per_s"] is None
    assert figures["sparse_1000000_samples_per_s"] > 0


@pytest.mark.slow
def test_the_sparse_bench_measures_scale_and_a_shards_memory():
    from psfw.tools.sparse_bench import run_memory, run_scale

    scale = run_scale(rows=1024, seconds=0.5)
    assert all(scale[f"sparse_scale_{n}_shards_rows_per_s"] > 0 for n in (1, 2, 4))
    memory = run_memory(1 << 30, steps=2)  # large enough that the process itself (~200 MB) weighs little
    held = memory["sparse_memory_shard_held_mb"]
    assert min(held) > 1000  # each shard holds its half of the table and its Adagrad state
    assert max(memory["sparse_memory_shard_peak_over_held"]) < 2.5


@pytest.mark.slow
def test_the_sparse_bench_holds_its_cap_and_moves_the_same_bytes_under_it():
    """The same steps with and without tables.max_rows: each shard holds at most half
    the cap with it and more without, and every step moves the same rows either way."""
    from psfw.tools.sparse_bench import run_sparse_cap

    figures = run_sparse_cap(rows=10**6, max_rows=20_000, steps=3, warmup=2)
    assert figures["sparse_capped_rows_held"] == [10_000, 10_000]
    assert min(figures["sparse_uncapped_rows_held"]) > 10_000
    assert figures["sparse_capped_bytes_per_step"] == figures["sparse_uncapped_bytes_per_step"] > 0
    for run in ("capped", "uncapped"):
        assert min(figures[f"sparse_{run}_shard_rss_mb"]) > 0 and figures[f"sparse_{run}_samples_per_s"] > 0
