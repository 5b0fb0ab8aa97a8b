"""ReLoBRaLo, SoftAdapt, uncertainty and causal weighting in ``ppsci.solver.Solver``; loop idioms."""

import numpy as np
import paddle
import pytest

ppsci = pytest.importorskip("ppsci")

from paddle_pinn_balance import CausalResidual, ReLoBRaLo, SoftAdapt, UncertaintyWeighting  # noqa: E402
from paddle_pinn_balance import ppsci as adapter  # noqa: E402

NAMES = ["helmholtz", "u"]
CONFIGS = {
    "relobralo": {"name": "relobralo", "expected_rho": 0.5, "seed": 3},
    "softadapt": {"name": "softadapt", "beta": 1.0},
    "uncertainty": {"name": "uncertainty", "loss_names": NAMES},  # names needed before the optimizer
}
CLASSES = {"relobralo": ReLoBRaLo, "softadapt": SoftAdapt, "uncertainty": UncertaintyWeighting}


def constraints(n=32):
    from ppsci.autodiff import hessian

    rect = ppsci.geometry.Rectangle((-1.0, -1.0), (1.0, 1.0))
    mse = ppsci.loss.MSELoss("mean")
    data = {"dataset": "IterableNamedArrayDataset", "iters_per_epoch": 1, "batch_size": n}
    return {
        "EQ": ppsci.constraint.InteriorConstraint(
            {"helmholtz": lambda o: hessian(o["u"], o["x"]) + hessian(o["u"], o["y"]) + o["u"]},
            {"helmholtz": lambda d: np.sin(np.pi * d["x"])}, rect, data, mse, name="EQ"),
        "BC": ppsci.constraint.BoundaryConstraint({"u": lambda o: o["u"]}, {"u": 0.0}, rect, data, mse, name="BC"),
    }


def make_solver(cfg, out_dir, epochs, iters=5, checkpoint_path=None, lbfgs=False):
    ppsci.utils.misc.set_random_seed(0)
    with paddle.utils.unique_name.guard():
        model = ppsci.arch.MLP(("x", "y"), ("u",), 2, 8, "tanh")
        cons = constraints()
        net, agg = adapter.build_for_solver(cfg, model, cons)
        # the uncertainty balancer's log-variances train with the network
        opt = (ppsci.optimizer.LBFGS(max_iter=3) if lbfgs else ppsci.optimizer.Adam(1e-3))((net, agg))
        solver = ppsci.solver.Solver(net, cons, str(out_dir), opt, epochs=epochs, iters_per_epoch=iters,
                                     log_freq=100, loss_aggregator=agg, checkpoint_path=checkpoint_path)
    return solver, agg


def train(solver):
    with paddle.utils.unique_name.guard():
        solver.train()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_solver_resume_is_identical(name, tmp_path):
    full, agg_full = make_solver(CONFIGS[name], tmp_path / "full", epochs=2)
    train(full)
    assert isinstance(agg_full, CLASSES[name]) and list(agg_full.loss_names) == NAMES
    w = agg_full.weights
    assert all(np.isfinite(v) and v > 0 for v in w.values()) and len(set(w.values())) == 2
    half, _ = make_solver(CONFIGS[name], tmp_path / "half", epochs=1)
    train(half)
    resumed, agg_res = make_solver(CONFIGS[name], tmp_path / "res", epochs=2,
                                   checkpoint_path=str(tmp_path / "half" / "checkpoints" / "latest"))
    train(resumed)
    a, b = agg_full.state_dict(), agg_res.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
    for (k, p), (_, q) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        np.testing.assert_array_equal(p.numpy(), q.numpy(), err_msg=k)


def test_uncertainty_with_lbfgs_in_the_solver(tmp_path):
    solver, agg = make_solver(CONFIGS["uncertainty"], tmp_path, epochs=1, iters=3, lbfgs=True)
    s0 = agg.log_vars.numpy().copy()
    train(solver)
    s1 = agg.log_vars.numpy()
    assert np.all(np.isfinite(s1)) and not np.array_equal(s0, s1)


def test_causal_residual_in_a_solver_loss(tmp_path):
    """A causal residual as one term: ``CausalMSELoss`` semantics from our layer (time-major points)."""
    c = CausalResidual(4, eps=1.0)
    loss = c(paddle.to_tensor(np.ones([16], "float32")))
    np.testing.assert_allclose(float(loss), np.mean(np.exp(-np.arange(4.0))), rtol=1e-6)


@pytest.mark.parametrize("cls", [ReLoBRaLo, SoftAdapt])
def test_loop_idioms(cls):
    paddle.seed(0)
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([8, 2])
    bal = cls()

    def losses(k):
        return {"a": (net(x) ** 2).mean() * (k + 1), "b": ((net(x) - 1) ** 2).mean()}

    for step in range(3):
        t = bal(losses(step), step)
        w = bal.weights
        ref = [g.numpy() for g in paddle.grad(w["a"] * losses(step)["a"] + w["b"] * losses(step)["b"],
                                              net.parameters())]
        net.clear_gradients()  # clear_grad right before backward
        t.backward()
        for p, r in zip(net.parameters(), ref):
            np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-5, atol=1e-7)
        net.clear_gradients()
    # two calls accumulated (no update on the second: update_freq 2)
    bal2 = cls(update_freq=2)
    t1 = bal2(losses(0), 0)
    t2 = bal2(losses(0), 1)
    (t1 + t2).backward()
    g2 = [p.grad.numpy().copy() for p in net.parameters()]
    net.clear_gradients()
    w = bal2.weights
    ref = paddle.grad(2 * (w["a"] * losses(0)["a"] + w["b"] * losses(0)["b"]), net.parameters())
    for a, r in zip(g2, ref):
        np.testing.assert_allclose(a, r.numpy(), rtol=1e-5, atol=1e-7)
