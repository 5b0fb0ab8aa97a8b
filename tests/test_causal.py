"""Causal weighting (Wang, Sankaran, Perdikaris, CMAME 2024, eqs. 3.3-3.4): weights, loss, annealing, ppsci."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import CausalResidual, ReLoBRaLo, build_causal, causal_weights


def np_causal(chunks, eps):
    w = np.array([np.exp(-eps * chunks[:i].sum()) for i in range(len(chunks))])
    return w, (w * chunks).mean()


def test_weights_and_loss_match_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=40).astype(DTYPE)
    t = rng.uniform(0, 1, 40).astype(DTYPE)
    M = 5
    idx = np.minimum((t - t.min()) / (t.max() - t.min()) * M, M - 1).astype(int)
    chunks = np.array([(r[idx == i] ** 2).mean() for i in range(M)])
    w_ref, loss_ref = np_causal(chunks, 2.0)
    c = CausalResidual(M, eps=2.0)
    loss = c(paddle.to_tensor(r), paddle.to_tensor(t))
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    np.testing.assert_allclose(c.last_weights.numpy(), w_ref, rtol=1e-5)
    np.testing.assert_allclose(causal_weights(paddle.to_tensor(chunks), 2.0).numpy(), w_ref, rtol=1e-6)


def test_gradient_has_detached_weights():
    x = paddle.to_tensor(np.linspace(0.5, 2.0, 12).astype(DTYPE), stop_gradient=False)
    c = CausalResidual(3, eps=1.0)
    loss = c(x)  # time-major, 4 points per chunk
    (g,) = paddle.grad(loss, x)
    chunks = (x.numpy().reshape(3, 4) ** 2).mean(1)
    w, _ = np_causal(chunks, 1.0)
    expected = (np.repeat(w, 4) * 2 * x.numpy() / 4) / 3  # d/dx of (1/M) sum_i w_i mean(x^2), w constant
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-5)


def test_matches_ppsci_causal_mse_loss():
    ppsci = pytest.importorskip("ppsci")
    rng = np.random.default_rng(1)
    out = rng.normal(size=(12, 1)).astype(DTYPE)
    lab = rng.normal(size=(12, 1)).astype(DTYPE)
    ref = ppsci.loss.CausalMSELoss(n_chunks=4, tol=1.5)({"u": paddle.to_tensor(out)}, {"u": paddle.to_tensor(lab)})
    ours = CausalResidual(4, eps=1.5)(paddle.to_tensor(out - lab))
    np.testing.assert_allclose(float(ours), float(ref["u"]), rtol=1e-6)


def test_eps_annealing_and_stopping():
    c = CausalResidual(3, eps_schedule=[0.1, 1.0, 10.0], delta=0.9)
    small = paddle.to_tensor([1e-3, 1e-3, 1e-3])
    assert float(c.current_eps()) == pytest.approx(0.1)
    c.from_chunk_losses(small)
    assert float(c.current_eps()) == pytest.approx(1.0)
    c.from_chunk_losses(paddle.to_tensor([5.0, 5.0, 5.0]))  # min w = exp(-10) < delta: stay
    assert float(c.current_eps()) == pytest.approx(1.0) and not c.converged
    c.from_chunk_losses(small)
    c.from_chunk_losses(small)
    assert float(c.current_eps()) == pytest.approx(10.0) and c.converged
    fresh = CausalResidual(3, eps_schedule=[0.1, 1.0, 10.0], delta=0.9)
    fresh.set_state_dict(c.state_dict())
    assert float(fresh.current_eps()) == pytest.approx(10.0)


def test_composes_with_a_balancer():
    c = CausalResidual(2)
    bal = ReLoBRaLo()
    x = paddle.to_tensor([1.0, 2.0, 3.0, 4.0], stop_gradient=False)
    total = bal({"res": c(x), "bc": (x ** 2).mean()}, 0)
    total.backward()
    assert x.grad is not None and np.all(np.isfinite(x.grad.numpy()))


@pytest.mark.parametrize("kw", [{"n_chunks": 0}, {"eps": -1.0}, {"delta": 1.5}, {"reduction": "max"},
                                {"eps_schedule": [1.0, 0.1]}, {"t_range": (1.0, 0.0)}])
def test_bad_hyperparameters(kw):
    args = dict({"n_chunks": 2}, **kw)
    with pytest.raises(ValueError, match=list(kw)[0]):
        CausalResidual(**args)


def test_build_causal():
    c = build_causal({"name": "causal", "n_chunks": 8, "eps": 0.5})
    assert isinstance(c, CausalResidual) and c.n_chunks == 8
    with pytest.raises(ValueError, match="tol"):
        build_causal({"name": "causal", "n_chunks": 8, "tol": 0.5})


def test_initial_loss_inside_the_exponent_matches_numpy():
    """The authors' KS / NS form: w_i = exp(-eps (L_0 + sum_{k<i} L_r^k)), w_1 = exp(-eps L_0), detached."""
    chunks = np.array([0.5, 0.2, 0.1, 0.4])
    L0, eps = 0.3, 2.0
    w_ref = np.exp(-eps * (L0 + np.concatenate([[0.0], np.cumsum(chunks)[:-1]])))
    c = paddle.to_tensor(chunks, dtype="float64", stop_gradient=False)
    l0 = paddle.to_tensor(L0, dtype="float64", stop_gradient=False)
    causal = CausalResidual(n_chunks=4, eps=eps)
    out = causal.from_chunk_losses(c, initial_loss=l0)
    np.testing.assert_allclose(float(out), (w_ref * chunks).mean(), rtol=1e-6)
    np.testing.assert_allclose(causal.last_weights.numpy(), w_ref, rtol=1e-6)
    gc, g0 = paddle.grad(out, [c, l0], allow_unused=True)
    np.testing.assert_allclose(gc.numpy(), w_ref / 4, rtol=1e-6)  # weights held constant
    assert g0 is None or float(g0) == 0.0  # L_0 only read
