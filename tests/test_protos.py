"""The committed gRPC code is what ``python -m psfw.protogen`` makes of ``protos/``."""

from pathlib import Path

from psfw.protogen import REPO, generate, proto_sources


def test_generated_code_matches_proto_sources(tmp_path: Path):
    """Regenerating into a temporary folder gives byte-identical files."""
    assert proto_sources(), "no .proto sources found"
    fresh = generate(tmp_path)
    assert fresh, "protoc generated nothing"
    for path in fresh:
        relative = path.relative_to(tmp_path)
        committed = REPO / relative
        assert committed.exists(), f"{relative} is not committed: run python -m psfw.protogen"
        assert committed.read_bytes() == path.read_bytes(), f"{relative} drifted: run python -m psfw.protogen"
