"""The registry gate: does a sanitized student pass? Pure function of metrics, scans and ``GateConfig``.

Rules (each failing one is named in the reason):

* CA drop: teacher CA - student CA <= ``gate.max_ca_drop``, the largest drop over every probe run;
* ASR: student ASR <= ``gate.max_asr``, the highest over every probe run. With the *inverted* trigger (no trigger was given: the
  teacher scan's trigger and collapse class) the rule applies only when the teacher scans
  suspicious: the inverted trigger of a clean-scanning teacher is a large universal patch, not a
  backdoor, and its "ASR" is reported, not gated;
* scan: with ``gate.reject_suspicious_student`` a student that still scans suspicious
  (PL1 < ``scan.threshold``) is rejected.

The reason always ends with the evidence: PL1 of teacher and student, and which trigger the ASR used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mimic.config import GateConfig


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str

    @property
    def label(self) -> str:
        return "sanitized" if self.passed else "rejected"

    def to_dict(self) -> dict:
        return {"verdict": self.label, "passed": self.passed, "reason": self.reason}


def _evidence(scan: Mapping[str, Mapping[str, Any]] | None, student_asr: float | None, asr_trigger: str | None,
              target: int | None) -> str:
    parts = []
    for who in ("teacher", "student"):
        rec = (scan or {}).get(who)
        if rec:
            parts.append(f"{who} PL1 {rec['pl1']:.4f} ({rec['verdict']})")
    if student_asr is not None:
        parts.append(f"student ASR {student_asr:.1f}% with the {asr_trigger or 'given'} trigger"
                     + ("" if target is None else f" (target class {target})"))
    return "evidence: " + ", ".join(parts) if parts else ""


def judge(teacher_ca: float | None, student_ca: float | None, student_asr: float | None, gate: GateConfig, *,
          scan: Mapping[str, Mapping[str, Any]] | None = None, asr_trigger: str | None = None,
          target: int | None = None, asr_probe: str | None = None, ca_probe: str | None = None) -> Verdict:
    """The verdict (module docstring); ``scan``: ``{"teacher"|"student": scan record}``, ``asr_trigger``:
    where the ASR trigger came from (given, teacher, inverted).

    The callers pass the worst case over the probes run (:func:`mimic.results.worst_case`);
    ``asr_probe``/``ca_probe`` name the probe each number came from, for the reason.
    """
    on_ca = f" ({ca_probe} probe)" if ca_probe else ""
    on_asr = f" ({asr_probe} probe)" if asr_probe else ""
    problems: list[str] = []
    notes: list[str] = []
    evidence = _evidence(scan, student_asr, asr_trigger, target)
    student_scan = (scan or {}).get("student")
    if student_scan and student_scan.get("suspicious") and gate.reject_suspicious_student:
        problems.append(f"the student still scans suspicious ({student_scan['reason']})")
    if student_ca is None or teacher_ca is None:
        problems.append("clean accuracy not measured (no labelled downstream data)")
        return Verdict(False, "; ".join(problems + ([evidence] if evidence else [])))
    drop = teacher_ca - student_ca
    if drop > gate.max_ca_drop:
        problems.append(f"CA drop {drop:.1f} points > {gate.max_ca_drop:g}{on_ca}")
    else:
        notes.append(f"CA drop {drop:.1f} <= {gate.max_ca_drop:g}{on_ca}")
    teacher_scan = (scan or {}).get("teacher")
    if student_asr is None:
        if gate.require_asr:
            problems.append("ASR not measured (no trigger/target known) and gate.require_asr is true")
        else:
            notes.append("ASR not measured (no trigger/target known)")
    elif asr_trigger == "inverted" and not (teacher_scan and teacher_scan.get("suspicious")):
        notes.append("ASR with the inverted trigger not gated: the teacher scans clean")
    elif student_asr > gate.max_asr:
        problems.append(f"student ASR {student_asr:.1f}% > {gate.max_asr:g}%{on_asr}")
    else:
        notes.append(f"ASR {student_asr:.1f}% <= {gate.max_asr:g}%{on_asr}")
    tail = [evidence] if evidence else []
    if problems:
        return Verdict(False, "; ".join(problems + tail))
    return Verdict(True, "; ".join(notes + tail))
