"""A canned command endpoint for unit tests of code that talks to ucc's command endpoint:
real ZeroMQ on 127.0.0.1, replies set by the test (for what is only formatting or client-side
logic; what the server does is tested against real servers in tests/system)."""

from __future__ import annotations

import json
import threading
from typing import Any

import zmq


class CannedServer:
    """A real ZeroMQ command endpoint on 127.0.0.1 that answers each command with the reply
    set for it in ``replies`` (else ``default``; a list: one per request, in order; ``None``:
    no answer, the client times out), and records the commands asked and the requests. The
    code under test talks to it with its real client."""

    def __init__(self) -> None:
        self.socket = zmq.Context.instance().socket(zmq.ROUTER)
        self.socket.linger = 0
        self.socket.bind("tcp://127.0.0.1:*")
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replies: dict[str, Any] = {}
        self.default: Any = None  # the reply to a command not in replies
        self.asked: list[str] = []
        self.requests: list[dict[str, Any]] = []  # each request as sent, without its id
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="canned-server", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(20):
                continue
            *envelope, payload = self.socket.recv_multipart()
            request = json.loads(payload)
            self.asked.append(request["cmd"])
            self.requests.append({k: v for k, v in request.items() if k != "id"})
            reply = self.replies.get(request["cmd"], self.default)
            if isinstance(reply, list):  # one reply per request, in order
                reply = reply.pop(0) if reply else None
            if reply is not None:
                body = json.dumps({"id": request.get("id"), **reply}).encode()
                self.socket.send_multipart([*envelope, body])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.socket.close()
