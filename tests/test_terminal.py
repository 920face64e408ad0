"""psfw train in a real terminal (a pseudo-terminal the test opens): the progress bar
shows what is known and nothing else, and log lines go above it, never into it."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

from helpers import EXAMPLES

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_terminal(command: list[str], timeout_s: float = 120.0) -> str:
    """What ``command`` wrote to a 150-column terminal, escape sequences included."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "CI")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: the command ended
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(master)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def test_the_progress_bar_keeps_log_lines_above_it_and_shows_no_unknown_metric(tmp_path):
    config = (EXAMPLES / "diabetes.toml").read_text().replace("epochs = 60", "epochs = 3")
    (tmp_path / "short.toml").write_text(config)
    raw = run_in_terminal(
        [sys.executable, "-m", "psfw.cli", "train", str(tmp_path / "short.toml"), "--run-dir", str(tmp_path / "run")]
    )
    assert "\x1b[" in raw, "rich drew a live bar (the terminal is interactive)"
    pieces = [p.strip() for p in re.split(r"[\r\n]+", ESCAPES.sub("", raw)) if p.strip()]
    assert "psfw: process 0 of group 0: shard 0 in-process" in pieces, pieces[:5]
    assert any(p.startswith("eval step 0: test loss ") for p in pieces)
    bars = [p for p in pieces if p.startswith("psfw ━")]
    assert bars and all(p.endswith(("-:--:--", "0:00:00")) for p in bars), "nothing is glued to a frame"
    assert all("nan" not in p for p in pieces), "a metric not known yet is blank"
    assert all(" acc " not in p for p in bars), "a regression has no accuracy"
    assert pieces[-1].startswith("test loss ") and pieces[-1].endswith(str(tmp_path / "run"))
