"""How long an S3 outage takes to be reported, with mimic.store's default settings.

    .venv/bin/python benchmarks/bench_store_outage.py [--runs 3] [--skip-hung] [--json bench-results/store_outage.json]

Four kinds of dead endpoint on loopback, each asked ``store.exists(key)`` (one HEAD request) by a
store opened with defaults (``open_store("s3://bucket", endpoint_url=...)``):

* refused: nothing listens on the port (connection refused at once);
* reset: a listener that accepts and resets every connection;
* blackholed: a listener whose accept queue is full, so the kernel drops the SYNs (connect timeout);
* hung: a listener that accepts and never answers (read timeout).

Attempts are counted from botocore's ``before-send`` events (what actually went out), seconds are
wall time until :class:`mimic.errors.StoreUnavailable` is raised. The backoff between attempts is
botocore's jittered exponential one, so seconds vary between runs: min / max of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from mimic.errors import StoreUnavailable
from mimic.store import open_store
from mimic.store.s3 import ATTEMPTS, CONNECT_TIMEOUT, READ_TIMEOUT


@contextlib.contextmanager
def refused() -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _serving(handle) -> Iterator[str]:
    """A listener whose accepted connections go to ``handle(conn)`` on a thread."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop, held = threading.Event(), []

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            handle(conn)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        server.close()


def reset() -> contextlib.AbstractContextManager[str]:
    def rst(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()

    return _serving(rst)


def hung() -> contextlib.AbstractContextManager[str]:
    return _serving(lambda conn: None)  # accepted, kept open, never answered


@contextlib.contextmanager
def blackholed() -> Iterator[str]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        for _ in range(4):  # fill the accept queue; it is never drained
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(listener.getsockname())
            fillers.append(c)
        time.sleep(0.2)
        try:
            yield f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            for c in fillers:
                c.close()


def measure(endpoint: str) -> dict:
    store = open_store("s3://outage-bench", endpoint_url=endpoint)
    sent = []
    store.client.meta.events.register("before-send.s3", lambda **kw: sent.append(time.monotonic()))
    t0 = time.monotonic()
    try:
        store.exists("teacher.pt")
    except StoreUnavailable as e:
        return {"attempts": len(sent), "seconds": time.monotonic() - t0, "error": str(e)}
    raise RuntimeError(f"{endpoint}: expected StoreUnavailable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-hung", action="store_true", help="skip the read-timeout case (about a minute per run)")
    ap.add_argument("--json", default="bench-results/store_outage.json")
    args = ap.parse_args()
    for var, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
        os.environ.setdefault(var, value)
    cases = {"refused": refused, "reset": reset, "blackholed": blackholed, "hung": hung}
    if args.skip_hung:
        del cases["hung"]
    rows = []
    for name, make in cases.items():
        runs = []
        for _ in range(args.runs):
            with make() as url:
                runs.append(measure(url))
        rows.append({"case": name, "attempts": sorted({r["attempts"] for r in runs}),
                     "seconds_min": min(r["seconds"] for r in runs), "seconds_max": max(r["seconds"] for r in runs),
                     "error": runs[-1]["error"]})
    print(f"defaults: {ATTEMPTS} attempts per request, connect timeout {CONNECT_TIMEOUT:g} s, "
          f"read timeout {READ_TIMEOUT:g} s, botocore standard retry mode")
    print(f"{'case':<11} {'attempts':>8} {'min s':>7} {'max s':>7}  error")
    for r in rows:
        attempts = "/".join(map(str, r["attempts"]))
        print(f"{r['case']:<11} {attempts:>8} {r['seconds_min']:>7.2f} {r['seconds_max']:>7.2f}  {r['error'][:90]}")
    out = {"defaults": {"attempts": ATTEMPTS, "connect_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT},
           "runs": args.runs, "cases": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
