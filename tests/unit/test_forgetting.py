"""distrib_ft/retrain/forgetting.py: GEM's ACC / BWT / FWT by hand, and the pipeline report on a folder and on S3.

The 3x3 R below has entries that are multiples of 1/4, so every difference is exact in binary and the metrics are
compared with ``==``. The S3 test writes to moto's real server (tests/s3.py) through pyarrow.fs.
"""

import io
import json

import pytest
from PIL import Image

from distrib_ft.monitor.budget import Monitor, Suite
from distrib_ft.registry import Registry
from distrib_ft.retrain.forgetting import (
    HEATMAP,
    LINES,
    PLOTS_DIR,
    gem_metrics,
    heatmap_figure,
    row_from_eval_report,
    write_report,
)
from distrib_ft.runtime.storage import UrlPath
from tests.s3 import list_keys, make_bucket, s3_env

# NLL (lower is better). Row i: the model after round i; column j: task j; base: the base model.
R = [[1.0, 3.0, 4.0],
     [1.5, 2.0, 3.5],
     [1.75, 2.5, 1.25]]
BASE = [2.0, 3.5, 4.5]


def test_gem_3x3_by_hand():
    m = gem_metrics(R, BASE)
    # ACC = (R[2][0] + R[2][1] + R[2][2]) / 3
    assert m["ACC"] == 5.5 / 3
    # BWT (NLL, negated): ((R[0][0] - R[2][0]) + (R[1][1] - R[2][1])) / 2 = ((1 - 1.75) + (2 - 2.5)) / 2: forgetting
    assert m["BWT"] == -0.625
    # FWT (NLL, negated): ((base[1] - R[0][1]) + (base[2] - R[1][2])) / 2 = ((3.5 - 3) + (4.5 - 3.5)) / 2
    assert m["FWT"] == 0.75
    assert m["T"] == 3 and m["missing"] == [] and m["lower_is_better"] is True
    # a higher-is-better metric (GEM's accuracy): the differences as GEM writes them, ACC unchanged
    acc = gem_metrics(R, BASE, lower_is_better=False)
    assert (acc["ACC"], acc["BWT"], acc["FWT"]) == (5.5 / 3, 0.625, -0.75)
    # R[0][2] (task 3 before round 2) enters no formula at T=3; R[1][2] enters FWT only
    assert gem_metrics([[1.0, 3.0, 99.0], R[1], R[2]], BASE) == m
    changed = gem_metrics([R[0], [1.5, 2.0, 4.0], R[2]], BASE)
    assert (changed["ACC"], changed["BWT"], changed["FWT"]) == (m["ACC"], m["BWT"], 0.5)


def test_gem_fewer_rows_than_tasks_and_t1():
    two = gem_metrics(R[:2], BASE)  # round 3 not run yet: its task is a column, not a row
    assert two == {"ACC": 1.75, "BWT": -0.5, "FWT": 0.5, "T": 2, "lower_is_better": True, "missing": []}
    one = gem_metrics(R[:1], BASE)  # T = 1: nothing trained before round 1, nothing to forget yet
    assert one == {"ACC": 1.0, "BWT": None, "FWT": None, "T": 1, "lower_is_better": True, "missing": []}
    assert gem_metrics([], BASE)["ACC"] is None


def test_gem_none_entries():
    holes = [list(r) for r in R]
    holes[2][0] = None  # the last model not evaluated on task 1: ACC and BWT need it, FWT does not
    m = gem_metrics(holes, BASE)
    assert (m["ACC"], m["BWT"], m["FWT"], m["missing"]) == (None, None, 0.75, ["R[2][0]"])
    m = gem_metrics(R, [2.0, None, 4.5])  # the base model not evaluated on task 2: FWT only
    assert (m["ACC"], m["BWT"], m["FWT"], m["missing"]) == (5.5 / 3, -0.625, None, ["base[1]"])
    unused = [list(r) for r in R]
    unused[0][2] = None  # an entry no formula uses
    assert gem_metrics(unused, [None, 3.5, 4.5]) == gem_metrics(R, BASE)


def test_gem_bad_input():
    with pytest.raises(ValueError, match=r"R\[1\] has 2 entries but there are 3 tasks"):
        gem_metrics([R[0], [1.0, 2.0]], BASE)
    with pytest.raises(ValueError, match="R has 3 rows but only 2 tasks"):
        gem_metrics([r[:2] for r in R], BASE[:2])
    with pytest.raises(ValueError, match=r"R\[0\]\[1\] = '3.0'"):
        gem_metrics([[1.0, "3.0", 4.0]], BASE)


def _matrix(**extra) -> dict:
    """Rounds r1 and r2 promoted, r3 refused (no row): what pipeline.py passes after a pipeline that stopped."""
    tasks = ["r1", "r2", "r3"]
    rows = [{"round": t, "version": f"v000{i + 1}", "scores": dict(zip(tasks, R[i]))} for i, t in enumerate(tasks[:2])]
    return {"metric": "nll", "tasks": tasks, "base": dict(zip(tasks, BASE)), "rows": rows, **extra}


def _check_png(data: bytes, size: tuple[int, int] | None = None) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    Image.open(io.BytesIO(data)).verify()  # the whole file decodes (CRCs, chunks)
    img = Image.open(io.BytesIO(data)).convert("L")
    assert size is None or img.size == size
    lo, hi = img.getextrema()
    assert hi - lo > 100 and len(data) > 10_000  # not blank


def test_write_report_local(tmp_path):
    rounds = [{"name": "r1", "version": "v0001", "decision": "promoted", "verdict": "accepted"},
              {"name": "r2", "version": "v0002", "decision": "promoted", "verdict": "accepted"},
              {"name": "r3", "version": "v0003", "decision": "refused", "verdict": "r1 over budget"}]
    matrix = _matrix(exit_code=3, current="v0002", rounds=rounds)
    out = write_report(tmp_path, matrix)
    report = json.loads((tmp_path / "pipeline_report.json").read_text())
    assert report == out
    assert report["R"] == [R[0], R[1]] and report["tasks"] == ["r1", "r2", "r3"]
    assert (report["ACC"], report["BWT"], report["FWT"], report["T"]) == (1.75, -0.5, 0.5, 2)
    assert report["base"] == {"r1": 2.0, "r2": 3.5, "r3": 4.5} and report["metric"] == "nll"
    assert (report["exit_code"], report["current"], report["rounds"]) == (3, "v0002", rounds)  # the caller's keys
    assert report["rows"] == matrix["rows"]

    md = (tmp_path / "pipeline_report.md").read_text()
    assert "Pipeline exit code 3; current version v0002." in md
    assert "- **BWT** = -0.5000" in md and "- **FWT** = +0.5000" in md and "- **ACC** = 1.7500" in md
    assert "| base | 2.0000 | 3.5000 | 4.5000 |" in md
    assert "| after r2 (v0002) | 1.5000 | **2.0000** | 3.5000 |" in md
    assert "| r3 | v0003 | refused | r1 over budget |" in md
    for png in (HEATMAP, LINES):
        assert f"]({PLOTS_DIR}/{png})" in md
        _check_png((tmp_path / PLOTS_DIR / png).read_bytes())
    _check_png((tmp_path / PLOTS_DIR / LINES).read_bytes(), (800, 450))
    assert not [p for p in tmp_path.rglob(".*")], "temp files left behind"


def test_write_report_none_and_defaults(tmp_path):
    matrix = _matrix()
    del matrix["rows"][1]["scores"]["r1"]  # r2's model not evaluated on task r1
    report = write_report(Registry(tmp_path / "reg"), matrix)  # a Registry object, as pipeline.py holds one
    assert report["R"][1] == [None, 2.0, 3.5]
    assert (report["ACC"], report["BWT"], report["FWT"], report["missing"]) == (None, None, 0.5, ["R[1][0]"])
    assert report["rounds"] == [{"name": "r1", "version": "v0001"}, {"name": "r2", "version": "v0002"}]
    assert json.loads((tmp_path / "reg" / "pipeline_report.json").read_text())["R"][1][0] is None
    md = (tmp_path / "reg" / "pipeline_report.md").read_text()
    assert "| after r2 (v0002) | n/a | **2.0000** | 3.5000 |" in md and "not evaluated" in md
    _check_png((tmp_path / "reg" / PLOTS_DIR / HEATMAP).read_bytes())


def test_write_report_non_finite(tmp_path):
    matrix = _matrix()
    matrix["rows"][1]["scores"]["r1"] = float("nan")  # a diverged model
    report = write_report(tmp_path, matrix)
    text = (tmp_path / "pipeline_report.json").read_text()
    assert "NaN" not in text and json.loads(text) == report  # strict JSON: NaN is null
    assert report["R"][1][0] is None and report["ACC"] is None and report["BWT"] is None and report["FWT"] == 0.5
    assert "| after r2 (v0002) | nan | **2.0000** | 3.5000 |" in (tmp_path / "pipeline_report.md").read_text()
    _check_png((tmp_path / PLOTS_DIR / HEATMAP).read_bytes())


def test_write_report_rows_out_of_order(tmp_path):
    matrix = _matrix()
    matrix["rows"].reverse()
    with pytest.raises(ValueError, match=r"rows\[0\] is round 'r2' but task 0 is 'r1'"):
        write_report(tmp_path, matrix)
    assert not list(tmp_path.iterdir())


def test_heatmap_cells_hold_the_values():
    labels = ["base", "r1 (v0001)", "r2 (v0002)", "r3 (v0003)"]
    fig = heatmap_figure(R, BASE, ["r1", "r2", "r3"], labels, "nll")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert len(texts) == 12  # (base + 3 rounds) x 3 tasks
    assert texts[:3] == ["2.000", "3.500", "4.500"]
    assert texts[3] == "1.000\n-50.0%" and texts[11] == "1.250\n-72.2%"  # (1 - 2) / 2, (1.25 - 4.5) / 4.5
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels


def test_row_from_eval_report():
    # the report an eval job writes, made by the same Monitor calls as jobs.evaluate: step 0 = base, 1 = the model
    monitor = Monitor([Suite(name, "nll", "loss") for name in ("r1", "general")], policy="report")
    monitor.record(0, {"r1": 2.0, "general": 9.0})
    monitor.record(1, {"r1": 1.5, "general": 9.5})
    chosen, decision = monitor.choose(monitor.steps[-1], [])
    report = json.loads(json.dumps(monitor.report(chosen, decision)))  # as read back from report.json
    assert row_from_eval_report(report, ["r1", "r2"]) == ({"r1": 2.0, "r2": None}, {"r1": 1.5, "r2": None})


def test_write_report_on_s3(s3_endpoint, monkeypatch):
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    make_bucket(s3_endpoint, "forgetting-unit")
    url = "s3://forgetting-unit/registry"
    write_report(url, _matrix(current="v0002"))
    keys = sorted(list_keys(s3_endpoint, "forgetting-unit", "registry/"))
    assert keys == ["registry/pipeline_report.json", "registry/pipeline_report.md",
                    f"registry/{PLOTS_DIR}/{HEATMAP}", f"registry/{PLOTS_DIR}/{LINES}"]
    report = json.loads(UrlPath(url + "/pipeline_report.json").read_text())
    assert (report["R"], report["BWT"], report["current"]) == ([R[0], R[1]], -0.5, "v0002")
    assert "| after r1 (v0001) | **1.0000** | 3.0000 | 4.0000 |" in UrlPath(url + "/pipeline_report.md").read_text()
    for png in (HEATMAP, LINES):
        _check_png(UrlPath(f"{url}/{PLOTS_DIR}/{png}").read_bytes())


def test_write_report_round_one_refused(tmp_path):
    """Round 1 refused: no row, no base (the pipeline evaluates only promoted models); the report still says so."""
    rounds = [{"name": "r1", "version": "v0001", "decision": "refused", "verdict": "no new-task gain"}]
    report = write_report(tmp_path, {"metric": "nll", "tasks": ["r1", "r2"], "base": {}, "rows": [], "exit_code": 3,
                                     "current": None, "rounds": rounds})
    assert (report["R"], report["ACC"], report["BWT"], report["FWT"], report["T"]) == ([], None, None, None, 0)
    md = (tmp_path / "pipeline_report.md").read_text()
    assert "Pipeline exit code 3; current version none." in md and "| r1 | v0001 | refused | no new-task gain |" in md
    for png in (HEATMAP, LINES):
        _check_png((tmp_path / PLOTS_DIR / png).read_bytes())
