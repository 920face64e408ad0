import json

import jax
import pytest

from psfw.base.errors import ConfigError
from psfw.jobs.config import load_config, parse_config
from psfw.jobs.job import build_job


def _write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.unit
@pytest.mark.parametrize("name", ["digits_mlp.toml", "digits_cnn.toml", "my_model.toml"])
def test_shipped_examples_validate(examples, name):
    config = load_config(examples / name)
    assert config.cluster.servers >= 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[train]\nbatchsize = 4\n", "train.batchsize: unknown key"),
        ("[optimizer]\nlearning_rate = 'fast'\n", "optimizer.learning_rate: Input should be a valid number"),
        ("[optimizer]\nname = 'lbfgs'\n", "optimizer.name: Input should be"),
        (
            "[train]\nbatch_size = 2\n[cluster]\nworkers_per_group = 4\nworkers_per_process = 4\n",
            "train.batch_size: 2 is smaller than cluster.workers_per_group (4)",
        ),
        (
            "[cluster]\nworkers_per_group = 3\nworkers_per_process = 2\n",
            "cluster.workers_per_group: 3 must be a multiple of cluster.workers_per_process (2)",
        ),
        ("[cluster]\nstaleness = 1\nwarmup_steps = 5\n", "cluster.warmup_steps: lets group 0 run ahead alone"),
        ("[train]\nsteps = 10\nepochs = 2\n", "train.epochs: give train.steps or train.epochs, not both"),
        ("[model]\nname = 'custom'\n", "model.path: a custom model needs path"),
        ("[model]\nhidden = [8, 0]\n", "model.hidden: layer sizes must be at least 1 (got [8, 0])"),
        ("[model]\nchannels = [-1]\n", "model.channels: layer sizes must be at least 1 (got [-1])"),
        ("source = 'elsewhere.toml'\n", "source: unknown key"),
        ("seed = [1\n", "not valid TOML"),
        (
            "seed = -1\n",
            "seed: must be from 0 to 4294967295: a seed is 32 bits (a larger one makes a smaller one's key) (got -1)",
        ),
        (
            "[cluster]\nservers = 100000\n",
            "cluster.servers: at most 1024: every worker process keeps a connection to each shard",
        ),
        ("seed = 4294967296\n", "seed: must be from 0 to 4294967295"),
        ("seed = 9223372036854775808\n", "seed: must be from 0 to 4294967295"),
        ("[optimizer]\nlearning_rate = inf\n", "optimizer.learning_rate: Input should be a finite number"),
        ("[optimizer]\nname = 'adam'\neps = inf\n", "optimizer.eps: Input should be a finite number"),
        ("[optimizer.schedule]\nname = 'linear'\nend_value = inf\n", "optimizer.schedule.end_value: Input should be"),
        ("[data]\nfeatures = 10\n", "data.features: applies to synthetic data only, not to digits: drop it"),
        (
            "[optimizer.schedule]\nname = 'warmup_cosine'\nsteps = 100\nwarmup_steps = 500\n",
            "optimizer.schedule.warmup_steps: 500 must be below optimizer.schedule.steps (100)",
        ),
        (
            "[optimizer.schedule]\nname = 'warmup_cosine'\nsteps = 100\nwarmup_steps = 100\n",
            "optimizer.schedule.warmup_steps: 100 must be below",
        ),
        (
            "[optimizer.schedule]\nname = 'exponential'\ndecay_rate = 5.0\n",
            "optimizer.schedule.decay_rate: 5.0 would grow the learning rate without bound: use a rate in (0, 1]",
        ),
        (
            "[optimizer]\nlearning_rate = 0.1\n[optimizer.schedule]\nname = 'linear'\nend_value = 5.0\n",
            "optimizer.schedule.end_value: 5.0 is above the peak learning_rate (0.1)",
        ),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_file_and_the_field(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and fragment in message
    assert "\n" not in message


SYNTHETIC = "[data]\nname = 'synthetic'\nfeatures = 4\ntrain = 10\ntest = 4\n"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "start"),
    [
        (
            SYNTHETIC + "[train]\nbatch_size = 4\n[model]\nname = 'cnn'\n",
            "model.name: cnn needs image data (H, W, C), data.name synthetic",
        ),
        ("[model]\nname = 'custom'\npath = 'absent.py'\n", "model.path: model file "),
        (SYNTHETIC, "train.batch_size: 64 is larger than the 10 training rows of data.name synthetic"),
        (
            "[train]\nsteps = 3\n[cluster]\nworker_groups = 2\nwarmup_steps = 3\n",
            "cluster.warmup_steps: 3 warmup steps leave nothing of the 3 steps",
        ),
    ],
)
def test_errors_found_after_validation_name_the_file_and_the_field(tmp_path, text, start):
    """The data, the model and the layout are checked once loaded: those errors lead
    with the file and the field too."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        build_job(load_config(path))
    assert str(err.value).startswith(f"{path}: {start}")


@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_a_seed_of_32_bits_builds_a_job_and_keys_of_its_own(tmp_path, seed):
    """Both ends of the seed's range build; one past the top would repeat seed 0's key,
    which is why the range ends there."""
    job = build_job(load_config(_write(tmp_path, f"seed = {seed}\n")))
    assert job.config.seed == seed
    assert (jax.random.PRNGKey(2**32 - 1) != jax.random.PRNGKey(0)).any()
    assert (jax.random.PRNGKey(2**32) == jax.random.PRNGKey(0)).all()


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train=5", "train.steps=3"], "--set train=5: train is a table: set a key in it, e.g. --set train.KEY=VALUE"),
        (["optimizer.schedule=3"], "--set optimizer.schedule=3: optimizer.schedule is a table: set a key in it"),
        (["model.hidden.x=5"], "--set model.hidden.x=5: model.hidden is a value, not a table: set model.hidden itself"),
    ],
)
def test_an_override_that_breaks_the_tables_is_reported_against_itself(tmp_path, overrides, message):
    """Not against the file (the key is not in it) nor against the next --set."""
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "seed = 1\n"), overrides)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.unit
def test_overrides_into_tables_and_free_options_still_apply(tmp_path):
    config = load_config(
        _write(tmp_path, "[model]\nname = 'custom'\npath = 'm.py'\n"),
        ["optimizer.schedule.name=cosine", "model.options.width=3", "train.steps=3"],
    )
    assert (config.optimizer.schedule.name, config.model.options, config.train.steps) == ("cosine", {"width": 3}, 3)


@pytest.mark.unit
def test_the_most_servers_a_config_takes_is_1024(tmp_path):
    assert load_config(_write(tmp_path, "[cluster]\nservers = 1024\n")).cluster.servers == 1024


@pytest.mark.unit
def test_integer_learning_rate_is_accepted_as_a_number():
    assert parse_config({"optimizer": {"learning_rate": 1}}).optimizer.learning_rate == 1.0


@pytest.mark.unit
def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.unit
def test_config_json_records_only_the_keys_of_the_data_set_used():
    """digits has no features, classes, train or test to set: config.json says none."""
    from psfw.jobs.config import parse_config

    assert json.loads(parse_config({}).model_dump_json())["data"] == {"name": "digits"}
    synthetic = parse_config({"data": {"name": "synthetic", "features": 5}})
    assert json.loads(synthetic.model_dump_json())["data"]["features"] == 5


@pytest.mark.asyncio
async def test_a_spec_the_shards_refuse_at_the_first_put_is_a_config_error_in_one_line():
    """A spec the config did not check (built around its validation here, as a config
    of another psfw version could be) is still one short line with exit code 2."""
    from psfw.jobs.config import OptimizerConfig, ScheduleConfig
    from psfw.jobs.embedded import train_async

    config = parse_config({"train": {"batch_size": 32, "steps": 2}, "model": {"hidden": [8]}})
    schedule = ScheduleConfig.model_construct(name="exponential", decay_rate=5.0)
    bad = config.model_copy(update={"optimizer": OptimizerConfig.model_construct(schedule=schedule)})
    with pytest.raises(ConfigError) as err:
        await train_async(bad, progress=False, outputs=False)
    message = str(err.value)
    assert message.startswith("the shards refuse this job's first Put: shard ") and "\n" not in message
    assert "schedule.decay_rate 5.0 would grow the learning rate" in message and "{" not in message


@pytest.mark.unit
def test_a_runs_config_json_reads_back_the_settings_it_trained_with(examples):
    """What a run folder records is read back as the same job (psfw eval, predict and
    load_model rebuild the data from it): a click log's rows included."""
    from psfw.jobs.run_settings import stored_settings

    for name, sets in [("recsys.toml", ["data.train=20000", "data.test=4000"]), ("digits_mlp.toml", [])]:
        config = load_config(examples / name, sets)
        again = parse_config(stored_settings(json.loads(config.model_dump_json())))
        assert again.data == config.data and again.model == config.model, name


RECSYS_TINY = {
    "model": {"name": "fm", "dim": 4},
    "data": {"name": "clicks", "users": 50, "items": 20, "train": 400, "test": 100},
    "train": {"batch_size": 64, "steps": 2},
}


@pytest.mark.unit
def test_table_lifetime_rules_reach_the_declaration_only_where_they_are_not_the_defaults():
    """[tables] sets every table's rules, [tables.per_table.NAME] one table's own
    (what it leaves unset comes from [tables]); the declaration the shards take
    carries a rule only where it differs from today's, so a job without rules keeps
    its identity."""
    plain = build_job(parse_config(RECSYS_TINY)).table_declaration()
    assert not any(k in plain["user"] for k in ("admit_after", "expire_after", "max_rows"))
    config = parse_config(
        {**RECSYS_TINY, "tables": {"admit_after": 2, "expire_after": 50, "per_table": {"item": {"max_rows": 10}}}}
    )
    declared = build_job(config).table_declaration()
    assert {k: declared["user"].get(k) for k in ("admit_after", "expire_after", "max_rows")} == {
        "admit_after": 2,
        "expire_after": 50,
        "max_rows": None,
    }
    assert {k: declared["item"].get(k) for k in ("admit_after", "expire_after", "max_rows")} == {
        "admit_after": 2,
        "expire_after": 50,
        "max_rows": 10,
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    ("tables", "field", "says"),
    [
        ({"per_table": {"nope": {"max_rows": 5}}}, "tables.per_table.nope", "the model has no table 'nope'"),
        ({"materialize": True, "expire_after": 5}, "tables.materialize", "admit_after, expire_after and max_rows"),
        ({"admit_after": 0}, "tables.admit_after", "greater than or equal to 1"),
        ({"per_table": {"user": {"colour": 1}}}, "tables.per_table.user.colour", ""),
    ],
)
def test_table_lifetime_rules_that_cannot_work_are_refused_naming_the_key(tables, field, says):
    with pytest.raises(ConfigError) as err:
        build_job(parse_config({**RECSYS_TINY, "tables": tables}))
    assert field in str(err.value) and says in str(err.value), str(err.value)
