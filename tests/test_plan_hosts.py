"""``psfw plan`` against the emulated hosts: its prediction of the benchmark job's
step within 20 % of the step measured between network namespaces whose links are
shaped (root only; about 10 minutes)."""

import pytest

from psfw.tools.hosts_bench import run_hosts
from psfw.tools.hosts_figures import Setup
from psfw.tools.plan_command import plan_bench
from psfw.tools.plan_model import Cluster
from psfw.tools.testbed import check_can_run

SHAPES = [(n, k) for n in (2, 4) for k in (1, 2, 4)]
# the bench's variant measured, the plan's mode, and the grid: the step whose every
# answer waits for the whole push (cluster.pipeline = false) at 100 Mbit/s and 1
# Gbit/s; the pipelined step at 50 Mbit/s, where the links and not this machine's 2
# cores (which the plan does not share between hosts) set its pace
GRIDS = {
    ("whole", "whole"): [Setup(n, k, rate) for n, k in SHAPES for rate in (10**8, 10**9)],
    ("insecure", "pipelined"): [Setup(n, k, 50 * 10**6) for n, k in SHAPES],
}


@pytest.fixture
def root():
    why = check_can_run()
    if why is not None:
        pytest.skip(why)


def _cells(setups: list[Setup], variant: str, mode: str) -> dict[Setup, tuple[float, float]]:
    """Each setup's measured step and the plan's, in seconds."""
    measured = run_hosts(setups, warmup=2, steps=4, variants=(variant,))
    cells = {}
    for entry in measured["hosts"]:
        n, k, rate = entry["worker_hosts"], entry["shard_hosts"], entry["link_bits_per_s"]
        cells[Setup(n, k, rate)] = (entry[variant]["step_s"], plan_bench(Cluster(n, k, rate, mode))["step_s"])
    return cells


def _missed(cells: dict[Setup, tuple[float, float]]) -> list[Setup]:
    return [setup for setup, (step, plan) in cells.items() if abs(plan / step - 1) > 0.2]


# the testbed forks its processes from this one, where JAX may run already: they exec
# psfw at once, so JAX's warning about a fork of a process with threads does not apply
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
@pytest.mark.slow
@pytest.mark.parametrize(("variant", "mode"), list(GRIDS))
def test_the_plan_is_within_a_fifth_of_the_measured_step_on_every_cell_of_the_grid(root, variant, mode):
    grid = GRIDS[variant, mode]
    cells = _cells(grid, variant, mode)
    assert sorted(cells) == sorted(grid)
    # a cell that missed is measured once more, and keeps the faster of its two steps
    # (as psfw bench keeps its best round): a step of a few measured steps is the
    # machine's as much as the links' when something else ran on its 2 cores meanwhile
    again = _missed(cells)
    if again:
        for setup, cell in _cells(again, variant, mode).items():
            cells[setup] = min(cells[setup], cell)
    shown = "\n".join(
        f"{mode}, {n} x {k} at {r / 1e6:g} Mbit/s: {s * 1e3:.0f} ms, plan {p * 1e3:.0f} ms ({p / s - 1:+.0%})"
        + (" (measured again)" if Setup(n, k, r) in again else "")
        for (n, k, r), (s, p) in sorted(cells.items())
    )
    print(shown)
    assert not _missed(cells), shown
