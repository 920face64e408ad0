"""``import psfw`` in a Python started in the project's folder works after a plain
(non-editable) install as after the editable one: the folder's ``psfw/`` comes first
on the path there, and compute/ and services/ lie beside it."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from helpers import REPO

CHECK = """
import psfw, psfw.compute, psfw.services
from psfw.compute.optimizer_schema import check_spec
from psfw.services.refusals import RefusalLog
print(psfw.__file__, psfw.compute.__file__, psfw.services.__file__, callable(psfw.load_params), sep="\\n")
"""


def run_check(cwd, *flags: str, env: dict | None = None) -> list[str]:
    done = subprocess.run(
        [sys.executable, *flags, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.slow
def test_import_psfw_in_the_checkout_after_a_plain_install(tmp_path):
    source = tmp_path / "source"  # built from a copy: the build writes nothing into the repository
    for folder in ("psfw", "compute", "services"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / file, source / file)
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, timeout=300)
    assert (target / "psfw" / "compute" / "__init__.py").is_file()
    # -S: no .pth files, so no editable install; the installed copy and the
    # dependencies stand on the path as a plain install's site-packages would
    site = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *site])}
    lines = run_check(REPO, "-S", env=env)
    assert lines == [
        str(REPO / "psfw" / "__init__.py"),
        str(REPO / "compute" / "__init__.py"),
        str(REPO / "services" / "__init__.py"),
        "True",
    ]
    # elsewhere the installed copy is used whole
    lines = run_check(tmp_path, "-S", env=env)
    installed = target / "psfw"
    assert lines[:3] == [
        str(installed / "__init__.py"),
        str(installed / "compute" / "__init__.py"),
        str(installed / "services" / "__init__.py"),
    ]


@pytest.mark.slow
def test_import_psfw_in_the_checkout_with_the_editable_install():
    lines = run_check(REPO)
    assert lines[1:] == [str(REPO / "compute" / "__init__.py"), str(REPO / "services" / "__init__.py"), "True"]
