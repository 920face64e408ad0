"""Regenerate the Python gRPC code in ``psfw/proto`` from ``protos/``.

Run ``python -m psfw.tools.protogen`` after editing a ``.proto`` file; the test suite fails
when the committed code drifts from the sources. The generator is the grpcio-tools
release that pyproject.toml's test extra pins: to move it, change the pin (and
.ci/constraints.txt), reinstall, regenerate, and raise grpcio's lower bound to the new
``GRPC_GENERATED_VERSION`` (tests/test_protos.py checks all four agree).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"


def proto_sources(root: Path = PROTO_ROOT) -> list[Path]:
    """The ``.proto`` files under ``root``, sorted."""
    return sorted(root.rglob("*.proto"))


def generate(out_dir: Path, root: Path = PROTO_ROOT) -> list[Path]:
    """Run ``grpc_tools.protoc`` on every source into ``out_dir``.

    Returns the generated files. Raises RuntimeError when protoc fails.
    """
    import grpc_tools
    from grpc_tools import protoc  # build-time tool only

    include = Path(grpc_tools.__file__).parent / "_proto"
    sources = proto_sources(root)
    args = [
        "protoc",
        f"-I{root}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, sources))}")
    generated = [out_dir / s.relative_to(root).with_name(s.stem + suffix) for s in sources for suffix in _OUTPUTS]
    return [p for p in generated if p.exists()]


_OUTPUTS = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def main() -> int:
    generated = generate(REPO)
    for path in generated:
        print(path.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
