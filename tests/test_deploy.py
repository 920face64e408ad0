"""What can be checked of the container deployments without a Docker engine or a
cluster: the manifests validate against the Kubernetes schemas, the Dockerfile
passes hadolint, and every command the images run parses with psfw's CLI."""

import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from psfw.cli.flags import parser
from psfw.jobs.config import load_config, parse_config

from certs import make_ca, make_leaf
from helpers import REPO, psfw_command

DEPLOY = REPO / "examples" / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def test_kubernetes_manifests_validate_strictly():
    files = sorted(str(p) for p in (DEPLOY / "kubernetes").glob("*.yaml"))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def parse_with_env(argv: list[str], env: dict[str, str], monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return parser().parse_args(argv)


def healthcheck_command() -> list[str]:
    """The argv of the Dockerfile's HEALTHCHECK."""
    text = (REPO / "Dockerfile").read_text()
    return yaml.safe_load(re.search(r"^\s*CMD (\[.*\])", text, re.M).group(1))


@pytest.mark.unit
def test_dockerfile_entrypoint_and_healthcheck_are_psfw_commands(monkeypatch):
    text = (REPO / "Dockerfile").read_text()
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (\[.*\])", text, re.M).group(1))
    env = dict(pair.split("=", 1) for pair in re.search(r"^ENV (.*)$", text, re.M).group(1).split())
    health = healthcheck_command()
    assert entry[0] == "psfw" and health[:2] == ["psfw", "health"]
    args = parse_with_env(entry[1:], env, monkeypatch)
    assert (args.command, args.shard, args.of, args.listen) == ("server", 0, 1, "0.0.0.0:50051")
    assert not args.insecure, "the image does not open its port to anyone by default"
    probe = parser().parse_args(health[1:])
    assert probe.address == args.listen.replace("0.0.0.0", "127.0.0.1") and probe.local


@pytest.mark.parametrize("setup", ["plaintext", "tls", "mutual tls and token"])
def test_image_healthcheck_passes_for_every_setup_the_shard_accepts(tmp_path, setup):
    """The HEALTHCHECK runs in the shard's container, with the shard's PSFW_*
    variables; the certificate names the shard's service, not 127.0.0.1."""
    ca = make_ca(tmp_path, "ca")
    cert, key = make_leaf(tmp_path, "shard", ca, server=True, names=("psfw-shard-0.psfw-shard",))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PSFW_")}
    env.update(PSFW_LISTEN="127.0.0.1:0", PSFW_GRACE="0", PYTHONUNBUFFERED="1")
    if setup != "plaintext":
        env.update(PSFW_TLS_CERT=str(cert), PSFW_TLS_KEY=str(key))
    if setup == "mutual tls and token":
        (tmp_path / "token").write_text("t0ken\n")
        env.update(PSFW_TLS_CLIENT_CA=str(tmp_path / "ca.pem"), PSFW_TOKEN_FILE=str(tmp_path / "token"))
    argv = healthcheck_command()
    with subprocess.Popen(
        [sys.executable, "-m", "psfw.cli", "server"], stdout=subprocess.PIPE, text=True, env=env
    ) as server:
        try:
            assert select.select([server.stdout], [], [], 60)[0], "the shard did not start within 60 s"
            address = re.search(r"listening on (\S+)", server.stdout.readline()).group(1)
            port = address.rsplit(":", 1)[1]
            probe = [a.replace(":50051", f":{port}") for a in argv[1:]]
            done = subprocess.run(
                [sys.executable, "-m", "psfw.cli", *probe], capture_output=True, text=True, env=env, timeout=60
            )
            assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
        finally:
            server.kill()
            server.wait(30)


@pytest.mark.unit
def test_compose_services_run_commands_the_cli_accepts(monkeypatch):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"shard-0", "shard-1", "worker-0", "worker-1"} <= set(services)
    for name in ("shard-0", "shard-1"):
        args = parse_with_env(["server"], services[name]["environment"], monkeypatch)
        assert args.of == 2 and args.shard == int(name[-1]) and args.insecure
    for name in ("worker-0", "worker-1"):
        service = services[name]
        argv = [*service["entrypoint"]]
        assert argv[:2] == ["psfw", "worker"]
        args = parse_with_env(argv[1:], service["environment"], monkeypatch)
        assert args.process == int(name[-1])
        assert args.servers == "shard-0:50051,shard-1:50051"
        assert any(v.startswith("./cluster.toml:") for v in service["volumes"])


@pytest.mark.unit
def test_kubernetes_commands_and_config_match_the_cli_and_the_job():
    docs = [d for p in sorted((DEPLOY / "kubernetes").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    by_kind = {d["kind"]: d for d in docs}
    shard = by_kind["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in shard["env"]}
    assert env["PSFW_SHARDS"] == str(by_kind["StatefulSet"]["spec"]["replicas"])
    assert shard["readinessProbe"]["grpc"]["service"] == "psfw.v1.ParameterServer"
    job = by_kind["Job"]["spec"]
    worker = job["template"]["spec"]["containers"][0]
    args = parser().parse_args([*worker["command"][1:]])
    assert args.command == "worker"
    config = parse_config(tomllib.loads(by_kind["ConfigMap"]["data"]["cluster.toml"]), "configmap")
    assert config == load_config(DEPLOY / "cluster.toml").model_copy(update={"base_dir": ".", "source": "configmap"})
    assert job["completions"] == config.cluster.worker_groups * config.cluster.processes_per_group
    servers = next(e["value"] for e in worker["env"] if e["name"] == "PSFW_SERVERS").split(",")
    assert len(servers) == config.cluster.servers


@pytest.mark.unit
@pytest.mark.parametrize("line", ["psfw server --help", "psfw worker --help", "psfw health --help"])
def test_container_commands_have_help(line, capsys):
    done = psfw_command(capsys, *shlex.split(line)[1:])
    assert done.returncode == 0 and "usage:" in done.stdout
