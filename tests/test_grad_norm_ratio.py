"""Grad-norm ratio weighting (Expert's Guide, Alg. 1) against numpy, on hand-made numbers and a small net."""

import numpy as np
import paddle
import pytest

from paddle_pinn_balance import GradNormRatio, NTKWeighting, build_balancer
from paddle_pinn_balance.grad_norm_ratio import grad_norm_ratio_weights


def test_weights_on_hand_made_norms():
    n = paddle.to_tensor([1.0, 3.0, 4.0])
    np.testing.assert_allclose(grad_norm_ratio_weights(n, "sum").numpy(), [8.0, 8.0 / 3, 2.0], rtol=1e-6)
    np.testing.assert_allclose(grad_norm_ratio_weights(n, "mean").numpy(), [8 / 3, 8 / 9, 2 / 3], rtol=1e-6)


def make():
    paddle.seed(1)
    return paddle.nn.Sequential(paddle.nn.Linear(1, 6), paddle.nn.Tanh(), paddle.nn.Linear(6, 1))


def losses(net, step):
    x = paddle.linspace(-1, 1, 10).reshape([-1, 1]) + 0.01 * step
    return {"res": ((net(x) - paddle.sin(3 * x)) ** 2).mean(), "bc": 50 * ((net(paddle.ones([2, 1]))) ** 2).mean()}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_ema_of_norm_ratios_against_numpy(reduction):
    net = make()
    bal = GradNormRatio(net, reduction=reduction, momentum=0.9, update_freq=2)
    opt = paddle.optimizer.SGD(1e-2, parameters=net.parameters())
    w = np.ones(2)
    for step in range(6):
        L = losses(net, step)
        if step % 2 == 0:  # independent: norms of paddle.grad per term, the paper's EMA
            n = np.array([np.sqrt(sum(float((g ** 2).sum()) for g in paddle.grad(v, net.parameters(),
                                                                                     retain_graph=True)))
                          for v in L.values()])
            hat = n.sum() / n if reduction == "sum" else n.mean() / n
            w = 0.9 * w + 0.1 * hat
        total = bal(L, step)
        np.testing.assert_allclose(list(bal.weights.values()), w, rtol=1e-5)
        total.backward()
        opt.step()
        opt.clear_grad()


def test_old_ntk_spelling_gives_the_same_estimate_and_the_registry_builds_it():
    a, b = make(), make()
    ntk = NTKWeighting(a, mode="grad_norm", update_freq=1)
    gnr = build_balancer({"name": "grad_norm_ratio", "momentum": 0.0, "update_freq": 1}, b)
    ntk(losses(a, 0), 0)
    gnr(losses(b, 0), 0)
    np.testing.assert_allclose(list(ntk.weights.values()), list(gnr.weights.values()), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        GradNormRatio(b, reduction="max")
    with pytest.raises(ValueError, match="momentum"):
        GradNormRatio(b, momentum=1.5)
