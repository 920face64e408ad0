"""The committed gRPC code is what ``python -m psfw.tools.protogen`` makes of ``protos/``."""

from pathlib import Path

from psfw.tools.protogen import generate, proto_sources

from helpers import REPO


def test_generated_code_matches_proto_sources(tmp_path: Path):
    """Regenerating into a temporary folder gives byte-identical files."""
    root = REPO / "protos"
    assert proto_sources(root), "no .proto sources found"
    fresh = generate(tmp_path, root)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = REPO / relative
        assert committed.exists(), f"{relative} is not committed: run python -m psfw.tools.protogen"
        assert committed.read_bytes() == path.read_bytes(), f"{relative} drifted: run python -m psfw.tools.protogen"
