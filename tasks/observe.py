"""What an audit leaves in Prefect for people and automations: artifacts and events.

* a **table artifact** ``audit-<fingerprint12>`` of CA/ASR per encoder and probe,
* a **markdown artifact** ``audit-<fingerprint12>-report`` with the verdict, the MI plot (embedded)
  and the lineage links (store, MLflow run, model version, DVC md5),
* an **event** ``mimic.audit.<outcome>`` (``sanitized``, ``rejected``, ``refused``, ``failed``) whose
  resource is the teacher (``mimic.teacher.<fingerprint>``), so an automation can notify on it.

Artifact keys take lowercase letters, digits and dashes only (Prefect's rule).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import task

from tasks.common import timeout_of


def artifact_key(fingerprint: str) -> str:
    return f"audit-{fingerprint[:12].lower()}"


def teacher_resource(fingerprint: str | None, uri: str) -> dict[str, str]:
    return {"prefect.resource.id": f"mimic.teacher.{fingerprint or 'unknown'}", "prefect.resource.name": uri,
            "prefect.resource.role": "teacher"}


def emit(outcome: str, fingerprint: str | None, uri: str, payload: dict[str, Any]) -> None:
    """Emit ``mimic.audit.<outcome>`` about the teacher (related: the flow run, via Prefect's context)."""
    from prefect.events import emit_event

    emit_event(event=f"mimic.audit.{outcome}", resource=teacher_resource(fingerprint, uri), payload=payload)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


@task(name="publish-artifacts", timeout_seconds=timeout_of("publish-artifacts"))
def publish(results: dict[str, Any]) -> dict[str, str]:
    """The table and markdown artifacts of one audit; returns their keys."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    fp = results["teacher"]["fingerprint"]
    key = artifact_key(fp)
    v = results["verdict"]
    rows = [{"encoder": who, "probe": probe, "CA %": _fmt(m.get("ca")), "ASR %": _fmt(m.get("asr"))}
            for who, probes in results.get("probes", {}).items() for probe, m in probes.items()]
    create_table_artifact(rows or [{"encoder": "-", "probe": "-", "CA %": "not measured", "ASR %": "not measured"}],
                          key=key, description=f"CA/ASR of {results['teacher']['uri']}: {v['verdict']}")
    out = Path(results["out"])
    mi_png = out / "mi.png"
    img = f"![MI per stage](data:image/png;base64,{base64.b64encode(mi_png.read_bytes()).decode()})" if mi_png.exists() else ""
    store, ml = results.get("store") or {}, results.get("mlflow") or {}
    reg = ml.get("registry") or {}
    dvc = (results.get("data") or {}).get("dvc") or {}
    lines = [f"# {v['verdict'].upper()}: {results['teacher']['uri']}", "", f"**{v['reason']}**", "",
             f"* teacher fingerprint `{fp}`", f"* audit key `{results['audit_key']}`",
             f"* student: `{store.get('student_uri', results['student']['file'])}`"
             + (f" (VersionId `{store['version_id']}`)" if store.get("version_id") else ""),
             f"* data version `{results['data'].get('data_version')}`"]
    lines += [f"* DVC {k}: md5 `{d['md5']}` at `{d['path']}` (remote {d.get('remote') or 'none'})" for k, d in dvc.items() if d]
    if ml.get("run_id"):
        lines.append(f"* MLflow run `{ml['run_id']}` at {ml.get('tracking_uri')}; "
                     + (f"model `{reg['name']}` version {reg['version']} (alias `{reg['alias']}`)" if reg.get("version")
                        else "student not registered (rejected)"))
    lines += ["", "| stage | MI | weight |", "|---|---|---|"]
    lines += [f"| {k} | {results['mi'][k]:.4f} | {w:.0f} |" for k, w in results["weights"].items() if k in results["mi"]]
    lines += ["", img]
    create_markdown_artifact("\n".join(lines), key=f"{key}-report", description=f"mimic audit report: {v['verdict']}")
    return {"table": key, "markdown": f"{key}-report"}
