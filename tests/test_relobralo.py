"""ReLoBRaLo: numpy re-derivation of eqs. 6-8 (arXiv 2110.09813), seeded look-back, guards, state."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import ReLoBRaLo, build_balancer
from paddle_pinn_balance.relobralo import relobralo_weights

SEQ = np.array([[1.0, 2.0, 0.5], [0.8, 2.5, 0.4], [0.5, 2.4, 0.45], [0.3, 1.0, 0.5], [0.2, 1.2, 0.1],
                [0.1, 0.9, 0.2], [0.05, 0.8, 0.3]])
NAMES = ("res", "bc", "ic")


def np_rhos(seed, n, p):
    """Park-Miller minimal standard (multiplier 48271), u = state / (2^31 - 1), rho = [u < p]."""
    s, out = seed % (2**31 - 2) + 1, []
    for _ in range(n):
        s = s * 48271 % (2**31 - 1)
        out.append(float(s / (2**31 - 1) < p))
    return out


def np_softmax_bal(L, ref, tau, eps):
    z = L / (tau * ref + eps)
    e = np.exp(z - z.max())
    return len(L) * e / e.sum()


def np_relobralo(seq, alpha, p, tau, eps=1e-8, seed=0):
    rhos = np_rhos(seed, len(seq), p)
    w, out = np.ones(seq.shape[1]), []
    for t, L in enumerate(seq):
        if t > 0:
            rho = rhos[t]
            w = alpha * (rho * w + (1 - rho) * np_softmax_bal(L, seq[0], tau, eps)) \
                + (1 - alpha) * np_softmax_bal(L, seq[t - 1], tau, eps)
        out.append(w.copy())
    return np.array(out)


def run(bal, seq, start=0):
    ws, totals = [], []
    for t, L in enumerate(seq, start=start):
        total = bal({n: paddle.to_tensor(v, dtype=DTYPE) for n, v in zip(NAMES, L)}, t)
        ws.append([bal.weights[n] for n in NAMES])
        totals.append(float(total))
    return np.array(ws), np.array(totals)


@pytest.mark.parametrize("alpha,p,tau,seed", [(0.95, 0.99, 1.0, 0), (0.5, 0.5, 0.1, 7), (0.9, 0.0, 1.0, 3)])
def test_weights_and_total_match_numpy(alpha, p, tau, seed):
    bal = ReLoBRaLo(alpha=alpha, expected_rho=p, tau=tau, seed=seed)
    ws, totals = run(bal, SEQ)
    ref = np_relobralo(SEQ, alpha, p, tau, seed=seed)
    np.testing.assert_allclose(ws, ref, rtol=1e-5)
    np.testing.assert_allclose(totals, (ref * SEQ).sum(1), rtol=1e-5)
    np.testing.assert_allclose(ws.sum(1)[1:], 3.0, rtol=1e-5)  # convex mix of estimates summing to n


def test_rho_draws_mix_both_branches():
    r = np_rhos(5, 200, 0.5)
    assert 60 < sum(r) < 140


def test_pure_function_overflow_safe():
    L = paddle.to_tensor([1e6, 1.0])
    w = relobralo_weights(L, paddle.to_tensor([1e-3, 1.0]), L, paddle.ones([2]), paddle.to_tensor(0.0), 0.9, 1.0)
    assert np.all(np.isfinite(w.numpy()))


def test_backward_matches_reported_weights():
    paddle.seed(0)
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([8, 2])
    bal = ReLoBRaLo()
    for step in range(3):
        losses = {"res": (net(x) ** 2).mean(), "bc": ((net(x) - 1) ** 2).mean()}
        total = bal(losses, step)
        w = bal.weights
        g = paddle.grad(total, net.parameters(), retain_graph=True)
        ref = paddle.grad(w["res"] * losses["res"] + w["bc"] * losses["bc"], net.parameters())
        for a, b in zip(g, ref):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    assert total.stop_gradient is False


@pytest.mark.parametrize("kw", [{"alpha": 1.5}, {"expected_rho": -0.1}, {"tau": 0.0}, {"seed": -1}, {"eps": -1.0},
                                {"update_freq": 0}])
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError, match=list(kw)[0]):
        ReLoBRaLo(**kw)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_loss_skips_update(bad):
    bal = ReLoBRaLo(seed=1)
    run(bal, SEQ[:3])
    before = {k: v.numpy().copy() for k, v in bal.state_dict().items() if k not in ("num_calls", "num_updates")}
    bal({"res": paddle.to_tensor(bad), "bc": paddle.to_tensor(1.0), "ic": paddle.to_tensor(1.0)}, 3)
    for k, v in bal.state_dict().items():
        if k in before:
            np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)
    # the next finite call continues as if the bad one had not happened
    ws, _ = run(bal, SEQ[3:], start=4)
    np.testing.assert_allclose(ws, np_relobralo(SEQ, 0.95, 0.99, 1.0, seed=1)[3:], rtol=1e-5)


def test_resume_is_bit_exact():
    full = ReLoBRaLo(expected_rho=0.5, seed=4)
    ws_full, _ = run(full, SEQ)
    half = ReLoBRaLo(expected_rho=0.5, seed=4)
    run(half, SEQ[:4])
    state = {k: v.numpy().copy() for k, v in half.state_dict().items()}
    fresh = ReLoBRaLo(expected_rho=0.5, seed=4)
    fresh.set_state_dict(state)
    ws_res, _ = run(fresh, SEQ[4:], start=4)
    np.testing.assert_array_equal(ws_res, ws_full[4:])
    for k, v in full.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), fresh.state_dict()[k].numpy(), err_msg=k)
    bad = dict(state, rng_state=np.zeros([2], "int64"))
    with pytest.raises(ValueError, match="rng_state"):
        ReLoBRaLo().set_state_dict(bad)


def test_update_freq_holds_weights():
    bal = ReLoBRaLo(update_freq=3)
    ws, _ = run(bal, SEQ)
    np.testing.assert_array_equal(ws[1], ws[0])
    np.testing.assert_array_equal(ws[2], ws[0])
    np.testing.assert_array_equal(ws[5], ws[3])


def test_build_balancer():
    bal = build_balancer({"name": "relobralo", "alpha": 0.9, "tau": 0.1}, paddle.nn.Linear(1, 1))
    assert isinstance(bal, ReLoBRaLo) and bal.alpha == 0.9 and bal.tau == 0.1
    with pytest.raises(ValueError, match="beta"):
        build_balancer({"name": "relobralo", "beta": 0.9}, paddle.nn.Linear(1, 1))
