"""CURVE on the command endpoint: key files, the ZAP handler that admits client keys, and the
check that refuses a non-loopback command endpoint without CURVE.

Owns:

- the key file format (``ucc keygen``): the secret file ``PATH`` holds the secret key and
  ``PATH.pub`` the public key, each as one z85 line (40 characters and a newline). One line
  rather than pyzmq's ``zmq.auth`` certificate format because the public line is exactly the
  string a client passes as ``server_key`` (or in ``$UCC_COMMAND_SERVER_KEY``) and that an
  operator pastes into a client directory: nothing to parse, nothing to get wrong. Blank lines
  are ignored when reading (no comments: ``#`` is a z85 character). The public half of a
  secret file is derived (``zmq.curve_public``), so a client needs only its secret file;
- :class:`ZapHandler`: a thread answering ZAP requests (RFC 27) on ``inproc://zeromq.zap.01`` of
  the server's context. It admits a CURVE client of the command endpoint only when its public
  key is one of the ``*.pub`` files of the clients directory, counts admissions and denials,
  and re-reads the directory on :meth:`ZapHandler.reload` (SIGHUP);
- :func:`is_local_endpoint`: whether an endpoint is reachable from this machine only.

Must never log or print a secret key, and never admit a key it cannot read: a malformed
``*.pub`` admits nobody (at start it is an error; on reload it is skipped and logged), and a
clients directory that cannot be listed on reload keeps the keys already admitted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

log = logging.getLogger("ucc.curve")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"ucc-command"  # set on the command socket: only its requests are judged here
Z85_KEY_LENGTH = 40  # a 32-byte key in z85
PUBLIC_SUFFIX = ".pub"


class KeyFileError(ValueError):
    """A key file or clients directory that cannot be used (the message says which and why)."""


# --- key files ---------------------------------------------------------------------------------


def parse_key(text: str, what: str) -> bytes:
    """The z85 key (40 characters, as bytes) that ``text`` holds: one line, ignoring blank
    lines. Raises KeyFileError naming ``what``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise KeyFileError(f"{what}: expected one z85 key line, found {len(lines)} lines")
    key = lines[0]
    if len(key) != Z85_KEY_LENGTH or not key.isascii():
        raise KeyFileError(f"{what}: expected a {Z85_KEY_LENGTH}-character z85 key")
    try:
        raw = z85.decode(key.encode("ascii"))
    except (ValueError, KeyError, IndexError):
        raise KeyFileError(f"{what}: not a z85 key") from None
    if len(raw) != 32 or z85.encode(raw) != key.encode("ascii"):
        raise KeyFileError(f"{what}: not a z85 key")
    return key.encode("ascii")


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{what} {path}: not a z85 key (not ASCII)") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def read_secret_key(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """``(public, secret)`` z85 keys from a secret key file (the public one derived)."""
    file = Path(path)
    secret = parse_key(_read_text(file, "secret key file"), f"secret key file {file}")
    return zmq.curve_public(secret), secret


def read_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key of a ``.pub`` file."""
    file = Path(path)
    return parse_key(_read_text(file, "public key file"), f"public key file {file}")


def server_public_key(value: str) -> bytes:
    """A client's ``server_key``: a z85 public key itself (40 characters), else the path of a
    ``.pub`` file holding it."""
    if len(value) == Z85_KEY_LENGTH and not os.path.exists(value):
        return parse_key(value, "server key")
    return read_public_key(value)


def load_client_keys(
    directory: str | os.PathLike[str], strict: bool = True
) -> tuple[frozenset[bytes], list[str]]:
    """The raw (32-byte) public keys of the ``*.pub`` files in ``directory`` and the problems
    found. ``strict`` (at start): a missing or empty directory or any malformed file raises
    KeyFileError; otherwise (reload) malformed files are skipped and listed as problems, and
    only a directory that cannot be listed raises."""
    folder = Path(directory)
    try:
        files = sorted(p for p in folder.iterdir() if p.name.endswith(PUBLIC_SUFFIX))
    except OSError as exc:
        raise KeyFileError(
            f"cannot list the command clients directory {folder}: {exc.strerror or exc}"
        ) from None
    keys: set[bytes] = set()
    problems: list[str] = []
    for file in files:
        try:
            keys.add(z85.decode(read_public_key(file)))
        except KeyFileError as exc:
            if strict:
                raise
            problems.append(str(exc))
    if strict and not keys:
        raise KeyFileError(f"the command clients directory {folder} has no *.pub key file")
    return frozenset(keys), problems


def write_keypair(path: str | os.PathLike[str]) -> bytes:
    """Write a new keypair: ``path`` (the secret key, mode 0600) and ``path.pub`` (the public
    key, mode 0644), each created exclusively. Returns the z85 public key. Raises
    FileExistsError if either exists (nothing is written then), OSError otherwise."""
    secret_path = Path(path)
    public_path = Path(f"{secret_path}{PUBLIC_SUFFIX}")
    if public_path.exists():
        raise FileExistsError(17, "File exists", str(public_path))
    public, secret = zmq.curve_keypair()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(secret_path, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(secret + b"\n")
        fd = os.open(public_path, flags, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(public + b"\n")
    except BaseException:
        secret_path.unlink(missing_ok=True)
        raise
    return public


# --- the loopback check ------------------------------------------------------------------------


def is_local_endpoint(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint (to bind) is reachable from this machine only: ``ipc://`` and
    ``inproc://``, or ``tcp://`` on 127.0.0.0/8, ``::1`` (also as ``[::1]`` or an IPv4-mapped
    127.x) or ``localhost``. ``tcp://*:PORT``, ``0.0.0.0``, ``::``, any other address, host or
    interface name, and every other transport are not."""
    scheme, sep, rest = endpoint.partition("://")
    scheme = scheme.lower()
    if not sep:
        return False
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # "*", an interface name or another host name
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_command_security(
    endpoint: str, command_key: str | None, command_clients: str | None, insecure: bool
) -> str | None:
    """The reason ``ucc serve`` must not start with these settings (exit 2), or None. Reads
    the key files to check them."""
    if command_key is None:
        if command_clients is not None:
            return "--command-clients needs --command-key (the server's CURVE secret key file)"
        if not insecure and not is_local_endpoint(endpoint):
            return (
                f"the command endpoint {endpoint} is not on a loopback address and has no"
                " authentication: anyone who reaches it can broadcast or disconnect any user."
                " Pass --command-key and --command-clients (see `ucc keygen`), bind it to"
                " 127.0.0.1, or pass --insecure-command if a firewall protects it"
            )
        return None
    if command_clients is None:
        return "--command-key needs --command-clients (a directory of admitted *.pub keys)"
    try:
        read_secret_key(command_key)
        load_client_keys(command_clients)
    except KeyFileError as exc:
        return str(exc)
    return None


# --- the ZAP handler ---------------------------------------------------------------------------


class ZapHandler:
    """Answers the ZAP requests of one context on a thread of its own; admits the CURVE clients
    of :data:`ZAP_DOMAIN` whose key is listed, and plain (NULL) peers of the process's other
    sockets, which have no keys to judge. Create it before the CURVE socket binds."""

    def __init__(
        self,
        secret_key_file: str | os.PathLike[str],
        clients_dir: str | os.PathLike[str],
        context: zmq.Context[Any] | None = None,
    ) -> None:
        """Raises KeyFileError for an unusable key file or directory, zmq.ZMQError when the
        context already has a ZAP handler."""
        self.public_key, self.secret_key = read_secret_key(secret_key_file)
        self.domain = ZAP_DOMAIN
        self.clients_dir = Path(clients_dir)
        self._clients, _ = load_client_keys(self.clients_dir)
        self._lock = threading.Lock()
        self._admitted = 0
        self._denied = 0
        self._reloads = 0
        context = context or zmq.Context.instance()
        self._socket: zmq.Socket[bytes] = context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self._socket.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._serve, name="ucc-zap", daemon=True)
        self._thread.start()
        log.info("command endpoint: CURVE, %d client keys admitted", len(self._clients))

    def stats(self) -> Mapping[str, int]:
        """A copy of the counters (any thread): admissions, denials, keys listed, reloads."""
        with self._lock:
            return {
                "admitted": self._admitted,
                "denied": self._denied,
                "clients": len(self._clients),
                "reloads": self._reloads,
            }

    def reload(self) -> None:
        """Re-read the clients directory (SIGHUP). Malformed files are skipped (logged); a
        directory that cannot be listed keeps the keys admitted so far."""
        try:
            keys, problems = load_client_keys(self.clients_dir, strict=False)
        except KeyFileError as exc:
            log.error("reload: %s; the %d keys admitted so far stay", exc, len(self._clients))
            return
        for problem in problems:
            log.error("reload: %s (skipped: it admits nobody)", problem)
        with self._lock:
            self._clients = keys
            self._reloads += 1
        log.info("reload: %d client keys admitted", len(keys))

    def close(self) -> None:
        """Stop the thread and unbind (idempotent)."""
        if self._wake_w < 0:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join()
        os.close(self._wake_w)
        os.close(self._wake_r)
        self._wake_w = self._wake_r = -1

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_r in ready:
                    return
                if self._socket in ready:
                    frames = self._socket.recv_multipart()
                    self._socket.send_multipart(self._answer(frames))
        finally:
            self._socket.close(linger=0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        """The reply to one ZAP request (RFC 27: version, request id, domain, address,
        identity, mechanism, credentials...)."""
        if len(frames) < 6 or frames[0] != b"1.0":
            request_id = frames[1] if len(frames) > 1 else b""
            return [b"1.0", request_id, b"500", b"malformed ZAP request", b"", b""]
        _version, request_id, domain, address, _identity, mechanism, *credentials = frames
        if mechanism == b"NULL" and domain != self.domain:
            return [b"1.0", request_id, b"200", b"OK", b"", b""]
        if mechanism == b"CURVE" and domain == self.domain and credentials:
            key = credentials[0]
            with self._lock:
                admitted = key in self._clients
                if admitted:
                    self._admitted += 1
                else:
                    self._denied += 1
            if admitted:
                return [b"1.0", request_id, b"200", b"OK", z85.encode(key), b""]
            log.debug("denied a client key from %s", address.decode(errors="replace"))
            return [b"1.0", request_id, b"400", b"client key not listed", b"", b""]
        with self._lock:
            self._denied += 1
        return [b"1.0", request_id, b"400", b"mechanism not allowed", b"", b""]


def command_auth(command_key: str | None, command_clients: str | None) -> ZapHandler | None:
    """The ZAP handler for ``ucc serve``'s command endpoint (on the default context), or None
    without ``--command-key``. Raises OSError for unusable keys (``ucc serve`` checks them
    before, with a clearer message)."""
    if command_key is None:
        return None
    if command_clients is None:
        raise OSError("--command-key needs --command-clients")
    try:
        return ZapHandler(command_key, command_clients)
    except KeyFileError as exc:
        raise OSError(str(exc)) from None
