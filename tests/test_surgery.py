"""PCGrad / ConFIG / UPGrad: numpy re-derivations from the papers, properties, end-to-end."""

import numpy as np
import paddle
import pytest
from scipy.optimize import minimize

from paddle_pinn_balance import build_balancer
from paddle_pinn_balance.surgery import (
    ConFIG,
    MConFIG,
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


# --------------------------------------------------------------------------- M-ConFIG


def np_mconfig(grads, b1=0.9, b2=0.999, eps=1e-8, second_moment=True):
    """Liu et al., the M-ConFIG algorithm (as in the authors' documentation), written from it: at step s
    only term s % K gives its gradient (``grads[s][s % K]``; the other rows are not read). Until every term
    has a momentum the direction is 0 and t does not count (the authors' PseudoMomentumOperator). Returns the
    directions and the bias-corrected momenta of each step."""
    K, P = grads[0].shape
    m, tg = np.zeros((K, P)), np.zeros(K)
    mp, v, t = np.zeros(P), np.zeros(P), 0
    out, hats = [], []
    for s, G in enumerate(grads):
        i = s % K
        tg[i] += 1
        m[i] = b1 * m[i] + (1 - b1) * G[i]
        if np.any(tg == 0):
            out.append(np.zeros(P))
            hats.append(None)
            continue
        t += 1
        mh = m / (1 - b1 ** tg)[:, None]
        mg = np_config(mh)
        hats.append(mh)
        if not second_moment:
            out.append(mg)
            continue
        gc = (mg * (1 - b1 ** t) - b1 * mp) / (1 - b1)
        mp = b1 * mp + (1 - b1) * gc
        v = b2 * v + (1 - b2) * gc ** 2
        out.append(mg / (np.sqrt(v / (1 - b2 ** t)) + eps))
    return out, hats


class _Linear(paddle.nn.Layer):
    """theta [P]; the loss L_i = c_i . theta has gradient c_i exactly (hand-made gradients)."""

    def __init__(self, p):
        super().__init__()
        self.theta = self.create_parameter([p], dtype="float64",
                                           default_initializer=paddle.nn.initializer.Constant(0.5))


def _hand_made(k, p, steps, seed):
    rng = np.random.default_rng(seed)
    scales = np.array([1.0, 30.0, 0.2, 5.0, 2.0][:k])[:, None]  # very different gradient sizes
    base = rng.normal(size=(k, p)) * scales
    return [base + 0.3 * scales * rng.normal(size=(k, p)) for _ in range(steps)]


def _run_mconfig(bal, model, grads, start=0):
    got = []
    for s, G in enumerate(grads, start):
        losses = {f"t{i}": paddle.dot(T(G[i]), model.theta) for i in range(len(G))}
        total = bal(losses, s)
        np.testing.assert_allclose(float(total), sum(float(v) for v in losses.values()), rtol=1e-12)
        total.backward()
        got.append(model.theta.grad.numpy().copy())
        model.clear_gradients()
    return got


@pytest.mark.parametrize("second_moment", [True, False])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_mconfig_matches_numpy_algorithm(k, second_moment):
    grads = _hand_made(k, 7, 4 * k, seed=k)
    model = _Linear(7)
    bal = MConFIG(model, beta_1=0.8, beta_2=0.99, second_moment=second_moment)
    got = _run_mconfig(bal, model, grads)
    want, _ = np_mconfig(grads, 0.8, 0.99, second_moment=second_moment)
    for s, (a, b) in enumerate(zip(got, want)):
        if s < k - 1:  # not every term has a momentum yet: nothing moves
            assert np.all(a == 0), s
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9 * np.abs(b).max(), err_msg=f"step {s}")
    assert bal.momentum_counts.numpy().tolist() == [4.0] * k
    assert float(bal.direction_count.numpy()[0]) == 4 * k - (k - 1)
    assert bal.weights == {f"t{i}": 1.0 for i in range(k)}


def test_mconfig_two_terms_by_hand():
    """K = 2, beta_1 = 0.5, no second moment. Step 0: m_0 = g_0 / 2 only, direction 0. Step 1: m_1 = g_1 / 2;
    bias corrections 1 / (1 - 0.5) = 2: m_hat = (g_0, g_1) = ((1, 0), (0, 1)): orthogonal unit vectors, so
    ConFIG's direction is (1, 1) / sqrt(2) times (g_0 + g_1) . g_u = sqrt(2), i.e. (1, 1)."""
    model = _Linear(2)
    G = np.array([[1.0, 0.0], [0.0, 1.0]])
    bal = MConFIG(model, beta_1=0.5, second_moment=False)
    got = _run_mconfig(bal, model, [G, G])
    np.testing.assert_allclose(got[0], [0.0, 0.0])
    np.testing.assert_allclose(got[1], [1.0, 1.0], rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_mconfig_equal_positive_cosine_to_every_momentum(k):
    grads = _hand_made(k, 9, 3 * k, seed=40 + k)
    model = _Linear(9)
    got = _run_mconfig(MConFIG(model, second_moment=False), model, grads)
    _, hats = np_mconfig(grads, second_moment=False)
    for d, mh in zip(got[k - 1:], hats[k - 1:]):
        cos = mh @ d / np.linalg.norm(mh, axis=1) / np.linalg.norm(d)
        np.testing.assert_allclose(cos, cos[0], rtol=1e-8)
        assert cos[0] > 0
        assert np.all(mh @ d > 0)  # no term's momentum conflicts with the direction


def test_mconfig_only_the_turn_term_is_differentiated():
    """One backward of one term per step: the other terms' graphs are left untouched."""
    net, make = _problem(3)
    bal = MConFIG(net)
    for step in range(4):
        losses = make()
        total = bal(losses, step)
        total.backward()
        turn = step % 3
        for i, v in enumerate(losses.values()):
            if i != turn:  # its graph was not freed by a backward
                paddle.grad(v, net.parameters())
        net.clear_gradients()
    assert bal.momentum_counts.numpy().tolist() == [2.0, 1.0, 1.0]


def test_mconfig_between_updates_plain_sum_and_cadence():
    net, make = _problem(2)
    bal = MConFIG(net, update_freq=2)
    for step in range(4):
        losses = make()
        total = bal(losses, step)
        total.backward()
        got = np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])
        if step % 2:  # not an update step: the plain sum's gradient, the momenta untouched
            np.testing.assert_allclose(got, _flat_term_grads(net, make()).sum(0), rtol=1e-5, atol=1e-6)
        net.clear_gradients()
    assert bal.momentum_counts.numpy().tolist() == [1.0, 1.0]


def test_mconfig_non_finite_gradient_skips_the_step():
    grads = _hand_made(2, 4, 5, seed=1)
    model = _Linear(4)
    bal = MConFIG(model)
    _run_mconfig(bal, model, grads[:3])
    state = {k: v.numpy().copy() for k, v in bal.state_dict().items()}
    bad = grads[3].copy()
    bad[1, 2] = np.nan  # step 3 is term 1's turn
    got = _run_mconfig(bal, model, [bad], start=3)
    assert np.all(got[0] == 0)
    for key, value in bal.state_dict().items():
        if key not in ("num_calls", "num_updates", "last_update_step", "mconfig_turn"):
            np.testing.assert_array_equal(value.numpy(), state[key], err_msg=key)
    assert int(bal.mconfig_turn.numpy()[0]) == 4  # the turn moved on
    assert np.all(np.isfinite(_run_mconfig(bal, model, grads[4:], start=4)[0]))


def test_mconfig_state_round_trip_bit_exact_and_registry():
    grads = _hand_made(3, 5, 8, seed=2)
    model = _Linear(5)
    a = build_balancer({"name": "m_conflict_free", "beta_1": 0.7}, model)
    assert isinstance(a, MConFIG) and a.beta_1 == 0.7
    _run_mconfig(a, model, grads[:4])
    state = {k: v.numpy() for k, v in a.state_dict().items()}
    b = MConFIG(model, beta_1=0.7)
    b.set_state_dict(state)
    assert b._turn == 4
    ga = _run_mconfig(a, model, grads[4:], start=4)
    gb = _run_mconfig(b, model, grads[4:], start=4)
    for x, y in zip(ga, gb):
        np.testing.assert_array_equal(x, y)
    for key, bad in (("beta_1", 1.0), ("beta_2", -0.1), ("eps", -1.0), ("second_moment", "yes"), ("rcond", 0.0)):
        with pytest.raises(ValueError, match=key):
            MConFIG(model, **{key: bad})
