"""deploy/: the systemd unit keeps the secret in its state directory where ucc looks for it,
HAProxy forwards WebSocket upgrades and checks /readyz, and the compose file runs two hosts and
a Redis. Each file is checked by its tool's own validator when the tool is on PATH
(``systemd-analyze verify``, ``haproxy -c``), and always for its essential lines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from shards.config import secret_path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UCC = Path(sys.executable).parent / "ucc"


def directives(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file (comments left out), by key."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


# -- systemd ---------------------------------------------------------------------------------------


def test_the_unit_keeps_the_secret_in_its_state_directory(monkeypatch):
    unit = directives((DEPLOY / "ucc.service").read_text())
    assert unit["StateDirectory"] == ["ucc"]
    assert unit["DynamicUser"] == ["yes"]
    environment = dict(value.split("=", 1) for value in unit["Environment"])
    # %S is the state directories' root (/var/lib): ucc's secret is then %S/ucc/secret, inside
    # StateDirectory=ucc
    assert environment["XDG_STATE_HOME"] == "%S"
    assert "UCC_SECRET_FILE" not in environment
    monkeypatch.delenv("UCC_SECRET_FILE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", "/var/lib")
    assert secret_path() == Path("/var/lib/ucc/secret")
    (exec_start,) = unit["ExecStart"]
    assert exec_start.split()[1] == "serve"
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]


def test_systemd_analyze_verifies_the_unit(tmp_path):
    """With systemd-analyze on PATH (ExecStart pointed at this venv's ucc, which exists)."""
    text = (DEPLOY / "ucc.service").read_text()
    assert "/opt/ucc/.venv/bin/ucc" in text
    tool = shutil.which("systemd-analyze")
    if tool is None:  # nothing more to check without the tool: the test above read the unit
        return
    unit = tmp_path / "ucc.service"
    unit.write_text(text.replace("/opt/ucc/.venv/bin/ucc", str(UCC)))
    done = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "ucc.service" not in done.stderr, done.stderr


# -- HAProxy ---------------------------------------------------------------------------------------


def haproxy_lines() -> list[str]:
    lines = []
    for raw in (DEPLOY / "haproxy.cfg").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(" ".join(line.split()))
    return lines


def test_haproxy_terminates_tls_and_forwards_websocket_upgrades():
    lines = haproxy_lines()
    (bind,) = [line for line in lines if line.startswith("bind ")]
    assert re.fullmatch(r"bind \S*:443 ssl crt \S+\.pem alpn http/1\.1", bind)
    assert "mode http" in lines  # HAProxy then switches an upgraded connection to a tunnel
    assert any(line.startswith("timeout tunnel ") for line in lines)
    assert "acl websocket hdr(Upgrade) -i websocket" in lines
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) >= 2 and all(line.endswith(":8765") for line in servers)


def test_haproxy_checks_readyz_on_the_metrics_port():
    lines = haproxy_lines()
    assert "option httpchk" in lines
    assert "http-check send meth GET uri /readyz" in lines
    assert "http-check expect status 200" in lines
    (default_server,) = [line for line in lines if line.startswith("default-server ")]
    assert "check port 9100" in default_server
    unit = directives((DEPLOY / "ucc.service").read_text())
    assert "UCC_METRICS=127.0.0.1:9100" in unit["Environment"]


def test_haproxy_accepts_the_config(tmp_path):
    """With haproxy (and openssl, for a throwaway certificate) on PATH: ``haproxy -c``."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    assert "/etc/haproxy/certs/ucc.pem" in text
    haproxy, openssl = shutil.which("haproxy"), shutil.which("openssl")
    if haproxy is None or openssl is None:  # the tests above read the essential lines
        return
    key, cert, pem = tmp_path / "key.pem", tmp_path / "cert.pem", tmp_path / "ucc.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=ucc",
         "-days", "1", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, timeout=60, check=True,
    )  # fmt: skip
    pem.write_text(cert.read_text() + key.read_text())
    config = tmp_path / "haproxy.cfg"
    config.write_text(text.replace("/etc/haproxy/certs/ucc.pem", str(pem)))
    done = subprocess.run(
        [haproxy, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Configuration file is valid" in done.stdout + done.stderr


# -- two hosts and a Redis -------------------------------------------------------------------------


def test_the_compose_file_runs_two_hosts_and_a_redis():
    text = (DEPLOY / "compose.yaml").read_text()
    services = re.findall(r"^  ([a-z0-9]+):$", text.split("\nservices:\n", 1)[1], re.MULTILINE)
    assert services == ["redis", "ucc1", "ucc2"]
    assert "UCC_REDIS_URL: redis://redis:6379/0" in text
    assert "UCC_SECRET: ${UCC_SECRET:?" in text  # one secret, from the environment, for both
    assert text.count("<<: *ucc") == 2
    assert '"127.0.0.1:8765:8765"' in text and '"127.0.0.1:8766:8765"' in text
    serve = re.search(r"exec ucc serve (.*)", text)
    assert serve is not None and "--host 0.0.0.0" in serve.group(1)
    assert "--command tcp://127.0.0.1:5555" in serve.group(1)  # the command endpoint: loopback
    assert "condition: service_healthy" in text
    assert "\t" not in text  # YAML: spaces only


def test_the_readme_points_to_the_deploy_files():
    readme = (ROOT / "README.md").read_text()
    many_hosts = readme.split("## Many hosts", 1)[1].split("\n## ", 1)[0]
    for name in ("compose.yaml", "ucc.service", "haproxy.cfg", "two-hosts.md"):
        assert f"deploy/{name}" in many_hosts
        assert (DEPLOY / name).is_file()
