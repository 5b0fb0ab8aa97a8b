"""PCGrad / ConFIG / UPGrad: numpy re-derivations from the papers, properties, end-to-end."""

import numpy as np
import paddle
import pytest
from scipy.optimize import minimize

from paddle_pinn_balance.surgery import (
    ConFIG,
    PCGrad,
    UPGrad,
    config_direction,
    pcgrad_direction,
    upgrad_direction,
)


def np_pcgrad(G, order):
    """Yu et al. Algorithm 1, written from the paper."""
    out = []
    for i in range(len(G)):
        g = G[i].copy()
        for j in order:
            if j != i and g @ G[j] < 0:
                g = g - (g @ G[j]) / (G[j] @ G[j]) * G[j]
        out.append(g)
    return np.sum(out, axis=0)


def np_config(G):
    """Liu et al. eqs. 2-3 via numpy's pinv of the unit-gradient matrix."""
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    gu = np.linalg.pinv(U) @ np.ones(len(G))  # pinv(U^T)^T... min-norm x with U x = 1
    gu /= np.linalg.norm(gu)
    return (G @ gu).sum() * gu


def np_upgrad(G):
    """Project each row onto {v: G v >= 0} (primal QP, SLSQP), then average."""
    outs = []
    for g in G:
        res = minimize(lambda v, g=g: ((v - g) ** 2).sum(), g, jac=lambda v, g=g: 2 * (v - g),
                       constraints=[{"type": "ineq", "fun": lambda v: G @ v, "jac": lambda v: G}],
                       method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
        outs.append(res.x)
    return np.mean(outs, axis=0)


def T(a):
    return paddle.to_tensor(np.asarray(a, dtype="float64"))


def test_pcgrad_hand_example():
    # g1 = (1, 0), g2 = (-1, 1): g1.g2 = -1 < 0.  g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1)
    G = np.array([[1.0, 0.0], [-1.0, 1.0]])
    d = pcgrad_direction(T(G), [0, 1]).numpy()
    np.testing.assert_allclose(d, [0.5, 1.5], atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_pcgrad_matches_numpy(k):
    rng = np.random.default_rng(k)
    G = rng.normal(size=(k, 12))
    order = rng.permutation(k).tolist()
    np.testing.assert_allclose(pcgrad_direction(T(G), order).numpy(), np_pcgrad(G, order), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_config_matches_numpy_equal_cosine(k):
    rng = np.random.default_rng(10 + k)
    G = rng.normal(size=(k, 20)) * rng.uniform(0.1, 10, size=(k, 1))
    d = config_direction(T(G)).numpy()
    np.testing.assert_allclose(d, np_config(G), rtol=1e-8, atol=1e-10)
    cos = G @ d / np.linalg.norm(G, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cos, cos[0], rtol=1e-8)
    assert cos[0] > 0


def test_config_nearly_parallel_float32():
    rng = np.random.default_rng(0)
    base = rng.normal(size=50)
    G = np.stack([base + 1e-6 * rng.normal(size=50) for _ in range(8)]) * np.arange(1, 9)[:, None]
    d = config_direction(paddle.to_tensor(G.astype("float32"))).numpy().astype(np.float64)
    assert np.all(np.isfinite(d))
    cos = G @ d / np.linalg.norm(G, axis=1) / np.linalg.norm(d)
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(d), np.linalg.norm(G, axis=1).sum(), rtol=1e-4)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_upgrad_matches_numpy_and_nonconflicting(k):
    rng = np.random.default_rng(20 + k)
    G = rng.normal(size=(k, 10))
    d = upgrad_direction(T(G)).numpy()
    np.testing.assert_allclose(d, np_upgrad(G), rtol=1e-5, atol=1e-6)
    assert np.all(G @ d >= -1e-10)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_projection_property(k):
    rng = np.random.default_rng(30 + k)
    G = rng.normal(size=(k, 6))  # k > P/2: strongly conflicting
    for d in (config_direction(T(G)).numpy(), upgrad_direction(T(G)).numpy()):
        assert np.all(G @ d >= -1e-9)
    if k == 2:  # PCGrad's guarantee (Yu et al. Thm 1 setting): 2 terms
        d = pcgrad_direction(T(G), [0, 1]).numpy()
        assert np.all(G @ d >= -1e-9)


def _problem(k):
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Linear(2, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
    xs = [paddle.rand([6, 2]) for _ in range(k)]

    def losses():
        return {f"t{i}": ((net(x) - (i - 1.0)) ** 2).mean() for i, x in enumerate(xs)}

    return net, losses


def _flat_term_grads(net, losses):
    rows = []
    for v in losses.values():
        gs = paddle.grad(v, net.parameters(), retain_graph=True)
        rows.append(np.concatenate([g.numpy().ravel() for g in gs]).astype(np.float64))
    return np.stack(rows)


@pytest.mark.parametrize("cls,ref", [(ConFIG, np_config), (UPGrad, np_upgrad), (PCGrad, None)])
def test_end_to_end_paddle_grad_and_clear_before_backward(cls, ref):
    net, make = _problem(3)
    bal = cls(net) if cls is not PCGrad else cls(net, seed=3)
    for step in range(3):
        losses = make()
        G = _flat_term_grads(net, losses)
        if cls is PCGrad:
            order = np.random.default_rng([3, step]).permutation(3).tolist()
            want = np_pcgrad(G, order)
        else:
            want = ref(G)
        total = bal(losses, step)
        np.testing.assert_allclose(float(total), sum(float(v) for v in losses.values()), rtol=1e-5)
        if step == 0:
            got = paddle.grad(2.0 * total, net.parameters())
            got = np.concatenate([g.numpy().ravel() for g in got])
            np.testing.assert_allclose(got, 2 * want, rtol=1e-3, atol=1e-5)
        else:
            for p in net.parameters():  # stale gradients present, cleared right before backward
                p.grad = paddle.ones_like(p)
            net.clear_gradients()
            total.backward()
            got = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_between_updates_plain_sum():
    net, make = _problem(2)
    bal = ConFIG(net, update_freq=2)
    losses = make()
    total = bal(losses, 1)
    (total).backward()
    got = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
    np.testing.assert_allclose(got, _flat_term_grads(net, make()).sum(0), rtol=1e-5, atol=1e-6)


def test_pcgrad_state_round_trip_bit_exact():
    net, make = _problem(5)
    a = PCGrad(net, seed=7)
    for s in range(3):
        a(make(), s).backward()
        net.clear_gradients()
    state = {k: v.numpy() for k, v in a.state_dict().items()}
    b = PCGrad(net, seed=7)
    b.set_state_dict(state)
    assert int(b.pcgrad_draws.numpy()[0]) == 3
    outs = []
    for bal in (a, b):
        bal(make(), 3).backward()
        outs.append([p.grad.numpy().copy() for p in net.parameters()])
        net.clear_gradients()
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)
