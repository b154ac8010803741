"""A local HTTP receiver for webhook tests: records every request and answers as scripted."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    url: str
    # Status codes of the next answers in turn (then 200); "sleep:<s>" waits before a 200.
    script: list[int | str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.received)} of {count} deliveries arrived")
            time.sleep(0.02)
        return self.received


@contextmanager
def webhook_receiver(script: list[int | str] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(url="", script=list(script or []))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the http.server interface)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                answer = receiver.script.pop(0) if receiver.script else 200
                receiver.received.append(
                    Received({k.lower(): v for k, v in self.headers.items()}, body, time.time())
                )
            if isinstance(answer, str) and answer.startswith("sleep:"):
                time.sleep(float(answer.split(":", 1)[1]))
                answer = 200
            self.send_response(int(answer))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
