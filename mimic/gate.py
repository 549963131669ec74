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


def judge(teacher_ca: float | None, student_ca: float | None, student_asr: float | None, gate: GateConfig, *,
          asr_probe: str | None = None, ca_probe: str | None = None) -> Verdict:
    """Student ASR <= ``gate.max_asr`` and CA drop <= ``gate.max_ca_drop`` (percent / points).

    The callers pass the worst case over the probes run (:func:`mimic.results.worst_case`);
    ``asr_probe``/``ca_probe`` name the probe each number came from, for the reason.
    """
    on_ca = f" ({ca_probe} probe)" if ca_probe else ""
    on_asr = f" ({asr_probe} probe)" if asr_probe else ""
    if student_ca is None or teacher_ca is None:
        return Verdict(False, "clean accuracy not measured (no labelled downstream data)")
    problems = []
    notes = []
    drop = teacher_ca - student_ca
    if drop > gate.max_ca_drop:
        problems.append(f"CA drop {drop:.1f} points > {gate.max_ca_drop:g}{on_ca}")
    else:
        notes.append(f"CA drop {drop:.1f} <= {gate.max_ca_drop:g}{on_ca}")
    if student_asr is None:
        if gate.require_asr:
            problems.append("ASR not measured (no trigger/target known) and gate.require_asr is true")
        else:
            notes.append("ASR not measured (no trigger/target known)")
    elif student_asr > gate.max_asr:
        problems.append(f"student ASR {student_asr:.1f}% > {gate.max_asr:g}%{on_asr}")
    else:
        notes.append(f"ASR {student_asr:.1f}% <= {gate.max_asr:g}%{on_asr}")
    if problems:
        return Verdict(False, "; ".join(problems))
    return Verdict(True, "; ".join(notes))
