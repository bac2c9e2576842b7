"""A fault-injecting HTTP proxy in front of an S3-compatible server (moto in the tests).

Clients (boto3, s3fs/aiobotocore for DVC, the MLflow server) are pointed at ``FaultProxy.endpoint``
instead of the real endpoint; every request is forwarded unchanged unless a ``Rule`` fires for it.
A rule matches a method and a path regex and fires on the first N matching requests, on every
k-th one, with a probability drawn from a seeded RNG, or always (``persistent``). Faults:

- ``reset``:       the request is read, then the connection is closed with a TCP RST (no response);
- ``reset_after``: the request is forwarded (so the server applied it), then the connection is reset:
                   the response is lost, which is what makes retries of writes interesting;
- ``500`` / ``503``: an S3 error document (InternalError / SlowDown) instead of forwarding;
- ``delay``:       the request is forwarded after ``delay_s`` seconds (slow server / network);
- ``truncate``:    the response headers announce the whole body, half of it is sent, then a reset.

``stats`` counts the faults injected by kind, ``requests`` the requests seen: the tests report
how many faults a run survived. The proxy is a ThreadingHTTPServer speaking HTTP/1.1 keep-alive,
which boto3, aiohttp and requests all use.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("reset", "reset_after", "500", "503", "delay", "truncate")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = {
    "500": ("InternalError", "We encountered an internal error. Please try again."),
    "503": ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class Rule:
    """When to inject ``fault``. ``method`` and ``path`` are regexes (``re.search``) on the request
    method and on the path with its query string. A rule with no trigger (first / every /
    probability / persistent) never fires."""

    fault: str
    method: str = ".*"
    path: str = ".*"
    first: int = 0             # fire on the first N matching requests
    every: int = 0             # fire on every k-th matching request (k, 2k, ...)
    probability: float = 0.0   # fire with this probability (the proxy's seeded RNG)
    persistent: bool = False   # fire on every matching request
    delay_s: float = 0.0       # for "delay"
    seen: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}; one of {FAULTS}")

    def fires(self, method: str, path: str, rng: random.Random) -> bool:
        if not (re.search(self.method, method) and re.search(self.path, path)):
            return False
        self.seen += 1
        return (self.persistent or (self.first and self.seen <= self.first)
                or (self.every and self.seen % self.every == 0)
                or (self.probability > 0 and rng.random() < self.probability))


class FaultProxy:
    """Forward to ``upstream`` (``http://host:port``), injecting faults from the current rules."""

    def __init__(self, upstream: str, seed: int = 0):
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self.stats: Counter[str] = Counter()
        self.requests = 0
        self.log: list[tuple[str, str, str]] = []  # (method, path, fault) of each injected fault
        self._server = _QuietServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False  # keep-alive connections may stay open until the client goes
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    # -- schedule ------------------------------------------------------------------------------
    def set_rules(self, *rules: Rule, seed: int | None = None) -> None:
        """Replace the schedule (and reset the counters, so each scenario reports its own)."""
        with self._lock:
            self._rules = list(rules)
            if seed is not None:
                self._rng.seed(seed)
            self.stats.clear()
            self.requests = 0
            self.log.clear()

    def fail_all(self, fault: str = "503", method: str = ".*", path: str = ".*") -> None:
        """Persistent failure of every matching request (an outage) until ``heal``."""
        self.set_rules(Rule(fault, method=method, path=path, persistent=True))

    def heal(self) -> None:
        self.set_rules()

    @property
    def injected(self) -> int:
        return sum(self.stats.values())

    def decide(self, method: str, path: str) -> Rule | None:
        with self._lock:
            self.requests += 1
            for rule in self._rules:
                if rule.fires(method, path, self._rng):
                    self.stats[rule.fault] += 1
                    self.log.append((method, path, rule.fault))
                    return rule
        return None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A client that gave up on a slow or reset exchange is expected here, not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, and 100-continue handled by the base class
        timeout = 30                   # an idle keep-alive connection ends its thread

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - base-class signature
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reset(self) -> None:
            """Close with RST: the client sees 'connection reset by peer', not a clean EOF."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _error(self, code: str) -> None:
            name, message = _ERRORS[code]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{name}</Code><Message>{message}'
                    f"</Message><RequestId>fault-proxy</RequestId></Error>").encode()
            self.send_response(int(code))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
            conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
                for k, v in self.headers.items():
                    if k.lower() in HOP_BY_HOP or (chunked and k.lower() == "content-length"):
                        continue
                    conn.putheader(k, v)
                if chunked or (body and "Content-Length" not in self.headers):
                    conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body or None)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.reason, resp.getheaders(), data
            finally:
                conn.close()

        def _handle(self) -> None:
            body = self._body()
            rule = proxy.decide(self.command, self.path)
            fault = rule.fault if rule else None
            if fault == "reset":
                return self._reset()
            if fault in _ERRORS:
                return self._error(fault)
            if fault == "delay":
                time.sleep(rule.delay_s)
            status, reason, headers, data = self._forward(body)
            if fault == "reset_after":
                return self._reset()
            self.send_response_only(status, reason)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if fault == "truncate" and len(data) > 1:
                self.wfile.write(data[: len(data) // 2])
                return self._reset()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle  # noqa: N815 - http.server names

    return Handler


__all__ = ["FAULTS", "FaultProxy", "Rule"]
