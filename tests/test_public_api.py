"""The public API: a handful of names, each one real, loaded only when used."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import psfw

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.unit
def test_every_public_name_resolves_and_none_is_left_out_of_all():
    for name in psfw.__all__:
        assert getattr(psfw, name) is not None, name
    assert set(psfw.__all__) <= set(dir(psfw))


def test_import_psfw_loads_neither_jax_nor_grpc():
    code = "import sys, psfw; print(sorted(m for m in ('jax', 'optax', 'grpc') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.unit
def test_the_example_client_script_uses_only_public_names():
    tree = ast.parse((EXAMPLES / "watch_cluster.py").read_text())
    inner = [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("psfw")
    ]
    assert inner == [], f"imports psfw's internals: {inner}"
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute) and _is_psfw(node.value)}
    assert used and used <= set(psfw.__all__), used - set(psfw.__all__)


def _is_psfw(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "psfw"
