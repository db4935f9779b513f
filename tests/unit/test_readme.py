"""README.md against the code: the configuration table lists every ``ucc serve`` flag and
nothing else, the install instructions name the distribution of setup.cfg, and the tour talks to
the server it started (on free ports) through ``$UCC_COMMAND`` and ``$UCC_URL``."""

from __future__ import annotations

import argparse
import configparser
import re
from pathlib import Path

from shards import ready
from shards.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def serve_flags() -> set[str]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = subparsers.choices["serve"]
    return {
        option
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }


def table_flags() -> list[str]:
    """The flags named in the first column of the Configuration table, in order."""
    flags = []
    for line in section("Configuration").splitlines():
        if line.startswith("| `"):
            flags += re.findall(r"--[a-z][a-z0-9-]*", line.split("|")[1])
    return flags


def test_the_configuration_table_lists_every_serve_flag_and_only_those():
    documented = table_flags()
    assert len(documented) == len(set(documented)), "a flag has two rows"
    missing = serve_flags() - set(documented)
    unknown = set(documented) - serve_flags()
    assert not missing, f"serve flags not in the README's Configuration table: {sorted(missing)}"
    assert not unknown, f"README rows that are not serve flags: {sorted(unknown)}"


def test_the_environment_column_names_what_the_parser_reads():
    # each variable in the table is one the code reads (a spelling mistake would pass silently)
    sources = "".join(p.read_text() for p in (ROOT / "shards").rglob("*.py"))
    for line in section("Configuration").splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"UCC_[A-Z_]+", line.split("|")[2]):
                assert f'"{name}"' in sources, name


def test_log_level_and_the_secrets_place_are_documented():
    assert "--log-level" in README
    assert "XDG_STATE_HOME" in README and "UCC_SECRET_FILE" in README
    assert "$XDG_STATE_HOME/ucc/secret" in README


def test_the_install_instructions_name_the_distribution():
    metadata = configparser.ConfigParser()
    metadata.read(ROOT / "setup.cfg")
    name = metadata["metadata"]["name"]
    assert name == "ucc-server"
    assert f"`{name}`" in README and f"pip install {name}" in README
    assert "pip install ucc`" not in README and "pip install ucc " not in README
    assert "pip install -e '.[test]'" in section("Two commands")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test]'" in ci
    # the browser tests' chromium: installed by the same script in both
    assert section("Two commands").count(".ci/chromium &&") == 1
    assert "\n.ci/chromium\n" in ci


def tour() -> list[str]:
    """The shell lines of the tour, comments and continuation prompts left out."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", section("A five-minute tour"), re.DOTALL):
        for line in block.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def test_the_tour_starts_on_free_ports_and_reads_the_ready_line():
    lines = tour()
    assert lines[0].startswith(".venv/bin/ucc serve --port 0 --command 'tcp://127.0.0.1:*'")
    # the ready line, split as the tour's `read` does, gives the two addresses
    line = ready.format_line("127.0.0.1", 40001, "tcp://127.0.0.1:40002", 2)
    _, _, url, command, _ = line.split()
    assert (url, command.removeprefix("command=")) == (
        "ws://127.0.0.1:40001",
        "tcp://127.0.0.1:40002",
    )
    assert "read -r _ _ UCC_URL COMMAND _ < ucc.ready" in lines
    assert "export UCC_URL UCC_COMMAND=${COMMAND#command=}" in lines


def test_the_tour_commands_use_the_started_server():
    lines = tour()
    for line in lines[1:]:
        assert "--command" not in line, line  # $UCC_COMMAND it is
        assert "8765" not in line and "5555" not in line, line
    assert any('"$UCC_URL/?token=$TOKEN"' in line for line in lines)
    assert sum(line.startswith(".venv/bin/ucc ") for line in lines) >= 10
