"""SoftAdapt: numpy re-derivation of the paper's variants (arXiv 1912.12355, Sec. 3), guards, state."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import SoftAdapt, build_balancer

SEQ = np.array([[1.0, 2.0, 0.5], [0.8, 2.5, 0.4], [0.5, 2.4, 0.45], [0.3, 1.0, 0.5], [0.2, 1.2, 0.1]])
NAMES = ("res", "bc", "ic")


def np_softadapt(seq, beta, variant, eps=1e-8):
    out = []
    for t, L in enumerate(seq):
        prev = seq[t - 1] if t else L
        if variant == "ratio":
            s = L / (prev + eps)
        else:
            s = L - prev
            if variant == "normalized":
                s = s / (np.abs(s).sum() + eps)
        e = np.exp(beta * s - np.max(beta * s))
        if variant == "loss_weighted":
            e = L * e
            out.append(e / (e.sum() + eps))
        else:
            out.append(e / e.sum())
    return np.array(out)


def run(bal, seq, start=0):
    ws, totals = [], []
    for t, L in enumerate(seq, start=start):
        total = bal({n: paddle.to_tensor(v, dtype=DTYPE) for n, v in zip(NAMES, L)}, t)
        ws.append([bal.weights[n] for n in NAMES])
        totals.append(float(total))
    return np.array(ws), np.array(totals)


@pytest.mark.parametrize("variant", ["difference", "normalized", "loss_weighted", "ratio"])
@pytest.mark.parametrize("beta", [0.1, 5.0, -2.0])
def test_weights_and_total_match_numpy(variant, beta):
    ws, totals = run(SoftAdapt(beta=beta, variant=variant), SEQ)
    ref = np_softadapt(SEQ, beta, variant)
    np.testing.assert_allclose(ws, ref, rtol=1e-5)
    np.testing.assert_allclose(totals, (ref * SEQ).sum(1), rtol=1e-5)


def test_overflow_safe():
    bal = SoftAdapt(beta=100.0)
    run(bal, np.array([[1.0, 1.0, 1.0], [1e4, 1.0, 1.0]]))
    w = bal.weights
    assert np.isclose(w["res"], 1.0) and all(np.isfinite(list(w.values())))


def test_momentum_smooths():
    ws, _ = run(SoftAdapt(beta=1.0, momentum=0.5), SEQ)
    ref = np_softadapt(SEQ, 1.0, "difference")
    lam = np.ones(3)
    for t in range(len(SEQ)):
        lam = 0.5 * lam + 0.5 * ref[t]
        np.testing.assert_allclose(ws[t], lam, rtol=1e-5)


def test_backward_matches_reported_weights():
    net = paddle.nn.Linear(2, 1)
    x = paddle.rand([8, 2])
    bal = SoftAdapt(beta=3.0)
    for step in range(3):
        losses = {"res": (net(x) ** 2).mean() * (step + 1), "bc": ((net(x) - 1) ** 2).mean()}
        total = bal(losses, step)
        w = bal.weights
        g = paddle.grad(total, net.parameters(), retain_graph=True)
        ref = paddle.grad(w["res"] * losses["res"] + w["bc"] * losses["bc"], net.parameters())
        for a, b in zip(g, ref):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kw", [{"beta": float("nan")}, {"beta": "0.1"}, {"variant": "slope"}, {"eps": -1.0},
                                {"momentum": 1.0}])
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError, match=list(kw)[0]):
        SoftAdapt(**kw)


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_nonfinite_loss_skips_update(bad):
    bal = SoftAdapt(beta=1.0)
    run(bal, SEQ[:3])
    w0, prev0 = bal.lambdas.numpy().copy(), bal.prev_losses.numpy().copy()
    bal({"res": paddle.to_tensor(1.0), "bc": paddle.to_tensor(bad), "ic": paddle.to_tensor(1.0)}, 3)
    np.testing.assert_array_equal(bal.lambdas.numpy(), w0)
    np.testing.assert_array_equal(bal.prev_losses.numpy(), prev0)


def test_resume_is_bit_exact():
    full = SoftAdapt(beta=2.0, variant="normalized")
    ws_full, _ = run(full, SEQ)
    half = SoftAdapt(beta=2.0, variant="normalized")
    run(half, SEQ[:2])
    fresh = SoftAdapt(beta=2.0, variant="normalized")
    fresh.set_state_dict({k: v.numpy().copy() for k, v in half.state_dict().items()})
    ws_res, _ = run(fresh, SEQ[2:], start=2)
    np.testing.assert_array_equal(ws_res, ws_full[2:])


def test_build_balancer():
    bal = build_balancer({"name": "softadapt", "beta": 0.5, "variant": "ratio"}, paddle.nn.Linear(1, 1))
    assert isinstance(bal, SoftAdapt) and bal.variant == "ratio"
