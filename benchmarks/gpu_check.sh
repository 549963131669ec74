#!/usr/bin/env bash
# The first run on a GPU, unchanged: the production distillation step at full width (fp32, bf16,
# channels_last vs contiguous, torch.compile) and a full-width audit of a small teacher, in under
# 8 minutes, every result as JSON under OUT_DIR (default bench-results/gpu-check).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # PY=.venv/bin/python, BUDGET_S=480
#
# Without CUDA it runs the same commands at a plumbing size (width 8, one step, the tiny audit) and
# says so in summary.json ("mode": "cpu-fallback"), so CI proves the script works before any GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench-results/gpu-check}
BUDGET_S=${BUDGET_S:-480}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  mode=cuda
  step=(--device cuda --widths 64 --batches 128 256 --precisions fp32 bf16 --formats channels_last contiguous
        --compile --steps 10 --warmup 3 --ideal)
  audit=(--device cuda --profile gpu-check)
else
  mode=cpu-fallback
  step=(--device cpu --widths 8 --batches 32 --precisions fp32 --formats auto --steps 1 --warmup 1 --clean-size 64 --data "")
  audit=(--device cpu --profile tiny --data synthetic)
fi
echo "gpu_check: mode $mode, budget ${BUDGET_S}s, results in $OUT"

status=0
timeout "$(( $(left) * 2 / 3 ))" "$PY" benchmarks/bench_distill.py step "${step[@]}" --json "$OUT/step.json" || status=$?
if [ "$status" -eq 0 ]; then
  timeout "$(left)" "$PY" benchmarks/bench_distill.py audit "${audit[@]}" --quiet --json "$OUT/audit.json" || status=$?
fi
"$PY" - "$OUT" "$mode" "$status" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path

out, mode, status, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
summary = {"mode": mode, "status": status, "wall_s": wall}
for name in ("step", "audit"):
    p = out / f"{name}.json"
    summary[name] = json.loads(p.read_text()) if p.exists() else None
rows = (summary["step"] or {}).get("rows", [])
summary["errors"] = [r["error"] for r in rows if "error" in r]
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
for r in rows:
    if "error" not in r:
        print(f"w{r['width']} b{r['batch']} {r['amp']} {'NHWC' if r['channels_last'] else 'NCHW'} compile={r['compile']}: "
              f"{r['step_s']:.3f} s/step, {r['img_per_s']:.0f} img/s")
if summary["audit"]:
    print(f"audit: {summary['audit']['wall_s']:.0f} s, stages {summary['audit']['stages_s']}")
print(f"gpu_check: {mode}, exit {status}, {wall} s -> {out / 'summary.json'}")
PY
exit "$status"
