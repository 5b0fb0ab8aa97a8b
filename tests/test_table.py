"""`pinn-balance table`: the smoke run CI keeps alive, the resume after a kill, the report's arithmetic, bad files."""

import importlib
import json
import math
import os

import pytest

from paddle_pinn_balance import cli, table

train = importlib.import_module("paddle_pinn_balance.train")  # the module (the package exports the function)
REAL_TRAIN = train.train

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)

SMALL = """
iters: 3
seeds: 2
problems:
  - problem: poisson1d
    settings: {width: 8, n_res: 16, n_bc: 4, optimizer: adam, lr: 1.0e-3}
  - label: toy
    problem: gradnorm_toy
    settings: {dim_in: 4, dim_out: 3, width: 8, depth: 2, batch_size: 8, test_n: 16}
    skip: [lra]
    iters: 2
methods:
  - label: sum
    balancer: {name: sum}
  - label: lra
    balancer: {name: lr_annealing, update_freq: 1}
  - label: ntk
    balancer: {name: ntk, update_freq: 2}
"""


def _write(tmp_path, text=SMALL, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _count_trainings(monkeypatch, fail_at=None):
    calls = []
    real = REAL_TRAIN

    def counting(problem, config, iters, seed=0, **kwargs):
        calls.append((problem.name, config["name"], iters, seed))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # a killed table
        return real(problem, config, iters, seed=seed, **kwargs)

    monkeypatch.setattr(train, "train", counting)
    return calls


def test_shipped_table_file_validates():
    spec = table.load_table(os.path.join(ROOT, "examples", "table.yaml"))
    labels = [m["label"] for m in spec["methods"]]
    assert {"sum", "lra", "ntk", "grad_norm", "grad_norm_ratio", "relobralo", "softadapt", "uncertainty",
            "pcgrad", "conflict_free"} <= set(labels)
    assert {"convection1d", "allen_cahn1d", "poisson2d_pieces", "helmholtz"} <= {p["label"] for p in spec["problems"]}
    assert spec["seeds"] == [0, 1, 2]


def test_smoke_table_writes_every_cell(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["table", _write(tmp_path), "--seeds", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "[1/5] poisson1d / sum / seed 0" in printed and "median error over seeds" in printed
    data = json.loads((out / "results.json").read_text())
    assert data["problems"] == ["poisson1d", "toy"] and data["methods"] == ["sum", "lra", "ntk"]
    assert data["seeds"] == [0]
    cells = {(r["problem"], r["method"]): r for r in data["records"]}
    assert sorted(cells) == [("poisson1d", "lra"), ("poisson1d", "ntk"), ("poisson1d", "sum"), ("toy", "ntk"),
                             ("toy", "sum")]  # lra skipped on the toy by the file
    assert "kernels" in cells[("toy", "ntk")]["skipped"]  # not applicable: the toy has no NTK kernels
    assert "n/a" in printed
    for key in [("poisson1d", "sum"), ("poisson1d", "lra"), ("poisson1d", "ntk"), ("toy", "sum")]:
        r = cells[key]
        assert r["seeds"] == [0] and len(r["errors"]) == 1 and math.isfinite(r["errors"][0])
        assert r["median"] == r["min"] == r["max"] == r["errors"][0]
        assert r["iters"] == (2 if key[0] == "toy" else 3)
        assert set(r["weights"][0]) == ({"res", "bc"} if key[0] == "poisson1d" else {"task1", "task2"})
    assert cells[("poisson1d", "sum")]["time_ratio"] == pytest.approx(1.0)
    assert cells[("poisson1d", "lra")]["time_ratio"] > 0
    pytest.importorskip("matplotlib")
    assert (out / "heatmap.png").stat().st_size > 5_000


def test_a_killed_table_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    path, out = _write(tmp_path), str(tmp_path / "out")
    calls = _count_trainings(monkeypatch, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["table", path, "--out", out, "--quiet", "--no-plots"])
    first = json.loads(open(os.path.join(out, "results.json")).read())
    done = {(r["problem"], r["method"], s) for r in first["records"] if "runs" in r for s in r["runs"]}
    assert len(done) == 3  # three cells finished before the kill, each written at once

    calls = _count_trainings(monkeypatch)
    assert cli.main(["table", path, "--out", out, "--quiet", "--no-plots"]) == 0
    assert "done before" in capsys.readouterr().out
    # 4 problem-method pairs that train x 2 seeds = 8 cells; 3 were done
    assert len(calls) == 5
    final = json.loads(open(os.path.join(out, "results.json")).read())
    by = {(r["problem"], r["method"]): r for r in final["records"]}
    for r in first["records"]:
        for seed, run in r.get("runs", {}).items():
            assert by[(r["problem"], r["method"])]["runs"][seed] == run  # kept, not retrained

    # a finished table trains nothing again; a changed budget retrains (the cells are not those of the file)
    calls.clear()
    assert cli.main(["table", path, "--out", out, "--quiet", "--no-plots"]) == 0
    assert calls == []
    assert cli.main(["table", path, "--out", out, "--quiet", "--no-plots", "--iters", "1"]) == 0
    assert len(calls) == 8 and {c[2] for c in calls} == {1}


def test_summary_arithmetic_on_hand_made_records():
    rec = {"problem": "p", "method": "m", "balancer": {"name": "lr_annealing"},
           "runs": {"0": {"error": 0.3, "weights": {"a": 1.0}, "time_per_step_ms": 2.0},
                    "2": {"error": 0.1, "weights": {"a": 2.0}, "time_per_step_ms": 4.0},
                    "1": {"error": 0.2, "weights": {"a": 3.0}, "time_per_step_ms": 9.0}}}
    s = table.summarise(rec)
    assert s["seeds"] == [0, 1, 2] and s["errors"] == [0.3, 0.2, 0.1]
    assert (s["median"], s["min"], s["max"]) == (0.2, 0.1, 0.3)
    assert s["weights"] == [{"a": 1.0}, {"a": 3.0}, {"a": 2.0}]
    plain = table.summarise({"problem": "p", "method": "sum", "balancer": {"name": "sum"},
                             "runs": {"0": {"error": 1.0, "weights": {}, "time_per_step_ms": 2.0},
                                      "1": {"error": 1.0, "weights": {}, "time_per_step_ms": 3.0}}})
    records = [plain, s]
    table._add_time_ratios(records)
    assert plain["time_ratio"] == 1.0 and s["time_ratio"] == pytest.approx(4.0 / 2.5)
    # a diverged seed: the median is nan (not hidden), min/max over the finite ones
    bad = table.summarise({"problem": "p", "method": "x", "balancer": {"name": "sum"},
                           "runs": {"0": {"error": float("nan"), "weights": {}, "time_per_step_ms": 1.0},
                                    "1": {"error": 0.5, "weights": {}, "time_per_step_ms": 1.0}}})
    assert math.isnan(bad["median"]) and bad["min"] == bad["max"] == 0.5
    text = table.table_text({"problems": ["p"], "methods": ["sum", "m"], "seeds": [0, 1, 2],
                             "records": records})
    assert "2.00e-01 [1.00e-01, 3.00e-01]" in text and "| p | 1.00e+00 | 2.00e-01 |" in text
    assert "1.60x" not in text and "vs plain" not in text  # no time column (cells run under different loads)


@pytest.mark.parametrize("text, needle", [
    ("problems: []\nmethods: [{label: a, balancer: {name: sum}}]", "`problems` must be a non-empty list"),
    ("iters: 2\nproblems: [{problem: burgers}]\nmethods: [{label: a, balancer: {name: sum}}]", "unknown problem"),
    ("iters: 2\nproblems: [{problem: poisson1d}]\nmethods: [{label: a, balancer: {name: nope}}]", "unknown balancer"),
    ("problems: [{problem: poisson1d}]\nmethods: [{label: a, balancer: {name: sum}}]", "no `iters`"),
    ("iters: 2\nproblems: [{problem: poisson1d, skip: [b]}]\nmethods: [{label: a, balancer: {name: sum}}]", "skip"),
    ("iters: 2\nseeds: 0\nproblems: [{problem: poisson1d}]\nmethods: [{label: a, balancer: {name: sum}}]", "seeds"),
    ("iters: 2\nproblems: [{problem: poisson1d, settings: {width: -1}}]\nmethods: [{label: a, balancer: {name: sum}}]",
     "bad settings"),
    ("iters: 2\nbogus: 1\nproblems: [{problem: poisson1d}]\nmethods: [{label: a, balancer: {name: sum}}]", "bogus"),
    ("iters: [", "malformed YAML"),
])
def test_bad_table_files_give_one_line_and_exit_code_2(tmp_path, capsys, text, needle):
    assert cli.main(["table", _write(tmp_path, text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("pinn-balance table: error:")
