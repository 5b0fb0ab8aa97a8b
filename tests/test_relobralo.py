"""ReLoBRaLo: numpy re-derivation of eqs. 6-8 (arXiv 2110.09813), seeded look-back, guards, state."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import ReLoBRaLo, build_balancer
from paddle_pinn_balance.relobralo import lookback_draw, relobralo_weights

SEQ = np.array([[1.0, 2.0, 0.5], [0.8, 2.5, 0.4], [0.5, 2.4, 0.45], [0.3, 1.0, 0.5], [0.2, 1.2, 0.1],
                [0.1, 0.9, 0.2], [0.05, 0.8, 0.3]])
NAMES = ("res", "bc", "ic")


def np_rhos(seed, steps, p):
    """rho(t) = [u < p], u = splitmix64(seed * 2^32 + t) / 2^64 (Steele et al. 2014), in numpy uint64."""
    out = []
    with np.errstate(over="ignore"):
        for t in steps:
            z = np.uint64(seed) * np.uint64(2**32) + np.uint64(t) + np.uint64(0x9E3779B97F4A7C15)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            out.append(float(int(z >> np.uint64(11)) / 2.0**53 < p))
    return out


def np_softmax_bal(L, ref, tau, eps):
    z = L / (tau * ref + eps)
    e = np.exp(z - z.max())
    return len(L) * e / e.sum()


def np_relobralo(seq, alpha, p, tau, eps=1e-8, seed=0, steps=None):
    """Weights after each call (eqs. of arXiv 2110.09813): the first call gives ones and takes L(0); call t
    at step steps[t] draws rho(steps[t])."""
    steps = list(range(len(seq))) if steps is None else steps
    rhos = np_rhos(seed, steps, p)
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
    r = np_rhos(5, range(200), 0.5)
    assert 60 < sum(r) < 140


@pytest.mark.parametrize("p", [0.0, 0.3, 0.99, 1.0])
def test_lookback_draw_is_bernoulli_of_the_step(p):
    draws = [lookback_draw(11, t, p) for t in range(20000)]
    assert draws == np_rhos(11, range(20000), p)
    assert set(draws) <= {0.0, 1.0}
    assert abs(np.mean(draws) - p) < 4 * np.sqrt(p * (1 - p) / 20000) + 1e-12
    assert [lookback_draw(12, t, 0.5) for t in range(64)] != [lookback_draw(11, t, 0.5) for t in range(64)]


def test_rho_one_skips_the_lookback_softmax_exactly():
    L, init, prev, w = (paddle.to_tensor(v) for v in ([0.3, 2.0], [1.0, 1.0], [0.5, 2.5], [1.2, 0.8]))
    a = relobralo_weights(L, init, prev, w, 1.0, 0.9, 1.0).numpy()
    b = (0.9 * w.numpy() + 0.1 * np_softmax_bal(L.numpy(), prev.numpy(), 1.0, 1e-8))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    half = relobralo_weights(L, init, prev, w, 0.5, 0.9, 1.0).numpy()
    c = 0.9 * (0.5 * w.numpy() + 0.5 * np_softmax_bal(L.numpy(), init.numpy(), 1.0, 1e-8)) \
        + 0.1 * np_softmax_bal(L.numpy(), prev.numpy(), 1.0, 1e-8)
    np.testing.assert_allclose(half, c, rtol=1e-6)


def test_pure_function_overflow_safe():
    L = paddle.to_tensor([1e6, 1.0])
    w = relobralo_weights(L, paddle.to_tensor([1e-3, 1.0]), L, paddle.ones([2]), 0.0, 0.9, 1.0)
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
    counters = ("num_calls", "num_updates", "last_update_step")
    before = {k: v.numpy().copy() for k, v in bal.state_dict().items() if k not in counters}
    bal({"res": paddle.to_tensor(bad), "bc": paddle.to_tensor(1.0), "ic": paddle.to_tensor(1.0)}, 3)
    for k, v in bal.state_dict().items():
        if k in before:
            np.testing.assert_array_equal(v.numpy(), before[k], err_msg=k)
    # the next finite call continues as if the bad one had not happened (rho drawn for its own step)
    ws, _ = run(bal, SEQ[3:], start=4)
    ref = np_relobralo(SEQ, 0.95, 0.99, 1.0, seed=1, steps=[0, 1, 2, 4, 5, 6, 7])
    np.testing.assert_allclose(ws, ref[3:], rtol=1e-5)


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
    bad = dict(state, lookback_seed=np.zeros([2], "int64"))
    with pytest.raises(ValueError, match="lookback_seed"):
        ReLoBRaLo().set_state_dict(bad)
    other = ReLoBRaLo(expected_rho=0.5, seed=99)  # the checkpoint's seed wins
    other.set_state_dict(state)
    assert other.seed == 4
    np.testing.assert_array_equal(run(other, SEQ[4:], start=4)[0], ws_full[4:])


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


def test_nonfinite_first_call_leaves_the_next_call_first():
    bal = ReLoBRaLo(seed=2)
    bal({"res": paddle.to_tensor(np.nan), "bc": paddle.to_tensor(1.0), "ic": paddle.to_tensor(1.0)}, 0)
    assert not bal.initialised.numpy().any()
    ws, _ = run(bal, SEQ, start=1)
    np.testing.assert_allclose(ws, np_relobralo(SEQ, 0.95, 0.99, 1.0, seed=2, steps=range(1, 8)), rtol=1e-5)
