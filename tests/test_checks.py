"""What psfw checks of a job before anything starts (psfw/jobs/checks.py): what the
machine can hold, and the data. Each mistake is one line from ``psfw train``, exit 2,
and no run folder."""

import resource

import pytest

from psfw.cli.main import main
from psfw.jobs.checks import available_memory

MLP_BYTES_PER_HIDDEN = (64 + 1 + 10) * 4  # digits: w0, b0 and w1 of a hidden unit, float32


def _train(tmp_path, capsys, text):
    """``psfw train`` of the config ``text``: its exit code, its one line, and
    whether it wrote the run folder."""
    config = tmp_path / "job.toml"
    config.write_text(text)
    run_dir = tmp_path / "run"
    code = main(["train", str(config), "--run-dir", str(run_dir)])
    lines = capsys.readouterr().err.strip().splitlines()
    return code, lines, run_dir.exists(), config


def test_parameters_larger_than_the_machine_are_one_line_before_anything_starts(tmp_path, capsys):
    code, lines, written, config = _train(tmp_path, capsys, "[model]\nhidden = [100000000000]\n[train]\nsteps = 2\n")
    assert (code, written) == (2, False), lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"psfw: config error: {config}: model.name: mlp: the parameters need 30000.0 GB, ")
    assert lines[0].endswith("GB available: make the model smaller")


def test_parameters_that_fit_once_but_not_beside_the_shards_and_their_state_are_one_line(tmp_path, capsys):
    """A worker process holds the parameters once; ``psfw train`` also holds the
    shards' copy and adam's two moments: four times in all."""
    hidden = int(available_memory() * 0.45 / MLP_BYTES_PER_HIDDEN)
    text = f"[model]\nhidden = [{hidden}]\n[optimizer]\nname = 'adam'\n[train]\nsteps = 2\n"
    code, lines, written, config = _train(tmp_path, capsys, text)
    assert (code, written) == (2, False), lines
    assert len(lines) == 1, lines
    assert " twice (the workers' copy and the shards'), and the shards' optimizer state " in lines[0]
    assert lines[0].endswith("GB available: make the model smaller")


@pytest.fixture
def few_open_files():
    """This process may open 512 files for the test's length."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize(("transport", "servers", "need"), [("auto", 100, 656), ("grpc", 40, 576)])
def test_more_shards_than_open_files_allow_is_one_line(tmp_path, capsys, few_open_files, transport, servers, need):
    text = f"[train]\nsteps = 2\n[cluster]\nservers = {servers}\ntransport = '{transport}'\n"
    code, lines, written, config = _train(tmp_path, capsys, text)
    assert (code, written) == (2, False), lines
    assert lines == [
        f"psfw: config error: {config}: cluster.servers: {servers} shards in this process need about {need} open "
        "files, and it may open 512 (ulimit -n): lower cluster.servers, or raise the limit"
    ]
