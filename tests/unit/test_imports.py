"""Every module imports on its own (no import cycle bites whoever imports it first), and the
dependencies point one way: nothing in ``actors`` imports ``shards``."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("actors", "shards")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        continue
    if name.startswith("actors"):
        leaked = sorted(m for m in sys.modules if m.split(".")[0] == "shards")
        if leaked:
            failures.append(f"{name} imports {leaked}")
print("\n".join(failures))
"""


def modules() -> list[str]:
    names = []
    for package in ("actors", "shards"):
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            names.append(info.name)
    return [n for n in names if not n.endswith("__main__")]


def test_every_module_imports_alone_and_actors_never_imports_shards():
    names = modules()
    assert "actors.wire.shardwire" in names and "shards.testing.plugin" in names
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "", probe.stdout
