"""Real loopback services for tests: a moto S3 server and a fault-injecting HTTP proxy.

Nothing here is mocked: ``moto_server()`` runs the ``moto_server`` program from the test
environment as a subprocess on 127.0.0.1, and ``FaultProxy`` is a small HTTP/1.1 proxy (stdlib
only, one thread per connection) that forwards to any loopback HTTP service (moto, an MLflow
tracking server, ...) and injects the failures a real network produces::

    from services import FaultProxy, moto_server

    with moto_server() as endpoint, FaultProxy(endpoint) as proxy:
        proxy.fail_next(2)                    # the next 2 requests get "500 InternalError"
        proxy.drop_uploads(after=65536)       # every request with a longer body is cut after 64 KiB
        proxy.drop_uploads(after=65536, times=1)   # ... only the next one
        proxy.corrupt_next_upload()           # flip one byte in the next request body
        proxy.truncate_responses(after=1000, times=1)   # cut the next response body after 1000 bytes
        proxy.strip_request_header("x-amz-server-side-encryption")   # a server that ignores a header
        proxy.refuse()                        # accept and reset every connection ("endpoint down")
        proxy.heal()                          # back to a clean pass-through
        proxy.requests                        # [Request(method, path, outcome, body_bytes), ...]
        proxy.connections                     # TCP connections accepted so far

Point the client at ``proxy.url`` instead of the service's URL. The proxy serves exactly one
request per client connection (it sends ``Connection: close`` both ways), answers
``Expect: 100-continue`` itself, and relays request bodies with ``Content-Length`` or chunked
framing. ``free_port()`` returns a loopback port that nothing listens on (a dead endpoint).

In pytest, the fixtures ``s3_endpoint``, ``s3_env`` and ``fault_proxy`` (tests/conftest.py) wrap
these helpers.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def venv_program(name: str) -> Path:
    """The console script ``name`` installed next to the running interpreter (``.venv/bin/NAME``)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: install the test extra (pip install -e '.[test]')")
    return path


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers any HTTP status; fail early if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"service exited with status {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, with an error status: that is alive enough
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate ``proc``; kill it if it has not exited after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


@contextlib.contextmanager
def moto_server(port: int | None = None, *, timeout: float = 30.0, tries: int = 3) -> Iterator[str]:
    """Run ``moto_server`` on 127.0.0.1 and yield its endpoint URL (``http://127.0.0.1:PORT``).

    The server's log goes to a temporary file (never a pipe nobody reads: moto logs every
    request). If the port was taken in the meantime the start is retried on another port.
    """
    program = venv_program("moto_server")
    last: Exception | None = None
    for _ in range(tries):
        p = port or free_port()
        url = f"http://{HOST}:{p}"
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen([str(program), "-H", HOST, "-p", str(p)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                try:
                    wait_http(url + "/moto-api/", timeout, proc)
                except (RuntimeError, TimeoutError) as e:
                    log.seek(0)
                    last = RuntimeError(f"moto_server on port {p}: {e}\n{log.read().decode(errors='replace')[-2000:]}")
                    if port is not None:
                        break
                    continue
                yield url
                return
            finally:
                stop_process(proc)
    raise last or RuntimeError("moto_server did not start")


@dataclass
class Request:
    """One request as the proxy saw it. ``outcome``: forwarded, failed-<status>, dropped, corrupted."""

    method: str
    path: str
    outcome: str
    body_bytes: int


class _Closed(Exception):
    """The peer closed the connection before a complete request head or body arrived."""


class FaultProxy:
    """Loopback HTTP/1.1 proxy in front of ``upstream`` that injects failures on demand.

    Faults (all thread-safe; ``heal()`` clears them):

    * ``refuse(True)``: every new connection is accepted and reset at once (an endpoint that is
      down); ``connections`` counts the attempts.
    * ``fail_next(n, status=500, method=None)``: answer the next ``n`` requests (optionally only
      those with HTTP method ``method``) with ``status`` and an S3-style XML error body, without
      forwarding them. 5xx codes use ``InternalError``, 503 ``SlowDown``, others ``InjectedError``.
    * ``drop_uploads(after, times=None)``: for requests whose body is longer than ``after``
      bytes, read ``after`` bytes of the body, then reset the connection (nothing is forwarded);
      ``times=None`` means every such request, else only the next ``times``.
    * ``corrupt_next_upload(times=1)``: flip one byte in the middle of the next request body
      and forward it (a server that does not verify checksums stores it).
    * ``truncate_responses(after, times=None)``: relay the status and headers of responses with a
      longer body, then only ``after`` bytes of it, then reset the connection (a download cut
      mid-stream); ``times`` as for ``drop_uploads``.
    * ``strip_request_header(name)``: forward requests without header ``name`` (a server that
      ignores it, e.g. one that does not encrypt).
    """

    def __init__(self, upstream: str, *, host: str = HOST, port: int = 0, io_timeout: float = 30.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"FaultProxy forwards to http://host:port, not {upstream!r}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.io_timeout = io_timeout
        self._lock = threading.Lock()
        self._listener = socket.create_server((host, port))
        self._listener.settimeout(0.1)
        self.url = f"http://{host}:{self._listener.getsockname()[1]}"
        self.requests: list[Request] = []
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="FaultProxy", daemon=True)
        self.heal()
        self._thread.start()

    # -- fault controls --------------------------------------------------------------------
    def heal(self) -> None:
        """Clear every fault: forward everything untouched."""
        with self._lock:
            self._refuse = False
            self._fail: list[tuple[int, str | None]] = []
            self._drop_after: int | None = None
            self._drop_times: int | None = None
            self._corrupt = 0
            self._truncate_after: int | None = None
            self._truncate_times: int | None = None
            self._strip: set[str] = set()

    def refuse(self, enabled: bool = True) -> None:
        """Reset every new connection (True) or accept them again (False)."""
        with self._lock:
            self._refuse = enabled

    def fail_next(self, n: int, status: int = 500, method: str | None = None) -> None:
        """Answer the next ``n`` requests (of ``method``, if given) with ``status``."""
        with self._lock:
            self._fail.extend([(status, method.upper() if method else None)] * n)

    def drop_uploads(self, after: int, times: int | None = None) -> None:
        """Cut requests with bodies longer than ``after`` bytes after ``after`` bytes."""
        with self._lock:
            self._drop_after, self._drop_times = after, times

    def corrupt_next_upload(self, times: int = 1) -> None:
        """Flip a byte in the bodies of the next ``times`` requests that have a body."""
        with self._lock:
            self._corrupt += times

    def truncate_responses(self, after: int, times: int | None = None) -> None:
        """Cut response bodies longer than ``after`` bytes after ``after`` bytes (then reset)."""
        with self._lock:
            self._truncate_after, self._truncate_times = after, times

    def strip_request_header(self, name: str) -> None:
        """Forward requests without the header ``name`` (case-insensitive)."""
        with self._lock:
            self._strip.add(name.lower())

    def log(self, method: str | None = None, outcome: str | None = None) -> list[Request]:
        """The requests seen so far, filtered by method and/or outcome."""
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method) and (outcome is None or r.outcome == outcome)]

    def clear_log(self) -> None:
        """Forget the requests and connections seen so far."""
        with self._lock:
            self.requests.clear()
            self.connections = 0

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Stop accepting; connections in flight finish on their own (daemon threads)."""
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                refuse = self._refuse
            if refuse:
                _reset(conn)
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _record(self, method: str, path: str, outcome: str, body_bytes: int) -> None:
        with self._lock:
            self.requests.append(Request(method, path, outcome, body_bytes))

    def _take_failure(self, method: str) -> int | None:
        with self._lock:
            for i, (status, only) in enumerate(self._fail):
                if only is None or only == method:
                    del self._fail[i]
                    return status
        return None

    def _take_drop(self, body_len: int | None) -> int | None:
        with self._lock:
            after = self._drop_after
            if after is None or (body_len is not None and body_len <= after):
                return None
            if self._drop_times is not None:
                if self._drop_times <= 0:
                    return None
                self._drop_times -= 1
            return after

    def _take_truncate(self, body_len: int) -> int | None:
        with self._lock:
            after = self._truncate_after
            if after is None or body_len <= after:
                return None
            if self._truncate_times is not None:
                if self._truncate_times <= 0:
                    return None
                self._truncate_times -= 1
            return after

    def _take_corrupt(self) -> bool:
        with self._lock:
            if self._corrupt > 0:
                self._corrupt -= 1
                return True
        return False

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.io_timeout)
        reader = conn.makefile("rb")
        try:
            try:
                line, headers = _read_head(reader)
            except _Closed:
                return
            method, path = (line.split(" ") + ["", ""])[:2]
            length = _content_length(headers)
            chunked = _header(headers, "transfer-encoding").lower() == "chunked"
            expect = _header(headers, "expect").lower() == "100-continue"
            status = self._take_failure(method)
            if status is not None:
                if not expect:  # drain the body so the client reads our answer, not a reset
                    _read_body(reader, length, chunked)
                self._record(method, path, f"failed-{status}", 0)  # logged before the client can react
                conn.sendall(_error_response(status, method))
                return
            if expect:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            has_body = chunked or bool(length)
            drop = self._take_drop(length) if has_body else None
            if drop is not None:
                got = len(reader.read(drop))
                self._record(method, path, "dropped", got)
                _reset(conn)
                return
            body = _read_body(reader, length, chunked)
            outcome = "forwarded"
            if body and self._take_corrupt():
                mid = len(body) // 2
                body = body[:mid] + bytes([body[mid] ^ 0xFF]) + body[mid + 1:]
                outcome = "corrupted"
            with self._lock:
                strip = set(self._strip)
            headers = [(k, v) for k, v in headers if k.lower() not in strip]
            self._forward(conn, line, headers, body, chunked, method, path, outcome)
        except (OSError, _Closed):
            pass
        finally:
            reader.close()
            with contextlib.suppress(OSError):
                conn.close()

    def _forward(self, conn: socket.socket, line: str, headers: list[tuple[str, str]], body: bytes,
                 chunked: bool, method: str, path: str, outcome: str) -> None:
        drop = {"connection", "expect", "keep-alive", "proxy-connection"}
        if chunked:  # the body was de-chunked: send it with a length instead
            drop |= {"transfer-encoding", "content-length"}
        kept = [(k, v) for k, v in headers if k.lower() not in drop]
        if chunked:
            kept.append(("Content-Length", str(len(body))))
        kept.append(("Connection", "close"))
        head = line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept) + "\r\n"
        with socket.create_connection(self.upstream, timeout=self.io_timeout) as up:
            up.sendall(head.encode("latin-1") + body)
            resp = up.makefile("rb")
            status_line, resp_headers = _read_head(resp)
            resp_kept = [(k, v) for k, v in resp_headers if k.lower() not in {"connection", "keep-alive"}]
            resp_kept.append(("Connection", "close"))
            cut = None if method == "HEAD" else self._take_truncate(_content_length(resp_headers) or 0)
            self._record(method, path, outcome if cut is None else "truncated", len(body))
            conn.sendall((status_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in resp_kept)
                          + "\r\n").encode("latin-1"))
            if cut is not None:
                conn.sendall(_read_exact(resp, cut))
                _reset(conn)
                return
            while chunk := resp.read1(65536):
                conn.sendall(chunk)


def _reset(conn: socket.socket) -> None:
    """Close ``conn`` with a TCP reset (SO_LINGER 0), like a crashed or unreachable peer."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        conn.close()


def _read_head(reader) -> tuple[str, list[tuple[str, str]]]:
    line = reader.readline(65536)
    if not line:
        raise _Closed
    headers: list[tuple[str, str]] = []
    while True:
        h = reader.readline(65536)
        if not h:
            raise _Closed
        if h in (b"\r\n", b"\n"):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers.append((k.strip(), v.strip()))
    return line.decode("latin-1").rstrip("\r\n"), headers


def _header(headers: list[tuple[str, str]], name: str) -> str:
    return next((v for k, v in headers if k.lower() == name), "")


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    v = _header(headers, "content-length")
    return int(v) if v.isdigit() else None


def _read_exact(reader, n: int) -> bytes:
    data = reader.read(n)
    if len(data) != n:
        raise _Closed
    return data


def _read_body(reader, length: int | None, chunked: bool) -> bytes:
    """The request body: ``length`` bytes, or the de-chunked data (trailers are discarded)."""
    if not chunked:
        return _read_exact(reader, length) if length else b""
    out = bytearray()
    while True:
        size_line = reader.readline(1024)
        if not size_line:
            raise _Closed
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while reader.readline(65536) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(out)
        out += _read_exact(reader, size)
        reader.readline(8)  # CRLF after the chunk


_REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}


def _error_response(status: int, method: str) -> bytes:
    code = "SlowDown" if status == 503 else "InternalError" if status >= 500 else "InjectedError"
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by FaultProxy</Message></Error>").encode()
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if method == "HEAD" else head + body


# The `tiny` encoders learn nothing (probe CA at chance) and scan as degenerate, so the gate rightly
# rejects their students. Tests of a *passing* audit's plumbing open the gate explicitly; what the
# gate decides is tested on encoders that learn (tests/test_scan.py, tests/test_evaluate.py).
OPEN_GATE = ("gate.max_ca_drop=100", "gate.max_asr=100", "gate.reject_suspicious_student=false")


def open_gate_args() -> list[str]:
    """``OPEN_GATE`` as CLI arguments."""
    return [a for s in OPEN_GATE for a in ("--set", s)]
