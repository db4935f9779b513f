"""shards/curve.py: the loopback check, key files, the clients directory, the start-up checks,
and the ZAP handler on a private ZeroMQ context (real sockets on loopback)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from shards.curve import (
    KeyFileError,
    ZapHandler,
    check_command_security,
    is_local_endpoint,
    load_client_keys,
    parse_key,
    read_public_key,
    read_secret_key,
    server_public_key,
    write_keypair,
)

LOCAL = [
    "tcp://127.0.0.1:5555",
    "tcp://127.0.0.1:*",
    "tcp://127.1.2.3:0",
    "tcp://[::1]:5555",
    "tcp://::1:5555",
    "tcp://localhost:5555",
    "tcp://LOCALHOST:1",
    "tcp://[::ffff:127.0.0.1]:5555",
    "ipc:///tmp/ucc.sock",
    "ipc://@abstract",
    "inproc://commands",
]
NOT_LOCAL = [
    "tcp://*:5555",
    "tcp://0.0.0.0:5555",
    "tcp://0.0.0.0:0",
    "tcp://[::]:5555",
    "tcp://10.0.0.1:5555",
    "tcp://192.168.1.2:5555",
    "tcp://eth0:5555",
    "tcp://lo:5555",
    "tcp://example.com:5555",
    "tcp://localhost.example.com:5555",
    "tcp://[::ffff:10.0.0.1]:5555",
    "pgm://eth0;239.192.1.1:5555",
    "ws://127.0.0.1:5555",
    "no-scheme",
]


@pytest.mark.parametrize("endpoint", LOCAL)
def test_loopback_ipc_and_inproc_are_local(endpoint):
    assert is_local_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", NOT_LOCAL)
def test_every_other_address_is_not_local(endpoint):
    assert not is_local_endpoint(endpoint)


# -- key files ----------------------------------------------------------------------------------


def test_keypair_files_are_one_z85_line_each_and_the_secret_is_0600(tmp_path):
    path = tmp_path / "k"
    public = write_keypair(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "k.pub").read_bytes() == public + b"\n"
    assert read_public_key(tmp_path / "k.pub") == public
    derived, secret = read_secret_key(path)
    assert derived == public
    assert path.read_bytes() == secret + b"\n"


def test_keypair_refuses_to_overwrite_either_file(tmp_path):
    path = tmp_path / "k"
    write_keypair(path)
    before = path.read_bytes(), (tmp_path / "k.pub").read_bytes()
    with pytest.raises(FileExistsError):
        write_keypair(path)
    assert (path.read_bytes(), (tmp_path / "k.pub").read_bytes()) == before
    other = tmp_path / "o"
    (tmp_path / "o.pub").write_text("taken\n")
    with pytest.raises(FileExistsError):
        write_keypair(other)
    assert not other.exists()


def test_a_key_may_have_blank_lines_around_it():
    public, _secret = zmq.curve_keypair()
    assert parse_key(f"\n  {public.decode()}  \n\n", "k") == public


@pytest.mark.parametrize(
    "text",
    ["", "\n", "short", "x" * 41, "é" * 40, '"' * 40, "two\nlines", "a" * 40 + "\n" + "b" * 40],
    ids=["empty", "blank", "short", "long", "not ascii", "not z85", "two lines", "two keys"],
)
def test_a_malformed_key_is_refused_with_its_name(text):
    with pytest.raises(KeyFileError, match="the key"):
        parse_key(text, "the key")


def test_unreadable_key_files_are_key_file_errors(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read"):
        read_secret_key(tmp_path / "missing")
    (tmp_path / "binary").write_bytes(b"\xff" * 40)
    with pytest.raises(KeyFileError, match="not ASCII"):
        read_public_key(tmp_path / "binary")


def test_server_key_is_z85_text_or_a_pub_file(tmp_path):
    public = write_keypair(tmp_path / "s")
    assert server_public_key(public.decode()) == public
    assert server_public_key(str(tmp_path / "s.pub")) == public
    with pytest.raises(KeyFileError):
        server_public_key(str(tmp_path / "nope.pub"))


# -- the clients directory ----------------------------------------------------------------------


def test_clients_directory_lists_the_pub_files_only(tmp_path):
    keys = [write_keypair(tmp_path / name) for name in ("a", "b")]
    clients = tmp_path / "clients"
    clients.mkdir()
    for name in ("a", "b"):
        (clients / f"{name}.pub").write_bytes((tmp_path / f"{name}.pub").read_bytes())
    (clients / "README").write_text("not a key, not a .pub")
    found, problems = load_client_keys(clients)
    assert found == {zmq.utils.z85.decode(key) for key in keys}
    assert problems == []


def test_clients_directory_at_start_must_exist_hold_keys_and_only_good_ones(tmp_path):
    with pytest.raises(KeyFileError, match="cannot list"):
        load_client_keys(tmp_path / "missing")
    with pytest.raises(KeyFileError, match=r"no \*\.pub"):
        load_client_keys(tmp_path)
    (tmp_path / "bad.pub").write_text("nope\n")
    with pytest.raises(KeyFileError, match=r"bad\.pub"):
        load_client_keys(tmp_path)


def test_on_reload_malformed_files_are_skipped_and_an_empty_directory_admits_nobody(tmp_path):
    public = write_keypair(tmp_path / "good")
    clients = tmp_path / "clients"
    clients.mkdir()
    assert load_client_keys(clients, strict=False) == (frozenset(), [])
    (clients / "good.pub").write_bytes(public + b"\n")
    (clients / "bad.pub").write_text("nope\n")
    found, problems = load_client_keys(clients, strict=False)
    assert found == {zmq.utils.z85.decode(public)}
    assert len(problems) == 1
    assert "bad.pub" in problems[0]


# -- the start-up checks ------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> tuple[str, str]:
    """A server key file and a clients directory with one key."""
    write_keypair(tmp_path / "server")
    write_keypair(tmp_path / "client")
    clients = tmp_path / "clients"
    clients.mkdir()
    (clients / "client.pub").write_bytes((tmp_path / "client.pub").read_bytes())
    return str(tmp_path / "server"), str(clients)


def test_start_up_checks(server, tmp_path):
    key, clients = server
    assert check_command_security("tcp://127.0.0.1:1", None, None, False) is None
    refusal = check_command_security("tcp://0.0.0.0:1", None, None, False)
    assert refusal is not None
    assert "--insecure-command" in refusal
    assert check_command_security("tcp://0.0.0.0:1", None, None, True) is None
    assert check_command_security("tcp://0.0.0.0:1", key, clients, False) is None
    assert "--command-clients" in (check_command_security("tcp://*:1", key, None, False) or "")
    assert "--command-key" in (check_command_security("tcp://*:1", None, clients, False) or "")
    assert "cannot read" in (
        check_command_security("tcp://*:1", str(tmp_path / "x"), clients, False) or ""
    )


# -- the ZAP handler ----------------------------------------------------------------------------


def _ask(context: zmq.Context[zmq.Socket[bytes]], endpoint: str, server: bytes, key: str) -> bool:
    """Whether a CURVE DEALER with the keypair of file ``key`` gets a session within 2 s."""
    public, secret = read_secret_key(key)
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.IMMEDIATE, 1)
    dealer.setsockopt(zmq.CURVE_SERVERKEY, server)
    dealer.setsockopt(zmq.CURVE_PUBLICKEY, public)
    dealer.setsockopt(zmq.CURVE_SECRETKEY, secret)
    dealer.connect(endpoint)
    try:
        return bool(dealer.poll(2000, zmq.POLLOUT))  # IMMEDIATE: only once admitted
    finally:
        dealer.close()


def test_zap_handler_admits_listed_keys_counts_and_reloads(server, tmp_path):
    key, clients = server
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    zap = ZapHandler(key, clients, context)
    router = context.socket(zmq.ROUTER)
    try:
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, zap.secret_key)
        router.setsockopt(zmq.ZAP_DOMAIN, zap.domain)
        router.bind("tcp://127.0.0.1:*")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        other = tmp_path / "other"
        write_keypair(other)
        assert _ask(context, endpoint, zap.public_key, str(tmp_path / "client"))
        assert not _ask(context, endpoint, zap.public_key, str(other))
        stats = zap.stats()
        assert stats["admitted"] == 1
        assert stats["denied"] >= 1
        assert stats["clients"] == 1
        (Path(clients) / "other.pub").write_bytes((tmp_path / "other.pub").read_bytes())
        zap.reload()
        assert zap.stats()["clients"] == 2
        assert zap.stats()["reloads"] == 1
        assert _ask(context, endpoint, zap.public_key, str(other))
        # a directory that cannot be listed keeps the keys admitted so far
        zap.clients_dir = tmp_path / "gone"
        zap.reload()
        assert zap.stats()["clients"] == 2
        assert zap.stats()["reloads"] == 1
    finally:
        router.close()
        zap.close()
        zap.close()  # idempotent
        context.term()


def test_one_zap_handler_per_context(server):
    key, clients = server
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    zap = ZapHandler(key, clients, context)
    try:
        with pytest.raises(zmq.ZMQError):
            ZapHandler(key, clients, context)
    finally:
        zap.close()
        context.term()
