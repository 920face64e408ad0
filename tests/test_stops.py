"""``psfw train`` ends, whatever fails and whenever it is stopped: a failure in a
worker, a stub or a shard ends the process with one line and a non-zero status within
seconds; the first Ctrl-C stops it gracefully within seconds, a second one at once,
even while a worker is in a long step. Real processes of the command."""

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import REPO

MODELS = REPO / "tests" / "models"
FAULTS = REPO / "tests" / "faults.py"


def config(tmp_path, model="faulty_model.py", options="", steps=100_000, data='name = "digits"', extra=""):
    path = tmp_path / "job.toml"
    path.write_text(
        f'seed = 0\n[model]\nname = "custom"\npath = "{MODELS / model}"\n{options}\n[data]\n{data}\n'
        f"[train]\nsteps = {steps}\nbatch_size = 64\n{extra}\n"
        "[cluster]\nworkers_per_group = 2\nworkers_per_process = 1\nservers = 2\n"
    )
    return path


class Running:
    """A ``psfw`` process whose output lines are read as they come (bounded waits)."""

    def __init__(self, argv, tmp_path):
        self.process = subprocess.Popen(
            [*argv, "--run-dir", str(tmp_path / "run"), "--no-progress"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, []), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, kept):
        for line in stream:
            kept.append(line.rstrip("\n"))
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if text in self.lines.get(timeout=left):
                    return
            except queue.Empty:
                break
        self._close(kill=True)
        pytest.fail(f"no line with {text!r} within {timeout} s: {self.err[-5:]}")

    def _close(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        self.process.wait()
        for reader in self.readers:
            reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()

    def ends_within(self, seconds: float) -> float:
        """The seconds it took to end (fails the test past ``seconds``)."""
        started = time.monotonic()
        try:
            self.process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            self._close(kill=True)
            pytest.fail(f"still running {seconds} s later: {self.err[-5:]}")
        took = time.monotonic() - started
        self._close(kill=False)
        return took


FAILURES = {
    # a model whose loss raises only at run time, inside the jitted step
    "worker's step": (
        dict(options="options = {fail_at = 5}"),
        [],
        r"psfw: worker [01] of group 0 failed at step \d+: RuntimeError: the loss failed on purpose at call \d+",
    ),
    # the same loss, failing only in the final evaluation (batches of 50 rows), after the tasks ended
    "final evaluation": (
        dict(options="options = {fail_rows = 50}", steps=5, extra="eval_batch_size = 50"),
        [],
        r"psfw train: failed: RuntimeError: the loss failed on purpose on a batch of 50 rows \(-v shows where\)",
    ),
    "worker's thread": (dict(), ["worker"], r"psfw: worker 1 of group 0 failed at step 0: StopIteration"),
    "stub": (
        dict(
            model="mf_model.py",
            data='name = "clicks"\nusers = 300\nitems = 40\ntrain = 4000\ntest = 500',
        ),
        ["stub"],
        r"psfw: the stub of process [01] failed: .*headers raised StopIteration",
    ),
    "shard": (
        dict(),
        ["shard"],
        r"psfw: shard [01] \(in-process\) Update: INTERNAL: shard [01]: the update of group 0 step \d+ failed "
        r"\(RuntimeError\(\"an injected fault in the shard's update\"\)\)",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", FAILURES)
def test_a_failure_in_any_task_ends_the_command_with_one_line(tmp_path, where):
    settings, fault, line = FAILURES[where]
    entry = [sys.executable, str(FAULTS), *fault] if fault else [sys.executable, "-m", "psfw.cli"]
    run = Running([*entry, "train", str(config(tmp_path, **settings))], tmp_path)
    run.ends_within(240)  # start-up and compilation on a busy machine; a hang never ends
    assert run.process.returncode == 1, run.err
    assert not any("Traceback" in e for e in run.err), "\n".join(run.err)
    assert re.fullmatch(line, run.err[-1]), run.err


@pytest.mark.slow
def test_ctrl_c_stops_a_training_gracefully_with_one_line(tmp_path):
    run = Running([sys.executable, "-m", "psfw.cli", "train", str(config(tmp_path))], tmp_path)
    run.wait_for("group 0 step", 240)
    run.process.send_signal(signal.SIGINT)
    run.ends_within(30)
    assert run.process.returncode == 130, run.err
    assert run.err[-1].startswith("psfw: interrupted"), run.err
    assert not any("Traceback" in e for e in run.err), "\n".join(run.err)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signals, within, line",
    [(1, 30, "psfw: interrupted; "), (2, 10, "psfw: interrupted again: stopped at once; ")],
    ids=["once: gracefully", "twice: at once"],
)
def test_ctrl_c_stops_even_a_worker_in_a_long_step(tmp_path, signals, within, line):
    run = Running(
        [sys.executable, "-m", "psfw.cli", "train", str(config(tmp_path, options="options = {sleep_s = 600}"))],
        tmp_path,
    )
    run.wait_for("the loss sleeps", 240)  # a worker is in a step of 10 minutes
    run.process.send_signal(signal.SIGINT)
    if signals == 2:
        time.sleep(0.2)
        run.process.send_signal(signal.SIGINT)
    run.ends_within(within)
    assert run.process.returncode == 130, run.err
    assert run.err[-1].startswith(line), run.err
    assert not any("Traceback" in e for e in run.err), "\n".join(run.err)
