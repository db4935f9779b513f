"""CURVE on the command endpoint, with real ``ucc serve`` processes and real ZeroMQ: listed keys
are answered, others get nothing (and are counted), SIGHUP admits a new key, and a command
endpoint off loopback needs CURVE or ``--insecure-command``."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shards import procgroup, ready
from shards.client import AsyncClient, Client, CommandTimeout
from shards.testing import TIME_FACTOR, Host, refused_start, wait_until

NOTHING_WITHIN = 2.0  # seconds: "gets nothing" is a bounded wait for a reply that never comes
SECRET = "s" * 40


def keygen(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shards.cli", "keygen", str(path)],
        capture_output=True,
        text=True,
        timeout=30 * TIME_FACTOR,
        check=False,
    )


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """``server.key``, ``listed.key`` (its .pub in ``clients/``) and ``unlisted.key``."""
    (tmp_path / "clients").mkdir()
    for name in ("server", "listed", "unlisted"):
        assert keygen(tmp_path / f"{name}.key").returncode == 0
    (tmp_path / "clients" / "listed.pub").write_bytes((tmp_path / "listed.key.pub").read_bytes())
    return tmp_path


def curve_host(ucc_host, keys: Path) -> Host:
    host: Host = ucc_host(
        shards=1,
        args=(
            "--command-key",
            str(keys / "server.key"),
            "--command-clients",
            str(keys / "clients"),
        ),
    )
    return host


def client(host: Host, keys: Path, name: str, timeout: float = 5.0) -> Client:
    return Client(
        host.command,
        timeout=timeout * TIME_FACTOR,
        server_key=str(keys / "server.key.pub"),
        client_key_file=str(keys / f"{name}.key"),
    )


def curve_stats(host: Host, keys: Path) -> dict[str, int]:
    with client(host, keys, "listed") as admin:
        stats: dict[str, int] = admin.request("router_stats")["curve"]
        return stats


def test_keygen_writes_a_0600_secret_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "k"
    done = keygen(path)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    public = done.stdout.strip()
    assert len(public) == 40
    assert (tmp_path / "k.pub").read_text().strip() == public
    assert len(path.read_text().strip()) == 40
    before = path.read_bytes()
    again = keygen(path)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
    assert path.read_bytes() == before


def test_a_listed_key_is_answered_an_unlisted_one_gets_nothing(ucc_host, keys):
    host = curve_host(ucc_host, keys)
    with client(host, keys, "listed") as listed:
        assert listed.status()["shards"][0]["state"] == "up"
    with (
        client(host, keys, "unlisted", timeout=NOTHING_WITHIN) as unlisted,
        pytest.raises(CommandTimeout),
    ):
        unlisted.status()
    stats = curve_stats(host, keys)
    assert stats["admitted"] >= 2
    assert stats["denied"] >= 1
    assert stats["clients"] == 1


def test_async_client_with_a_listed_key(ucc_host, keys):
    host = curve_host(ucc_host, keys)

    async def scenario() -> None:
        async with AsyncClient(
            host.command,
            timeout=5 * TIME_FACTOR,
            server_key=(keys / "server.key.pub").read_text().strip(),  # the z85 text itself
            client_key_file=str(keys / "listed.key"),
        ) as listed:
            assert (await listed.status())["shards"][0]["state"] == "up"

    asyncio.run(scenario())


def test_no_key_at_all_gets_nothing_from_a_curve_server(ucc_host, keys):
    host = curve_host(ucc_host, keys)
    with (
        Client(host.command, timeout=NOTHING_WITHIN, server_key="") as plain,
        pytest.raises(CommandTimeout),
    ):
        plain.status()
    assert curve_stats(host, keys)["admitted"] >= 1  # the server is up and answering


def test_sighup_rereads_the_client_keys(ucc_host, keys):
    host = curve_host(ucc_host, keys)
    with (
        client(host, keys, "unlisted", timeout=NOTHING_WITHIN) as unlisted,
        pytest.raises(CommandTimeout),
    ):
        unlisted.status()
    (keys / "clients" / "new.pub").write_bytes((keys / "unlisted.key.pub").read_bytes())
    host.signal(signal.SIGHUP)
    wait_until(lambda: curve_stats(host, keys)["reloads"] == 1, what="the reload")
    assert curve_stats(host, keys)["clients"] == 2
    with client(host, keys, "unlisted") as admitted:
        assert admitted.status()["shards"][0]["state"] == "up"
    # and removing a key file takes the key away at the next SIGHUP
    (keys / "clients" / "new.pub").unlink()
    host.signal(signal.SIGHUP)
    wait_until(lambda: curve_stats(host, keys)["reloads"] == 2, what="the second reload")
    assert curve_stats(host, keys)["clients"] == 1


def test_env_names_the_keys_for_host_clients(ucc_host, keys, monkeypatch):
    host = curve_host(ucc_host, keys)
    monkeypatch.setenv("UCC_COMMAND_SERVER_KEY", str(keys / "server.key.pub"))
    monkeypatch.setenv("UCC_COMMAND_CLIENT_KEY", str(keys / "listed.key"))
    assert host.status()["shards"][0]["state"] == "up"
    done = subprocess.run(
        [sys.executable, "-m", "shards.cli", "status", "--json", "--command", host.command],
        capture_output=True,
        text=True,
        timeout=30 * TIME_FACTOR,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    argv = [sys.executable, "-m", "shards.cli", "status", "--command", host.command]
    unlisted = subprocess.run(
        [*argv, "--client-key", str(keys / "unlisted.key"), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30 * TIME_FACTOR,
        check=False,
    )
    assert unlisted.returncode == 1
    assert "timeout" in unlisted.stderr


def serve(*args: str, stderr: Any = subprocess.PIPE) -> procgroup.Process:
    env = {**os.environ, "UCC_SECRET": SECRET}
    for name in ("UCC_COMMAND", "UCC_COMMAND_KEY", "UCC_COMMAND_CLIENTS"):
        env.pop(name, None)
    return procgroup.start(
        ready.serve_argv(1, *args), stdout=subprocess.PIPE, stderr=stderr, env=env
    )


def refused(*args: str) -> str:
    """``ucc serve ARGS`` exits 2 before its ready line; its stderr."""
    return refused_start(*args, secret=SECRET)


def test_a_command_endpoint_off_loopback_needs_curve():
    err = refused("--command", "tcp://0.0.0.0:0")
    assert "not on a loopback address" in err
    assert "--insecure-command" in err
    assert "not on a loopback address" in refused("--command", "tcp://*:0")


def test_bad_curve_settings_exit_2_before_the_ready_line(keys):
    server = str(keys / "server.key")
    assert "--command-clients" in refused("--command-key", server)
    empty = keys / "empty"
    empty.mkdir()
    assert "no *.pub" in refused("--command-key", server, "--command-clients", str(empty))
    missing = str(keys / "missing")
    assert "cannot list" in refused("--command-key", server, "--command-clients", missing)
    (keys / "bad.key").write_text("not a key\n")
    clients = str(keys / "clients")
    bad = refused("--command-key", str(keys / "bad.key"), "--command-clients", clients)
    assert "40-character z85 key" in bad


def test_insecure_command_starts_off_loopback_with_a_warning(tmp_path):
    log = tmp_path / "stderr"
    with log.open("wb") as stderr:
        proc = serve("--command", "tcp://0.0.0.0:0", "--insecure-command", stderr=stderr)
    try:
        line = ready.first_line(proc, 30 * TIME_FACTOR)
        match = ready.PATTERN.fullmatch(line)
        assert match is not None, line
        port = match[2].rsplit(":", 1)[1]
        # bound on every address, but the traffic stays on loopback
        with Client(f"tcp://127.0.0.1:{port}", timeout=5 * TIME_FACTOR, server_key="") as plain:
            assert plain.status()["shards"][0]["state"] == "up"
    finally:
        procgroup.kill(proc)
    err = log.read_bytes()
    assert b"WARNING" in err
    assert b"--insecure-command" in err
