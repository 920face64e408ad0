import pytest

from psfw.config import load_config, parse_config
from psfw.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["digits_mlp.toml", "digits_cnn.toml", "my_model.toml"])
def test_shipped_examples_validate(examples, name):
    config = load_config(examples / name)
    assert config.cluster.servers >= 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[train]\nbatchsize = 4\n", "train.batchsize: unknown key"),
        ("[optimizer]\nlearning_rate = 'fast'\n", "optimizer.learning_rate: Input should be a valid number"),
        ("[optimizer]\nname = 'lbfgs'\n", "optimizer.name: Input should be"),
        (
            "[train]\nbatch_size = 2\n[cluster]\nworkers_per_group = 4\nworkers_per_process = 4\n",
            "batch_size (2) is smaller than cluster.workers_per_group (4)",
        ),
        ("[cluster]\nworkers_per_group = 3\nworkers_per_process = 2\n", "must be a multiple of"),
        ("[train]\nsteps = 10\nepochs = 2\n", "give steps or epochs, not both"),
        ("[model]\nname = 'custom'\n", "a custom model needs path"),
        ("seed = [1\n", "not valid TOML"),
        ("[optimizer]\nlearning_rate = inf\n", "optimizer.learning_rate: Input should be a finite number"),
        ("[optimizer]\nname = 'adam'\neps = inf\n", "optimizer.eps: Input should be a finite number"),
        ("[optimizer.schedule]\nname = 'linear'\nend_value = inf\n", "optimizer.schedule.end_value: Input should be"),
    ],
)
def test_bad_configs_fail_with_one_line_naming_the_field(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_integer_learning_rate_is_accepted_as_a_number():
    assert parse_config({"optimizer": {"learning_rate": 1}}).optimizer.learning_rate == 1.0


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
