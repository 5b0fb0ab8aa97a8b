"""SelfAdaptive (McClenny & Braga-Neto 2023): ascent sign, sharp layer, composition, resume."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import LRAnnealing, SelfAdaptive


def test_ascent_direction_matches_numpy():
    r = np.array([0.5, -1.0, 2.0])
    lam0 = np.array([1.0, 2.0, 0.5])
    for mask, dm in (("polynomial", lambda a: 2 * a), ("sigmoid", lambda a: np.exp(-a) / (1 + np.exp(-a)) ** 2)):
        sa = SelfAdaptive({"res": 3}, mask=mask)
        paddle.assign(paddle.to_tensor(lam0.astype(DTYPE)), sa.weight("res"))
        loss = sa({"res": paddle.to_tensor(r.astype(DTYPE))})["res"]
        m = lam0 ** 2 if mask == "polynomial" else 1 / (1 + np.exp(-lam0))
        np.testing.assert_allclose(float(loss), np.mean(m * r ** 2), rtol=1e-6)
        (g,) = paddle.grad(loss, [sa.weight("res")])
        # d L / d lambda_i = m'(lambda_i) r_i^2 / N; the delivered gradient is its negative (ascent by descent)
        np.testing.assert_allclose(g.numpy(), -dm(lam0) * r ** 2 / 3, rtol=1e-5)


def test_point_count_change_raises():
    sa = SelfAdaptive({"res": 3})
    with pytest.raises(ValueError, match="points must stay fixed"):
        sa({"res": paddle.zeros([4])})


def _net():
    paddle.seed(0)
    return paddle.nn.Sequential(paddle.nn.Linear(1, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 1))


def test_composition_with_lr_annealing_matches_autograd():
    net = _net()
    sa = SelfAdaptive({"res": 8, "bc": 2}, init=0.7)
    x = paddle.linspace(-1, 1, 8).reshape([8, 1])
    xb = paddle.to_tensor([[-1.0], [1.0]])
    lra = LRAnnealing(net, ref="res", update_freq=1)
    lra.add_parameters(sa.parameters())
    params = net.parameters() + sa.parameters()
    for step in range(3):
        def make():
            return sa({"res": (net(x) - paddle.sin(3 * x)).reshape([-1]), "bc": net(xb).reshape([-1])})
        ref_losses = make()
        total = lra(make(), step)
        w = lra.weights
        ref = paddle.grad(sum(w[n] * v for n, v in ref_losses.items()), params)
        got = paddle.grad(total, params)
        for a, b in zip(got, ref):
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6)


def test_sharp_layer_weights_concentrate_and_resume_bit_exact():
    # u'' = f on [-1, 1], u = tanh(20 x): the residual is large near x = 0
    net = _net()
    n = 64
    xs = np.linspace(-1, 1, n).astype(DTYPE).reshape(n, 1)
    k = 20.0
    f = (-2 * k ** 2 * np.tanh(k * xs) / np.cosh(k * xs) ** 2).astype(DTYPE)
    x = paddle.to_tensor(xs)
    x.stop_gradient = False
    fx = paddle.to_tensor(f)
    xb = paddle.to_tensor([[-1.0], [1.0]])
    ub = paddle.to_tensor([[-1.0], [1.0]])
    sa = SelfAdaptive({"res": n, "bc": 2})
    opt = paddle.optimizer.Adam(5e-3, parameters=net.parameters() + sa.parameters())

    def step():
        u = net(x)
        du = paddle.grad(u, x, create_graph=True)[0]
        d2u = paddle.grad(du, x, create_graph=True)[0]
        losses = sa({"res": (d2u - fx).reshape([-1]) / k ** 2, "bc": (net(xb) - ub).reshape([-1])})
        (losses["res"] + losses["bc"]).backward()
        opt.step()
        opt.clear_grad()

    for _ in range(200):
        step()
    lam = sa.weight("res").numpy()
    assert lam.min() >= 1.0 - 1e-6  # ascent: weights only grow
    centre = np.abs(xs[:, 0]) < 0.15
    assert lam[centre].mean() > lam[~centre].mean()
    s = sa.summary()["res"]
    assert s[0] <= s[1] <= s[2]
    state = {k: v.numpy().copy() for k, v in sa.state_dict().items()}
    sa2 = SelfAdaptive({"res": n, "bc": 2})
    sa2.set_state_dict(state)
    for a, b in zip(sa.parameters(), sa2.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_built_from_yaml_like_any_balancer(tmp_path):
    from paddle_pinn_balance import build_balancer, build_loss_layer

    path = tmp_path / "sa.yaml"
    path.write_text("name: self_adaptive\npoints: {res: 3, bc: 2}\nmask: polynomial\nq: 2.0\ninit: 0.5\n")
    sa = build_loss_layer(str(path))
    assert sa.names == ("res", "bc") and sa.q == 2.0
    np.testing.assert_array_equal(sa.weight("res").numpy(), [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="allowed"):
        build_loss_layer({"name": "self_adaptive", "points": {"res": 3}, "qq": 1})
    with pytest.raises(ValueError, match="unknown loss layer"):
        build_loss_layer({"name": "lr_annealing"})
    with pytest.raises(ValueError, match="build_loss_layer"):
        build_balancer({"name": "self_adaptive", "points": {"res": 3}}, paddle.nn.Linear(1, 1))
    causal = build_loss_layer({"name": "causal", "n_chunks": 4, "eps": 1.0})
    assert type(causal).__name__ == "CausalResidual"
