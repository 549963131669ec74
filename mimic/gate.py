"""The registry gate: does a sanitized student pass? Pure function of metrics and ``GateConfig``."""

from __future__ import annotations

from dataclasses import dataclass

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


def judge(teacher_ca: float | None, student_ca: float | None, student_asr: float | None, gate: GateConfig) -> Verdict:
    """Student ASR <= ``gate.max_asr`` and CA drop <= ``gate.max_ca_drop`` (percent / points)."""
    if student_ca is None or teacher_ca is None:
        return Verdict(False, "clean accuracy not measured (no labelled downstream data)")
    problems = []
    notes = []
    drop = teacher_ca - student_ca
    if drop > gate.max_ca_drop:
        problems.append(f"CA drop {drop:.1f} points > {gate.max_ca_drop:g}")
    else:
        notes.append(f"CA drop {drop:.1f} <= {gate.max_ca_drop:g}")
    if student_asr is None:
        if gate.require_asr:
            problems.append("ASR not measured (no trigger/target known) and gate.require_asr is true")
        else:
            notes.append("ASR not measured (no trigger/target known)")
    elif student_asr > gate.max_asr:
        problems.append(f"student ASR {student_asr:.1f}% > {gate.max_asr:g}%")
    else:
        notes.append(f"ASR {student_asr:.1f}% <= {gate.max_asr:g}%")
    if problems:
        return Verdict(False, "; ".join(problems))
    return Verdict(True, "; ".join(notes))
