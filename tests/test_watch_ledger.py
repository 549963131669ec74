"""The watch's ledger and listing without audits: claims with owners and leases under concurrent
watchers (real processes), stale claims taken over, the watch never listing its own outputs,
symlinks out of the watched folder and odd names skipped with a reason, names escaped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]

# One watcher process: waits for the start signal, then, like a tick, remembers every file it
# saw, claims each teacher and "audits" it (a line in audits.log) before recording it audited.
WORKER = r"""
import os, sys, time
from flows.ledger import Ledger
root, me, n, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
book = Ledger(root, lease_s=60)
while not os.path.exists(go):
    time.sleep(0.002)
for i in range(n):
    fp = f"{i:064x}"
    book.remember(f"/in/{me}/{i}.pt", "1:2", {"fingerprint": fp})
    if book.claim(fp, f"/in/{i}.pt"):
        with book.holding(fp):
            with open(os.path.join(root, "audits.log"), "a") as f:
                f.write(f"{fp} {me}\n")
        book.finish(fp, {"uri": f"/in/{i}.pt", "by": me})
"""


def _python(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", *args], cwd=ROOT, **kw)


def test_two_watcher_processes_audit_each_teacher_exactly_once_and_lose_no_ledger_entry(tmp_path):
    ledger, go, n = tmp_path / "ledger", tmp_path / "go", 25
    procs = [_python(WORKER, str(ledger), name, str(n), str(go)) for name in ("a", "b")]
    time.sleep(0.5)  # both started (importing); then both run at once
    go.touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    lines = (ledger / "audits.log").read_text().splitlines()
    audited = [line.split()[0] for line in lines]
    assert sorted(audited) == sorted(f"{i:064x}" for i in range(n)), lines  # each once, none missing
    seen = Ledger(ledger, lease_s=60).seen()
    assert len(seen) == n and all(r["status"] == "audited" for r in seen.values())
    files = json.loads((ledger / "files.json").read_text())
    assert len(files) == 2 * n  # every read-modify-write of files.json kept the other watcher's entries


def test_a_claim_whose_owner_process_died_is_taken_over_at_once(tmp_path):
    fp = "ab" * 32
    killed = _python("import os, sys; from flows.ledger import Ledger; "
                     "assert Ledger(sys.argv[1], lease_s=3600).claim(sys.argv[2], '/in/t.pt'); os._exit(0)",
                     str(tmp_path), fp)
    assert killed.wait(timeout=60) == 0  # exited mid-"audit": its claim is left behind
    left = Ledger(tmp_path, lease_s=3600).record(fp)
    assert left["status"] == "auditing" and left["owner"]["pid"] == killed.pid
    book = Ledger(tmp_path, lease_s=3600)
    assert book.claim(fp, "/in/t.pt")
    rec = book.record(fp)
    assert rec["owner"] == book.owner and rec["took_over"]["owner"]["pid"] == killed.pid
    assert "is gone" in rec["took_over"]["reason"]
    assert not Ledger(tmp_path, lease_s=3600).claim(fp, "/in/t.pt")  # a live owner's claim is not


def test_an_expired_lease_is_taken_over_a_refreshed_one_is_not(tmp_path, monkeypatch):
    import flows.ledger

    clock = [1000.0]
    monkeypatch.setattr(flows.ledger, "_now", lambda: clock[0])
    fp = "cd" * 32
    a, b = Ledger(tmp_path, lease_s=10), Ledger(tmp_path, lease_s=10)
    assert a.owner["pid"] == b.owner["pid"] and a.owner != b.owner  # two watchers in one process: two owners
    assert a.claim(fp, "/in/t.pt") and not b.claim(fp, "/in/t.pt")
    clock[0] = 1008.0
    assert a.heartbeat(fp)  # the lease now runs to 1018
    clock[0] = 1015.0
    assert not b.claim(fp, "/in/t.pt")
    clock[0] = 1019.0
    assert b.claim(fp, "/in/t.pt")  # a stopped refreshing (hung, or another host that went away)
    assert "lease expired" in b.record(fp)["took_over"]["reason"]
    assert not a.heartbeat(fp)  # a learns it lost the claim ...
    a.release(fp)
    assert b.record(fp)["owner"] == b.owner  # ... and cannot remove b's
    # a claim of another host is never judged by its pid (not ours to check), only by its lease
    other = {"host": "elsewhere", "pid": 2 ** 22 + 12345, "token": "x"}
    rec = {"status": "auditing", "owner": other, "expires": 1030.0}
    assert b.stale(rec) is None
    clock[0] = 1031.0
    assert "lease expired" in b.stale(rec)
    # an older mimic's claim kept no owner and no heartbeat
    assert "no owner" in b.stale({"status": "auditing", "pid": 1})


def test_an_audited_record_is_never_taken_over(tmp_path, monkeypatch):
    import flows.ledger

    clock = [1000.0]
    monkeypatch.setattr(flows.ledger, "_now", lambda: clock[0])
    fp = "ef" * 32
    a = Ledger(tmp_path, lease_s=10)
    assert a.claim(fp, "/in/t.pt")
    a.finish(fp, {"uri": "/in/t.pt", "verdict": "passed"})
    clock[0] = 10 ** 9  # long past any lease
    b = Ledger(tmp_path, lease_s=10)
    assert not b.claim(fp, "/in/t.pt") and b.record(fp)["verdict"] == "passed"
    b.release(fp)  # not b's: nothing happens
    b.finish(fp, {"uri": "/in/t.pt", "verdict": "rejected"})  # the first audited record is kept
    assert b.record(fp)["verdict"] == "passed"
    (tmp_path / "seen" / f"{'01' * 32}.json").write_text("{not json")
    assert not b.claim("01" * 32, "/in/u.pt")  # an unreadable record is left for a person to look at


def test_holding_refreshes_the_claim_while_the_audit_runs(tmp_path):
    fp = "12" * 32
    book = Ledger(tmp_path, lease_s=0.3)  # a beat every 0.1 s
    assert book.claim(fp, "/in/t.pt")
    first = book.record(fp)["heartbeat"]
    with book.holding(fp):
        deadline = time.monotonic() + 30
        while book.record(fp)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
    assert book.record(fp)["heartbeat"] > first and book.record(fp)["owner"] == book.owner
    with pytest.raises(ValueError):
        Ledger(tmp_path, lease_s=-1)


def test_timeouts_claim_is_the_lease_and_is_validated():
    from mimic.config import load_config
    from mimic.errors import ConfigError

    assert load_config().timeouts.claim > 0
    assert load_config(sets=["timeouts.claim=30"]).timeouts.claim == 30
    with pytest.raises(ConfigError, match="timeouts"):
        load_config(sets=["timeouts.claim=-1"])


# ---------------------------------------------------------------------------------------------
# the listing


def _listing(location: Path, **outputs: str | None) -> list[dict]:
    from flows.watch import excluded_prefixes, list_incoming

    return list_incoming.fn(str(location), None, excluded_prefixes(str(location), outputs))


def test_outputs_nested_in_the_watched_folder_are_not_listed(tmp_path):
    incoming = tmp_path / "incoming"
    for rel in ("teacher.pt", "store/students/s.safetensors", "out/abc/student.safetensors", "ledger/x.pt",
                "cache/fetched/t.pt", "storefront/v.pt"):
        (incoming / rel).parent.mkdir(parents=True, exist_ok=True)
        (incoming / rel).write_bytes(b"x")
    names = [c["name"] for c in _listing(incoming, store=str(incoming / "store"), **{"out-root": str(incoming / "out")},
                                         ledger=str(incoming / "ledger"), cache=str(incoming / "cache"))]
    assert names == ["storefront/v.pt", "teacher.pt"]  # a sibling sharing the prefix 'store' is still watched
    assert len(_listing(incoming, store=str(tmp_path / "elsewhere"))) == 6


def test_watching_a_folder_inside_mimics_outputs_is_refused_in_one_line(tmp_path):
    from flows.watch import excluded_prefixes
    from mimic.errors import ConfigError

    with pytest.raises(ConfigError, match="inside the store") as err:
        excluded_prefixes(str(tmp_path / "runs/store/students"), {"store": str(tmp_path / "runs/store")})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="inside the out-root"):
        excluded_prefixes(str(tmp_path / "out"), {"out-root": str(tmp_path / "out")})
    with pytest.raises(ConfigError, match="inside the cache"):
        excluded_prefixes("s3://bkt/cache/in", {"cache": "s3://bkt/cache"})
    assert excluded_prefixes("s3://bkt/in", {"store": "s3://bkt/in/store", "cache": "s3://other-bkt/in/c", "ledger": "runs/w"}) \
        == ["store/"]


def test_a_symlink_out_of_the_watched_folder_is_skipped_with_a_reason_never_read(tmp_path):
    incoming, outside = tmp_path / "incoming", tmp_path / "outside"
    incoming.mkdir()
    outside.mkdir()
    (outside / "secret.pt").write_text("TOPSECRET")
    (incoming / "good.pt").write_bytes(b"x")
    (incoming / "link.pt").symlink_to(outside / "secret.pt")
    (incoming / "inner.pt").symlink_to(incoming / "good.pt")  # inside the folder: an ordinary candidate
    (incoming / "models").symlink_to(outside, target_is_directory=True)
    cands = {c["name"]: c for c in _listing(incoming)}
    assert set(cands) == {"good.pt", "inner.pt", "link.pt", "models/"}
    assert "version" in cands["good.pt"] and "version" in cands["inner.pt"]
    assert "outside" in cands["link.pt"]["skipped"] and "version" not in cands["link.pt"]
    assert cands["models/"]["skipped"]
    assert "TOPSECRET" not in json.dumps(cands)


def test_odd_names_are_skipped_one_by_one_and_printed_escaped(tmp_path):
    from flows.watch import shown

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ("good.pt", "evil\nfailed: forged.pt", "\x1b[2Jclear.pt", "notes.txt"):
        (incoming / name).write_bytes(b"x")
    cands = {c["name"]: c for c in _listing(incoming)}
    assert set(cands) == {"good.pt", "evil\nfailed: forged.pt", "\x1b[2Jclear.pt"}  # other suffixes: not candidates
    assert "control character" in cands["evil\nfailed: forged.pt"]["skipped"]
    assert "control character" in cands["\x1b[2Jclear.pt"]["skipped"]
    for name in cands:
        assert "\n" not in shown(name) and "\x1b" not in shown(name) and shown(name).isprintable()
    assert shown("evil\nfailed: forged.pt") == "evil\\nfailed: forged.pt"
    assert shown("modèle.pt") == "modèle.pt"  # printable names are shown as they are
