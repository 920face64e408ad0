"""The README and docs/ stay true: every flag of every command is documented, every
metric name they give is one a running shard serves, the README's cluster commands
run as shown, and every link between the pages leads somewhere."""

import argparse
import asyncio
import json
import re
import shlex
import subprocess
import sys
import urllib.request

import numpy as np
import pytest

from psfw.base.errors import ShardError
from psfw.cli.flags import parser
from psfw.protocol.messages import GetHeader, RowBlock
from psfw.runtime.shard_client import ShardClient
from psfw.services.server import ShardServer

from helpers import REPO, SGD, free_port, send

README = (REPO / "README.md").read_text()
PAGES = {path: path.read_text() for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]}
DOCS = "\n".join(PAGES.values())


@pytest.mark.unit
def test_every_flag_of_every_command_is_documented():
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"psfw {name} {flag}"
        for name, sub in commands.items()
        for action in sub._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help" and flag not in PAGES[REPO / "docs" / "commands.md"]
    ]
    assert not missing, f"flags docs/commands.md does not mention: {missing}"


@pytest.mark.unit
@pytest.mark.asyncio
async def test_every_metric_the_docs_name_is_served_by_a_shard():
    named = set(re.findall(r"`(psfw_[a-z_]+)`", DOCS))
    assert len(named) >= 8, named
    server = ShardServer(0, 1)
    await server.start("127.0.0.1:0", metrics_port=0)
    client = ShardClient(server.address, 0, timeout_s=10, retries=0)
    try:
        table = {"rows": 8, "dim": 2, "init": "zeros", "scale": 0, "seed": 0, "optimizer": {"name": "sgd"}}
        await client.put([("w", 0, np.zeros(4, np.float32))], SGD, "", json.dumps({"t": table}))
        rows = RowBlock(np.array([0], np.int64), np.ones((1, 2), np.float32))  # id 0 is shard 0's of 1
        await send(client, {0: np.ones(4, np.float32)}, push={"t": rows})
        with pytest.raises(ShardError):  # a refusal, counted
            await client.get(GetHeader(0, 0, [("nope", 0)], wait_s=1), lambda key: (np.dtype("float32"), (4,)))
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    finally:
        await client.close()
        await server.stop(0)
    served = set(re.findall(r"^(psfw_[a-z_]+?)(?:_bucket|_count|_sum|_created)?[{ ]", text, re.M))
    assert named <= served, f"named in the docs but not served: {sorted(named - served)}"


@pytest.mark.slow
def test_the_readmes_cluster_commands_run_as_shown(tmp_path):
    """The README's cluster example, with free ports and folders of the test."""
    block = README.split("```bash\npsfw launch", 1)[1].split("```", 1)[0]
    lines = ["psfw launch" + block.splitlines()[0]] + block.splitlines()[1:]
    ports = {"50051": str(free_port()), "50052": str(free_port())}
    background, done = [], []
    try:
        for line in (raw.split("#")[0].strip() for raw in lines):
            if not line:
                continue
            for old, new in ports.items():
                line = line.replace(f":{old}", f":{new}")
            line = line.replace("ckpt", str(tmp_path / "ckpt")).replace("runs/p0", str(tmp_path / "p0"))
            words = shlex.split(line.rstrip("&"))
            assert words[0] == "psfw", line
            if "launch" in words:
                words += ["--run-dir", str(tmp_path / "launched")]  # not under the checkout's runs/
            command = [sys.executable, "-m", "psfw.cli", *words[1:]]
            if line.endswith("&"):
                out = subprocess.PIPE if words[1] == "server" else subprocess.DEVNULL
                background.append(subprocess.Popen(command, cwd=REPO, stdout=out, text=True))
                if words[1] == "server":
                    assert "listening on" in background[-1].stdout.readline()
            else:
                done.append(subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600))
                assert done[-1].returncode == 0, (line, done[-1].stderr[-2000:])
        worker0 = background[-1]
        assert worker0.wait(300) == 0
    finally:
        for proc in background:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            if proc.stdout is not None:
                proc.stdout.close()
    assert done[-1].stdout.count("g0@330") == 2, done[-1].stdout  # status: both shards at the last step
    assert (tmp_path / "p0" / "metrics.jsonl").exists() and any((tmp_path / "ckpt").iterdir())


@pytest.mark.unit
def test_the_readme_is_a_first_page_and_every_link_between_the_pages_leads_somewhere():
    assert len(README.splitlines()) <= 100, "the README is the first page: the reference lives in docs/"
    for path, text in PAGES.items():
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", text):
            assert (path.parent / target).exists(), f"{path.name} links to {target}, which does not exist"
        for anchor_page, anchor in re.findall(r"\]\(([^)#:]+\.md)#([^)]+)\)", text):
            headings = (path.parent / anchor_page).read_text().splitlines()
            slugs = {_slug(h.lstrip("#").strip()) for h in headings if h.startswith("#")}
            assert anchor in slugs, f"{path.name} links to {anchor_page}#{anchor}, which has no such heading"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.lower()).replace(" ", "-")


PLACEHOLDERS = {
    "CONFIG": "examples/digits_mlp.toml",
    "DIR": "runs/docs",
    "ADDR": "127.0.0.1:50051",
    "A,B": "127.0.0.1:50051,127.0.0.1:50052",
    "I": "0",
    "S": "2",
    "COMMAND": "train examples/digits_mlp.toml",
}


def _shown_commands() -> list[str]:
    """Every psfw command the README and docs/ show: in code blocks, and inline."""
    shown = set()
    for text in PAGES.values():
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            shown.update(line.split("#")[0].strip().rstrip("&").strip() for line in block.splitlines())
        shown.update(re.findall(r"`(psfw [^`]+)`", text))
    return sorted(c for c in shown if c.startswith("psfw "))


@pytest.mark.unit
def test_every_command_the_docs_show_parses_with_psfws_own_parser(capsys):
    """Flags, values and choices as shown; placeholders (CONFIG, DIR, I, ...) stand for
    real values, [optional parts] are all given, and a bare mention of a command
    (``psfw status``) or of a flag (``psfw health --timeout``) may lack its values."""
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for shown in _shown_commands():
        words = shown.replace("[", " ").replace("]", " ").replace("\\|", "|").split()
        if len(words) < 2 or (words[1] not in commands and words[1] != "-v"):
            continue  # a message psfw prints (``psfw server: PSFW_SHARD=...``), not a command
        words = [PLACEHOLDERS.get(w, w.split("|")[0]) for w in words[1:]]
        try:
            parser().parse_args(shlex.split(" ".join(words)))
        except SystemExit as exit:
            said = capsys.readouterr().err
            mention = "the following arguments are required" in said or (
                f"argument {words[-1]}: expected one argument" in said  # a flag named, not used
            )
            assert exit.code == 2 and mention, (shown, said)
        checked += 1
    assert checked >= 20, checked
