import itertools
import math

import numpy as np
import paddle
import pytest
from reference import DTYPE, lra_estimate, make_net, mse_and_grads, numpy_params

from paddle_pinn_balance import LRAnnealing

NAMES = ("res", "bc", "ic")


def make_data(seed=1, scales=(1.0, 30.0, 0.2)):
    rng = np.random.default_rng(seed)
    data = {}
    for name, s, n in zip(NAMES, scales, (12, 7, 5)):
        x = rng.uniform(-1, 1, size=(n, 2))
        t = s * rng.normal(size=(n, 1))
        data[name] = (x, t)
    return data


def paddle_losses(net, data, dtype=DTYPE):
    out = {}
    for name, (x, t) in data.items():
        u = net(paddle.to_tensor(x.astype(dtype)))
        out[name] = ((u - paddle.to_tensor(t.astype(dtype))) ** 2).mean()
    return out


def numpy_grads(net, data, subset):
    params = numpy_params(net)
    grads, losses = {}, {}
    for name, (x, t) in data.items():
        losses[name], g = mse_and_grads(params, x, t)
        grads[name] = g if subset == "all" else g[0::2]
    return losses, grads


VARIANTS = list(itertools.product(
    ["siam", "arxiv"], ["max", "mean", "norm"], ["all", "weights"], ["flat", "layer_mean", "layer_max_ratio"]))


@pytest.mark.parametrize("variant,stat,subset,reduction", VARIANTS)
def test_every_variant_matches_numpy_reference(variant, stat, subset, reduction):
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref="res", variant=variant, statistic=stat, params=subset, reduction=reduction,
                      update_freq=1)
    alpha = {"siam": 0.1, "arxiv": 0.9}[variant]
    lam = {n: 1.0 for n in NAMES}
    for step in range(3):  # several updates, so the siam lambda inside the denominator is not 1
        losses_np, grads = numpy_grads(net, data, subset)
        hat = lra_estimate(grads, ("res",), lam, stat, reduction, variant == "siam", 1e-8)
        lam = {n: (1 - alpha) * lam[n] + alpha * hat[n] for n in NAMES}
        total = lra(paddle_losses(net, data), step)
        got = lra.weights
        for n in NAMES:
            assert got[n] == pytest.approx(lam[n], rel=2e-5), (n, step)
        # forward: the returned total already uses this call's updated weights
        assert float(total) == pytest.approx(sum(lam[n] * losses_np[n] for n in NAMES), rel=2e-5)
    assert lam["bc"] != pytest.approx(1.0) and lam["ic"] != pytest.approx(1.0)


def test_backward_gives_weighted_gradient_only():
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref="res", update_freq=1, alpha=0.5)
    total = lra(paddle_losses(net, data), 0)
    total.backward()
    _, grads = numpy_grads(net, data, "all")
    w = lra.weights
    for p, *per_term in zip(net.parameters(), *(grads[n] for n in NAMES)):
        expected = sum(w[n] * g for n, g in zip(NAMES, per_term))
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=2e-5, atol=1e-7)
    assert lra.lambdas.grad is None and lra.lambdas.stop_gradient


def test_closed_form_linear_model():
    """f(x) = x.w + b, L_i = mean((f - t_i)^2): dL/dw = 2/N X^T r, dL/db = 2/N sum r (flat, all)."""
    paddle.seed(0)
    lin = paddle.nn.Linear(3, 1)
    rng = np.random.default_rng(5)
    xr, tr = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    xb, tb = rng.normal(size=(4, 3)), 10 * rng.normal(size=(4, 1))
    w, b = lin.weight.numpy().astype(np.float64), lin.bias.numpy().astype(np.float64)

    def grad(x, t):
        r = x @ w + b - t
        return np.concatenate([(2 / len(x) * x.T @ r).ravel(), [2 / len(x) * r.sum()]])

    gr, gb = grad(xr, tr), grad(xb, tb)
    R = np.abs(gr).max() / np.abs(gb).mean()
    lra = LRAnnealing(lin, ref="res", variant="arxiv", alpha=1.0, update_freq=1)
    losses = {"res": ((lin(paddle.to_tensor(xr, dtype=DTYPE)) - paddle.to_tensor(tr, dtype=DTYPE)) ** 2).mean(),
              "bc": ((lin(paddle.to_tensor(xb, dtype=DTYPE)) - paddle.to_tensor(tb, dtype=DTYPE)) ** 2).mean()}
    lra(losses, 0)
    assert lra.weights["bc"] == pytest.approx(R, rel=1e-5)


@pytest.mark.parametrize("variant,power", [("siam", 0.5), ("arxiv", 1.0)])
def test_fixed_point_with_frozen_parameters(variant, power):
    net = make_net()
    data = make_data()
    _, grads = numpy_grads(net, data, "all")
    lra = LRAnnealing(net, ref="res", variant=variant, update_freq=1, eps=0.0)
    for step in range(400):  # frozen parameters: the same losses, recomputed (a call consumes their graph)
        lra(paddle_losses(net, data), step)
    gr = np.concatenate([np.abs(g).ravel() for g in grads["res"]])
    for n in ("bc", "ic"):
        gi = np.concatenate([np.abs(g).ravel() for g in grads[n]])
        R = gr.max() / gi.mean()
        assert lra.weights[n] == pytest.approx(R ** power, rel=1e-4)


def test_several_reference_terms_take_the_max():
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref=["res", "ic"], variant="arxiv", alpha=1.0, update_freq=1)
    lra(paddle_losses(net, data), 0)
    _, grads = numpy_grads(net, data, "all")
    hat = lra_estimate(grads, ("res", "ic"), {}, "max", "flat", False, 1e-8)
    assert lra.weights["res"] == 1.0 and lra.weights["ic"] == 1.0
    assert lra.weights["bc"] == pytest.approx(hat["bc"], rel=2e-5)


def test_preset_reproduces_authors_code_and_explicit_arguments_override():
    net = make_net()
    lra = LRAnnealing(net, preset="wang2021_code")
    assert (lra.variant, lra.statistic, lra.params, lra.reduction, lra.update_freq, lra.alpha) == (
        "siam", "max", "weights", "layer_mean", 10, 0.1)
    assert lra._segments.sizes == [2 * 5, 5 * 4, 4 * 1]  # the three weight matrices, no biases
    assert LRAnnealing(net, preset="wang2021_code", update_freq=5).update_freq == 5
    # the authors' rule on hand-computed gradients: global max over weights / mean of per-layer means
    data = make_data()
    lam = {n: 1.0 for n in NAMES}
    for step in range(20):
        if step % 10 == 0:
            _, grads = numpy_grads(net, data, "weights")
            mx = max(np.abs(g).max() for g in grads["res"])
            for n in ("bc", "ic"):
                mean = np.mean([np.abs(lam[n] * g).mean() for g in grads[n]])
                lam[n] = 0.9 * lam[n] + 0.1 * mx / mean
        lra(paddle_losses(net, data), step)
    for n in ("bc", "ic"):
        assert lra.weights[n] == pytest.approx(lam[n], rel=2e-5)


def test_weights_change_only_on_update_steps():
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref="res", update_freq=3)
    history = []
    for step in range(7):
        lra(paddle_losses(net, data), step)
        history.append(lra.weights["bc"])
    assert history[0] == history[1] == history[2] != history[3] == history[4] == history[5] != history[6]
    assert int(lra.num_updates.numpy()[0]) == 3 and int(lra.num_calls.numpy()[0]) == 7


def test_step_none_counts_calls():
    net = make_net()
    lra = LRAnnealing(net, ref="res", update_freq=2)
    data = make_data()
    seen = []
    for _ in range(4):
        lra(paddle_losses(net, data))
        seen.append(int(lra.num_updates.numpy()[0]))
    assert seen == [1, 1, 2, 2]


def test_bounds():
    net = make_net()
    data = make_data(scales=(1.0, 1e-3, 1e3))
    lra = LRAnnealing(net, ref="res", variant="arxiv", alpha=1.0, update_freq=1, min_weight=0.5, max_weight=2.0)
    lra(paddle_losses(net, data), 0)
    assert all(0.5 <= v <= 2.0 for v in lra.weights.values())
    free = LRAnnealing(net, ref="res", variant="arxiv", alpha=1.0, update_freq=1)
    free(paddle_losses(net, data), 0)
    assert free.weights["bc"] > 2.0 or free.weights["ic"] < 0.5


def test_permuting_terms_permutes_weights():
    net = make_net()
    data = make_data()
    a = LRAnnealing(net, ref="res", update_freq=1)
    b = LRAnnealing(net, ref="res", update_freq=1)
    a(paddle_losses(net, data), 0)
    lb = paddle_losses(net, data)
    b({n: lb[n] for n in reversed(NAMES)}, 0)
    assert list(b.weights) == list(reversed(NAMES))
    for n in NAMES:
        assert a.weights[n] == pytest.approx(b.weights[n], rel=1e-6)


def test_non_finite_loss_keeps_weights():
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref="res", update_freq=1)
    lra(paddle_losses(net, data), 0)
    before = lra.weights
    losses = paddle_losses(net, data)
    losses["bc"] = losses["bc"] * float("nan")
    lra(losses, 1)
    after = lra.weights
    assert after == before
    assert all(math.isfinite(v) for v in after.values())


def test_term_without_gradient_keeps_its_weight():
    net = make_net()
    data = make_data()
    lra = LRAnnealing(net, ref="res", update_freq=1)
    losses = paddle_losses(net, data)
    losses["ic"] = paddle.to_tensor(3.0)  # constant: not connected to the parameters
    lra(losses, 0)
    assert lra.weights["ic"] == 1.0 and lra.weights["bc"] != 1.0


@pytest.mark.parametrize("bad,match", [
    (dict(variant="paper"), "variant"),
    (dict(statistic="min"), "statistic"),
    (dict(params="biases"), "params"),
    (dict(reduction="median"), "reduction"),
    (dict(alpha=0.0), "alpha"),
    (dict(alpha=1.5), "alpha"),
    (dict(update_freq=0), "update_freq"),
    (dict(update_freq=2.5), "update_freq"),
    (dict(min_weight=-1.0), "min_weight"),
    (dict(min_weight=3.0, max_weight=2.0), "min_weight"),
    (dict(eps=float("nan")), "eps"),
    (dict(preset="nope"), "preset"),
    (dict(ref=[]), "ref"),
    (dict(ref=["res", "res"]), "ref"),
])
def test_bad_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=match):
        LRAnnealing(make_net(), **bad)


def test_ref_must_be_a_loss_name():
    lra = LRAnnealing(make_net(), ref="pde")
    with pytest.raises(ValueError, match="pde"):
        lra(paddle_losses(make_net(), make_data()), 0)


def test_momentum_is_the_papers_alpha_under_the_shared_name():
    """``momentum`` (every balancer's smoothing name) = 1 - ``alpha`` (the LRA paper's): same weights."""
    def run(**kw):
        paddle.seed(3)
        net = paddle.nn.Sequential(paddle.nn.Linear(1, 6), paddle.nn.Tanh(), paddle.nn.Linear(6, 1))
        lra = LRAnnealing(net, ref="res", update_freq=1, **kw)
        x = paddle.linspace(0, 1, 8).reshape([-1, 1])
        for step in range(3):
            lra({"res": net(x).pow(2).mean(), "bc": (net(x[:1]) - 1).pow(2).mean() * 1e-3}, step).backward()
        return lra.weights["bc"]

    assert run(momentum=0.25) == run(alpha=0.75) != run(alpha=0.5)
    lra = LRAnnealing(paddle.nn.Linear(1, 1), momentum=0.25)
    assert lra.alpha == 0.75 and lra.momentum == 0.25
    with pytest.raises(ValueError, match="not both"):
        LRAnnealing(paddle.nn.Linear(1, 1), alpha=0.5, momentum=0.5)
    with pytest.raises(ValueError, match="momentum"):
        LRAnnealing(paddle.nn.Linear(1, 1), momentum=1.0)
