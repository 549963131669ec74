"""The MLflow registry gate: one registered model per teacher lineage, ``sanitized`` only on passing versions.

* **Name.** ``gate.model_name`` is a template: ``{teacher}`` is the teacher file's name without
  its suffix (``s3://b/in/vendor-encoder.pt`` -> ``vendor-encoder``), ``{fingerprint}`` the first 12
  hex digits of its fingerprint. The default ``{teacher}-sanitized`` keeps the versions of one
  teacher's audits together; a fixed name (``--set gate.model_name=acme-encoder``) groups a lineage
  whose file names change.
* **Only passing students become versions.** A rejected student is logged in its run (a logged
  model tagged ``verdict=rejected``, and stored under ``quarantine/``) and never registered: a
  registered model holds sanitized encoders only, so ``models:/<name>/<any version>`` is safe to
  deploy and the alias ``sanitized`` always names the newest passing one.
* **Race-free, idempotent.** The registered model is created and "already exists" tolerated; a
  version already made for the same audit key is reused, not duplicated.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from prefect import task

from tasks.common import timeout_of
from tasks.tracking import tracking

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def model_name(template: str, teacher_uri: str, fingerprint: str) -> str:
    """The registered model's name for a teacher (``template`` as in the module docstring)."""
    stem = PurePosixPath(teacher_uri.split("?")[0].rstrip("/")).name
    for suffix in (".safetensors", ".ckpt", ".pth", ".pt", ".bin", ".tar"):
        stem = stem.removesuffix(suffix)
    stem = _UNSAFE.sub("-", stem).strip("-.") or "teacher"
    return template.format(teacher=stem, fingerprint=fingerprint[:12])


def _exists(exc: Exception) -> bool:
    text = str(exc)
    return "RESOURCE_ALREADY_EXISTS" in text or "already exists" in text.lower()


@task(name="register-student", timeout_seconds=timeout_of("register-student"))
def register_student(name: str, alias: str, model_uri: str, run_id: str, tags: dict[str, str], passed: bool) -> dict:
    """A version of ``name`` for a passing student, with ``alias`` moved to it; nothing for a rejected one."""
    if not passed:
        return {"name": name, "version": None, "alias": alias, "alias_moved": False, "registered": False,
                "reason": "rejected students are not registered (logged in their run, stored in quarantine/)"}
    import mlflow
    from mlflow import MlflowClient

    with tracking("registering the student"):
        client = MlflowClient()
        try:
            client.create_registered_model(name, tags={"mimic.role": "sanitized-encoders"},
                                           description="Encoders sanitized by mimic (MIMIC distillation); only passing students")
        except Exception as exc:  # noqa: BLE001 - made by an earlier (or a concurrent) audit
            if not _exists(exc):
                raise
        akey = tags["mimic.audit_key"]
        found = client.search_model_versions(f"name = '{name}' and tags.`mimic.audit_key` = '{akey}'")
        mv = min(found, key=lambda m: int(m.version)) if found else mlflow.register_model(model_uri, name, tags=tags)
        client.set_registered_model_alias(name, alias, mv.version)
    return {"name": name, "version": str(mv.version), "alias": alias, "alias_moved": True, "registered": True,
            "reused": bool(found), "run_id": run_id, "tags": tags}
