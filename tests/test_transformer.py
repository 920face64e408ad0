"""The transformer on the standard library's text: it learns and is evaluated while
it trains, and psfw's training of it (a label per position) equals single-process
training."""

import numpy as np
import pytest

from psfw.jobs.config import parse_config
from psfw.jobs.embedded import train_async
from psfw.jobs.outputs import read_records

from helpers import assert_params_close, reference


@pytest.mark.asyncio
async def test_the_transformer_learns_the_standard_library_text_and_is_evaluated_while_it_trains(tmp_path):
    config = parse_config(
        {
            "model": {"name": "transformer", "width": 32, "heads": 2, "depth": 1},
            "data": {"name": "stdlib_text", "seq_len": 32},
            "train": {"batch_size": 16, "steps": 60, "log_every": 10, "eval_every": 20, "eval_batch_size": 512},
            "optimizer": {"name": "adam", "learning_rate": 0.01},
            "cluster": {"workers_per_group": 2, "workers_per_process": 2, "servers": 2},
        }
    )
    result = await train_async(config, tmp_path / "run", progress=False)
    evals = [r for r in read_records(tmp_path / "run" / "metrics.jsonl") if r.get("eval")]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals == result.evals
    assert 7.5 < evals[0]["test_bits_per_token"] < 8.5, "a fresh model guesses among 256 bytes"
    assert result.test_metrics["bits_per_token"] < evals[0]["test_bits_per_token"] - 2.0
    assert result.test_metrics["bits_per_token"] == pytest.approx(result.test_loss / np.log(2))
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000


@pytest.mark.asyncio
async def test_the_transformer_in_psfw_equals_single_process_training():
    """Sequence labels (a label per position) travel the same scheme."""
    config = parse_config(
        {
            "seed": 5,
            "model": {"name": "transformer", "width": 16, "heads": 2, "depth": 1, "ff": 2},
            "data": {"name": "stdlib_text", "seq_len": 8},
            "train": {"batch_size": 12, "steps": 3, "log_every": 1},
            "optimizer": {"name": "sgd", "learning_rate": 0.5},
            "cluster": {"workers_per_group": 3, "workers_per_process": 3, "servers": 2, "slice_bytes": 1024},
        }
    )
    result = await train_async(config, progress=False, outputs=False)
    assert_params_close(result.params, reference(config, 3))
