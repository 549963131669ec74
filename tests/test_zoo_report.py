"""`scenarios/zoo/report.py write`: docs/results.md and the plots from whatever part of the matrix ran."""

from __future__ import annotations

import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ZOO = Path(__file__).resolve().parents[1] / "scenarios" / "zoo"
REPORT = ZOO / "report.py"


def _matrix():
    """scenarios/zoo/matrix.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("zoo_matrix_under_test", ZOO / "matrix.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


matrix = _matrix()
EVALUATE = yaml.safe_load((ZOO / "cells.yaml").read_text())["evaluate_cells"]

# (attack, defence): {seed: (linear CA, linear ASR)}; badencoder/uniform lacks seed 2
DATA = {
    ("badencoder", "teacher"): {0: (42.0, 99.0), 1: (43.0, 98.5), 2: (41.0, 99.5)},
    ("badencoder", "mimic"): {0: (40.0, 3.0), 1: (41.5, 5.5), 2: (39.2, 2.1)},
    ("badencoder", "uniform"): {0: (40.4, 4.0), 1: (41.0, 3.2)},
    ("drupe", "mimic"): {0: (38.0, 2.0), 1: (38.6, 2.5), 2: (37.1, 3.0)},
    ("drupe", "uniform"): {0: (37.5, 20.0), 1: (38.2, 25.0), 2: (36.9, 22.0)},
}
Z_SHIFT = {("badencoder", "mimic"): 12.0}  # the z-scored linear probe's ASR above the standard one


def key(attack: str, defence: str, seed: int) -> str:
    """The evaluate key of a cell, as matrix.py names the stage; it must be one of cells.yaml's."""
    (target,) = matrix.targets([attack], [defence], [seed], "")
    k = target.split("evaluate@", 1)[1]
    assert EVALUATE[k] == {"cell": matrix.cell(attack, seed), "seed": seed, "path": EVALUATE[k]["path"]}
    return k


def probes(a: str, d: str, ca: float, asr: float) -> dict:
    """The four probes of one encoder: mlp one point above linear, z-scored ASR shifted by Z_SHIFT."""
    z = Z_SHIFT.get((a, d), 1.0)
    return {"linear": {"probe": "linear", "ca": ca, "asr": asr}, "mlp": {"probe": "mlp", "ca": ca + 1, "asr": asr + 1},
            "linear_z": {"probe": "linear_z", "ca": ca, "asr": asr + z}, "mlp_z": {"probe": "mlp_z", "ca": ca, "asr": asr}}


def write(root: Path) -> tuple[str, subprocess.CompletedProcess]:
    """Run the report on ``root``; the page it wrote and the process."""
    r = subprocess.run([sys.executable, str(REPORT), "write", "--dir", str(root), "--out", str(root / "results.md"),
                        "--img", str(root / "img")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return (root / "results.md").read_text(), r


def section(page: str, heading: str) -> str:
    """The text of the section under ``heading`` (up to the next heading of the same level)."""
    level = heading.split(" ", 1)[0]
    body = page.split(heading + "\n", 1)[1]
    return body.split(f"\n{level} ", 1)[0]


def table_rows(page: str, probe: str) -> dict[tuple[str, str], list[str]]:
    """The rows of one probe's table: (attack, defence) -> [CA, ASR, n]."""
    heading = next(ln for ln in page.splitlines() if ln.startswith(f"## Probe `{probe}`"))
    out = {}
    for ln in section(page, heading).splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            out[(cells[0].strip("`"), cells[1].strip("*`"))] = cells[2:]
    return out


def ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


@pytest.fixture
def scenario(tmp_path) -> Path:
    """A scenario folder with metrics for part of the matrix, its params, profile, cells and a record."""
    for name in ("params.yaml", "profile.yaml", "cells.yaml"):
        shutil.copyfile(ZOO / name, tmp_path / name)
    (tmp_path / "metrics").mkdir()
    for (a, d), by_seed in DATA.items():
        for s, (ca, asr) in by_seed.items():
            k = key(a, d, s)
            m = {"encoders": {k: probes(a, d, ca, asr)}, "target_class": 9, "seconds": 3.0, "environment": {}}
            (tmp_path / "metrics" / f"{k}.json").write_text(json.dumps(m))
    (tmp_path / "records").mkdir()
    env = {"device": "cpu", "threads": 1, "git": "abcdef1234567890"}
    (tmp_path / "records" / "a.json").write_text(json.dumps({"stage": "distill", "seconds": 5400.0, "cached": False,
                                                              "environment": env}))
    (tmp_path / "records" / "b.json").write_text(json.dumps({"stage": "distill", "seconds": 99.0, "cached": True}))
    return tmp_path


def test_a_partial_matrix_is_tabled_compared_listed_and_plotted(scenario):
    page, r = write(scenario)
    n_files = sum(len(v) for v in DATA.values())
    assert f"{n_files} of {len(EVALUATE)} evaluations" in r.stdout

    # tables: mean ± sample std over the seeds present, n (with the missing seed named)
    for probe, dca, dasr in (("linear", 0, 0), ("mlp", 1, 1)):
        rows = table_rows(page, probe)
        for (a, d), by_seed in DATA.items():
            ca = [v[0] + dca for v in by_seed.values()]
            asr = [v[1] + dasr for v in by_seed.values()]
            missing = [f"s{s}" for s in matrix.SEEDS if s not in by_seed]
            n = str(len(by_seed)) + (f" of {len(matrix.SEEDS)} ({', '.join(missing)} not run)" if missing else "")
            assert rows[(a, d)] == [ms(ca), ms(asr), n], (probe, a, d)
        assert rows[("badencoder", "sharp")][0] == "not run"  # a defence of an attack that ran, with no seed
        assert ("be-small", "mimic") not in rows  # attacks with no metrics are not tabled
    assert "## Probe `linear_z`" in page and "## Probe `mlp_z`" in page

    # ties: the difference of the means against the larger std, computed here from the data
    def verdict(a: str, i: int) -> tuple[bool, float]:
        x = [v[i] for v in DATA[(a, "uniform")].values()]
        y = [v[i] for v in DATA[(a, "mimic")].values()]
        diff = statistics.mean(x) - statistics.mean(y)
        return abs(diff) < max(statistics.stdev(x), statistics.stdev(y)), diff

    compared = section(section(page, "## Defences compared"), "### `linear`")
    tie, diff = verdict("badencoder", 1)
    assert tie and f"`uniform` ASR tie ({diff:+.1f}, within the larger std" in compared
    tie, diff = verdict("drupe", 1)
    assert not tie and diff > 0 and f"`uniform` ASR higher by {diff:.1f} (larger std" in compared
    line = next(ln for ln in compared.splitlines() if ln.startswith("- `drupe`"))
    assert "lowest ASR `mimic`" in line and "tied with" not in line

    # standard vs z-scored: only the shifted row is more than 5 points away
    z = section(page, "## Standard against z-scored probes")
    gap = Z_SHIFT[("badencoder", "mimic")]
    assert f"- `badencoder` / `mimic`: `linear_z` ASR higher than `linear` by {gap:.1f} points" in z
    assert z.count("\n- ") == 1

    # not run: the attacks with no metrics at all, and per partly run attack the missing seeds
    nr = section(page, "## Not run")
    assert f"{len(EVALUATE) - n_files} of {len(EVALUATE)} evaluations have no metrics yet" in nr
    whole = next(ln for ln in nr.splitlines() if ln.startswith("- not run at all:"))
    assert sorted(w.strip(" `") for w in whole.split(":", 1)[1].split(",")) == sorted(set(matrix.ATTACKS) - {"badencoder", "drupe"})
    be = next(ln for ln in nr.splitlines() if ln.startswith("- `badencoder`, not run:"))
    assert "`uniform` s2;" in be and "`sharp` s0, s1, s2" in be and "`mimic`" not in be and "`teacher`" not in be
    assert "`clean` s0, s1, s2" in be  # the reference without metrics is missing too

    # the setup of the profile in profile.yaml, and the one record that was not cached
    profile = yaml.safe_load((scenario / "profile.yaml").read_text())["profile"]
    params = yaml.safe_load((scenario / "params.yaml").read_text())
    epochs = params["profiles"][profile].get("distill", {}).get("epochs", params["distill"]["epochs"])
    assert f"profile `{profile}`" in page and f"distillation {epochs} epochs" in page
    assert "1 stage record(s) of runs that were not cached, 1.50 h" in page
    assert "stale" not in page.lower() and "not what `matrix.py` gives" not in page

    # one non-empty PNG per attack run, linked from the page
    for a in ("badencoder", "drupe"):
        png = scenario / "img" / f"{a}.png"
        assert png.stat().st_size > 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(img/{a}.png)" in page
    assert sorted(p.name for p in (scenario / "img").iterdir()) == ["badencoder.png", "drupe.png"]


def test_an_empty_metrics_folder_says_the_matrix_has_not_been_run(tmp_path):
    (tmp_path / "metrics").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "drupe.png").write_bytes(b"old")  # a plot of an earlier run: removed
    page, r = write(tmp_path)
    assert f"0 of {len(EVALUATE)} evaluations" in r.stdout
    assert "The matrix has not been run" in page and f"none of its {len(EVALUATE)} evaluations" in page
    assert "dvc repro scenarios/zoo/dvc.yaml" in page
    assert "## Probe" not in page and "![" not in page
    assert list((tmp_path / "img").iterdir()) == []


def test_stray_and_broken_metrics_files_and_stale_cells_are_reported(tmp_path):
    (tmp_path / "metrics").mkdir()
    k = key("badencoder", "mimic", 0)
    (tmp_path / "metrics" / f"{k}.json").write_text(json.dumps({"encoders": {k: {"linear": {"probe": "linear"}}}}))
    (tmp_path / "metrics" / "nosuch-s0-mimic.json").write_text("{}")
    cells = yaml.safe_load((ZOO / "cells.yaml").read_text())
    cells["evaluate_cells"].pop(k)
    (tmp_path / "cells.yaml").write_text(yaml.safe_dump(cells))
    page, _ = write(tmp_path)
    assert "The matrix has not been run" in page  # neither file counts as a result
    assert "not what `matrix.py` gives" in page
    assert "no evaluation of the spec (ignored): nosuch-s0-mimic.json" in page
    assert f"without CA/ASR for their key (ignored): {k}.json" in page


# (attack, defence): {seed: (linear CA, linear ASR)} for the attack check and the losses of MIMIC
def seed_scenario(root: Path, data: dict) -> None:
    """A scenario folder at ``root``: the zoo's params and cells, and one metrics file per (attack, defence, seed) of ``data``."""
    for name in ("params.yaml", "profile.yaml", "cells.yaml"):
        shutil.copyfile(ZOO / name, root / name)
    (root / "metrics").mkdir()
    for (a, d), by_seed in data.items():
        for s, (ca, asr) in by_seed.items():
            k = key(a, d, s)
            (root / "metrics" / f"{k}.json").write_text(json.dumps({"encoders": {k: probes(a, d, ca, asr)}, "target_class": 9}))


LOSS_DATA = {
    ("badencoder", "clean"): {0: (41.0, 10.0), 1: (42.0, 11.0), 2: (40.0, 9.0)},
    ("badencoder", "teacher"): {0: (40.0, 99.0), 1: (41.0, 98.0), 2: (40.0, 99.5)},   # works: ASR 98.8, CA -0.7
    ("badencoder", "mimic"): {0: (40.0, 3.0), 1: (41.5, 5.5), 2: (39.2, 2.1)},      # removed
    ("badencoder", "fineprune"): {0: (35.0, 0.5), 1: (36.0, 0.7), 2: (35.5, 0.6)},  # lower beyond the spread
    ("badencoder", "uniform"): {0: (40.4, 4.0), 1: (41.0, 3.2), 2: (40.0, 2.5)},    # a tie: not a loss
    ("drupe", "clean"): {0: (44.0, 10.0), 1: (45.0, 10.0), 2: (43.0, 10.0)},
    ("drupe", "teacher"): {0: (38.0, 90.0), 1: (38.0, 92.0), 2: (38.0, 91.0)},      # ASR 91 < 95, CA 6 under
    ("drupe", "mimic"): {0: (38.0, 40.0), 1: (38.0, 45.0), 2: (38.0, 50.0)},        # survives: +35 points
    ("adaptive", "teacher"): {0: (40.0, 97.0)},                                        # no clean row: CA not compared
    ("adaptive", "mimic"): {0: (39.0, 30.0)},
    ("adaptive", "clp"): {0: (37.0, 12.0)},                                           # lower on one seed: no call
}


def test_the_page_says_which_attacks_worked_and_where_mimic_loses(tmp_path):
    seed_scenario(tmp_path, LOSS_DATA)
    page, _ = write(tmp_path)
    worked = section(section(page, "## Did the attacks work?"), "### `linear`")
    line = {ln.split("`")[1]: ln for ln in worked.splitlines() if ln.startswith("- `")}
    assert line["badencoder"].endswith(": works.") and "(clean encoder 41.0 ± 1.0, -0.7)" in line["badencoder"]
    assert "**did not meet the bar**: ASR under 95, CA 6.0 points under the clean encoder" in line["drupe"]
    assert "ASR reached, CA not compared" in line["adaptive"]

    lost = section(section(page, "## Where `mimic` loses"), "### `linear`")
    line = {ln.split("`")[1]: ln for ln in lost.splitlines() if ln.startswith("- `")}
    assert "removed to within 10 points of the clean encoder" in line["badencoder"]
    assert "**Beaten by** `fineprune` (ASR 0.6 ± 0.1" in line["badencoder"] and "`uniform`" not in line["badencoder"]
    assert "**the backdoor survives** (+35.0 points over the clean encoder)" in line["drupe"]
    assert "No defence reaches a lower ASR beyond the spread." in line["drupe"]
    assert "Lower on one seed each (no call): `clp` (12.0)" in line["adaptive"] and "survives" not in line["adaptive"]

    weighting = section(page, "## Does the MI weighting matter?")
    assert "- `linear`, `uniform` on 1 attack(s): ASR lower on 0, tied on 1, higher on 0;" in weighting
    assert "the sharper mapping is not kept" in weighting and "Kept:" not in weighting
    assert "- no MI weights on record." in weighting


SHARP_DATA = {
    ("badencoder", "mimic"): {0: (40.0, 20.0), 1: (41.0, 22.0), 2: (40.5, 21.0)},
    ("badencoder", "sharp"): {0: (40.2, 5.0), 1: (40.8, 6.0), 2: (40.4, 5.5)},    # ASR lower beyond the spread, CA tied
    ("badencoder", "uniform"): {0: (40.0, 21.0), 1: (41.0, 20.0), 2: (40.5, 22.5)},
    ("drupe", "mimic"): {0: (38.0, 30.0), 1: (38.5, 31.0), 2: (38.2, 29.0)},
    ("drupe", "sharp"): {0: (38.1, 10.0), 1: (38.4, 11.0), 2: (38.3, 12.0)},
    ("drupe", "uniform"): {0: (38.0, 30.5), 1: (38.5, 29.5), 2: (38.2, 31.0)},    # a tie
}


def test_a_sharper_mapping_is_kept_only_when_it_beats_mimic_on_most_attacks(tmp_path):
    seed_scenario(tmp_path, SHARP_DATA)
    for name, mapping, w in (("badencoder-s0", "share", [3000, 3300, 3600]), ("drupe-s0", "share", [3000, 3000, 3450]),
                             ("badencoder-s0-softmax", "softmax", [1000, 2000, 8000])):
        (tmp_path / "mi" / name).mkdir(parents=True)
        (tmp_path / "mi" / name / "mi.json").write_text(json.dumps(
            {"mapping": mapping, "weights": {f"layer{i + 1}": v for i, v in enumerate(w)}}))
    page, _ = write(tmp_path)
    weighting = section(page, "## Does the MI weighting matter?")
    assert "- mapping `share`: 1.15-1.20x (2 MI stage(s))" in weighting
    assert "- mapping `softmax`: 8.00-8.00x (1 MI stage(s))" in weighting
    assert ("- `linear`, `sharp` on 2 attack(s): ASR lower on 2 (badencoder, drupe), tied on 0, higher on 0; "
            "CA lower on 0, tied on 2, higher on 0.") in weighting
    assert "- `linear`, `uniform` on 2 attack(s): ASR lower on 0, tied on 2, higher on 0;" in weighting
    assert "Kept: `sharp` beat `mimic`'s ASR beyond the spread" in weighting and "not kept" not in weighting
