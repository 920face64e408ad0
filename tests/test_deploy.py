"""What can be checked of the container deployments without a Docker engine or a
cluster: the manifests validate against the Kubernetes schemas (and the RayJob against
KubeRay's), the Dockerfile passes hadolint, and every command the images run parses
with psfw's CLI."""

import copy
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
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


RAYJOB = DEPLOY / "rayjob.yaml"
# KubeRay's RayJob schema, the part the manifest uses (its header says where it comes from)
RAYJOB_SCHEMA = REPO / "tests" / "schemas" / "rayjob-v1.yaml"
# The submission modes KubeRay's operator accepts (JobSubmissionMode in its
# ray-operator/apis/ray/v1/rayjob_types.go); its CRD types the field as any string.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
PLACEMENTS = {"pack", "spread", "strict_spread", "strict_pack"}


def rayjob_documents() -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(RAYJOB.read_text())}


def closed(schema):
    """A CRD's schema as ``kubectl apply`` applies it (strict field validation): an
    object that lists its properties takes no other."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def rayjob_schema_errors(rayjob: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(closed(yaml.safe_load(RAYJOB_SCHEMA.read_text())))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(rayjob)]


def ray_groups(rayjob: dict) -> dict[str, dict]:
    """The RayJob's head group and worker groups, by name ("head" for the head)."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


@pytest.mark.unit
def test_rayjob_validates_against_kuberays_schema():
    """Every field where KubeRay's RayJob has it, with a value of its type."""
    rayjob = rayjob_documents()["RayJob"]
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob_schema_errors(rayjob) == []
    assert rayjob["spec"]["submissionMode"] in SUBMISSION_MODES


def _rename(where: dict, old: str, new: str) -> None:
    where[new] = where.pop(old)


MISTAKES = {
    "a misspelt job field": (
        lambda spec: _rename(spec, "shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
        "'shutdownAfterJobFinished' was unexpected",
    ),
    "a misspelt group field": (
        lambda spec: _rename(spec["rayClusterSpec"]["workerGroupSpecs"][0], "minReplicas", "minReplica"),
        "'minReplica' was unexpected",
    ),
    "a cluster field on the job": (
        lambda spec: spec.update(authOptions=spec["rayClusterSpec"].pop("authOptions")),
        "'authOptions' was unexpected",
    ),
    "a pod field on the template": (
        lambda spec: spec["rayClusterSpec"]["headGroupSpec"]["template"].update(containers=[]),
        "'containers' was unexpected",
    ),
    "an auth mode KubeRay lacks": (
        lambda spec: spec["rayClusterSpec"]["authOptions"].update(mode="tokens"),
        "'tokens' is not one of",
    ),
    "a number for a ray start flag": (
        lambda spec: spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "0 is not of type 'string'",
    ),
}


@pytest.mark.unit
@pytest.mark.parametrize("mistake", MISTAKES)
def test_the_rayjob_schema_check_refuses_a_misspelt_or_misplaced_field(mistake):
    """A copy of the manifest with one mistake is refused, naming it: the schema check
    is not one that passes whatever it is given."""
    rayjob = copy.deepcopy(rayjob_documents()["RayJob"])
    change, said = MISTAKES[mistake]
    change(rayjob["spec"])
    errors = rayjob_schema_errors(rayjob)
    assert any(said in e for e in errors), errors


def test_rayjob_pods_and_objects_validate_against_the_kubernetes_schemas(tmp_path):
    """The head's and the workers' pod templates (as PodTemplates), the ConfigMap and
    the volume claim, strictly: KubeRay gives the templates to Kubernetes as they are,
    adding its own command, environment and ports."""
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    rayjob = next(d for d in docs if d["kind"] == "RayJob")
    templates = [
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": f"{rayjob['metadata']['name']}-{name}"},
            "template": group["template"],
        }
        for name, group in ray_groups(rayjob).items()
    ]
    checked = tmp_path / "rayjob-kubernetes-objects.yaml"
    checked.write_text(yaml.safe_dump_all([d for d in docs if d is not rayjob] + templates))
    done = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", str(checked)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.unit
def test_rayjob_runs_the_deployments_job_on_every_pod_alike():
    """The entrypoint's config is the ConfigMap's, mounted where it says on every pod,
    and its run folder lies on the shared (ReadWriteMany) volume, mounted at the same
    path on every pod; every pod runs the image's non-root user, with requests and
    limits; the job is the container deployments' job, plus its Ray settings."""
    docs = rayjob_documents()
    spec = docs["RayJob"]["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["psfw", "ray"]
    config_path, run_dir = Path(argv[2]), argv[argv.index("--run-dir") + 1]
    config_map, claim = docs["ConfigMap"], docs["PersistentVolumeClaim"]
    assert config_path.name in config_map["data"] and "ReadWriteMany" in claim["spec"]["accessModes"]
    user = int(re.search(r"^USER (\d+)", (REPO / "Dockerfile").read_text(), re.M).group(1))
    images, shared = set(), set()
    for name, group in ray_groups(docs["RayJob"]).items():
        pod = group["template"]["spec"]
        ray = pod["containers"][0]  # KubeRay runs Ray in the first container
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in ray["volumeMounts"]}
        assert mounts[str(config_path.parent)]["configMap"]["name"] == config_map["metadata"]["name"], name
        claimed = {path for path, v in mounts.items() if "persistentVolumeClaim" in v}
        assert [mounts[path]["persistentVolumeClaim"]["claimName"] for path in claimed] == [claim["metadata"]["name"]]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == user, name
        assert {"cpu", "memory"} <= set(ray["resources"]["requests"]) & set(ray["resources"]["limits"]), name
        images.add(ray["image"])
        shared |= claimed
    assert len(images) == 1 and len(shared) == 1 and run_dir.startswith(f"{shared.pop()}/")
    assert (
        spec["shutdownAfterJobFinishes"] and spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    )
    assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token"
    job = tomllib.loads(config_map["data"][config_path.name])
    ray_settings, placement = job.pop("ray"), job["cluster"].pop("placement")
    assert placement in PLACEMENTS and {"shard", "worker"} <= set(ray_settings)
    assert parse_config(job, "configmap") == load_config(DEPLOY / "cluster.toml").model_copy(
        update={"base_dir": ".", "source": "configmap"}
    )


@pytest.mark.unit
def test_rayjob_entrypoint_and_config_are_ones_psfw_ray_accepts():
    docs = rayjob_documents()
    argv = shlex.split(docs["RayJob"]["spec"]["entrypoint"])
    args = parser().parse_args(argv[1:])
    assert (args.command, args.config, args.run_dir) == ("ray", argv[2], "/shared/runs/psfw-digits")
    parse_config(tomllib.loads(docs["ConfigMap"]["data"][Path(argv[2]).name]), "configmap")  # [ray] included
