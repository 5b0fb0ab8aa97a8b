"""The composed recipes (examples/recipes/*.yaml): the network options, the causal residual inside the problems,
the recorded schedule, the progress files of a run, and the PaddleScience-side comparison script."""

import glob
import json
import math
import os

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import CausalResidual
from paddle_pinn_balance.per_point import per_point_sq_grad_norms
from paddle_pinn_balance.problems import AllenCahn1D, Convection1D
from paddle_pinn_balance.problems.recipe import RecipeNet, check_net
from paddle_pinn_balance.runner import load_benchmark, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "examples", "recipes", "*.yaml"))
                 if os.path.basename(p) != "table.yaml")
SMALL = ["n_res=32", "batch_size=16", "net={width: 8, depth: 2, fourier_dim: 8}"]
SMALL_AC = ["ref_n=32", "ref_dt=0.01", "save_dt=0.05"]
NET = {"width": 8, "depth": 2, "fourier_dim": 8}


def test_recipe_files_exist():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"convection.yaml", "allen_cahn.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_recipe_yaml_loads_and_every_method_runs_a_few_steps(path, tmp_path):
    spec = load_benchmark(path)  # as written: settings valid, methods known
    problem = spec["_problem"]
    assert problem.net is not None and problem.causal is not None and problem.loss_names == ("res", "ic")
    small = load_benchmark(path, overrides=SMALL + (SMALL_AC if spec["problem"] == "allen_cahn1d" else []))
    assert run(small, small["methods"], iters=3, seeds=[0], out=str(tmp_path), progress=False, plots=False) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "partial" not in data and set(data["methods"]) == {m["label"] for m in spec["methods"]}
    for m in data["methods"].values():
        h = m["history"]
        assert np.isfinite(m["rel_l2"]) and set(h["loss"]) == {"res", "ic"}
        assert len(h["wall_s"]) == len(h["step"]) and len(h["monitor"]["causal_eps"]) == len(h["step"])


def test_recipe_table_rows_load_with_the_recipe_settings():
    from paddle_pinn_balance.table import load_table

    spec = load_table(os.path.join(ROOT, "examples", "recipes", "table.yaml"))
    rows = {p["label"]: p for p in spec["problems"]}
    assert {"convection1d", "convection1d+recipe", "allen_cahn1d", "allen_cahn1d+recipe"} <= set(rows)
    for name in ("convection", "allen_cahn"):
        recipe = load_benchmark(os.path.join(ROOT, "examples", "recipes", f"{name}.yaml"))
        row = rows[recipe["problem"] + "+recipe"]["settings"]
        assert row["net"] == recipe["settings"]["net"]
        causal = recipe["settings"]["causal"]
        if "eps_schedule" in causal and "eps" in row["causal"]:
            # Allen-Cahn: the table's row (1,000 steps) keeps the schedule's first epsilon fixed, as it was run;
            # the long runs' schedule took its first step at 4,400-4,700 steps (design/results.md)
            assert row["causal"] == {"n_chunks": causal["n_chunks"], "eps": causal["eps_schedule"][0]}
        else:
            assert row["causal"] == causal


@pytest.mark.slow
def test_a_recipe_run_draws_every_curve(tmp_path):
    spec = load_benchmark(os.path.join(ROOT, "examples", "recipes", "convection.yaml"), overrides=SMALL)
    methods = [m for m in spec["methods"] if m["label"] == "grad_norm_ratio"]
    assert run(spec, methods, iters=2, seeds=[0], out=str(tmp_path), progress=False, plots=True) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    pngs = {"weights.png", "losses.png", "rel_l2.png", "rel_l2_time.png", "causal.png", "fields_grad_norm_ratio.png"}
    assert pngs <= set(data["plots"]) and all((tmp_path / f).is_file() for f in pngs)


def np_recipe_net(net, xt):
    """Independent numpy forward of RecipeNet from its parameters (module docstring formulas)."""
    p = {k: v.numpy().astype(np.float64) for k, v in net.state_dict().items()}
    x, t = xt[:, 0:1], net.t_scale * xt[:, 1:2]
    z = np.concatenate([t, np.cos(net.omega * x), np.sin(net.omega * x)], 1)
    zb = z @ p["B"]
    z = np.concatenate([np.cos(zb), np.sin(zb)], 1)
    u = np.tanh(z @ p["gate_u.weight"] + p["gate_u.bias"])
    v = np.tanh(z @ p["gate_v.weight"] + p["gate_v.bias"])
    h = z
    for i in range(len(net.hidden)):
        h = np.tanh(h @ p[f"hidden.{i}.weight"] + p[f"hidden.{i}.bias"])
        h = h * u + (1 - h) * v
    return h @ p["out.weight"] + p["out.bias"]


def test_recipe_net_matches_numpy_and_is_periodic():
    paddle.seed(0)
    net = RecipeNet(width=8, depth=3, x_range=(-1.0, 1.0), fourier_dim=6, fourier_scale=2.0, t_scale=3.0)
    xt = np.random.default_rng(0).uniform([-1, 0], [1, 1], (20, 2))
    out = net(paddle.to_tensor(xt.astype(DTYPE))).numpy()
    np.testing.assert_allclose(out, np_recipe_net(net, xt), rtol=1e-4, atol=1e-5)
    shifted = xt + np.array([2.0, 0.0])  # one period in x
    np.testing.assert_allclose(net(paddle.to_tensor(shifted.astype(DTYPE))).numpy(), out, atol=1e-5)
    assert net.B.stop_gradient and "B" not in [n for n, _ in net.named_parameters()]


def test_plain_options_and_bad_net_settings():
    paddle.seed(0)
    net = RecipeNet(width=4, depth=1, x_range=(0.0, 2 * math.pi), periodic=False, fourier_dim=0, modified=False)
    assert net.B is None and len(net.parameters()) == 4  # one hidden Linear and the output Linear
    with pytest.raises(ValueError, match="unknown key.*'depht'"):
        check_net({"depht": 3})
    with pytest.raises(ValueError, match="fourier_dim"):
        check_net({"fourier_dim": 7})
    with pytest.raises(ValueError, match="periodic"):
        check_net({"periodic": "yes"})
    with pytest.raises(ValueError, match="causal.*unknown key.*'tol'"):
        Convection1D(causal={"n_chunks": 4, "tol": 1.0})
    with pytest.raises(ValueError, match="n_chunks"):
        AllenCahn1D(causal={"eps": 1.0})


@pytest.mark.parametrize("cls", [Convection1D, AllenCahn1D])
def test_optim_setting_sets_the_learning_rate_schedule_of_this_problem_only(cls):
    p = cls(batch_size=8, net=NET, optim={"lr": 2e-3, "decay_steps": 1500})
    assert (p.lr, p.decay_rate, p.decay_steps) == (2e-3, 0.9, 1500)
    assert (cls.lr, cls.decay_steps) == (1e-3, 1000)  # the class defaults are untouched
    model = p.build_model(0)
    optimizer, sched = p.optimizer(model.parameters())
    for _ in range(1500):
        sched.step()
    assert optimizer.get_lr() == pytest.approx(2e-3 * 0.9, rel=1e-6)  # 0.9 after 1,500 steps, smooth decay
    for bad, match in [({"lrr": 1.0}, "unknown key.*'lrr'"), ({"lr": 0.0}, "optim.lr"),
                       ({"decay_rate": 1.5}, "optim.decay_rate"), ({"decay_steps": 0}, "optim.decay_steps"),
                       ([1e-3], "`optim` must be a mapping")]:
        with pytest.raises(ValueError, match=match):
            cls(optim=bad)


def test_periodic_net_drops_bc_and_nonperiodic_keeps_it():
    p = Convection1D(batch_size=8, net=dict(NET, periodic=False))
    assert p.loss_names == ("res", "ic", "bc")
    losses = p.losses(p.build_model(0), p.sample(np.random.default_rng(0)))
    assert set(losses) == {"res", "ic", "bc"} and set(p.kernels(p.sample(np.random.default_rng(0)))) == set(losses)
    q = Convection1D(batch_size=8, net=NET)
    assert set(q.losses(q.build_model(0), q.sample(np.random.default_rng(0)))) == {"res", "ic"}


def test_causal_res_term_is_the_causal_residual_of_the_points():
    p = Convection1D(batch_size=8, n_res=64, net=NET, causal={"n_chunks": 4, "eps": 0.5})
    model, batch = p.build_model(0), p.sample(np.random.default_rng(1))
    assert batch["x_res"].shape == [64, 2]
    res = p._residual(model, batch)
    ref = CausalResidual(4, eps=0.5, t_range=(0.0, 1.0))(res, batch["x_res"][:, 1])
    np.testing.assert_allclose(float(p.losses(model, batch)["res"]), float(ref), rtol=1e-5)


def test_causal_schedule_advances_when_its_threshold_is_met_and_restarts_per_run():
    p = Convection1D(batch_size=8, n_res=32, net=NET, causal={"n_chunks": 4, "eps_schedule": [0.01, 1.0, 10.0],
                                                               "delta": 0.9})
    batch = p.sample(np.random.default_rng(0))
    model = p.build_model(0)
    for param in model.out.parameters():  # a constant network: u_t + beta u_x = 0 exactly
        param.set_value(paddle.zeros_like(param))
    p.losses(model, batch)
    assert p.monitor() == {"causal_eps": pytest.approx(1.0), "causal_min_weight": pytest.approx(1.0),
                           "causal_mean_weight": pytest.approx(1.0)}
    p.losses(model, batch)
    assert p.monitor()["causal_eps"] == pytest.approx(10.0)
    rough = p.build_model(1)  # a fresh run: schedule back at its start
    assert p.monitor()["causal_eps"] == pytest.approx(0.01)
    with paddle.no_grad():
        for param in rough.out.parameters():
            param.set_value(param * 1e3)  # a large residual: min weight < delta, no advance
    p.losses(rough, batch)
    mon = p.monitor()
    assert mon["causal_eps"] == pytest.approx(0.01) and mon["causal_min_weight"] < 0.9


def test_flushed_causal_weights_count_zero_and_gradients_stay_finite():
    c = CausalResidual(3, eps=1.0)
    r = paddle.to_tensor(np.array([0.1, 0.1, 30.0, 30.0, 1.0, 1.0], dtype=DTYPE), stop_gradient=False)
    loss = c(r)  # chunks 0.01, 900, 1: w = 1, e^-0.01, e^-900.01 (flushed to 0)
    np.testing.assert_allclose(float(loss), (0.01 + math.exp(-0.01) * 900.0) / 3, rtol=1e-5)
    (g,) = paddle.grad(loss, r)
    assert np.all(np.isfinite(g.numpy())) and g.numpy()[4] == 0.0 and g.numpy()[5] == 0.0
    assert float(c.min_weight.numpy()[0]) == pytest.approx(0.0, abs=1e-30)


@pytest.mark.parametrize("cls", [Convection1D, AllenCahn1D])
def test_exact_ntk_traces_on_the_recipe_net_take_the_fast_path(cls):
    kw = {"ref_n": 32, "ref_dt": 0.01, "save_dt": 0.05} if cls is AllenCahn1D else {}
    p = cls(batch_size=6, n_res=6, net=NET, **kw)
    model, batch = p.build_model(0), p.sample(np.random.default_rng(0))
    for name, kernel in p.kernels(batch).items():
        fast, path = per_point_sq_grad_norms(model, kernel, path="expanded", return_path=True)
        loop = per_point_sq_grad_norms(model, kernel, path="loop")
        assert path == "expanded", (name, path.reason if hasattr(path, "reason") else path)
        np.testing.assert_allclose(fast.numpy(), loop.numpy(), rtol=1e-4)


def test_a_killed_run_leaves_partial_results(tmp_path, monkeypatch):
    import paddle_pinn_balance.train as train_module

    real = train_module.train

    def killed(*args, on_log=None, **kwargs):
        calls = []

        def hook(history, net):
            on_log(history, net)
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt

        return real(*args, on_log=hook, **kwargs)

    monkeypatch.setattr(train_module, "train", killed)
    spec = load_benchmark(os.path.join(ROOT, "examples", "recipes", "convection.yaml"), overrides=SMALL)
    with pytest.raises(KeyboardInterrupt):
        run(spec, spec["methods"][:1], iters=10, seeds=[0], out=str(tmp_path), progress=False, plots=False)
    data = json.loads((tmp_path / "results.json").read_text())
    m = data["methods"]["grad_norm_ratio"]
    assert data["partial"] and m["partial"] and m["history"]["step"] == [0, 1]
    assert m["rel_l2"] == m["history"]["rel_l2"][-1] and m["runs"][0]["steps_done"] == 2


@pytest.mark.slow
def test_ppsci_comparison_script_runs_a_few_steps(tmp_path):
    pytest.importorskip("ppsci")
    pytest.importorskip("scipy")
    import importlib.util

    spec = importlib.util.spec_from_file_location("allen_cahn_compare",
                                                  os.path.join(ROOT, "examples", "ppsci", "allen_cahn_compare.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "2", "--log-every", "1", "--batch", "64", "--n-chunks", "4", "--hidden", "8",
                     "--layers", "2", "--fourier-dim", "8", "--ntk-points", "8", "--update-freq", "1",
                     "--ref-dt", "0.005", "--methods", "ppsci_ntk,ntk,grad_norm_ratio", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["final"] and set(data["methods"]) == {"ppsci_ntk", "ntk", "grad_norm_ratio"}
    for m in data["methods"].values():
        assert m["history"]["step"] == [0, 1] and np.isfinite(m["rel_l2"])
    assert data["methods"]["ntk"]["ntk_path"] == "expanded"
    w = data["methods"]["ppsci_ntk"]["history"]["weights"][-1]
    assert w["res"] > 0 and w["ic"] > 0 and (tmp_path / "allen_cahn.mat").is_file()


def test_cli_run_trains_the_seeds_given_by_seed(tmp_path):
    from paddle_pinn_balance.cli import main

    args = ["run", os.path.join(ROOT, "examples", "recipes", "convection.yaml"), "--method", "sum", "--iters", "2",
            "--seed", "3", "--out", str(tmp_path), "--quiet", "--no-plots"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["seeds"] == [3] and data["methods"]["sum"]["runs"][0]["seed"] == 3


def test_ppsci_mtl_ntk_is_the_grad_norm_ratio_without_momentum():
    """PaddleScience's ``mtl.NTK`` weights are sum_j ||g_j|| / ||g_i|| (no NTK trace): GradNormRatio with
    reduction 'sum' and momentum 0 gives the same numbers (and a numpy re-derivation does)."""
    ppsci = pytest.importorskip("ppsci")
    from paddle_pinn_balance import GradNormRatio

    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(2, 6), paddle.nn.Tanh(), paddle.nn.Linear(6, 1))
    x = paddle.to_tensor(np.random.default_rng(0).normal(size=(10, 2)).astype(DTYPE))

    def losses():
        y = model(x)
        return {"a": (y ** 2).mean(), "b": ((3.0 * y - 1.0) ** 2).mean()}

    theirs = ppsci.loss.mtl.NTK(model, 2, update_freq=1)
    theirs(losses(), 0)
    ours = GradNormRatio(model, loss_names=["a", "b"], reduction="sum", momentum=0.0, update_freq=1)
    ours(losses(), 0)
    norms = []
    for v in losses().values():
        g = paddle.grad(v, model.parameters())
        norms.append(np.sqrt(sum(float((gi ** 2).sum()) for gi in g)))
    expected = [sum(norms) / n for n in norms]
    np.testing.assert_allclose(theirs.weight.numpy(), expected, rtol=1e-4)
    np.testing.assert_allclose([ours.weights["a"], ours.weights["b"]], expected, rtol=1e-4)


def test_allen_cahn_exact_on_more_than_one_block_of_points_is_the_reference_grid():
    """``exact`` sums the Fourier series in blocks of 2,048 points; on the full test grid (more than one block) it
    must give the saved reference itself (it once broadcast the first block's time weights to every block)."""
    p = AllenCahn1D(ref_n=64, ref_dt=0.01, save_dt=0.01, test_stride=1)
    x = p.test_grid()
    assert len(x) > 2048
    np.testing.assert_allclose(p.exact(x).reshape(p.grid_shape), p.reference[2], atol=1e-8)
