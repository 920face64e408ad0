"""The committed gRPC code is what ``python -m psfw.tools.protogen`` makes of ``protos/``,
with the generator that pyproject.toml pins."""

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

from psfw.tools.protogen import generate, proto_sources

from helpers import REPO

pytestmark = pytest.mark.unit


def _made_by() -> str:
    """The grpcio-tools release that made the committed code (what it demands of grpcio)."""
    text = (REPO / "psfw/proto/ps_pb2_grpc.py").read_text()
    return re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", text, re.M).group(1)


def _release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_generated_code_matches_proto_sources(tmp_path: Path):
    """Regenerating into a temporary folder gives byte-identical files."""
    installed = version("grpcio-tools")
    assert installed == _made_by(), (
        f"grpcio-tools {installed} is installed, but psfw/proto was made by {_made_by()}: "
        'pip install -e ".[test]" installs the pinned one'
    )
    root = REPO / "protos"
    assert proto_sources(root), "no .proto sources found"
    fresh = generate(tmp_path, root)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = REPO / relative
        assert committed.exists(), f"{relative} is not committed: run python -m psfw.tools.protogen"
        assert committed.read_bytes() == path.read_bytes(), f"{relative} drifted: run python -m psfw.tools.protogen"


def test_the_pins_agree_with_what_the_generated_code_demands():
    """The test extra pins grpcio-tools to the release that made the committed code,
    CI's constraints agree, and the runtime lower bounds of grpcio and protobuf
    satisfy what that code checks when it is imported."""
    made_by = _made_by()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert f"grpcio-tools=={made_by}" in project["optional-dependencies"]["test"]
    constraints = (REPO / ".ci/constraints.txt").read_text().splitlines()
    assert f"grpcio-tools=={made_by}" in constraints
    requires = dict(re.match(r"([a-z-]+)(.*)", d).groups() for d in project["dependencies"])
    grpcio_lowest = re.match(r">=([0-9.]+)", requires["grpcio"]).group(1)
    assert _release(grpcio_lowest) >= _release(made_by), f"ps_pb2_grpc.py needs grpcio>={made_by}"
    protobuf = re.search(r"^# Protobuf Python Version: ([0-9.]+)$", (REPO / "psfw/proto/ps_pb2.py").read_text(), re.M)
    lowest, below = re.fullmatch(r">=([0-9.]+),<([0-9]+)", requires["protobuf"]).groups()
    made = _release(protobuf.group(1))  # protobuf checks: the same major release, no older minor
    assert made <= _release(lowest) and made[0] == _release(lowest)[0] == int(below) - 1


def test_the_service_name_of_the_base_floor_is_the_one_ps_proto_declares():
    """``psfw.base.service`` names the service without importing the generated code."""
    from psfw.base.service import SERVICE_NAME
    from psfw.proto import ps_pb2 as pb

    assert SERVICE_NAME == pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
