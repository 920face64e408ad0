"""``psfw plan`` against the emulated hosts: its prediction of the benchmark job's
step within 20 % of the step measured between network namespaces whose links are
shaped (root only; about 6 minutes)."""

import pytest

from psfw.tools.hosts_bench import run_hosts
from psfw.tools.hosts_figures import Setup
from psfw.tools.plan_command import plan_bench
from psfw.tools.plan_model import Cluster
from psfw.tools.testbed import check_can_run

# the step whose prediction is checked: every answer after the whole push (the bench's
# "whole" variant, cluster.pipeline = false). The pipelined step is measured beside it
# by psfw bench --hosts; on this 2-core machine its cores, not its links, set its pace
MODE = "whole"
GRID = [Setup(n, k, rate) for n in (2, 4) for k in (1, 2, 4) for rate in (10**8, 10**9)]


@pytest.fixture
def root():
    why = check_can_run()
    if why is not None:
        pytest.skip(why)


def _cells(setups: list[Setup]) -> dict[Setup, tuple[float, float]]:
    """Each setup's measured step and the plan's, in seconds."""
    measured = run_hosts(setups, warmup=2, steps=4, variants=(MODE,))
    cells = {}
    for entry in measured["hosts"]:
        n, k, rate = entry["worker_hosts"], entry["shard_hosts"], entry["link_bits_per_s"]
        cells[Setup(n, k, rate)] = (entry[MODE]["step_s"], plan_bench(Cluster(n, k, rate, MODE))["step_s"])
    return cells


def _missed(cells: dict[Setup, tuple[float, float]]) -> list[Setup]:
    return [setup for setup, (step, plan) in cells.items() if abs(plan / step - 1) > 0.2]


# the testbed forks its processes from this one, where JAX may run already: they exec
# psfw at once, so JAX's warning about a fork of a process with threads does not apply
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.slow
def test_the_plan_is_within_a_fifth_of_the_measured_step_on_every_cell_of_the_grid(root):
    cells = _cells(GRID)
    assert sorted(cells) == sorted(GRID)
    # a cell that missed is measured once more: a step of a few measured steps is the
    # machine's as much as the links' when something else ran on its 2 cores meanwhile
    again = _missed(cells)
    if again:
        cells.update(_cells(again))
    shown = "\n".join(
        f"{n} x {k} at {r / 1e6:g} Mbit/s: {s * 1e3:.0f} ms, plan {p * 1e3:.0f} ms ({p / s - 1:+.0%})"
        + (" (measured again)" if Setup(n, k, r) in again else "")
        for (n, k, r), (s, p) in sorted(cells.items())
    )
    print(shown)
    assert not _missed(cells), shown
