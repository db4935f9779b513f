"""README.md's five-minute tour, run as written by bash on free ports: the server started with
``--port 0 --command 'tcp://127.0.0.1:*'``, its addresses read from the ready line, every ``ucc``
command through ``$UCC_COMMAND``. The interactive WebSocket client line is replaced by a
background client that records the frames it gets."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from shards.testing import TIME_FACTOR

ROOT = Path(__file__).resolve().parents[2]

LISTENER = """
import asyncio, os, sys
import websockets

async def main():
    async with websockets.connect(os.environ["UCC_URL"] + "/?token=" + os.environ["TOKEN"]) as ws:
        with open("frames.txt", "w") as out:
            try:
                async for frame in ws:
                    out.write(frame + "\\n")
                    out.flush()
            except websockets.ConnectionClosed:  # `ucc disconnect 42`: 4001
                pass

asyncio.run(main())
"""


def tour_script() -> str:
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("\n## A five-minute tour\n", 1)[1].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", tour, re.DOTALL):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if not command or command.startswith("#"):
                continue
            if "python -m websockets" in command:
                # the interactive client: one in the background that writes what it gets
                command = (
                    "TOKEN=$TOKEN .venv/bin/python listener.py & LISTENER=$!\n"
                    "until grep -q hello frames.txt 2>/dev/null; do sleep 0.1; done"
                )
            if command.startswith("kill %1"):
                command = "kill %1; wait %1 || true; wait $LISTENER || true"
            lines.append(command)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def test_the_readme_tour_runs_as_written(tmp_path):
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    (tmp_path / "listener.py").write_text(LISTENER)
    (tmp_path / "tour.sh").write_text(tour_script())
    env = {k: v for k, v in os.environ.items() if not k.startswith("UCC_")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    bash = subprocess.Popen(
        ["bash", "tour.sh"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = bash.communicate(timeout=60 * TIME_FACTOR)
    finally:
        # whatever the tour left running (the server, the listener): its process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(bash.pid, signal.SIGKILL)
        bash.wait()
    assert bash.returncode == 0, out + err
    assert (tmp_path / "state" / "ucc" / "secret").is_file()
    frames = [json.loads(line) for line in (tmp_path / "frames.txt").read_text().splitlines()]
    assert frames[0]["type"] == "hello" and frames[0]["user"] == 42
    datas = [frame.get("data") for frame in frames if frame.get("type") == "message"]
    assert {"text": "hello, channel 1"} in datas and "just for you" in datas
    assert '{"offset": 1, "data": {"text": "hello, channel 1"}}' in out
    assert "[42]" in out
    assert "INDEX" in out and "total" in out  # ucc status
    assert '"commands"' in out  # ucc stats
