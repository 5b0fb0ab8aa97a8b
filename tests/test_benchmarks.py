"""Benchmark problems (Klein-Gordon, Poisson, Wave, GradNorm toy), ``pinn-balance run`` and ``pinn-balance report``."""

import glob
import json
import math
import os

import numpy as np
import paddle
import pytest
import yaml
from reference import DEVICE, DTYPE, Analytic, fd_second

from paddle_pinn_balance import NTKWeighting, cli
from paddle_pinn_balance.problems import PROBLEMS, GradNormToy, KleinGordon1D, Poisson1D, Wave1D, get_problem
from paddle_pinn_balance.problems.nets import sequential_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = sorted(glob.glob(os.path.join(ROOT, "paddle_pinn_balance", "benchmarks", "*.yaml")))
#: smoke length: the pipeline end to end, a few seconds per file
SMOKE_ITERS = 20
#: the full-size Wave net (3 x 500) costs ~1 s per step and ~20-40 s per NTK update on a 2-core CPU: its smoke
#: run keeps every other setting of the file (balancers, chunk size, points) on a smaller net
SMOKE_OVERRIDES = {"wave1d_full.yaml": ["--set", "layers=[2,32,32,32,1]"]}
#: Helmholtz, seed 0: LRA's error is below plain's at every 100th step from 1 to 3000 (> 3x from ~200 on, as plain
#: blows up to ~6 first); 1000 steps x 2 runs take ~40 s on a loaded 2-core CPU (1500: ~65 s)
EFFECT_ITERS = 1000


# ------------------------------------------------------------------ the problems themselves


def test_registry_names_every_problem():
    assert sorted(PROBLEMS) == ["allen_cahn1d", "convection1d", "gradnorm_toy", "helmholtz", "klein_gordon",
                                "poisson1d", "poisson2d_pieces", "wave1d"]
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("burgers")


def test_klein_gordon_exact_solution_and_data():
    p = KleinGordon1D()
    x = np.random.default_rng(0).uniform(0.05, 0.95, size=(200, 2))
    u = p.exact(x)
    lhs = fd_second(p.exact, x, 1) - fd_second(p.exact, x, 0) + u**3
    np.testing.assert_allclose(lhs, p.forcing(x), atol=1e-4 * np.abs(p.forcing(x)).max())
    s = np.linspace(0, 1, 11)
    np.testing.assert_allclose(p.exact(np.stack([s, 0 * s], 1))[:, 0], s, atol=1e-12)  # u(x, 0) = x
    # independent u: x cos(5 pi t) + (x t)^3
    np.testing.assert_allclose(u[:, 0], x[:, 0] * np.cos(5 * math.pi * x[:, 1]) + (x[:, 0] * x[:, 1]) ** 3)


def test_klein_gordon_losses_vanish_for_the_exact_solution():
    p = KleinGordon1D(batch_size=64)
    exact = Analytic(lambda x, t: x * paddle.cos(5 * math.pi * t) + (x * t) ** 3)
    losses = p.losses(exact, p.sample(np.random.default_rng(1)))
    assert sorted(losses) == ["bcs", "ics", "res"]
    assert float(losses["res"]) < 1e-6 * 250**2 and float(losses["ics"]) < 1e-8 and float(losses["bcs"]) < 1e-10
    # u = 0: ics = mean(x^2) (value) + 0 (velocity); bcs = 0 (x = 0 edge) + mean(u(1, t)^2)
    zero = Analytic(lambda x, t: 0.0 * (x * t) ** 2)
    batch = p.sample(np.random.default_rng(2))
    losses = p.losses(zero, batch)
    np.testing.assert_allclose(float(losses["ics"]), float((batch["x_ic"][:, 0] ** 2).mean()), rtol=1e-5)
    edge = p.exact(batch["x_bc"].numpy().astype(np.float64)[64:])
    np.testing.assert_allclose(float(losses["bcs"]), (edge**2).mean(), rtol=1e-5)


def test_wave_exact_solution_and_losses():
    p = Wave1D(layers=(2, 8, 1), batch_size=50)
    x = np.random.default_rng(0).uniform(0.05, 0.95, size=(200, 2))
    np.testing.assert_allclose(fd_second(p.exact, x, 1), 4 * fd_second(p.exact, x, 0), atol=2e-3 * 16 * 40)
    s = np.linspace(0, 1, 11)
    np.testing.assert_allclose(p.exact(np.stack([s, 0 * s], 1))[:, 0],
                               np.sin(math.pi * s) + 0.5 * np.sin(4 * math.pi * s), atol=1e-12)

    def u(x, t):
        return (paddle.sin(math.pi * x) * paddle.cos(2 * math.pi * t)
                + 0.5 * paddle.sin(4 * math.pi * x) * paddle.cos(8 * math.pi * t))

    losses = p.losses(Analytic(u), p.sample(np.random.default_rng(1)))
    assert sorted(losses) == ["res", "u", "ut"]
    assert float(losses["u"]) < 1e-10 and float(losses["ut"]) < 1e-8 and float(losses["res"]) < 1e-4 * 400**2


def test_poisson_exact_solution_losses_and_ntk_parameterisation():
    p = Poisson1D()
    x = np.linspace(0.05, 0.95, 50)[:, None]
    np.testing.assert_allclose(fd_second(p.exact, x, 0), p.forcing(x), atol=1e-3 * 160)
    losses = p.losses(Analytic(lambda x: paddle.sin(4 * math.pi * x)), p.sample(None))
    assert float(losses["bc"]) < 1e-10 and float(losses["res"]) < 1e-6 * 160**2
    b = p.sample(None)
    assert b["x_res"].shape == [100, 1] and b["x_bc"].shape == [100, 1]
    assert float(b["x_bc"].sum()) == 50.0  # 50 points at x = 0, 50 at x = 1
    net = p.build_model(0)
    # 1 -> 100 (N(0,1) weights and biases), tanh, x 1/sqrt(100), 100 -> 1
    lin1, lin2 = net[0], net[3]
    assert abs(net[2].factor - 0.1) < 1e-12
    h = np.tanh(b["x_res"].numpy() @ lin1.weight.numpy() + lin1.bias.numpy()) * 0.1
    np.testing.assert_allclose(net(b["x_res"]).numpy(), h @ lin2.weight.numpy() + lin2.bias.numpy(), rtol=1e-5,
                               atol=1e-6)  # float32: a 1-ulp difference of one entry near 0
    assert 0.7 < lin1.weight.numpy().std() < 1.3


@pytest.mark.parametrize("make", [lambda: Poisson1D(width=16), lambda: Wave1D(layers=(2, 8, 8, 1), batch_size=6)])
def test_ntk_kernels_take_the_fast_path_and_match_the_loop(make):
    p = make()
    net = p.build_model(0)
    batch = p.sample(np.random.default_rng(0))
    fast = NTKWeighting(net, kernels=p.kernels(batch), update_freq=1, path="expanded")
    slow = NTKWeighting(net, kernels=p.kernels(batch), update_freq=1, path="loop")
    fast(p.losses(net, batch), 0)
    slow(p.losses(net, batch), 0)
    assert fast.last_path == "expanded"
    for name, value in fast.traces().items():
        np.testing.assert_allclose(value, slow.traces()[name], rtol=1e-4)


def test_gradnorm_toy_targets_heads_and_metric():
    p = GradNormToy(dim_in=12, dim_out=5, width=8, test_n=40)
    x = p.test_grid()
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0)
    y = p.exact(x)
    np.testing.assert_allclose(y[:, 5:], 100 * np.tanh(x @ (p.B + p.eps[1]).T))
    assert np.abs(y[:, :5]).max() <= 1.0
    net = p.build_model(3)
    assert net.get_last_shared_layer() is net.trunk[-2] and isinstance(net.trunk[-2], paddle.nn.Linear)
    assert net(paddle.to_tensor(x, dtype=DTYPE)).shape == [40, 10]
    assert abs(p.error(net) - 2.0) < 1e-6  # sum_i L_i(0)/L_i(0) = T at the start
    losses = p.losses(net, p.sample(np.random.default_rng(0)))
    assert sorted(losses) == ["task1", "task2"] and float(losses["task2"]) > 100 * float(losses["task1"])


def test_sequential_mlp_validates():
    with pytest.raises(ValueError, match="parameterisation"):
        sequential_mlp((1, 4, 1), parameterisation="mean_field")
    with pytest.raises(ValueError, match="widths"):
        sequential_mlp((1,))


# ------------------------------------------------------------------ pinn-balance run: every benchmark, smoke mode


def test_every_benchmark_is_listed():
    names = {os.path.basename(p) for p in BENCHMARKS}
    assert {"helmholtz2d.yaml", "klein_gordon1d.yaml", "poisson1d_gd.yaml", "poisson1d_adam.yaml",
            "wave1d_full.yaml", "wave1d_small.yaml", "gradnorm_toy.yaml", "helmholtz2d_gradnorm.yaml"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHMARKS, ids=[os.path.basename(p) for p in BENCHMARKS])
def test_benchmark_smoke(path, tmp_path, capsys):
    out = tmp_path / "run"
    extra = SMOKE_OVERRIDES.get(os.path.basename(path), [])
    argv = ["run", path, "--iters", str(SMOKE_ITERS), "--seeds", "1", "--out", str(out), "--quiet", "--no-plots"]
    assert cli.main(argv + extra) == 0
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    data = json.loads((out / "results.json").read_text())
    assert data["iters"] == SMOKE_ITERS and data["seeds"] == [0] and data["problem"] == spec["problem"]
    assert list(data["methods"]) == [m["label"] for m in spec["methods"]]
    for m in spec["methods"]:
        got = data["methods"][m["label"]]
        assert math.isfinite(got["error_mean"]) and got["error_mean"] > 0 and len(got["errors"]) == 1
        assert got["balancer"] == m["balancer"] and got["published"] == m.get("published")
        h = got["history"]
        assert h["step"][-1] == SMOKE_ITERS - 1 and all(len(v) == len(h["step"]) for v in h["weight"].values())
        assert got["time_per_step_ms"] > 0
    assert data["plots"] == []


@pytest.mark.slow
def test_run_one_method_several_seeds_and_report(tmp_path, capsys):
    path = os.path.join(ROOT, "paddle_pinn_balance", "benchmarks", "poisson1d_adam.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["run", path, "--method", "ntk_fixed", "--iters", "5", "--seeds", "2", "--out", str(a),
                     "--quiet"]) == 0
    data = json.loads((a / "results.json").read_text())
    assert list(data["methods"]) == ["ntk_fixed"] and data["seeds"] == [0, 1]
    m = data["methods"]["ntk_fixed"]
    assert len(m["runs"]) == 2 and m["runs"][0]["seed"] == 0 and m["runs"][1]["seed"] == 1
    np.testing.assert_allclose(m["error_mean"], np.mean(m["errors"]))
    np.testing.assert_allclose(m["error_std"], np.std(m["errors"]))
    assert m["runs"][0]["rel_l2"] != m["runs"][1]["rel_l2"]  # different seeds, different nets
    # the weights are computed at step 0 only (update_freq larger than the run), then kept
    w = m["history"]["weight"]["bc"]
    assert w[0] > 1.0 and len(set(w)) == 1
    assert cli.main(["run", "gradnorm_toy", "--iters", "3",  # a shipped benchmark by name
                     "--out", str(b), "--quiet"]) == 0
    capsys.readouterr()
    rep = tmp_path / "report"
    assert cli.main(["report", str(a), str(b), "--out", str(rep)]) == 0
    table = capsys.readouterr().out
    assert "| Poisson 1D | ntk_fixed | 2 | 5 |" in table and "1.63e-03" in table
    assert "| GradNorm toy regression | gradnorm | 1 | 3 |" in table and "normalised loss" in table
    assert (rep / "report.md").read_text().count("\n| ") == 4  # header row... plus 3 method rows
    pytest.importorskip("matplotlib")
    assert (rep / "comparison.png").stat().st_size > 5_000
    assert (rep / "curves_a.png").stat().st_size > 5_000 and (rep / "curves_b.png").stat().st_size > 5_000
    plots = json.loads((a / "results.json").read_text())["plots"]
    assert sorted(plots) == ["fields_ntk_fixed.png", "losses.png", "rel_l2.png", "weights.png"]
    assert sorted(json.loads((b / "results.json").read_text())["plots"]) == ["losses.png", "rel_l2.png",
                                                                            "weights.png"]  # no fields: not a PDE
    # a folder holding run folders works as well
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "r2")]) == 0


@pytest.mark.slow
def test_lra_beats_plain_on_helmholtz_after_a_short_run(tmp_path):
    """The one real-effect check: same seed, same batches; LRA's error ends below plain's."""
    path = os.path.join(ROOT, "paddle_pinn_balance", "benchmarks", "helmholtz2d.yaml")
    out = tmp_path / "effect"
    assert cli.main(["run", path, "--method", "plain", "--method", "lra", "--iters", str(EFFECT_ITERS),
                     "--out", str(out), "--quiet", "--no-plots"]) == 0
    m = json.loads((out / "results.json").read_text())["methods"]
    assert m["lra"]["error_mean"] < m["plain"]["error_mean"] / 3  # seed 0: ~1.0 vs ~6.6 (design/results.md)
    assert m["lra"]["weights"]["bc"] > 10.0  # the boundary weight grew, as in the paper


# ------------------------------------------------------------------ errors: one line on stderr, exit code 2


def _write(tmp_path, text, name="bench.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = "problem: poisson1d\niters: 2\nmethods:\n  - label: equal\n    balancer: {name: sum}\n"


@pytest.mark.parametrize(
    "text, extra, needle",
    [
        (None, [], "not found"),
        ("problem: [poisson1d\niters: 2\n", [], "malformed YAML"),
        ("- just\n- a list\n", [], "mapping"),
        ("", [], "mapping"),
        (GOOD.replace("poisson1d", "burgers"), [], "unknown problem 'burgers'"),
        (GOOD, ["--method", "ntk"], "unknown method 'ntk'"),
        (GOOD.replace("name: sum", "name: magic"), [], "unknown balancer 'magic'"),
        (GOOD.replace("name: sum", "name: sum, alpha: 1"), [], "unknown key(s) ['alpha']"),
        (GOOD.replace("iters: 2", "iters: 0"), [], "`iters`"),
        (GOOD.replace("iters: 2\n", ""), [], "missing key `iters`"),
        (GOOD + "settings: {width: 10, colour: red}\n", [], "bad settings"),
        (GOOD, ["--set", "width"], "KEY=VALUE"),
        (GOOD.replace("name: sum", "name: lr_annealing, ref: res, update_freq: 0"), [], "method 'equal': "),
        (GOOD.replace("name: sum", "name: ntk, reduction: median"), [], "reduction"),
        (GOOD, ["--set", "width=-3"], "bad settings"),
        (GOOD + "seeds: -1\n", [], "`seeds`"),
        (GOOD + "metods: []\n", [], "unknown key(s) ['metods']"),
        (GOOD + "  - label: equal\n    balancer: {name: sum}\n", [], "unique"),
        (GOOD.replace("    balancer: {name: sum}\n", ""), [], "`label` and `balancer`"),
    ],
)
def test_run_errors_give_one_line_and_exit_code_2(tmp_path, capsys, text, extra, needle):
    path = str(tmp_path / "missing.yaml") if text is None else _write(tmp_path, text)
    assert cli.main(["run", path, "--out", str(tmp_path / "out"), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("pinn-balance run: error:")
    assert needle in captured.err, captured.err
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_run_takes_a_shipped_name_and_lists_the_names_for_an_unknown_one(tmp_path, capsys, monkeypatch):
    from paddle_pinn_balance import runner

    names = [os.path.basename(p)[:-5] for p in BENCHMARKS]
    assert runner.shipped_benchmarks() == names and "helmholtz2d" in names
    monkeypatch.chdir(tmp_path)  # an empty folder: the name resolves to the package's file
    shipped = os.path.join(ROOT, "paddle_pinn_balance", "benchmarks", "poisson1d_gd.yaml")
    for name in ("poisson1d_gd", "poisson1d_gd.yaml"):
        assert os.path.samefile(runner.benchmark_path(name), shipped)
        assert os.path.samefile(runner.load_benchmark(name)["config_file"], shipped)
    (tmp_path / "poisson1d_gd.yaml").write_text(GOOD)  # a file of that name in the folder is taken as a path
    assert runner.benchmark_path("poisson1d_gd.yaml") == "poisson1d_gd.yaml"
    assert runner.load_benchmark("poisson1d_gd.yaml")["iters"] == 2
    for bad in ("helmholtz3d", os.path.join("sub", "helmholtz2d"), "helmholtz2d.yml"):
        assert cli.main(["run", bad, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"pinn-balance run: error: {bad}: config file not found")
        assert f"shipped: {names}" in err, err
    assert not (tmp_path / "out").exists()


def test_report_errors_give_one_line_and_exit_code_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert cli.main(["report", str(tmp_path)]) == 2  # no results.json anywhere
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    assert cli.main(["report", str(bad)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("pinn-balance report: error:") for line in lines)


def _run_benchmark(name, *args):
    """Run benchmarks/<name>.py in a fresh interpreter (it sets thread counts and PaddleScience's logger)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PADDLE_PINN_BALANCE_DEVICE=DEVICE)  # the suite's device (the benchmarks read it)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{name}.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_step_overhead_benchmark_runs(tmp_path):
    """The cost benchmark end to end (a tiny run: the numbers themselves are not asserted)."""
    out = tmp_path / "step.json"
    _run_benchmark("step_overhead", "--terms", "2", "--freqs", "1", "10", "--rounds", "2", "--block", "3",
                   "--no-ppsci", "--memory", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {(r["method"], r["update_freq"]) for r in rows} == {
        (m, f) for m in ("lra", "gradnorm", "ntk_grad_norm") for f in (1, 10)}
    assert all(r["ratio"] > 0 and r["peak_mb"] > 0 for r in rows)


@pytest.mark.slow
def test_solver_overhead_benchmark_runs(tmp_path):
    pytest.importorskip("ppsci")
    out = tmp_path / "solver.json"
    _run_benchmark("solver_overhead", "--terms", "2", "--freqs", "1", "--rounds", "1", "--iters", "2",
                   "--warmup", "1", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert {r["method"] for r in rows} == {"plain", "lra", "gradnorm", "ntk_grad_norm", "ppsci_gradnorm", "ppsci_ntk"}
    assert all(r["ratio"] > 0 for r in rows)


@pytest.mark.slow
def test_solver_overhead_times_a_baseline_checkout_beside(tmp_path):
    """``--baseline``: another checkout's methods (here this one's own) timed in the same process, rows name@base."""
    pytest.importorskip("ppsci")
    out = tmp_path / "solver.json"
    _run_benchmark("solver_overhead", "--terms", "2", "--freqs", "1", "--rounds", "1", "--iters", "2",
                   "--warmup", "1", "--baseline", ROOT, "--json", str(out))
    methods = {r["method"] for r in json.loads(out.read_text())["results"]}
    assert {"lra@base", "gradnorm@base", "ntk_grad_norm@base", "lra"} <= methods


@pytest.mark.slow
def test_public_ops_benchmark_runs(tmp_path):
    """Private vs public ops, one tiny process per form (the numbers themselves are not asserted)."""
    out = tmp_path / "ops.json"
    _run_benchmark("public_ops", "--freqs", "1", "--rounds", "1", "--block", "2", "--pairs", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    assert {r["method"] for r in rows} >= {"lra", "gradnorm"} and all(r["private"] > 0 and r["public"] > 0
                                                                      for r in rows)
