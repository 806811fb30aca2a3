"""A fault-injecting HTTP proxy for the S3 server on 127.0.0.1: errors, delays, dropped connections.

Put it between s3fs and moto (`endpoint_url` = `proxy.url`) and add `Fault`s: each matches
requests by method and a regular expression over the path (`/bucket/key?query`), lets the first
`skip` matches through, then injects on the next `times` (every one when `times` is None); when
several faults are due on one request, the first added wins:

- `status`: answer with this HTTP status and an S3 error document (`code`), never forwarding;
- `delay`: wait this many seconds, then forward (a slow response);
- `reset`: close the connection without answering (a dropped connection);
- `truncate`: forward, but send only half the body and close (a response cut short).

Every request is logged (`requests`); `wait_for` blocks on a condition over the log (no polling).
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailers", "transfer-encoding", "upgrade", "content-length", "expect"}


@dataclass
class Fault:
    """What to do to matching requests (see the module doc)."""

    method: str | None = None
    path: str = ""
    status: int = 0
    code: str = "InternalError"
    delay: float = 0.0
    reset: bool = False
    truncate: bool = False
    skip: int = 0
    times: int | None = 1
    matched: int = 0
    injected: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(re.search(self.path, path))

    @property
    def spent(self) -> bool:
        return self.times is not None and self.injected >= self.times


@dataclass(frozen=True)
class Request:
    """One request as the proxy saw it: what it did and the status the client got (0: none)."""

    method: str
    path: str
    status: int
    fault: str = ""


@dataclass
class _State:
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _choose(self) -> Fault | None:
        state = self.server.state
        chosen = None
        with state.changed:
            # Every fault counts every request it matches (so `skip` counts requests, not
            # leftovers of other faults); the first one due injects.
            for fault in state.faults:
                if not fault.matches(self.command, self.path):
                    continue
                fault.matched += 1
                if chosen is None and not fault.spent and fault.matched > fault.skip:
                    fault.injected += 1
                    chosen = fault
        return chosen

    def _record(self, status: int, fault: str = "") -> None:
        state = self.server.state
        with state.changed:
            state.requests.append(Request(self.command, self.path, status, fault))
            state.changed.notify_all()

    def _drop(self) -> None:
        # SO_LINGER 0: the close sends a RST, as a crashed server or load balancer would.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _handle(self) -> None:
        body = self._body()
        fault = self._choose()
        try:
            self._answer(body, fault)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up first (its read timeout, during an injected delay).
            self._record(0, "delay" if fault is not None and fault.delay else "client gone")
            self.close_connection = True

    def _answer(self, body: bytes, fault: Fault | None) -> None:
        if fault is not None and fault.delay:
            time.sleep(fault.delay)  # the injected slowness itself
        if fault is not None and fault.reset:
            self._record(0, "reset")
            self._drop()
            return
        if fault is not None and fault.status:
            doc = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{fault.code}</Code>'
                   f"<Message>injected by the test proxy</Message><Resource>{self.path}"
                   "</Resource><RequestId>fault</RequestId></Error>").encode()
            self.send_response(fault.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(doc)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(doc)
            self._record(fault.status, f"status {fault.status}")
            return
        upstream = http.client.HTTPConnection(self.server.upstream_host,
                                              self.server.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in _HOP_BY_HOP:
                self.send_header(key, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", response.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command == "HEAD":
            self._record(response.status, "delay" if fault else "")
            return
        if fault is not None and fault.truncate and len(data) > 1:
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self._record(response.status, "truncate")
            self._drop()
            return
        self.wfile.write(data)
        self._record(response.status, "delay" if fault else "")

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: str, state: _State) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        parts = urlsplit(upstream)
        if parts.hostname != "127.0.0.1":
            raise ValueError(f"the proxy only forwards to 127.0.0.1, got {upstream!r}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.state = state


class FaultProxy:
    """The proxy; a context manager that serves on 127.0.0.1 on a free port."""

    def __init__(self, upstream: str) -> None:
        self._state = _State()
        self._server = _Server(upstream, self._state)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="fault-proxy")

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, fault: Fault) -> Fault:
        with self._state.changed:
            self._state.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault and forget the request log."""
        with self._state.changed:
            self._state.faults.clear()
            self._state.requests.clear()

    @property
    def requests(self) -> list[Request]:
        with self._state.changed:
            return list(self._state.requests)

    def wait_for(self, condition: Callable[[list[Request]], bool], timeout: float) -> bool:
        """Block until `condition(requests)` holds (True) or `timeout` seconds pass (False)."""
        with self._state.changed:
            return self._state.changed.wait_for(lambda: condition(self._state.requests), timeout)


def puts_of(requests: list[Request], pattern: str) -> list[Request]:
    """Successful PUTs whose path matches `pattern`."""
    return [r for r in requests if r.method == "PUT" and r.status == 200
            and re.search(pattern, r.path)]
