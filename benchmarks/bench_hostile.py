"""Peak memory while refusing hostile model files (issue 12: < 300 MB above the process baseline).

    .venv/bin/python benchmarks/bench_hostile.py [--cases memo_bomb zip_bomb ...] [--single-process]
        [--cap-mb 4096] [--json bench-results/hostile.json]

Every case of ``tests/hostile.py`` is built in a temporary directory (nothing is kept), then loaded
with ``load_encoder`` in a fresh Python process per case: the process first loads two tiny valid
files (so imports and lazy initialisation are in the baseline), resets its peak RSS to its current
RSS (``/proc/self/clear_refs``), loads the case and reads the peak (``VmHWM``); the difference
is the case's peak RSS delta. (``ru_maxrss`` is not used: after fork+exec it still holds the
parent's peak.) Two good teachers (a width-4 mimic ``.pt`` and a torchvision ResNet-18) are
measured the same way for comparison. ``--single-process`` loads every case in one process, the
peak reset before each (faster; memory kept by earlier cases raises the baseline of later ones).
``--cap-mb`` limits the address space of the
measuring process to its size after warm-up plus this many MB, so that a regression fails with
an allocation error instead of swapping a shared machine (0 = no cap).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
BOUND_MB = 300

WORKER = r"""
import json, resource, sys, time
from mimic.checkpoints import load_encoder
from mimic.errors import MimicError

def status_mb(key):
    with open("/proc/self/status") as fh:
        return int(next(l for l in fh if l.startswith(key)).split()[1]) / 1024

def reset_peak():
    try:  # Linux >= 4.0: VmHWM := VmRSS
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass

cap_mb, warm, paths = int(sys.argv[1]), sys.argv[2:4], sys.argv[4:]
for p in warm:
    load_encoder(p)
if cap_mb:
    limit = int(status_mb("VmSize") + cap_mb) << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in paths:
    reset_peak()
    base = status_mb("VmRSS")
    t0 = time.perf_counter()
    try:
        load_encoder(path)
        outcome, message = "loaded", ""
    except MimicError as exc:
        outcome, message = "refused", str(exc).split(": ", 1)[-1]
    except BaseException as exc:
        outcome, message = "crashed", f"{type(exc).__name__}: {exc}"
    print(json.dumps({"path": path, "outcome": outcome, "message": message, "seconds": time.perf_counter() - t0,
                      "base_mb": base, "peak_mb": max(status_mb("VmHWM"), base)}), flush=True)
"""


def good_teachers(d: Path) -> list[tuple[str, Path]]:
    import torch
    import torchvision

    from hostile import w4_state
    from mimic.checkpoints import save_encoder
    from mimic.encoders import Encoder, EncoderSpec

    enc = Encoder(EncoderSpec(width=4))
    enc.backbone.load_state_dict(w4_state())
    save_encoder(d / "good_w4.pt", enc)
    save_encoder(d / "good_w4.safetensors", enc)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), d / "good_resnet18.pth")
    return [("good_w4_mimic", d / "good_w4.pt"), ("good_resnet18_torchvision", d / "good_resnet18.pth")]


def run_worker(paths: list[Path], warm: list[Path], cap_mb: int) -> list[dict]:
    cmd = [sys.executable, "-c", WORKER, str(cap_mb), *map(str, warm), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(rows) != len(paths):
        rows += [{"path": str(p), "outcome": "crashed", "message": (proc.stderr.strip().splitlines() or ["?"])[-1][:300],
                  "seconds": 0.0, "base_mb": 0.0, "peak_mb": 0.0} for p in paths[len(rows):]]  # fmt: skip
    return rows


def measure(names: list[str] | None = None, single_process: bool = False, cap_mb: int = 4096) -> list[dict]:
    """Build the cases (and two good teachers) in a temporary directory and measure each."""
    from hostile import CASES

    cases = [c for c in CASES if names is None or c.name in names]
    with tempfile.TemporaryDirectory(prefix="mimic-hostile-") as tmp:
        d = Path(tmp)
        good = good_teachers(d)
        warm = [d / "good_w4.pt", d / "good_w4.safetensors"]
        items = [(c.name, c.build(d), c.expect, c.what) for c in cases]
        items += [(name, path, "", "a valid teacher (loads)") for name, path in good]
        paths = [path for _, path, _, _ in items]
        sizes = [path.stat().st_size for path in paths]
        if single_process:
            rows = run_worker(paths, warm, cap_mb)
        else:
            rows = [run_worker([p], warm, cap_mb)[0] for p in paths]
    out = []
    for (name, _path, expect, what), size, row in zip(items, sizes, rows):
        ok = (row["outcome"] == "refused" and expect in row["message"]) if expect else row["outcome"] == "loaded"
        out.append({"case": name, "what": what, "file_bytes": size,
                    "expected": f"refused: ...{expect}..." if expect else "loaded", "outcome": row["outcome"],
                    "message": row["message"], "as_expected": ok, "seconds": round(row["seconds"], 3),
                    "peak_rss_delta_mb": round(row["peak_mb"] - row["base_mb"], 1), "base_rss_mb": round(row["base_mb"], 1)})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--single-process", action="store_true", help="all cases in one process (running maximum)")
    ap.add_argument("--cap-mb", type=int, default=4096, help="address-space headroom of the worker (0 = none)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = measure(args.cases, args.single_process, args.cap_mb)
    print(f"{'case':26s} {'bytes':>9s} {'outcome':8s} {'ok':3s} {'s':>6s} {'peak RSS +MB':>12s}  message")
    for r in rows:
        print(f"{r['case']:26s} {r['file_bytes']:>9d} {r['outcome']:8s} {'yes' if r['as_expected'] else 'NO':3s} "
              f"{r['seconds']:6.2f} {r['peak_rss_delta_mb']:12.1f}  {r['message'][:110]}")  # fmt: skip
    hostile = [r for r in rows if r["expected"] != "loaded"]
    worst = max((r["peak_rss_delta_mb"] for r in hostile), default=0.0)
    ok = all(r["as_expected"] for r in rows) and worst < BOUND_MB
    print(f"worst peak RSS delta while refusing: {worst:.1f} MB (bound {BOUND_MB} MB); "
          f"{sum(r['as_expected'] for r in rows)}/{len(rows)} as expected; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        from mimic.io import write_json

        write_json(args.json, {"bound_mb": BOUND_MB, "worst_refusal_delta_mb": worst, "ok": ok,
                               "single_process": args.single_process, "rows": rows})  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
