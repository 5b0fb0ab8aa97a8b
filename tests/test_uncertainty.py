"""Uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018, eq. 7): total, closed-form gradients, state."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import UncertaintyWeighting, build_balancer


def test_total_and_gradient_closed_form():
    paddle.seed(0)
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([6, 2])
    bal = UncertaintyWeighting(loss_names=["res", "bc"], init_log_var=0.3)
    bal.log_vars.set_value(paddle.to_tensor([0.3, -1.2]))
    s = np.array([0.3, -1.2])
    losses = {"res": (net(x) ** 2).mean(), "bc": ((net(x) - 2) ** 2).mean()}
    L = np.array([float(losses["res"]), float(losses["bc"])])
    total = bal(losses, 0)
    np.testing.assert_allclose(float(total), (0.5 * np.exp(-s) * L + 0.5 * s).sum(), rtol=1e-6)
    np.testing.assert_allclose(list(bal.weights.values()), 0.5 * np.exp(-s), rtol=1e-6)
    params = net.parameters()
    g = paddle.grad(total, params + [bal.log_vars], retain_graph=True)
    np.testing.assert_allclose(g[-1].numpy(), 0.5 * (1 - np.exp(-s) * L), rtol=1e-5)  # dL/ds_j
    gl = [paddle.grad(v, params, retain_graph=True) for v in losses.values()]
    for k in range(len(params)):
        ref = sum(0.5 * np.exp(-s[j]) * gl[j][k].numpy() for j in range(2))
        np.testing.assert_allclose(g[k].numpy(), ref, rtol=1e-5, atol=1e-7)


def test_optimizer_reaches_the_fixed_point():
    """With fixed losses the optimum is s_j = log L_j (dL/ds = 0)."""
    bal = UncertaintyWeighting(loss_names=["a", "b"])
    opt = paddle.optimizer.Adam(0.05, parameters=bal.parameters())
    for step in range(600):
        total = bal({"a": paddle.to_tensor(4.0), "b": paddle.to_tensor(0.25)}, step)
        total.backward()
        opt.step()
        opt.clear_grad()
    np.testing.assert_allclose(bal.log_vars.numpy(), np.log([4.0, 0.25]), atol=2e-2)


def test_loop_idioms():
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([4, 2])
    bal = UncertaintyWeighting(loss_names=["a", "b"])
    params = net.parameters() + bal.parameters()

    def total():
        return bal({"a": (net(x) ** 2).mean(), "b": ((net(x) - 1) ** 2).mean()})

    ref = [g.numpy() for g in paddle.grad(total(), params)]
    t = total()
    for p in params:
        p.clear_gradient()
    t.backward()  # clear_grad right before backward
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.grad.numpy(), r, rtol=1e-6)
    total().backward()  # two calls accumulate
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p.grad.numpy(), 2 * r, rtol=1e-6)


def test_parameter_created_lazily_without_names():
    bal = UncertaintyWeighting()
    assert bal.parameters() == []
    bal({"a": paddle.to_tensor(1.0)})
    assert len(bal.parameters()) == 1


def test_nonfinite_loss_and_checkpoint():
    bal = UncertaintyWeighting(loss_names=["a", "b"])
    total = bal({"a": paddle.to_tensor(np.nan), "b": paddle.to_tensor(1.0)})
    total.backward()
    assert np.isnan(bal.log_vars.grad.numpy()[0])  # documented: the optimizer sees what autograd gives
    state = {k: v.numpy().copy() for k, v in bal.state_dict().items()}
    state["log_vars"] = np.array([np.nan, 0.0], DTYPE)
    fresh = UncertaintyWeighting(loss_names=["a", "b"], init_log_var=1.0)
    with pytest.raises(ValueError, match="log_vars"):
        fresh.set_state_dict(state)
    np.testing.assert_array_equal(fresh.log_vars.numpy(), [1.0, 1.0])


def test_resume_is_bit_exact():
    def train(bal, opt, steps, start=0):
        for step in range(start, start + steps):
            total = bal({"a": paddle.to_tensor(3.0 + step), "b": paddle.to_tensor(0.5)}, step)
            total.backward()
            opt.step()
            opt.clear_grad()

    full = UncertaintyWeighting(loss_names=["a", "b"])
    opt = paddle.optimizer.SGD(0.1, parameters=full.parameters())
    train(full, opt, 6)
    half = UncertaintyWeighting(loss_names=["a", "b"])
    train(half, paddle.optimizer.SGD(0.1, parameters=half.parameters()), 3)
    fresh = UncertaintyWeighting(loss_names=["a", "b"])
    fresh.set_state_dict({k: v.numpy().copy() for k, v in half.state_dict().items()})
    train(fresh, paddle.optimizer.SGD(0.1, parameters=fresh.parameters()), 3, start=3)
    np.testing.assert_array_equal(fresh.log_vars.numpy(), full.log_vars.numpy())


def test_bad_hyperparameters_and_config():
    with pytest.raises(ValueError, match="init_log_var"):
        UncertaintyWeighting(init_log_var=float("inf"))
    bal = build_balancer({"name": "uncertainty", "loss_names": ["a"], "init_log_var": 1.0}, paddle.nn.Linear(1, 1))
    assert isinstance(bal, UncertaintyWeighting)
    np.testing.assert_allclose(bal.weights["a"], 0.5 * np.exp(-1.0), rtol=1e-6)
