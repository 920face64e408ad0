"""``psfw bench --hosts``: the configurations its flags name, the link arithmetic, the
report; a tiny configuration between emulated hosts (root only); and the testbed left
by a run that was killed or interrupted removed by the next."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from psfw.tools import testbed
from psfw.tools.hosts_figures import Setup, Snapshot, model_bytes, ps_model_floor, ring_model_floor, setups, window
from psfw.tools.hosts_report import hosts_table
from psfw.tools.testbed import Link, check_can_run, parse_rate, rate_text, tbf_burst

from helpers import psfw_command

M = 7_454_760  # the benchmark MLP's float32 parameters
HOSTS = [sys.executable, "-m", "psfw.cli", "bench", "--hosts"]


@pytest.mark.unit
def test_the_flags_name_each_worker_count_with_its_shard_count_at_each_rate():
    assert setups("2,4", None, "200mbit,1gbit") == [
        Setup(2, 2, 200 * 10**6),
        Setup(2, 2, 10**9),
        Setup(4, 4, 200 * 10**6),
        Setup(4, 4, 10**9),
    ]
    assert setups("2,4", "1", "100mbit") == [Setup(2, 1, 10**8), Setup(4, 1, 10**8)]
    assert setups("2,4", "1,2", "1gbit") == [Setup(2, 1, 10**9), Setup(4, 2, 10**9)]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("hosts", "shards", "link", "says"),
    [
        ("3", None, "200mbit", "does not split evenly over 3 worker hosts"),
        ("0", None, "200mbit", "every count must be at least 1"),
        ("two", None, "200mbit", "give a count of hosts"),
        ("2,4", "1,2,3", "200mbit", "one for each of --hosts 2,4"),
        ("32", "40", "200mbit", "at most 64 hosts"),
        ("2", None, "200mbps", "use a number of bits per second"),  # tc's mbps is megabytes: never guessed
        ("2", None, "200", "use a number of bits per second"),
        ("2", None, "500kbit", "the slowest link it emulates is 1mbit"),
    ],
)
def test_counts_and_rates_it_cannot_run_are_refused_in_one_line(hosts, shards, link, says):
    with pytest.raises(ValueError, match=says):
        setups(hosts, shards, link)


@pytest.mark.unit
def test_rates_read_as_tc_reads_them_and_the_bucket_holds_a_segment():
    assert parse_rate("200mbit") == parse_rate("200 Mbit/s") == 200 * 10**6
    assert parse_rate("1Gbit") == parse_rate("1000mbit") == 10**9
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert rate_text(200 * 10**6) == "200 Mbit/s" and rate_text(10**9) == "1 Gbit/s"
    assert tbf_burst(200 * 10**6) == 64 * 1024  # a 64 KiB offload segment must fit
    assert tbf_burst(10**9) == 250_000  # 2 ms at the rate


@pytest.mark.unit
def test_the_model_floors_are_the_cost_models():
    assert model_bytes() == M
    rate = 200 * 10**6
    # k >= n: M up and M down per worker host, overlapped
    assert ps_model_floor(M, 2, 2, rate) == pytest.approx(M * 8 / rate)
    assert ps_model_floor(M, 4, 4, rate) == pytest.approx(M * 8 / rate)
    # k < n: a shard host carries n M / k each way
    assert ps_model_floor(M, 2, 1, rate) == pytest.approx(2 * M * 8 / rate)
    # ring all-reduce: 2 (n - 1) / n M each way on every link
    assert ring_model_floor(M, 2, rate) == pytest.approx(M * 8 / rate)
    assert ring_model_floor(M, 4, rate) == pytest.approx(1.5 * M * 8 / rate)


@pytest.mark.unit
def test_a_window_gives_step_time_bytes_per_step_busy_links_and_floors():
    rate = 100 * 10**6  # 12.5 MB/s
    first = Snapshot(10.0, {"w0": Link(1000, 2000), "s0": Link(0, 0)}, {"w0": 1.0, "s0": 3.0}, machine=(100, 1000, 50))
    steps, step_s = 4, 2.0
    last = Snapshot(
        10.0 + steps * step_s,
        {"w0": Link(1000 + 4 * 5_000_000, 2000 + 4 * 6_000_000), "s0": Link(4 * 6_000_000, 4 * 5_000_000)},
        {"w0": 1.4, "s0": 4.2},
        machine=(900, 2000, 250),
    )
    got = window(first, last, steps, rate, cpus=2)
    assert got["step_s"] == pytest.approx(2.0)
    assert got["samples_per_s"] == pytest.approx(128)
    w0 = got["links"]["w0"]
    assert (w0["up_bytes"], w0["down_bytes"]) == (5_000_000, 6_000_000)
    assert w0["busy_up"] == pytest.approx(5e6 / (12.5e6 * 2)) and w0["busy_down"] == pytest.approx(6e6 / 25e6)
    assert w0["cpu_s"] == pytest.approx(0.1) and w0["cores"] == pytest.approx(0.05)
    # the busiest link's larger direction at the rate; both directions one after the other
    assert got["link_floor_s"] == pytest.approx(6e6 / 12.5e6)
    assert got["link_serial_s"] == pytest.approx(11e6 / 12.5e6)
    assert got["step_over_floor"] == pytest.approx(2.0 / 0.48)
    assert got["cpu_share"] == pytest.approx((0.4 + 1.2) / (8.0 * 2))
    assert got["machine_busy"] == pytest.approx(0.8) and got["packet_share"] == pytest.approx(0.2)
    assert got["cpu_saturated"] is False  # the machine 0.8 busy, s0's processes 0.15 of a core
    one_host = last._replace(cpu={"w0": 1.4, "s0": 3.0 + 4 * 1.9})  # s0's processes: 0.95 of a core
    assert window(first, one_host, steps, rate, cpus=2)["cpu_saturated"] is True
    machine = last._replace(machine=(1000, 2000, 250))  # the machine 0.9 busy
    assert window(first, machine, steps, rate, cpus=2)["cpu_saturated"] is True


def _variant(step_s: float) -> dict:
    link = {"up_bytes": M, "down_bytes": M, "busy_up": 0.5, "busy_down": 0.5, "cpu_s": 0.01, "cores": 0.02}
    return {
        "step_s": step_s,
        "samples_per_s": 256 / step_s,
        "link_floor_s": 0.3,
        "link_serial_s": 0.6,
        "step_over_floor": step_s / 0.3,
        "busiest_link": "s0",
        "links": {"w0": link, "s0": link},
        "cpu_share": 0.2,
        "packet_share": 0.1,
        "machine_busy": 0.95,
        "cpu_saturated": False,
    }


@pytest.mark.unit
def test_the_table_puts_each_variant_beside_the_floor_and_says_what_did_not_run():
    figures = {"model_bytes": M, "batch": 256, "warmup": 3, "steps": 12, "cpus": 2}
    entry = {"worker_hosts": 1, "shard_hosts": 1, "link_bits_per_s": 200 * 10**6}
    entry.update(ps_model_floor_s=0.298, ring_model_floor_s=0.0, insecure=_variant(0.65), tls=_variant(0.7))
    figures["hosts"] = [{**entry, "ddp": None}]
    text = "\n".join(hosts_table(figures))
    assert "1 worker hosts x 1 shard hosts, each link 200 Mbit/s each way" in text
    assert "psfw insecure    0.650" in text and "psfw TLS         0.700" in text
    assert 'DDP (gloo)     not run (pip install ".[peers]" to compare)' in text
    assert " 7.45/ 7.45  50%/ 50% 0.010" in text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--link", "1gbit"], "--link belongs to --hosts: run psfw bench --hosts N --link ..."),
        (["--shard-hosts", "2"], "--shard-hosts belongs to --hosts"),
        (
            ["--hosts", "2", "--sparse", "--rounds", "2"],
            "--hosts runs alone, each configuration once: drop --sparse, --rounds",
        ),
        (["--hosts", "3"], "does not split evenly"),
    ],
)
def test_hosts_flags_it_cannot_use_are_refused(capsys, args, says):
    done = psfw_command(capsys, "bench", *args)
    assert done.returncode == 2
    assert says in done.stderr


@pytest.mark.unit
def test_without_root_it_says_why_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(testbed.os, "geteuid", lambda: 1000)
    done = psfw_command(capsys, "bench", "--hosts", "2")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "psfw bench: --hosts cannot run here: it makes network namespaces and shapes links with tc, which needs "
        "root: run it as root"
    ]


@pytest.fixture
def root():
    why = check_can_run()
    if why is not None:
        pytest.skip(why)


def _left(pid: int) -> list[str]:
    """The namespaces and folders a testbed owned by process ``pid`` left."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split()
    folders = [p.name for p in testbed.Path(testbed.tempfile.gettempdir()).glob(f"{testbed.PREFIX}{pid}x*")]
    return [n for n in names if n.startswith(f"{testbed.PREFIX}{pid}x")] + folders


@pytest.mark.slow
def test_a_tiny_configuration_reports_every_figure(root):
    run = subprocess.Popen(
        [*HOSTS, "2", "--shard-hosts", "1", "--link", "100mbit", "--steps", "3", "--warmup", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = run.communicate(timeout=600)
    finally:
        run.kill()
    assert run.returncode == 0, err[-3000:]
    assert not _left(run.pid), "the run removed its namespaces and folder"
    assert "psfw bench: 2 x 1 at 100 Mbit/s, psfw insecure:" in err
    figures = json.loads(out)
    assert (figures["model_bytes"], figures["steps"], figures["warmup"]) == (M, 3, 1)
    [entry] = figures["hosts"]
    assert (entry["worker_hosts"], entry["shard_hosts"], entry["link_bits_per_s"]) == (2, 1, 10**8)
    assert entry["ps_model_floor_s"] == pytest.approx(2 * M * 8 / 1e8)
    assert entry["insecure"]["path"] == "shard 0 link (tcp)"
    assert entry["tls"]["path"] == "shard 0 link (tcp, TLS)"
    variants = ["insecure", "tls"] + (["ddp"] if entry["ddp"] is not None else [])
    for key in variants:
        got = entry[key]
        assert got["step_s"] > 0 and got["samples_per_s"] == pytest.approx(256 / got["step_s"])
        assert set(got["links"]) == {"w0", "w1", "s0"}
        workers = [got["links"][h] for h in ("w0", "w1")]
        for link in workers:  # the model up and the model down, and the headers of its packets
            assert 0.75 * M < link["up_bytes"] < 1.35 * M and 0.75 * M < link["down_bytes"] < 1.35 * M
            assert 0 < link["busy_up"] < 1.1 and link["cpu_s"] > 0
        largest = max(max(v["up_bytes"], v["down_bytes"]) for v in got["links"].values())
        assert got["link_floor_s"] == pytest.approx(largest * 8 / 1e8)
        assert got["step_s"] > 0.9 * got["link_floor_s"]  # no step beats its link
        assert 0 <= got["cpu_share"] <= 1 and isinstance(got["cpu_saturated"], bool)
    for key in ("insecure", "tls"):  # the shard host carries both workers' bytes
        shard = entry[key]["links"]["s0"]
        assert 1.5 * M < shard["up_bytes"] < 2.7 * M and entry[key]["busiest_link"] == "s0"
    if entry["ddp"] is not None:
        assert entry["ddp"]["links"]["s0"]["up_bytes"] < 0.01 * M  # DDP's ring leaves the shard host out


def _start_and_wait_for_workers(tmp_path) -> tuple[subprocess.Popen, str]:
    """A bench of many steps, once its first worker process runs in its host; and the
    name of that host's namespace."""
    with (tmp_path / "bench.log").open("w") as log:  # the child writes to its own copy
        proc = subprocess.Popen(
            [*HOSTS, "1", "--link", "100mbit", "--steps", "200", "--warmup", "1"], stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        worker = next((n for n in _left(proc.pid) if n.endswith("-w0")), None)
        if worker is not None and _pids(worker):
            return proc, worker
        assert proc.poll() is None, (tmp_path / "bench.log").read_text()[-2000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no worker process ran within 120 s")


def _alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` that still run (not ended, nor ended and waiting to be reaped)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            alive.append(pid)
    return alive


def _pids(namespace: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(p) for p in done.stdout.split()]


@pytest.mark.slow
def test_a_run_killed_midway_leaves_nothing_the_next_trips_over(root, tmp_path):
    proc, worker = _start_and_wait_for_workers(tmp_path)
    pids = _pids(worker)
    proc.kill()  # no chance to clean up
    proc.wait(30)
    assert _left(proc.pid), "the killed run's namespaces are still there"
    with testbed.Testbed(["w0", "s0"]) as bed:  # the next one: the same host names, the same addresses
        assert not _left(proc.pid), "the next testbed removed the killed run's"
        bed.shape(10**8)
        assert set(bed.links()) == {"w0", "s0"}
    assert not _alive(pids), "the killed run's processes ended with it"
    assert not _left(os.getpid()), "and the next testbed removed its own"


@pytest.mark.slow
def test_an_interrupted_run_removes_what_it_made(root, tmp_path):
    proc, worker = _start_and_wait_for_workers(tmp_path)
    pids = _pids(worker)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130
    assert not _left(proc.pid)
    assert not _alive(pids)
