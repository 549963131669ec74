"""House rules that keep the architecture honest: a light core, one identity, small modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mimic import identity
from mimic.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("prefect", "mlflow", "boto3", "botocore", "dvc", "dvc_data", "dvc_objects", "s3transfer")

BLOCKER = f"""
import importlib.abc, pkgutil, sys, importlib
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"blocked: {{name}}")
        return None
sys.meta_path.insert(0, Block())
import mimic
names = sorted(m.name for m in pkgutil.walk_packages(mimic.__path__, "mimic.") if not m.name.endswith("__main__"))
for n in names:
    importlib.import_module(n)
from mimic.audit import run_audit
from mimic.cli import build_parser
build_parser()  # the fronts' entry point is skipped when its imports fail
print(len(names))
"""


def test_every_core_module_imports_with_orchestration_blocked():
    """Rule 3: ``import mimic.<anything>`` works where prefect, mlflow, boto3 and dvc cannot be imported."""
    r = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.strip()) >= 20


def test_the_blocker_would_catch_a_heavy_import(tmp_path):
    """The check above is real: a module importing prefect at the top fails under the blocker."""
    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import prefect\n")
    code = BLOCKER.replace("import mimic\n", f"sys.path.insert(0, {str(tmp_path)!r})\nimport probe_pkg\nimport mimic\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode != 0 and "blocked: prefect" in r.stderr


def test_no_module_over_400_lines():
    big = []
    for folder in ("mimic", "tasks", "flows", "scenarios"):
        for p in (ROOT / folder).rglob("*.py"):
            n = len(p.read_text().splitlines())
            if n > 400:
                big.append(f"{p.relative_to(ROOT)} ({n})")
    assert not big, big


# ---------------------------------------------------------------------------------------------
# one identity


def test_stage_code_closures_follow_the_data_flow():
    """Editing a stage's code invalidates that stage (and later ones through their inputs), not the others."""
    assert "mimic.distill" not in identity.code_modules("mi")
    assert "mimic.mi" not in identity.code_modules("evaluate") and "mimic.distill" not in identity.code_modules("evaluate")
    assert "mimic.evaluate" not in identity.code_modules("distill")
    for stage in identity.STAGES:
        mods = identity.code_modules(stage)
        assert f"mimic.stages.{stage}" in mods and "mimic.runtime" in mods
        assert not any(identity._neutral(m) for m in mods)


def test_editing_one_stage_changes_only_its_key(monkeypatch, tmp_path):
    cfg = load_config(profile="tiny")
    inputs = {"teacher": "t", "clean": "c", "weights": [1.0]}
    before = {s: identity.stage_key(s, cfg, inputs) for s in identity.STAGES}
    edited = tmp_path / "distill.py"
    edited.write_text((ROOT / "mimic" / "distill.py").read_text() + "\n# an edit\n")
    real = identity._module_file
    monkeypatch.setattr(identity, "_module_file", lambda m: edited if m == "mimic.distill" else real(m))
    identity.code_hash.cache_clear()
    try:
        after = {s: identity.stage_key(s, cfg, inputs) for s in identity.STAGES}
    finally:
        identity.code_hash.cache_clear()
    changed = {s for s in identity.STAGES if before[s] != after[s]}
    assert changed == {s for s in identity.STAGES if "mimic.distill" in identity.code_modules(s)} == {"distill"}


def test_keys_cover_what_changes_results_and_only_that():
    base = load_config(profile="tiny", sets=["precision=fp32"])  # not auto: auto is bf16 on CPUs with AVX512-BF16
    inputs = {"teacher": "t", "clean": "c"}
    key = identity.stage_key
    assert key("distill", base, inputs) != key("distill", load_config(profile="tiny", sets=["precision=bf16"]), inputs)
    assert key("distill", base, inputs) != key("distill", base, {**inputs, "teacher": "u"})
    assert key("distill", base, inputs) != key("distill", load_config(profile="tiny", sets=["precision=fp32", "distill.lr=0.5"]), inputs)
    # params another stage reads, and the gate, do not touch this stage's key
    for s in ("mi.epochs=9", "evaluate.epochs=3", "gate.max_asr=50", "timeouts.lock=5"):
        assert key("distill", base, inputs) == key("distill", load_config(profile="tiny", sets=["precision=fp32", s]), inputs), s
    # the resume lineage ignores the epoch count only
    longer = load_config(profile="tiny", sets=["precision=fp32", "distill.epochs=9"])
    assert key("distill", base, inputs) != key("distill", longer, inputs)
    assert identity.lineage_key("distill", base, inputs) == identity.lineage_key("distill", longer, inputs)
    # ... unless an attention schedule spans the run: then a longer run is another run from epoch 0
    sched = ["precision=fp32", "distill.attention_end=0.1"]
    assert (identity.lineage_key("distill", load_config(profile="tiny", sets=sched), inputs)
            != identity.lineage_key("distill", load_config(profile="tiny", sets=sched + ["distill.epochs=9"]), inputs))
    assert identity.runtime_identity(load_config(sets=["precision=bf16"])) == {"device": "cpu", "precision": "bfloat16"}


def _dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("dvc_stage, stages", [("demo_teacher", ("pretrain", "attack")), ("mi", ("mi",)), ("scan-teacher", ("scan",)), ("scan-student", ("scan",)),
                                               ("distill", ("distill",)), ("evaluate", ("evaluate",))])
def test_dvc_stages_depend_on_the_code_and_params_of_their_stage(dvc_stage, stages):
    """DVC reruns a stage when its code changes: dvc.yaml deps = the identity's code files."""
    st = _dvc_stages()[dvc_stage]
    deps = {d for d in st["deps"] if d.startswith("mimic/")}
    assert deps == set().union(*[set(identity.code_files(s)) for s in stages])
    params = set(st["params"])
    for s in stages:
        for p in identity.STAGES[s].params:
            assert p in params or any(p.startswith(q + ".") for q in params), (s, p)
    assert {"device", "precision"} <= params  # the runtime identity


SCENARIO_STAGES = {
    "cifar10": {"pretrain": ("pretrain",), "attack": ("attack",), "mi": ("mi",), "distill": ("distill",),
                "finetune": ("pretrain",), "evaluate": ("evaluate",)},
    "zoo": {"pretrain": ("pretrain",), "attack": ("attack", "drupe", "adaptive"), "mi": ("mi",), "distill": ("distill",),
            "scan": ("scan",), "unlearn": ("unlearn",), "prune": ("prune",), "evaluate": ("evaluate",)},
}


@pytest.mark.parametrize("scenario, dvc_stage", [(sc, st) for sc, stages in SCENARIO_STAGES.items() for st in stages])
def test_the_scenario_stages_depend_on_their_code(scenario, dvc_stage):
    """A scenario's `dvc repro` reruns a stage when the code it runs changes (its deps are the identity's files),
    and evaluate's metrics file holds CA/ASR only (timings and the environment go to records/eval/)."""
    folder = ROOT / "scenarios" / scenario
    st = yaml.safe_load((folder / "dvc.yaml").read_text())["stages"][dvc_stage]
    st = st.get("do", st)
    deps = {str((folder / d).resolve().relative_to(ROOT)) for d in st["deps"] if d.startswith("../../mimic/")}
    assert deps == set().union(*[set(identity.code_files(s)) for s in SCENARIO_STAGES[scenario][dvc_stage]])
    if dvc_stage == "evaluate":
        assert "--metrics metrics/${key}.json" in st["cmd"] and "--json records/eval/${key}.json" in st["cmd"]


# ---------------------------------------------------------------------------------------------
# no private torch module, one writer


def _sources():
    for folder in ("mimic", "tasks", "flows"):
        for p in sorted((ROOT / folder).rglob("*.py")):
            yield p, ast.parse(p.read_text(), filename=str(p))


def _private_torch(name: str) -> bool:
    parts = name.split(".")
    return parts[0] == "torch" and any(part.startswith("_") for part in parts[1:])


def _private_torch_imports(tree: ast.AST) -> list[str]:
    """``import torch._x`` / ``from torch.y._z import w`` / ``from torch import _x`` in ``tree`` (imports only:
    strings naming torch internals, such as pickle_scan's allow-list, are data)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _private_torch(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names if _private_torch(f"{node.module}.{a.name}")]
    return found


def test_no_private_torch_module_is_imported():
    """Rule 5: only torch's public API (a private module changes or vanishes between releases)."""
    bad = [f"{p.relative_to(ROOT)}: {name}" for p, tree in _sources() for name in _private_torch_imports(tree)]
    assert not bad, bad


def test_the_private_import_check_would_catch_one():
    for code in ("import torch._dynamo", "from torch.distributed._functional_collectives import all_gather_single",
                 "from torch import _utils", "def f():\n    import torch.nn._reduction as r\n"):
        assert _private_torch_imports(ast.parse(code)), code
    for code in ("import torch.distributed as dist", "from torch.distributed.nn.functional import all_gather",
                 "ALLOWED = {'torch._utils._rebuild_tensor_v2'}", "from ._impl import x"):
        assert not _private_torch_imports(ast.parse(code)), code


RENAMES = {("os", "replace"), ("os", "rename"), ("tempfile", "NamedTemporaryFile")}


def _renames(tree: ast.AST) -> list[str]:
    """Uses of ``os.replace`` / ``os.rename`` / ``tempfile.NamedTemporaryFile`` (attribute or imported name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (node.value.id, node.attr) in RENAMES:
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [f"from {node.module} import {a.name} (line {node.lineno})" for a in node.names
                      if (node.module, a.name) in RENAMES]
    return found


def test_files_are_replaced_only_in_mimic_io():
    """Rule 4: one place writes a file atomically (mimic/io.py); everyone else calls it."""
    bad = [f"{p.relative_to(ROOT)}: {use}" for p, tree in _sources() if p != ROOT / "mimic" / "io.py"
           for use in _renames(tree)]
    assert not bad, bad
    assert _renames(ast.parse((ROOT / "mimic" / "io.py").read_text()))  # the check sees the real one


def test_the_rename_check_would_catch_one():
    for code in ("os.replace(a, b)", "os.rename(a, b)", "from os import replace", "tempfile.NamedTemporaryFile()",
                 "from tempfile import NamedTemporaryFile"):
        assert _renames(ast.parse(code)), code
    for code in ("s.replace('a', 'b')", "dataclasses.replace(x)", "tempfile.mkdtemp()"):
        assert not _renames(ast.parse(code)), code


def test_an_audit_loads_its_teacher_and_its_data_once(tmp_path, random_teacher, monkeypatch, one_thread):
    """Issue 11, rule 5b: the teacher file is read and checked once per audit (every stage reads the
    content-addressed copy through the same per-process memo) and the dataset is loaded once."""
    import mimic.inputs as inputs
    from mimic.audit import AuditRequest, run_audit
    from mimic.config import load_config

    loads: list[str] = []
    datasets: list[str] = []
    real_load, real_dataset = inputs.load_encoder, inputs.load_dataset
    monkeypatch.setattr(inputs, "load_encoder", lambda path, **kw: loads.append(str(path)) or real_load(path, **kw))
    monkeypatch.setattr(inputs, "load_dataset", lambda *a, **kw: datasets.append(repr(a)) or real_dataset(*a, **kw))
    monkeypatch.setattr(inputs, "_teachers", inputs._Memo())
    monkeypatch.setattr(inputs, "_datasets", inputs._Memo())
    cfg = load_config(profile="tiny", sets=["data.synthetic_train=300", "data.synthetic_test=100"])
    res = run_audit(cfg, AuditRequest(teacher=str(random_teacher), data="synthetic"), root=tmp_path / "cache",
                    out_dir=tmp_path / "out", progress=False)
    assert res["student_ca"] is not None
    want = inputs.file_sha256(random_teacher)
    teacher_loads = [p for p in loads if inputs.file_sha256(p) == want]
    assert teacher_loads == [str(random_teacher)], loads  # once, from the path the user named; later stages hit the memo
    assert len(datasets) == 1, datasets
