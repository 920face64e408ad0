"""psfw export: one embedding table's trained rows in a file a serving side reads
without psfw (safetensors or npz), from a finished run or a running job's newest
complete checkpoint; psfw.load_table reads the file back; bad input is one line."""

import json
import re
import shutil
import threading

import numpy as np
import pytest
from safetensors import safe_open

import psfw
from psfw.base.errors import UsageError
from psfw.cli.main import main
from psfw.jobs import trained
from psfw.jobs.config import load_config
from psfw.jobs.embedded import train
from psfw.jobs.export import export_table
from psfw.services.checkpoint import MANIFEST, complete_steps, step_dir

from helpers import REPO

MF = REPO / "tests" / "models" / "mf_model.py"
DIM = 9  # mf_model's rows: 8 latent values and the id's bias
STEPS, EVERY = 25, 10  # checkpoints of steps 10, 20 and the final 25

CONFIG = f"""
seed = 0

[model]
name = "custom"
path = "{MF}"

[data]
name = "clicks"
users = 300
items = 40
train = 4000
test = 500

[train]
batch_size = 100
steps = {STEPS}
checkpoint_every = {EVERY}
eval_every = 0

[tables.optimizer]
name = "adagrad"
learning_rate = 0.3
initial_accumulator_value = 0.0

[cluster]
workers_per_group = 2
workers_per_process = 1
servers = 2
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run of a tables-only model over 2 shards (trained once for the module)."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "mf.toml").write_text(CONFIG)
    train(load_config(folder / "mf.toml"), folder / "run", progress=False)
    return folder / "run"


def export(capsys, *args) -> tuple[int, list[str], list[str]]:
    """``psfw export ARGS``: its exit status, stdout lines and stderr lines."""
    code = main(["export", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def assert_same_rows(read: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(read[0], expected[0])
    np.testing.assert_array_equal(read[1], expected[1])


@pytest.mark.slow
def test_export_writes_the_final_checkpoints_rows_that_safetensors_and_numpy_read_without_psfw(run, capsys):
    expected = psfw.load_table(run, "user")
    code, out, err = export(capsys, run, "--table", "user")
    default = run / "export" / "user.safetensors"
    assert code == 0 and not err
    assert out == [f"psfw export: table user, {len(expected[0])} rows of {DIM} from step {STEPS} -> {default}"]

    with safe_open(str(default), framework="numpy") as f:  # as a serving side reads it
        assert sorted(f.keys()) == ["ids", "values"]
        ids, values, meta = f.get_tensor("ids"), f.get_tensor("values"), f.metadata()
    assert ids.dtype == np.int64 and values.dtype == np.float32 and values.shape == (len(ids), DIM)
    assert np.all(np.diff(ids) > 0)  # sorted, each once
    assert meta == {"table": "user", "dim": str(DIM), "step": str(STEPS), "run": str(run.resolve())}
    assert_same_rows((ids, values), expected)
    assert_same_rows(psfw.load_table(default), expected)
    assert_same_rows(psfw.load_table(default, "user", step=STEPS), expected)

    npz = run / "served" / "item.npz"  # a folder that does not exist yet
    code, out, _ = export(capsys, run, "--table", "item", "--to", npz, "--step", EVERY)
    assert code == 0 and out[0].endswith(f"from step {EVERY} -> {npz}")
    with np.load(npz, allow_pickle=False) as f:
        assert sorted(f.files) == ["ids", "meta", "values"]
        ids, values, meta = f["ids"], f["values"], json.loads(str(f["meta"]))
    assert meta == {"table": "item", "dim": DIM, "step": EVERY, "run": str(run.resolve())}
    assert ids.dtype == np.int64 and values.dtype == np.float32
    assert_same_rows((ids, values), psfw.load_table(run, "item", step=EVERY))
    assert_same_rows(psfw.load_table(npz, "item"), (ids, values))
    assert not np.array_equal(values, psfw.load_table(run, "item")[1])  # step 10's rows, not the final ones


@pytest.mark.slow
def test_the_docs_snippet_reads_both_formats_without_psfw(run, capsys, monkeypatch):
    """docs/tables.md's snippet, run as written, on files psfw export wrote."""
    text = (REPO / "docs" / "tables.md").read_text().split("## Export for serving", 1)[1]
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(run.parent)
    assert export(capsys, "run", "--table", "user")[0] == 0
    assert export(capsys, "run", "--table", "item", "--to", "item.npz")[0] == 0
    found: dict = {}
    exec(snippet.replace("runs/run-001", "run"), found)
    assert_same_rows((found["ids"], found["values"]), psfw.load_table(run, "user"))
    assert_same_rows((found["item_ids"], found["item_values"]), psfw.load_table(run, "item"))
    assert found["meta"]["table"] == "user" and found["item_meta"]["table"] == "item"


@pytest.mark.slow
def test_an_export_of_a_running_job_takes_its_newest_complete_checkpoint(run, tmp_path, capsys):
    """The shards of a running job are writing step 30: one shard's file is there, the
    other and the manifest are not yet; the export reads step 25, the newest complete."""
    shards = tmp_path / "shards"  # a cluster run's --checkpoint-dir
    shutil.copytree(run / "checkpoints", shards)
    writing = step_dir(shards, 30)
    shutil.copytree(step_dir(shards, STEPS), writing)
    (writing / MANIFEST).unlink()
    (writing / "shard-1.safetensors").unlink()
    assert complete_steps(shards) == [EVERY, 2 * EVERY, STEPS]
    to = tmp_path / "user.npz"
    code, out, _ = export(capsys, run, "--table", "user", "--checkpoint-dir", shards, "--to", to)
    assert code == 0 and f"from step {STEPS} ->" in out[0]
    assert_same_rows(psfw.load_table(to), psfw.load_table(run, "user", step=STEPS))

    (writing / "shard-1.safetensors").write_bytes((step_dir(shards, STEPS) / "shard-1.safetensors").read_bytes())
    code, out, _ = export(capsys, run, "--table", "user", "--checkpoint-dir", shards, "--to", to)
    assert f"from step {STEPS} ->" in out[0]  # every file, but no manifest yet: still being written


@pytest.mark.slow
def test_a_checkpoint_removed_while_it_is_read_is_read_again_from_the_newest_once(run, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shutil.copytree(run / "checkpoints", shards)
    read_rows = trained.load_table_rows
    removals, left = [], [1]  # the steps removed, and how many more to remove

    def pruned_at_the_second_shard(root, step, shard, table, shards):
        if shard == 1 and left[0]:  # shard 0's rows of this step are read already
            left[0] -= 1
            removals.append(step)
            shutil.rmtree(step_dir(root, step))
        return read_rows(root, step, shard, table, shards)

    monkeypatch.setattr(trained, "load_table_rows", pruned_at_the_second_shard)
    exported = export_table(run, "user", tmp_path / "user.safetensors", checkpoint_dir=shards)
    assert removals == [STEPS] and exported.step == 2 * EVERY  # the newest complete step once 25 went
    assert_same_rows(psfw.load_table(exported.path), psfw.load_table(run, "user", step=2 * EVERY))

    left[0] = 2
    with pytest.raises(UsageError, match=r"step 10 in .* was removed while it was read .*: try again$"):
        export_table(run, "user", tmp_path / "user.safetensors", checkpoint_dir=shards)
    assert removals == [STEPS, 2 * EVERY, EVERY] and complete_steps(shards) == []

    shutil.copytree(run / "checkpoints", shards, dirs_exist_ok=True)
    removals.clear()
    left[0] = 1
    with pytest.raises(UsageError, match="try again"):  # a step asked for by number is not replaced
        export_table(run, "user", tmp_path / "user.safetensors", step=STEPS, checkpoint_dir=shards)
    assert removals == [STEPS]


@pytest.mark.slow
def test_exports_taken_while_a_job_trains_are_each_one_complete_step(tmp_path):
    """Export over and over while the shards write (and drop) checkpoints every 2
    steps: each export is a complete step's, or one line that says to try again."""
    (tmp_path / "mf.toml").write_text(CONFIG)
    config = load_config(tmp_path / "mf.toml", ["train.steps=200", "train.checkpoint_every=2"])
    run_dir, to = tmp_path / "run", tmp_path / "user.safetensors"
    trained_done, exported, failures = threading.Event(), [], []

    def export_until_trained() -> None:
        while not complete_steps(run_dir / "checkpoints") and not trained_done.is_set():
            trained_done.wait(0.01)
        while not trained_done.is_set():
            try:
                step = export_table(run_dir, "user", to).step
                with safe_open(str(to), framework="numpy") as f:
                    ids, values, meta = f.get_tensor("ids"), f.get_tensor("values"), f.metadata()
                assert int(meta["step"]) == step and step % 2 == 0
                assert np.all(np.diff(ids) > 0) and values.shape == (len(ids), DIM)
                exported.append(step)
                trained_done.wait(0.005)  # leave the training most of the cores
            except UsageError as err:
                if not str(err).endswith("try again"):
                    failures.append(err)
            except Exception as err:  # reported in the test's own thread
                failures.append(err)

    exporter = threading.Thread(target=export_until_trained)
    exporter.start()
    try:
        train(config, run_dir, progress=False)
    finally:
        trained_done.set()
        exporter.join(60)
    assert not failures, failures
    assert exported and exported == sorted(exported) and exported[0] < 200, exported
    final = export_table(run_dir, "user", to)
    assert final.step == 200
    assert_same_rows(psfw.load_table(to), psfw.load_table(run_dir, "user"))


@pytest.mark.slow
def test_bad_input_is_one_line_with_exit_status_2(run, tmp_path, capsys):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    cases = {
        "no such run folder": ([tmp_path / "nowhere", "--table", "user"], r"nowhere: no such run folder"),
        "unknown suffix": ([run, "--table", "user", "--to", tmp_path / "user.csv"], r"\.safetensors or \.npz"),
        "no table": ([run, "--table", "users"], r"holds no embedding table 'users' \(it holds item, user\)"),
        "no such step": (
            [run, "--table", "user", "--step", 7],
            r"no complete checkpoint of step 7 \(it has 10, 20, 25\)",
        ),
        "no best": ([run, "--table", "user", "--step", "best"], r"keeps no best step"),
        "unwritable": (
            [run, "--table", "user", "--to", blocked / "user.npz"],
            rf"{blocked / 'user.npz'} cannot be written: {blocked} is a file, not a folder",
        ),
    }
    for case, (args, said) in cases.items():
        code, out, err = export(capsys, *args)
        assert code == 2 and not out and len(err) == 1, (case, out, err)
        assert err[0].startswith("psfw export: ") and re.search(said, err[0]), (case, err)

    never_saved = tmp_path / "never-saved"  # a run folder whose shards saved nothing yet
    never_saved.mkdir()
    shutil.copy(run / "config.json", never_saved)
    code, _, err = export(capsys, never_saved, "--table", "user")
    assert code == 2 and len(err) == 1 and "has no complete checkpoint" in err[0]
    assert not (never_saved / "export").exists() and not (run / "export" / "users.safetensors").exists()


@pytest.mark.slow
def test_load_table_checks_a_files_table_and_step_and_names_the_tables_of_a_run(run, tmp_path):
    path = tmp_path / "user.npz"
    export_table(run, "user", path)
    with pytest.raises(UsageError, match=r"holds table 'user', not 'item'"):
        psfw.load_table(path, "item")
    with pytest.raises(UsageError, match=rf"holds the rows of step {STEPS}, not of step {EVERY}"):
        psfw.load_table(path, step=EVERY)
    with pytest.raises(UsageError, match="checkpoint_dir is for a run folder"):
        psfw.load_table(path, checkpoint_dir=run / "checkpoints")
    with pytest.raises(UsageError, match=r"name the table .* \(it holds item, user\)"):
        psfw.load_table(run)
    with pytest.raises(UsageError, match="no such file"):
        psfw.load_table(tmp_path / "absent.safetensors")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, ids=np.array([1, 2]), values=np.array([object(), object()]))
    with pytest.raises(UsageError, match="cannot be read as a table"):  # never unpickled
        psfw.load_table(pickled)


def test_an_unknown_suffix_and_a_missing_run_folder_are_refused_before_anything_is_read(tmp_path):
    with pytest.raises(UsageError, match=r"--to .*user\.csv: give a file name ending in \.safetensors or \.npz"):
        export_table(tmp_path / "nowhere", "user", tmp_path / "user.csv")
    with pytest.raises(UsageError, match="no such run folder"):
        export_table(tmp_path / "nowhere", "user")
    with pytest.raises(UsageError, match="no such run folder"):
        psfw.load_table(tmp_path / "nowhere", "user")
