"""NTKWeighting: traces, weights (numpy re-derivations), cadence, state, bad input, grad_norm mode, config."""

import warnings

import numpy as np
import paddle
import pytest
from reference import DTYPE, make_net, mse_and_grads, numpy_params

from paddle_pinn_balance import NTKWeighting, build_balancer

NAMES = ("res", "bc", "ic")
SIZES = {"res": 12, "bc": 7, "ic": 5}


def _points(seed=1):
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-1, 1, size=(SIZES[n], 2)).astype(DTYPE) for n in NAMES}


def _residual(x):
    def kernel(model):
        xx = paddle.to_tensor(x)
        xx.stop_gradient = False
        u = model(xx)
        g = paddle.grad(u.sum(), xx, create_graph=True)[0]
        lap = sum(paddle.grad(g[:, k].sum(), xx, create_graph=True)[0][:, k] for k in range(2))
        return lap + u[:, 0]
    return kernel


def _output(x):
    return lambda model: model(paddle.to_tensor(x))


def _velocity(x):  # a first-derivative term (u_t of an initial condition)
    def kernel(model):
        xx = paddle.to_tensor(x)
        xx.stop_gradient = False
        u = model(xx)
        return paddle.grad(u.sum(), xx, create_graph=True)[0][:, 1]
    return kernel


def kernels_for(points):
    return {"res": _residual(points["res"]), "bc": _output(points["bc"]), "ic": _velocity(points["ic"])}


def reference_traces(net, points):
    """Independent: each point's kernel value alone, one paddle.grad per point, summed in float64."""
    makers = {"res": _residual, "bc": _output, "ic": _velocity}
    params = net.parameters()
    out = {}
    for n in NAMES:
        tot = []
        for p in range(SIZES[n]):
            f = makers[n](points[n][p:p + 1])(net).reshape([-1]).sum()
            grads = paddle.grad(f, params, allow_unused=True)  # u_y does not reach the last bias
            tot.append(sum(float((g.astype("float64") ** 2).sum()) for g in grads if g is not None))
        out[n] = np.array(tot)
    return out


def losses_for(net, points):
    return {n: (k(net) ** 2).mean() for n, k in kernels_for(points).items()}


def test_traces_match_independent_loop():
    net, points = make_net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), update_freq=1)
    ntk(losses_for(net, points), 0)
    ref = reference_traces(net, points)
    got = ntk.traces()
    for n in NAMES:
        np.testing.assert_allclose(got[n], ref[n].sum(), rtol=1e-5)
    assert ntk.last_path == "expanded" and ntk.last_paths == dict.fromkeys(NAMES, "expanded")


def test_traces_linear_closed_form():
    """f(x) = w.x + b: Tr = sum_p (||x_p||^2 + 1) for the output; N for u_y; sum_p (||x_p||^2 + 1) for lap u + u."""
    lin = paddle.nn.Linear(2, 1)
    points = _points()
    kernels = {"bc": _output(points["bc"]), "ic": _velocity(points["ic"])}
    ntk = NTKWeighting(lin, kernels=kernels, update_freq=1)
    ntk({n: paddle.to_tensor(1.0) for n in kernels}, 0)
    tr = ntk.traces()
    np.testing.assert_allclose(tr["bc"], ((points["bc"].astype(np.float64) ** 2).sum(1) + 1).sum(), rtol=1e-6)
    np.testing.assert_allclose(tr["ic"], SIZES["ic"], rtol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_weights_formula(reduction, momentum):
    net, points = make_net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), reduction=reduction, momentum=momentum, update_freq=1)
    ref = reference_traces(net, points)
    s = np.array([ref[n].sum() if reduction == "sum" else ref[n].mean() for n in NAMES])
    lam = np.ones(3)
    for step in range(2):  # parameters fixed: the same estimate twice, smoothed from 1
        total = ntk(losses_for(net, points), step)
        lam = momentum * lam + (1 - momentum) * s.sum() / s
        np.testing.assert_allclose([ntk.weights[n] for n in NAMES], lam, rtol=2e-5)
    losses = {n: float(v) for n, v in losses_for(net, points).items()}
    np.testing.assert_allclose(float(total), sum(lam[i] * losses[n] for i, n in enumerate(NAMES)), rtol=1e-5)
    np.testing.assert_allclose([ntk.traces()[n] for n in NAMES], s, rtol=1e-5)


def test_update_schedule_and_total_uses_new_weights():
    net, points = make_net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), update_freq=3)
    opt = paddle.optimizer.SGD(learning_rate=1e-3, parameters=net.parameters())
    history = []
    for step in range(7):
        losses = losses_for(net, points)
        before = ntk.weights if step else dict.fromkeys(NAMES, 1.0)
        total = ntk(losses, step)
        after = ntk.weights
        if step % 3 == 0:
            ref = reference_traces(net, points)
            s = np.array([ref[n].sum() for n in NAMES])
            np.testing.assert_allclose([after[n] for n in NAMES], s.sum() / s, rtol=2e-5)
        else:
            assert after == before
        expected = sum(after[n] * float(losses[n]) for n in NAMES)
        np.testing.assert_allclose(float(total), expected, rtol=1e-5)
        history.append(after)
        total.backward()
        opt.step()
        opt.clear_grad()
    assert history[3] != history[2] and history[6] != history[5]
    assert int(ntk.num_updates.numpy()[0]) == 3


def test_weights_carry_no_gradient_and_permute_with_terms():
    net, points = make_net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), update_freq=1)
    losses = {n: paddle.to_tensor(2.0, stop_gradient=False) for n in NAMES}
    total = ntk(losses, 0)
    total.backward()
    for n in NAMES:
        np.testing.assert_allclose(float(losses[n].grad), ntk.weights[n], rtol=1e-6)
    assert ntk.lambdas.stop_gradient and ntk.traces_buf.stop_gradient
    order = ("ic", "res", "bc")
    other = NTKWeighting(net, kernels=kernels_for(points), update_freq=1, loss_names=order)
    other({n: paddle.to_tensor(1.0) for n in order}, 0)
    for n in NAMES:
        np.testing.assert_allclose(other.weights[n], ntk.weights[n], rtol=1e-6)


def test_state_round_trip(tmp_path):
    net, points = make_net(), _points()
    kw = {"kernels": kernels_for(points), "update_freq": 2, "momentum": 0.5}
    ntk = NTKWeighting(net, **kw)
    for step in range(3):
        ntk(losses_for(net, points), step)
    path = str(tmp_path / "ntk.pdparams")
    paddle.save(ntk.state_dict(), path)
    assert "traces_buf" in ntk.state_dict()
    fresh = NTKWeighting(net, **kw)
    fresh.set_state_dict(paddle.load(path))
    assert fresh.traces() == ntk.traces() and fresh.weights == ntk.weights
    for _ in range(3, 5):
        losses = losses_for(net, points)
        np.testing.assert_array_equal(ntk(losses, None).numpy(), fresh(losses, None).numpy())
        assert fresh.weights == ntk.weights and fresh.traces() == ntk.traces()
    assert int(fresh.num_updates.numpy()[0]) == int(ntk.num_updates.numpy()[0])


def test_non_vector_kernel_is_refused_naming_the_term():
    net, points = make_net(), _points()
    kernels = kernels_for(points)
    kernels["bc"] = lambda model: model(paddle.to_tensor(points["bc"])).tile([1, 2])
    ntk = NTKWeighting(net, kernels=kernels, update_freq=1)
    with pytest.raises(ValueError, match="'bc'.*\\[7, 2\\]"):
        ntk(losses_for(make_net(), points), 0)


def test_missing_and_mismatched_kernels():
    net, points = make_net(), _points()
    kernels = kernels_for(points)
    del kernels["ic"]
    with pytest.raises(ValueError, match="'ic'.*no kernel"):
        NTKWeighting(net, kernels=kernels)({n: paddle.to_tensor(1.0) for n in NAMES}, 0)
    with pytest.raises(ValueError, match="no kernel"):
        NTKWeighting(net, kernels=kernels, loss_names=NAMES)
    with pytest.raises(ValueError, match="not loss names"):
        NTKWeighting(net, kernels=kernels_for(points), loss_names=("res", "bc"))
    with pytest.raises(ValueError, match="kernels"):
        NTKWeighting(net)
    with pytest.raises(ValueError, match="callables"):
        NTKWeighting(net, kernels={"res": 3})
    ntk = NTKWeighting(net, kernels=kernels_for(points))
    ntk({n: paddle.to_tensor(1.0) for n in NAMES}, 1)
    with pytest.raises(ValueError, match="missing \\['ic'\\]"):
        ntk({"res": paddle.to_tensor(1.0), "bc": paddle.to_tensor(1.0)}, 2)
    for bad in ({"mode": "exact"}, {"reduction": "max"}, {"update_freq": 0}, {"momentum": 1.0},
                {"chunk_size": 0}, {"path": "fast"}):
        with pytest.raises(ValueError):
            NTKWeighting(net, kernels=kernels_for(points), **bad)


def test_nan_traces_keep_weights_and_warn():
    net, points = make_net(), _points()
    kernels = kernels_for(points)
    poison = {"on": False}
    good_bc = kernels["bc"]
    kernels["bc"] = lambda model: good_bc(model) * (float("nan") if poison["on"] else 1.0)
    ntk = NTKWeighting(net, kernels=kernels, update_freq=1)
    ntk({n: paddle.to_tensor(1.0) for n in NAMES}, 0)
    weights, traces = ntk.weights, ntk.traces()
    poison["on"] = True
    with pytest.warns(UserWarning, match="'bc'"):
        total = ntk({n: paddle.to_tensor(1.0) for n in NAMES}, 1)
    assert ntk.weights == weights and ntk.traces() == traces
    np.testing.assert_allclose(float(total), sum(weights.values()), rtol=1e-6)
    ntk.set_state_dict(ntk.state_dict())  # still a loadable (finite) checkpoint


def test_a_model_the_fast_path_cannot_record_uses_the_loop_with_one_warning():
    """A wrapper layer is recorded like any composition of affine maps (fast); a parameter that enters through
    an operation the recording does not know (here ``paddle.exp``) sends the term to the exact loop, once
    warned, with the same traces."""
    class Net(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.inner = make_net()
            self.log_scale = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(0.1))

        def forward(self, x):
            return self.inner(x) * paddle.exp(self.log_scale)

    net, points = Net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), update_freq=1)
    with pytest.warns(UserWarning, match="per-point loop"):
        ntk(losses_for(net, points), 0)
    assert ntk.last_path == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntk(losses_for(net, points), 1)
    ref = reference_traces(net, points)
    for n in NAMES:
        np.testing.assert_allclose(ntk.traces()[n], ref[n].sum(), rtol=1e-5)

    class Wrapper(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.inner = make_net()

        def forward(self, x):
            return self.inner(x)

    wrapped = Wrapper()
    fast = NTKWeighting(wrapped, kernels=kernels_for(points), update_freq=1)
    fast(losses_for(wrapped, points), 0)
    assert fast.last_path == "expanded"
    ref = reference_traces(wrapped, points)
    for n in NAMES:
        np.testing.assert_allclose(fast.traces()[n], ref[n].sum(), rtol=1e-5)


def test_grad_norm_mode_matches_numpy():
    net = make_net()
    rng = np.random.default_rng(4)
    data = {n: (rng.uniform(-1, 1, size=(SIZES[n], 2)), s * rng.normal(size=(SIZES[n], 1)))
            for n, s in zip(NAMES, (1.0, 20.0, 0.3))}
    ntk = NTKWeighting(net, mode="grad_norm", update_freq=1, momentum=0.5)
    losses = {n: ((net(paddle.to_tensor(x.astype(DTYPE))) - paddle.to_tensor(t.astype(DTYPE))) ** 2).mean()
              for n, (x, t) in data.items()}
    ntk(losses, 0)
    params = numpy_params(net)
    norms = np.array([np.sqrt(sum((g ** 2).sum() for g in mse_and_grads(params, *data[n])[1])) for n in NAMES])
    lam = 0.5 * 1.0 + 0.5 * norms.sum() / norms
    np.testing.assert_allclose([ntk.weights[n] for n in NAMES], lam, rtol=1e-5)
    np.testing.assert_allclose([ntk.traces()[n] for n in NAMES], norms, rtol=1e-5)
    with pytest.raises(ValueError, match="grad_norm"):
        NTKWeighting(net, mode="grad_norm", kernels={"res": lambda m: m})
    with pytest.raises(ValueError, match="reduction"):
        NTKWeighting(net, mode="grad_norm", reduction="mean")


def test_grad_norm_is_below_trace_bound():
    """Cauchy-Schwarz: ||grad mean(r^2)|| <= 2/N ||r|| sqrt(Tr K) for the same per-point r."""
    net, points = make_net(), _points()
    ntk = NTKWeighting(net, kernels=kernels_for(points), update_freq=1)
    gn = NTKWeighting(net, mode="grad_norm", update_freq=1)
    losses = losses_for(net, points)
    ntk(losses, 0)
    gn(losses, 0)
    for n, k in kernels_for(points).items():
        r = k(net).numpy().astype(np.float64)
        bound = 2 / r.size * np.linalg.norm(r) * np.sqrt(ntk.traces()[n])
        assert gn.traces()[n] <= bound * (1 + 1e-5)


def test_build_from_config():
    net, points = make_net(), _points()
    b = build_balancer({"name": "ntk", "mode": "grad_norm", "update_freq": 5, "momentum": 0.9}, net)
    assert isinstance(b, NTKWeighting) and b.update_freq == 5 and b.momentum == 0.9
    b = build_balancer({"name": "ntk", "kernels": kernels_for(points), "reduction": "mean"}, net)
    assert b.reduction == "mean" and b.update_freq == 100
    with pytest.raises(ValueError, match="kernels"):
        build_balancer({"name": "ntk"}, net)
    with pytest.raises(ValueError, match="unknown key"):
        build_balancer({"name": "ntk", "mode": "grad_norm", "alpha": 0.1}, net)
