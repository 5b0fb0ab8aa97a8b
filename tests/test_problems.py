"""The benchmark problems Convection 1D, Allen-Cahn 1D (with its ETDRK4 reference) and Poisson 2D with pieces.

Exact solutions are checked against the equations by finite differences in numpy (independently of the modules),
the losses vanish for a parameter-free model computing the exact solution, the batches and kernels have the
documented shapes, and every problem trains a few steps with three balancers.
"""

import math

import numpy as np
import paddle
import pytest
from reference import Analytic, fd_first, fd_second

from paddle_pinn_balance.problems import PROBLEMS, AllenCahn1D, Convection1D, Poisson2DPieces, get_problem
from paddle_pinn_balance.problems.allen_cahn import etdrk4_allen_cahn
from paddle_pinn_balance.train import train

BETA = 30.0
TWO_PI = 2.0 * math.pi


def _np(t):
    return t.numpy().astype(np.float64)


def _check_kernels(p, batch, net, sizes):
    """One callable per loss name, each giving ``[N, 1]`` (or ``[N]``) per-point values of a finite tensor."""
    kernels = p.kernels(batch)
    assert sorted(kernels) == sorted(p.loss_names)
    out = {}
    for name, fn in kernels.items():
        assert callable(fn)
        value = fn(net)
        assert value.shape in ([sizes[name], 1], [sizes[name]]), (name, value.shape)
        assert np.isfinite(value.numpy()).all()
        out[name] = _np(value).reshape(-1)
    return out


def test_registry_has_the_new_problems():
    assert {"convection1d": Convection1D, "allen_cahn1d": AllenCahn1D,
            "poisson2d_pieces": Poisson2DPieces}.items() <= PROBLEMS.items()
    assert isinstance(get_problem("convection1d", beta=5.0), Convection1D)


@pytest.mark.parametrize("cls", [Convection1D, AllenCahn1D, Poisson2DPieces])
def test_docstrings_state_equations_domain_solution_and_source(cls):
    doc = cls.__doc__
    assert ".. math::" in doc and r"\text{on }" in doc  # the equations and the domain
    assert "References:" in doc and ("20" in doc.split("References:")[1])  # a paper with its year
    assert ("u = " in doc) or ("reference" in doc.lower())  # the exact solution or the reference


# ------------------------------------------------------------------ Convection 1D


def test_convection_exact_solution_pde_ic_and_periodicity():
    p = Convection1D()
    assert p.beta == BETA
    x = np.stack([np.random.default_rng(0).uniform(0.0, TWO_PI, 300), np.random.default_rng(1).uniform(0, 1, 300)], 1)
    u_t, u_x = fd_first(p.exact, x, 1), fd_first(p.exact, x, 0)
    np.testing.assert_allclose(u_t + BETA * u_x, 0.0, atol=1e-5 * BETA)
    np.testing.assert_allclose(u_x, np.cos(x[:, 0:1] - BETA * x[:, 1:2]), atol=1e-6)  # not the zero solution
    s = np.linspace(0.0, TWO_PI, 21)
    np.testing.assert_allclose(p.exact(np.stack([s, 0 * s], 1))[:, 0], np.sin(s), atol=1e-12)
    t = np.linspace(0.0, 1.0, 21)
    np.testing.assert_allclose(p.exact(np.stack([0 * t, t], 1)), p.exact(np.stack([0 * t + TWO_PI, t], 1)),
                               atol=1e-12)
    np.testing.assert_allclose(p.exact(x)[:, 0], np.sin(x[:, 0] - BETA * x[:, 1]))
    g = p.test_grid()
    assert g.shape == (100 * 100, 2) and p.grid_shape == (100, 100)
    assert g[:, 0].min() == 0.0 and abs(g[:, 0].max() - TWO_PI) < 1e-12 and g[:, 1].max() == 1.0


def test_convection_batch_losses_and_kernels():
    n = 32
    p = Convection1D(layers=(2, 8, 8, 1), batch_size=n)
    assert p.loss_names == ("res", "ic", "bc")
    batch = p.sample(np.random.default_rng(0))
    assert {k: v.shape for k, v in batch.items()} == {"x_res": [n, 2], "x_ic": [n, 2], "u_ic": [n, 1],
                                                      "x_bc": [2 * n, 2]}
    xr, xi, xb = _np(batch["x_res"]), _np(batch["x_ic"]), _np(batch["x_bc"])
    assert 0 <= xr[:, 0].min() and xr[:, 0].max() <= TWO_PI + 1e-6 and 0 <= xr[:, 1].min() and xr[:, 1].max() <= 1
    assert (xi[:, 1] == 0).all()
    np.testing.assert_allclose(_np(batch["u_ic"])[:, 0], np.sin(xi[:, 0]), atol=1e-6)
    assert (xb[:n, 0] == 0).all() and np.allclose(xb[n:, 0], TWO_PI) and (xb[:n, 1] == xb[n:, 1]).all()

    exact = Analytic(lambda x, t: paddle.sin(x - BETA * t))
    losses = p.losses(exact, batch)
    assert sorted(losses) == ["bc", "ic", "res"] and all(v.shape == [] for v in losses.values())
    assert float(losses["res"]) < 1e-8 and float(losses["ic"]) < 1e-10 and float(losses["bc"]) < 1e-9
    # u = sin x + t + x / 10: residual 1 + beta (cos x + 1/10), initial error x / 10, periodicity gap -2 pi / 10
    other = Analytic(lambda x, t: paddle.sin(x) + t + 0.1 * x)
    losses = p.losses(other, batch)
    np.testing.assert_allclose(float(losses["res"]), ((1 + BETA * (np.cos(xr[:, 0]) + 0.1)) ** 2).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(losses["ic"]), ((0.1 * xi[:, 0]) ** 2).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(losses["bc"]), (0.1 * TWO_PI) ** 2, rtol=1e-4)

    net = p.build_model(0)
    k = _check_kernels(p, batch, net, {"res": n, "ic": n, "bc": n})
    losses = p.losses(net, batch)
    np.testing.assert_allclose((k["res"] ** 2).mean(), float(losses["res"]), rtol=1e-4)
    np.testing.assert_allclose((k["bc"] ** 2).mean(), float(losses["bc"]), rtol=1e-4)
    u_b = _np(net(batch["x_bc"]))[:, 0]
    np.testing.assert_allclose(k["bc"], u_b[:n] - u_b[n:], rtol=1e-5, atol=1e-7)  # u(0, t) - u(2 pi, t)
    np.testing.assert_allclose(k["ic"], _np(net(batch["x_ic"]))[:, 0], rtol=1e-6)


# ------------------------------------------------------------------ Allen-Cahn 1D


def _allen_cahn_rk4(n, dt, t_end, eps=1e-4, a=5.0):
    """The same semi-discrete system, u_t = eps D2 u + a (u - u^3) with D2 the Fourier second derivative on
    x_j = -1 + 2 j / n, stepped by classical explicit RK4 (written here independently of the module)."""
    x = -1.0 + 2.0 * np.arange(n) / n
    m = np.fft.fftfreq(n, d=1.0 / n)
    k2 = (math.pi * m) ** 2

    def rhs(u):
        return eps * np.real(np.fft.ifft(-k2 * np.fft.fft(u))) + a * (u - u**3)

    u = x**2 * np.cos(math.pi * x)
    for _ in range(round(t_end / dt)):
        k1 = rhs(u)
        k2_ = rhs(u + 0.5 * dt * k1)
        k3 = rhs(u + 0.5 * dt * k2_)
        k4 = rhs(u + dt * k3)
        u = u + dt / 6 * (k1 + 2 * k2_ + 2 * k3 + k4)
    return u


def test_etdrk4_converges_at_fourth_order():
    ref = etdrk4_allen_cahn(n=512, dt=1e-3, t_end=1.0, save_dt=1.0)[2][-1]
    errors = [np.abs(etdrk4_allen_cahn(n=512, dt=dt, t_end=1.0, save_dt=1.0)[2][-1] - ref).max()
              for dt in (0.04, 0.02, 0.01)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]  # measured: ~14.9, ~15.4 (4th order: 16)
    assert all(r >= 12 for r in ratios), (errors, ratios)
    assert errors[-1] < 1e-6


def test_etdrk4_matches_an_independent_rk4_and_keeps_the_symmetry():
    n, t_end = 128, 0.25
    x, t, u, coef = etdrk4_allen_cahn(n=n, dt=5e-3, t_end=t_end, save_dt=0.05)
    assert x.shape == (n,) and u.shape == (6, n) and coef.shape == (6, n)
    np.testing.assert_allclose(t, 0.05 * np.arange(6), atol=1e-12)
    np.testing.assert_allclose(x, -1 + 2 * np.arange(n) / n)
    np.testing.assert_allclose(u[0], x**2 * np.cos(math.pi * x), atol=1e-13)
    np.testing.assert_allclose(u, np.real(np.fft.ifft(coef, axis=1)))
    rk4 = _allen_cahn_rk4(n, dt=1e-3, t_end=t_end)
    np.testing.assert_allclose(u[-1], rk4, atol=1e-7)
    assert np.abs(u[-1] - u[0]).max() > 0.1  # it evolved
    # u(x) = u(-x): x_j and -x_j = x_{n-j} (periodic); the maximum principle keeps |u| <= 1
    np.testing.assert_allclose(u, u[:, (-np.arange(n)) % n], atol=1e-12)
    assert np.abs(u).max() <= 1.0 + 1e-9
    with pytest.raises(ValueError, match="multiples"):
        etdrk4_allen_cahn(n=16, dt=0.3, t_end=1.0, save_dt=0.3)
    with pytest.raises(ValueError, match="multiple of `save_dt`"):
        etdrk4_allen_cahn(n=16, dt=0.1, t_end=1.0, save_dt=0.3)
    with pytest.raises(ValueError, match="divide"):
        AllenCahn1D(ref_dt=1e-3, save_dt=3e-3)  # the reference would stop at t = 0.999


def test_allen_cahn_reference_grid_and_exact():
    p = AllenCahn1D(layers=(2, 8, 1), batch_size=8, ref_n=64, ref_dt=1e-3, save_dt=1e-2, test_stride=2)
    xs, ts, u, _ = p.reference
    assert xs.shape == (64,) and ts.shape == (101,) and u.shape == (101, 64) and abs(ts[-1] - 1.0) < 1e-12
    g = p.test_grid()
    assert p.grid_shape == (51, 32) and g.shape == (51 * 32, 2)
    np.testing.assert_allclose(p.exact(g).reshape(p.grid_shape), u[::2, ::2], atol=1e-10)  # no interpolation
    # between grid points: the Fourier series of the initial condition (its periodic extension has a kink at
    # x = +-1, u_x = -+2, which limits the accuracy near the ends: ~1e-2 with 64 modes)
    s = np.random.default_rng(0).uniform(-1, 1, 200)
    err = np.abs(p.exact(np.stack([s, 0 * s], 1))[:, 0] - s**2 * np.cos(math.pi * s))
    assert err[np.abs(s) < 0.7].max() < 1e-3 and err.max() < 2e-2
    mid = p.exact(np.stack([xs, np.full(64, 0.015)], 1))[:, 0]  # halfway between saved times 0.01 and 0.02
    np.testing.assert_allclose(mid, 0.5 * (u[1] + u[2]), atol=1e-10)
    # error(): the relative L2 distance to the reference on the test grid
    np.testing.assert_allclose(p.error(Analytic(lambda x, t: 0 * x * t)), 1.0)


def test_allen_cahn_batch_losses_and_kernels():
    n, eps, a = 32, 1e-4, 5.0
    p = AllenCahn1D(layers=(2, 8, 8, 1), batch_size=n, ref_n=64, ref_dt=1e-3, save_dt=1e-2)
    assert p.loss_names == ("res", "ic", "bc") and (p.eps, p.a) == (eps, a)
    batch = p.sample(np.random.default_rng(0))
    assert {k: v.shape for k, v in batch.items()} == {"x_res": [n, 2], "x_ic": [n, 2], "u_ic": [n, 1],
                                                      "x_bc": [2 * n, 2]}
    xr, xi, xb = _np(batch["x_res"]), _np(batch["x_ic"]), _np(batch["x_bc"])
    assert -1 <= xr[:, 0].min() and xr[:, 0].max() <= 1 and 0 <= xr[:, 1].min() and xr[:, 1].max() <= 1
    assert (xi[:, 1] == 0).all()
    np.testing.assert_allclose(_np(batch["u_ic"])[:, 0], xi[:, 0] ** 2 * np.cos(math.pi * xi[:, 0]), atol=1e-6)
    assert (xb[:n, 0] == -1).all() and (xb[n:, 0] == 1).all() and (xb[:n, 1] == xb[n:, 1]).all()

    # the steady states u = 0 and u = 1: no residual, periodic; u = 0 misses the initial condition by u_ic
    for c in (0.0, 1.0):
        losses = p.losses(Analytic(lambda x, t, c=c: 0 * x * t + c), batch)
        assert sorted(losses) == ["bc", "ic", "res"] and all(v.shape == [] for v in losses.values())
        assert float(losses["res"]) < 1e-12 and float(losses["bc"]) < 1e-12
    np.testing.assert_allclose(float(losses["ic"]), ((1 - _np(batch["u_ic"])) ** 2).mean(), rtol=1e-5)
    # the initial condition frozen in time: ic 0, u-gap 0, u_x-gap (-2) - 2 = -4, residual by hand
    ic = Analytic(lambda x, t: x**2 * paddle.cos(math.pi * x) + 0 * t)
    losses = p.losses(ic, batch)
    s = xr[:, 0]
    w = s**2 * np.cos(math.pi * s)
    w_xx = 2 * np.cos(math.pi * s) - 4 * math.pi * s * np.sin(math.pi * s) - math.pi**2 * w
    np.testing.assert_allclose(float(losses["res"]), ((-eps * w_xx + a * w**3 - a * w) ** 2).mean(), rtol=1e-4)
    assert float(losses["ic"]) < 1e-12
    np.testing.assert_allclose(float(losses["bc"]), 16.0, rtol=1e-5)

    net = p.build_model(0)
    k = _check_kernels(p, batch, net, {"res": n, "ic": n, "bc": 2 * n})
    losses = p.losses(net, batch)
    np.testing.assert_allclose((k["res"] ** 2).mean(), float(losses["res"]), rtol=1e-4)
    np.testing.assert_allclose(2 * (k["bc"] ** 2).mean(), float(losses["bc"]), rtol=1e-4)  # two gaps stacked
    np.testing.assert_allclose(k["ic"], _np(net(batch["x_ic"]))[:, 0], rtol=1e-6)


# ------------------------------------------------------------------ Poisson 2D with four boundary pieces


def _poisson_u(x, a=8.0, c=0.1):
    s, y = x[:, 0:1], x[:, 1:2]
    return np.sin(2 * np.pi * s) * np.cos(2 * np.pi * y) + c * np.sin(a * np.pi * s) * np.sin(a * np.pi * y)


def test_poisson2d_exact_solution_and_boundary_pieces():
    p = Poisson2DPieces()
    x = np.random.default_rng(0).uniform(0.02, 0.98, size=(300, 2))
    np.testing.assert_allclose(p.exact(x), _poisson_u(x), atol=1e-12)
    lap = fd_second(p.exact, x, 0) + fd_second(p.exact, x, 1)
    f = p.forcing(x)
    assert np.abs(f).max() > 100
    np.testing.assert_allclose(lap, f, atol=1e-3 * np.abs(f).max())

    batch = p.sample(np.random.default_rng(1))
    n = p.batch_size
    pieces = {"bottom": (None, 0.0), "top": (None, 1.0), "right": (1.0, None), "left": (0.0, None)}
    for name, (xv, yv) in pieces.items():
        pts = _np(batch[f"x_{name}"])
        assert pts.shape == (n, 2)
        assert (pts[:, 0] == xv).all() if xv is not None else (pts[:, 1] == yv).all()
    bottom, top, right, left = (_np(batch[f"x_{k}"]) for k in ("bottom", "top", "right", "left"))
    # the conditions hold for the exact solution on each piece's sampled points (computed here independently)
    np.testing.assert_allclose(_poisson_u(bottom)[:, 0], np.sin(2 * np.pi * bottom[:, 0]), atol=1e-12)
    np.testing.assert_allclose(_poisson_u(top)[:, 0], np.sin(2 * np.pi * top[:, 0]), atol=1e-12)
    np.testing.assert_allclose(_poisson_u(right)[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(fd_first(_poisson_u, left, 0), _np(batch["g_left"]), atol=1e-4)
    # and the batch's data are those values
    for name, pts in (("bottom", bottom), ("top", top), ("right", right)):
        np.testing.assert_allclose(_np(batch[f"u_{name}"]), _poisson_u(pts), atol=1e-6)
    np.testing.assert_allclose(_np(batch["f"]), p.forcing(_np(batch["x_res"])), rtol=1e-6, atol=1e-4)
    g = p.test_grid()
    assert g.shape == (100 * 100, 2) and p.grid_shape == (100, 100)


def test_poisson2d_losses_and_kernels():
    n = 32
    p = Poisson2DPieces(layers=(2, 8, 8, 1), batch_size=n)
    assert len(p.loss_names) > 2 and p.loss_names == ("res", "bottom", "top", "right", "left")
    batch = p.sample(np.random.default_rng(0))
    assert batch["x_res"].shape == [n, 2] and batch["f"].shape == [n, 1] and batch["g_left"].shape == [n, 1]
    pi = math.pi

    def u(x, y):
        return (paddle.sin(2 * pi * x) * paddle.cos(2 * pi * y)
                + 0.1 * paddle.sin(8 * pi * x) * paddle.sin(8 * pi * y))

    losses = p.losses(Analytic(u), batch)
    assert sorted(losses) == sorted(p.loss_names) and all(v.shape == [] for v in losses.values())
    assert float(losses["res"]) < 1e-6 * 200**2
    assert all(float(losses[k]) < 1e-10 for k in ("bottom", "top", "right")) and float(losses["left"]) < 1e-8
    # u = 0 leaves each Dirichlet piece its data and the Neumann piece its flux
    zero = p.losses(Analytic(lambda x, y: 0 * x * y), batch)
    for name in ("bottom", "top", "right"):
        np.testing.assert_allclose(float(zero[name]), (_np(batch[f"u_{name}"]) ** 2).mean(), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(float(zero["left"]), (_np(batch["g_left"]) ** 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(zero["res"]), (_np(batch["f"]) ** 2).mean(), rtol=1e-5)

    net = p.build_model(0)
    k = _check_kernels(p, batch, net, dict.fromkeys(p.loss_names, n))
    losses = p.losses(net, batch)
    for name in p.loss_names:
        np.testing.assert_allclose((k[name] ** 2).mean(), float(losses[name]), rtol=1e-4)


@pytest.mark.parametrize("make", [lambda: Convection1D(layers=(2, 8, 1), batch_size=6),
                                  lambda: AllenCahn1D(layers=(2, 8, 1), batch_size=6, ref_n=64, ref_dt=1e-3,
                                                      save_dt=1e-2),
                                  lambda: Poisson2DPieces(layers=(2, 8, 1), batch_size=6)],
                         ids=["convection1d", "allen_cahn1d", "poisson2d_pieces"])
def test_kernels_give_the_same_traces_on_both_per_point_paths(make):
    """On a Sequential net the auto path takes the fast expanded path where it applies; it must agree with the
    exact loop (the periodicity gaps call the model on each edge separately, so that they stay pointwise)."""
    from paddle_pinn_balance.per_point import per_point_sq_grad_norms

    p = make()
    net = paddle.nn.Sequential(paddle.nn.Linear(2, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
    batch = p.sample(np.random.default_rng(0))
    for name, kernel in p.kernels(batch).items():
        auto = per_point_sq_grad_norms(net, kernel, path="auto")
        loop = per_point_sq_grad_norms(net, kernel, path="loop")
        np.testing.assert_allclose(auto.numpy(), loop.numpy(), rtol=1e-4, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------ a few training steps with three balancers

SMALL = {
    "convection1d": lambda: Convection1D(layers=(2, 16, 16, 1), batch_size=8, test_n=20),
    "allen_cahn1d": lambda: AllenCahn1D(layers=(2, 16, 16, 1), batch_size=8, ref_n=64, ref_dt=1e-3, save_dt=1e-2,
                                        test_stride=4),
    "poisson2d_pieces": lambda: Poisson2DPieces(layers=(2, 16, 16, 1), batch_size=8, test_n=20),
}
BALANCERS = [{"name": "sum"}, {"name": "lr_annealing", "update_freq": 1}, {"name": "ntk", "update_freq": 2}]


@pytest.mark.filterwarnings("ignore:NTKWeighting. term .* uses the exact per-point loop")  # MLP: not Sequential
@pytest.mark.parametrize("config", BALANCERS, ids=[c["name"] for c in BALANCERS])
@pytest.mark.parametrize("problem", sorted(SMALL))
def test_a_few_training_steps(problem, config):
    p = SMALL[problem]()
    out = train(p, dict(config), iters=3, seed=0, progress=False)
    assert math.isfinite(out["rel_l2"]) and out["rel_l2"] > 0
    assert sorted(out["weights"]) == sorted(p.loss_names)
    assert all(math.isfinite(w) and w > 0 for w in out["weights"].values())
    h = out["history"]
    assert h["step"] == [0, 1, 2] and all(len(h["loss"][n]) == 3 for n in p.loss_names)
    assert all(math.isfinite(v) for n in p.loss_names for v in h["loss"][n])
    if config["name"] != "sum":
        assert any(abs(w - 1.0) > 1e-6 for w in out["weights"].values())  # the balancer did reweight
