"""Helmholtz 2D problem, the training loop and the ``demo`` command."""

import json
import math
import os

import numpy as np
import paddle
import pytest
from reference import Analytic

from paddle_pinn_balance import cli
from paddle_pinn_balance.problems import Helmholtz2D, get_problem, relative_l2
from paddle_pinn_balance.train import train


def small_problem():
    return Helmholtz2D(layers=(2, 8, 8, 1), batch_size=16, test_n=10)


# ------------------------------------------------------------------ the PDE itself


def test_exact_solution_satisfies_pde_by_finite_differences():
    p = Helmholtz2D()
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.99, 0.99, size=(200, 2))
    h = 1e-4
    ex, ey = np.array([[h, 0.0]]), np.array([[0.0, h]])
    u = p.exact(x)
    u_xx = (p.exact(x + ex) - 2 * u + p.exact(x - ex)) / h**2
    u_yy = (p.exact(x + ey) - 2 * u + p.exact(x - ey)) / h**2
    lhs = u_xx + u_yy + p.k**2 * u
    # independent q: (k^2 - pi^2 a1^2 - pi^2 a2^2) sin(a1 pi x) sin(a2 pi y) with k=1, a1=1, a2=4
    q = (1.0 - math.pi**2 - 16 * math.pi**2) * np.sin(math.pi * x[:, :1]) * np.sin(4 * math.pi * x[:, 1:])
    np.testing.assert_allclose(p.forcing(x), q, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lhs, q, atol=1e-4 * np.abs(q).max())


def test_exact_solution_vanishes_on_the_boundary():
    p = Helmholtz2D()
    batch = p.sample(np.random.default_rng(0))
    x_bc = batch["x_bc"].numpy().astype(np.float64)
    assert np.abs(p.exact(x_bc)).max() < 1e-6
    corners = np.array([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
    assert np.abs(p.exact(corners)).max() < 1e-12


def test_sample_shapes_edges_and_reproducibility():
    p = Helmholtz2D(batch_size=32)
    b = p.sample(np.random.default_rng(5))
    assert b["x_res"].shape == [32, 2] and b["x_bc"].shape == [128, 2] and b["q"].shape == [32, 1]
    x_res, x_bc = b["x_res"].numpy(), b["x_bc"].numpy().reshape(4, 32, 2)
    assert np.all(np.abs(x_res) <= 1.0)
    # edges in order: y = -1, x = 1, y = 1, x = -1; the free coordinate is uniform in [-1, 1]
    for edge, (axis, value) in zip(x_bc, [(1, -1.0), (0, 1.0), (1, 1.0), (0, -1.0)]):
        assert np.all(edge[:, axis] == value)
        assert np.all(np.abs(edge[:, 1 - axis]) <= 1.0) and edge[:, 1 - axis].std() > 0.3
    again = p.sample(np.random.default_rng(5))
    np.testing.assert_array_equal(again["x_bc"].numpy(), b["x_bc"].numpy())


# ------------------------------------------------------------------ residual operator and losses


def test_operator_on_a_polynomial_model():
    p = Helmholtz2D(k=2.0)
    model = Analytic(lambda x, y: x**2 * y**3)
    pts = np.random.default_rng(2).uniform(-1, 1, size=(50, 2))
    x = paddle.to_tensor(pts, dtype="float64", stop_gradient=False)
    got = p.operator(model, x).numpy()
    X, Y = pts[:, :1], pts[:, 1:]
    expected = 2 * Y**3 + 6 * X**2 * Y + 4.0 * X**2 * Y**3  # u_xx + u_yy + k^2 u
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_losses_vanish_for_the_exact_solution():
    p = Helmholtz2D()
    exact = Analytic(lambda x, y: paddle.sin(math.pi * x) * paddle.sin(4 * math.pi * y))
    losses = p.losses(exact, p.sample(np.random.default_rng(3)))
    assert sorted(losses) == ["bc", "res"]
    # float32: q is O(170) in size, so the residual is zero up to rounding
    assert float(losses["res"]) < 1e-6 * 170**2
    assert float(losses["bc"]) < 1e-10


def test_bc_loss_is_the_sum_of_the_four_edge_errors():
    p = Helmholtz2D()
    one = Analytic(lambda x, y: 1.0 + 0.0 * (x**2 + y**2))  # u = 1 everywhere, still twice differentiable
    losses = p.losses(one, p.sample(np.random.default_rng(4)))
    assert float(losses["bc"]) == pytest.approx(4.0)  # four edges, each mean squared error 1


def test_model_initialisation_and_standardisation():
    p = Helmholtz2D()
    a, b = p.build_model(7), p.build_model(7)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy())
        if name.endswith("bias"):
            assert np.all(pa.numpy() == 0)
    assert [list(q.shape) for q in a.parameters() if len(q.shape) == 2] == [[2, 50], [50, 50], [50, 50], [50, 1]]
    w = a.linears[1].weight.numpy()
    assert w.std() == pytest.approx(math.sqrt(2 / 100), rel=0.1)  # Xavier normal
    np.testing.assert_allclose(a.inv_std.numpy(), [[math.sqrt(3), math.sqrt(3)]], rtol=1e-6)
    np.testing.assert_allclose(a.mean.numpy(), [[0.0, 0.0]])


def test_relative_l2_and_registry():
    assert relative_l2([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert relative_l2([3.0, 4.0], [0.0, 0.0]) == pytest.approx(1.0)
    assert isinstance(get_problem("helmholtz"), Helmholtz2D)
    with pytest.raises(ValueError, match="unknown problem"):
        get_problem("nope")


# ------------------------------------------------------------------ training loop


def test_train_is_seeded_and_records_history():
    p = small_problem()
    r1 = train(p, {"name": "sum"}, iters=5, seed=3, log_every=2, progress=False)
    r2 = train(p, {"name": "sum"}, iters=5, seed=3, log_every=2, progress=False)
    assert r1["rel_l2"] == r2["rel_l2"]
    assert r1["history"]["step"] == [0, 2, 4]
    assert set(r1["history"]["loss"]) == {"res", "bc"} and len(r1["history"]["loss"]["bc"]) == 3
    assert r1["weights"] == {"res": 1.0, "bc": 1.0}
    # the first recorded losses are those of the initial network on the first batch: identical for any balancer
    r3 = train(p, {"name": "lr_annealing", "preset": "wang2021_code"}, iters=1, seed=3, progress=False)
    assert r3["history"]["loss"] == {n: v[:1] for n, v in r1["history"]["loss"].items()}
    assert r3["weights"]["bc"] != 1.0  # LRA updates at step 0


def test_train_with_grad_norm_trains_the_wrapper():
    r = train(small_problem(), {"name": "grad_norm", "alpha": 0.5}, iters=3, seed=0, progress=False)
    assert sum(r["weights"].values()) == pytest.approx(2.0, rel=1e-4)
    assert math.isfinite(r["rel_l2"])


def test_train_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iters"):
        train(small_problem(), {"name": "sum"}, iters=0)
    with pytest.raises(ValueError, match="unknown balancer"):
        train(small_problem(), {"name": "nope"}, iters=1, progress=False)


# ------------------------------------------------------------------ command line


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--iters", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rel. L2 error" in printed and "plain (sum)" in printed and "LRA (wang2021_code)" in printed
    data = json.loads((out / "results.json").read_text())
    # the layout of every `pinn-balance run`
    assert data["problem"] == "helmholtz" and data["problem_name"] == "Helmholtz 2D"
    assert data["iters"] == 30 and data["seeds"] == [0]
    plain, lra = data["methods"]["plain"], data["methods"]["lra"]
    assert plain["balancer"] == {"name": "sum"}
    assert lra["balancer"] == {"name": "lr_annealing", "preset": "wang2021_code"}
    assert plain["weights"] == {"res": 1.0, "bc": 1.0}
    assert lra["weights"]["res"] == 1.0 and lra["weights"]["bc"] > 1.0
    for run in (plain, lra):
        assert 0 < run["rel_l2"] < 10 and run["wall_time_s"] > 0 and run["errors"] == [run["rel_l2"]]
        assert run["history"]["step"][0] == 0 and run["history"]["step"][-1] == 29
        assert len(run["history"]["weight"]["bc"]) == len(run["history"]["step"])
    assert data["demo"]["error_ratio_plain_over_lra"] == pytest.approx(plain["rel_l2"] / lra["rel_l2"])
    # identical seed: identical initial network and first batch
    assert plain["history"]["loss"]["res"][0] == lra["history"]["loss"]["res"][0]

    # `report` reads the demo's output like any run's
    capsys.readouterr()
    assert cli.main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert "| Helmholtz 2D | plain | 1 | 30 |" in capsys.readouterr().out

    # plot files: only these assertions need matplotlib (the optional `plot` extra)
    pytest.importorskip("matplotlib")
    expected = ["weights.png", "losses.png", "rel_l2.png", "fields_plain.png", "fields_lra.png"]
    assert sorted(data["plots"]) == sorted(expected)
    for name in expected:
        assert (out / name).stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["demo", "--iters", "0"], "--iters"),
        (["demo", "--iters", "ten"], "--iters"),
        (["demo", "--seed", "-1"], "--seed"),
        (["demo", "--bogus"], "unrecognized"),
        (["nope"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and err.startswith("pinn-balance")


def test_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert cli.main(["demo", "--iters", "1", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert os.path.isfile(f)
