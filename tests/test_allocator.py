"""psfw's malloc settings: applied by the psfw command, never over the user's."""

import os
import subprocess
import sys

import pytest

from psfw.runtime.allocator import SETTINGS

PROBE = "from psfw.runtime.allocator import tune_malloc; print(tune_malloc())"


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@pytest.mark.skipif(not _glibc(), reason="the settings are glibc's")
def test_glibc_malloc_is_tuned_unless_the_user_set_malloc_variables():
    assert _probe() == "True"
    assert _probe(MALLOC_ARENA_MAX="4") == "False"
    assert dict(SETTINGS)[-3] >= 2 << 20, "slices and chunks of about 1 MiB come from the heap"
