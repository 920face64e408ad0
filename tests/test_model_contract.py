"""A user's model is checked against its contract before training: each mistake is
one config error naming the file and what to change, never a JAX traceback."""

import pytest

from psfw.base.errors import ConfigError
from psfw.jobs.config import load_config
from psfw.jobs.job import build_job

GOOD = """
import jax, jax.numpy as jnp, optax

def init(key):
    return {"w": jax.random.normal(key, (IN, 10)) / 8.0, "b": jnp.zeros(10)}

def loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), {"accuracy": (logits.argmax(-1) == y).mean()}
"""

CASES = {
    "make returns a tuple": (
        GOOD.replace("IN", "64") + "\ndef make(**options):\n    return init, loss\n",
        "",
        "make() of {path} returned tuple, not a model with init: return psfw.Model(init, loss, layers)",
    ),
    "layers beside make": (
        GOOD.replace("IN", "64") + "\nlayers = ['w']\ndef make(**options):\n    import psfw\n    return None\n",
        "",
        "defines make() and a module-level layers, which make's model would not use",
    ),
    "options without make": (
        GOOD.replace("IN", "64"),
        "options = {width = 3}\n",
        "options are given, but {path} has no make(**options) to take them",
    ),
    "a model for other inputs": (
        GOOD.replace("IN", "784"),
        "",
        "the model does not fit the data (x is float32[32, 64] and y int32[32] for a batch of 32): TypeError",
    ),
    "a loss that is not a mean": (
        GOOD.replace("IN", "64").replace(".mean(), {", ", {"),
        "",
        "loss must return the mean loss over the rows (a scalar)",
    ),
    "a loss with an array for metrics": (
        GOOD.replace("IN", "64").replace('{"accuracy": (logits.argmax(-1) == y).mean()}', "logits"),
        "",
        "loss returns (loss, float32[32, 10]): the second value must be a dict of scalar metrics",
    ),
    "an integer loss": (
        GOOD.replace("IN", "64").replace(".mean(), {", ".mean().astype(jnp.int32), {"),
        "",
        "loss returns the mean loss as int32: it must be a float, as only a float has a gradient",
    ),
    "a loss with no gradient": (
        GOOD.replace("IN", "64").replace(
            "return optax",
            "value = jax.lax.while_loop(lambda c: c < 0, lambda c: c * 2, params['b'].sum())\n    return value + optax",
        ),
        "",
        "the loss has no gradient: ValueError: Reverse-mode differentiation does not work for lax.while_loop",
    ),
    "names that collide once flattened": (
        GOOD.replace("IN", "64").replace(
            '"b": jnp.zeros(10)}', '"b": jnp.zeros(10), "a/b": jnp.zeros(1), "a": {"b": jnp.zeros(1)}}'
        ),
        "",
        "init(key): two parameters are both named 'a/b': rename one of them",
    ),
    "an integer parameter": (
        GOOD.replace("IN", "64").replace("jnp.zeros(10)}", "jnp.zeros(10, jnp.int32)}"),
        "",
        "parameter b is int32: the shards hold float16, bfloat16, float32 or float64 parameters: an integer takes no",
    ),
    "a complex parameter": (
        GOOD.replace("IN", "64").replace("jnp.zeros(10)}", "jnp.zeros(10, jnp.complex64)}"),
        "",
        "parameter b is complex64: the shards hold float16, bfloat16, float32 or float64 parameters: store it as one",
    ),
    "a file that does not import": ("import numpyy\n", "", "importing {path} failed: ModuleNotFoundError"),
}


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_model_that_breaks_its_contract_is_one_config_error(tmp_path, case):
    source, extra, fragment = CASES[case]
    model = tmp_path / "model.py"
    model.write_text(source)
    config = tmp_path / "job.toml"
    config.write_text(f"[model]\nname = 'custom'\npath = 'model.py'\n{extra}[train]\nbatch_size = 32\nsteps = 2\n")
    with pytest.raises(ConfigError) as err:
        build_job(load_config(config))
    message = str(err.value)
    assert message.startswith(f"{config}: model.path: ") and "\n" not in message, message
    assert fragment.format(path=model) in message, message


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[model]\nname = 'cnn'\nhidden = [64]\n", "model.hidden: applies to mlp models only, not to cnn: drop it"),
        ("[model]\nchannels = [8]\n", "model.channels: applies to cnn models only, not to mlp: drop it"),
        ("[model]\noptions = {a = 1}\n", "model.options: applies to custom models only"),
    ],
)
def test_model_keys_that_apply_to_nothing_are_refused(tmp_path, text, fragment):
    config = tmp_path / "job.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config(config)


@pytest.mark.unit
def test_the_shipped_user_model_keeps_working(examples):
    job = build_job(load_config(examples / "my_model.toml"))
    assert set(job.layout.params) == {"hidden/b", "hidden/w", "out/b", "out/w"}


BFLOAT16_WEIGHT = """
import jax, jax.numpy as jnp, optax

def init(key):
    return {"w": (jax.random.normal(key, (64, 10)) / 8.0).astype(jnp.bfloat16), "b": jnp.zeros(10)}

def loss(params, x, y):
    logits = (x.astype(jnp.bfloat16) @ params["w"]).astype(jnp.float32) + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "cluster", ["transport = 'auto'", "transport = 'grpc'", "transport = 'grpc'\ncompression = 'bf16'"]
)
def test_a_bfloat16_weight_trains_on_every_path_and_is_checkpointed_as_itself(tmp_path, capsys, cluster):
    """A bfloat16 leaf is held, updated, answered and saved as bfloat16 (beside a
    float32 one, whose gradients may travel compressed), and the loss falls; the
    run resumes from its checkpoint."""
    import json

    import psfw
    from psfw.cli.main import main

    (tmp_path / "model.py").write_text(BFLOAT16_WEIGHT)
    config = tmp_path / "job.toml"
    config.write_text(
        "[model]\nname = 'custom'\npath = 'model.py'\n[optimizer]\nname = 'adam'\nlearning_rate = 0.01\n"
        f"[train]\nbatch_size = 32\nsteps = 30\nlog_every = 10\ncheckpoint_every = 10\n[cluster]\n{cluster}\n"
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--no-progress"]) == 0, capsys.readouterr().err
    assert (
        main(["train", str(config), "--run-dir", str(run), "--no-progress", "--resume", "--set", "train.steps=40"]) == 0
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    params = psfw.load_params(run)
    assert (str(params["w"].dtype), str(params["b"].dtype)) == ("bfloat16", "float32")
