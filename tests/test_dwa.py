"""Dynamic Weight Average (dwa.py) against a numpy re-derivation of Liu, Johns & Davison (CVPR 2019, Sec. 3.3)."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import build_balancer
from paddle_pinn_balance.dwa import DWA, dwa_weights

SEQ = [[2.0, 1.0, 0.5], [1.5, 0.9, 0.6], [1.0, 0.85, 0.3], [0.7, 0.8, 0.31], [0.6, 0.4, 0.2], [0.5, 0.41, 0.1]]
NAMES = ["res", "bc", "ic"]


def np_dwa(seq, T, eps=1e-8):
    """Weights after each update: 1 until two earlier losses exist, then K softmax(L(t-1) / (L(t-2) + eps) / T)."""
    out, hist = [], []
    for L in seq:
        L = np.asarray(L, dtype=np.float64)
        if len(hist) < 2:
            w = np.ones_like(L)
        else:
            r = hist[-1] / (hist[-2] + eps) / T
            e = np.exp(r - r.max())
            w = len(L) * e / e.sum()
        out.append(w)
        hist.append(L)
    return out


def run(bal, seq, steps=None):
    ws = []
    for t, L in zip(steps if steps is not None else range(len(seq)), seq):
        bal({n: paddle.to_tensor(v, dtype=DTYPE) for n, v in zip(NAMES, L)}, t)
        ws.append(np.array(list(bal.weights.values())))
    return ws


@pytest.mark.parametrize("T", [0.5, 2.0, 10.0])
def test_weights_match_numpy(T):
    got = run(DWA(temperature=T), SEQ)
    for g, r in zip(got, np_dwa(SEQ, T)):
        np.testing.assert_allclose(g, r, rtol=1e-6 if DTYPE == "float32" else 1e-13)
    assert abs(got[-1].sum() - 3.0) < 1e-5  # the weights sum to K


def test_pure_function_is_the_formula():
    p1, p2 = np.array([0.5, 2.0]), np.array([1.0, 1.0])
    got = dwa_weights(paddle.to_tensor(p1), paddle.to_tensor(p2), 2.0, eps=0.0).numpy()
    e = np.exp(p1 / p2 / 2.0)
    np.testing.assert_allclose(got, 2 * e / e.sum(), rtol=1e-12)


def test_update_freq_reads_the_update_calls_losses():
    bal = DWA(update_freq=2, temperature=1.0)
    got = run(bal, SEQ)
    ref = np_dwa(SEQ[0::2], 1.0)
    for i, w in enumerate(got):  # weights change only at even steps
        np.testing.assert_allclose(w, ref[i // 2], rtol=1e-6)


def test_momentum_and_bounds_are_the_base_ones():
    bal = DWA(temperature=1.0, momentum=0.5, max_weight=1.05)
    lam = np.ones(3)
    for g, r in zip(run(bal, SEQ), np_dwa(SEQ, 1.0)):
        lam = np.minimum(0.5 * lam + 0.5 * r, 1.05)
        np.testing.assert_allclose(g, lam, rtol=1e-6)


def test_a_non_finite_loss_keeps_weights_and_both_earlier_losses():
    seq = SEQ[:3] + [[np.nan, 0.8, 0.31]] + SEQ[3:]
    with pytest.warns(Warning, match="non-finite loss"):
        got = run(DWA(temperature=1.0, check_every=1), seq)
    ref = np_dwa(SEQ, 1.0)
    np.testing.assert_allclose(got[3], got[2])  # skipped
    for g, r in zip(got[4:], ref[3:]):  # as if the bad call had not been
        np.testing.assert_allclose(g, r, rtol=1e-6)


def test_checkpoint_resumes_bit_exactly():
    whole = DWA(temperature=1.0)
    ref = run(whole, SEQ)
    first = DWA(temperature=1.0)
    run(first, SEQ[:3])
    state = {k: v.numpy().copy() for k, v in first.state_dict().items()}
    assert state["initialised"].tolist() == [2, 2, 2]
    second = DWA(temperature=1.0)
    second.set_state_dict(state)
    first.set_state_dict(state)  # into a balancer whose state exists already
    rest = run(second, SEQ[3:], steps=range(3, len(SEQ)))
    for g, r in zip(rest, ref[3:]):
        np.testing.assert_array_equal(g, r)
    bad = dict(state, initialised=np.array([3, 0, 0]))
    with pytest.raises(ValueError, match="initialised"):
        DWA().set_state_dict(bad)


def test_built_from_a_config():
    bal = build_balancer({"name": "dwa", "temperature": 3.0, "min_weight": 0.1}, paddle.nn.Linear(1, 1))
    assert isinstance(bal, DWA) and bal.temperature == 3.0 and bal.min_weight == 0.1
    with pytest.raises(ValueError, match="temperature"):
        DWA(temperature=0.0)
