"""One look at an audit: ``report.html`` next to ``results.json``, rendered from the results alone.

The page is self-contained (the plots are embedded as ``data:`` URIs), so it can be opened from a
disk, an MLflow artifact view or an S3 bucket alike. It shows, in this order:

* the verdict and the gate's reason,
* CA / ASR of every measured encoder and probe (``results["probes"]``),
* the MI per stage with the distillation weights, and the MI plot,
* the distillation loss curves,
* the inverted trigger, when a scan found one (``trigger.png`` in the output directory),
* the lineage: teacher URI and fingerprint, data versions (DVC md5 and remote), where the student
  went (store URI, S3 VersionId), MLflow run and model version, Prefect flow run, audit key.

:func:`render_report` is pure (results + images in, HTML out); :func:`write_report` is the audit's
output step. Templates are :class:`string.Template` (stdlib): nothing to install.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from string import Template
from typing import Any

from mimic.io import write_text

REPORT = "report.html"
IMAGES = {"mi": "mi.png", "losses": "losses.png", "trigger": "trigger.png"}

_PAGE = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mimic audit $short: $verdict</title>
<style>
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:60rem;color:#222;background:#fff}
h1{margin-bottom:.2rem}.verdict{display:inline-block;padding:.3rem .8rem;border-radius:.3rem;color:#fff;font-weight:700}
.sanitized{background:#1a7f37}.rejected{background:#b42318}
table{border-collapse:collapse;margin:.5rem 0 1rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.3rem 0}code{font-size:.9em}
</style></head><body>
<h1>Audit of <code>$teacher_name</code></h1>
<p><span id="verdict" class="verdict $verdict">$verdict</span> <span id="reason">$reason</span></p>
<h2>Clean accuracy and attack success rate</h2>
$scores
<h2>Mutual information per stage</h2>
$mi_table
$mi_img
<h2>Distillation losses</h2>
$losses_img
$trigger
<h2>Lineage</h2>
$lineage
<p><small>mimic $version &middot; $kind &middot; schema $schema</small></p>
</body></html>
""")


def _esc(v: Any) -> str:
    return html.escape("-" if v is None else str(v))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _table(header: list[str], rows: list[list[Any]], id_: str) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{id_}"><tr>{head}</tr>{body}</table>'


def _img(data: bytes | None, alt: str, id_: str) -> str:
    if not data:
        return f"<p><em>{_esc(alt)}: not available</em></p>"
    return f'<img id="{id_}" alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _lineage(res: dict[str, Any]) -> list[list[Any]]:
    t, d, s = res.get("teacher", {}), res.get("data", {}), res.get("store") or {}
    rows = [["teacher", t.get("uri")], ["teacher fingerprint", t.get("fingerprint")],
            ["teacher architecture", f"{t.get('arch')} ({t.get('layout')})"],
            ["clean data", f"{d.get('source')} ({d.get('clean_images')} images, version {d.get('clean_version')})"],
            ["data version", d.get("data_version") or d.get("dataset_version")],
            ["eval data", f"{d.get('eval_source')} (version {d.get('eval_version')})"]]
    for what, v in sorted((d.get("dvc") or {}).items()):
        if v:
            rows.append([f"DVC {what}", f"md5 {v.get('md5')} in {v.get('repo')}, remote {v.get('remote') or 'none'}"
                         + (" (pushed)" if v.get("pushed") else "")])
    rows.append(["student fingerprint", res.get("student", {}).get("fingerprint")])
    if s:
        rows.append([f"stored ({s.get('area')})", s.get("student_uri")])
        if s.get("version_id"):
            rows.append(["S3 VersionId", s.get("version_id")])
    ml = res.get("mlflow") or {}
    if ml.get("run_id"):
        rows.append(["MLflow run", f"{ml['run_id']} ({ml.get('tracking_uri')})"])
        reg = ml.get("registry") or {}
        rows.append(["MLflow model", f"{reg.get('name')} version {reg.get('version')}" if reg.get("version")
                     else f"not registered ({reg.get('reason', 'rejected')})"])
    if res.get("prefect", {}).get("flow_run_id"):
        rows.append(["Prefect flow run", res["prefect"]["flow_run_id"]])
    rows.append(["audit key", res.get("audit_key")])
    env = res.get("environment", {})
    rows.append(["environment", f"torch {env.get('torch')}, {env.get('device')}, {env.get('threads')} threads, git {env.get('git')}"])
    return rows


def render_report(results: dict[str, Any], images: dict[str, bytes | None]) -> str:
    """The report page for ``results`` (a results.json dict); ``images``: PNG bytes by name (``mi``,
    ``losses``, ``trigger``), a missing one is said to be missing."""
    v = results.get("verdict", {})
    scores = [[f"{who} ({probe})", _fmt(m.get("ca")), _fmt(m.get("asr"))]
              for who, probes in results.get("probes", {}).items() for probe, m in probes.items()]
    mi = results.get("mi", {})
    mi_rows = [[k, f"{mi[k]:.4f}", f"{w:.0f}"] for k, w in results.get("weights", {}).items() if k in mi]
    trigger = ""
    if images.get("trigger"):
        trigger = "<h2>Inverted trigger</h2>" + _img(images["trigger"], "inverted trigger", "trigger-img")
    teacher = results.get("teacher", {})
    return _PAGE.substitute(
        short=_esc(teacher.get("fingerprint", "")[:12]), verdict=_esc(v.get("verdict")), reason=_esc(v.get("reason")),
        teacher_name=_esc(Path(str(teacher.get("uri", "teacher"))).name),
        scores=_table(["encoder (probe)", "CA %", "ASR %"], scores, "scores") if scores
        else "<p><em>CA/ASR not measured (no labelled evaluation data)</em></p>",
        mi_table=_table(["stage", "MI", "weight"], mi_rows, "mi-table"),
        mi_img=_img(images.get("mi"), "MI per stage", "mi-img"), losses_img=_img(images.get("losses"), "loss curves", "losses-img"),
        trigger=trigger, lineage=_table(["what", "value"], _lineage(results), "lineage"),
        version=_esc(results.get("environment", {}).get("mimic")), kind=_esc(results.get("kind")), schema=_esc(results.get("schema")))


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.html`` for ``results``, embedding the plots found in ``out_dir``."""
    out = Path(out_dir)
    images = {name: (out / f).read_bytes() if (out / f).is_file() else None for name, f in IMAGES.items()}
    return write_text(out / REPORT, render_report(results, images))
