"""Per-point squared gradient norms: fast (expanded) path against independent per-point references."""

import warnings

import numpy as np
import paddle
import pytest
from reference import DTYPE, make_net

from paddle_pinn_balance.per_point import per_point_sq_grad_norms, register_elementwise, supports_expansion


def _x(n, d=2, seed=3, dtype=DTYPE):
    return paddle.to_tensor(np.random.default_rng(seed).uniform(-1, 1, size=(n, d)).astype(dtype))


def output_kernel(x):
    return lambda model: model(x)


def residual_kernel(x, a=(0.7, -0.4), c=0.5):
    """f = a . grad u + c u + laplacian u (first and second derivatives)."""
    def kernel(model):
        xx = x.detach()
        xx.stop_gradient = False
        u = model(xx)
        g = paddle.grad(u.sum(), xx, create_graph=True)[0]
        lap = 0.0
        for k in range(x.shape[1]):
            (h,) = paddle.grad(g[:, k].sum(), xx, create_graph=True, allow_unused=True)
            lap = lap + (0.0 if h is None else h[:, k])  # None: a linear model has no second derivative
        return a[0] * g[:, 0] + a[1] * g[:, 1] + c * u[:, 0] + lap
    return kernel


def reference_sq_norms(model, make_kernel, x):
    """Independent reference: the kernel on each point alone, one paddle.grad per point."""
    params = [p for p in model.parameters() if not p.stop_gradient]
    out = []
    for p in range(x.shape[0]):
        f = make_kernel(x[p:p + 1])(model).reshape([-1])
        grads = paddle.grad(f.sum(), params, allow_unused=True)
        out.append(sum(float((g.astype("float64") ** 2).sum()) for g in grads if g is not None))
    return np.array(out)


@pytest.mark.parametrize("make_kernel", [output_kernel, residual_kernel], ids=["output", "residual"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_expanded_matches_independent_loop(make_kernel, dtype):
    net = make_net((2, 6, 5, 1), dtype=dtype)
    x = _x(9, dtype=dtype)
    sq, path = per_point_sq_grad_norms(net, make_kernel(x), return_path=True)
    assert path == "expanded" and list(sq.shape) == [9] and sq.stop_gradient
    ref = reference_sq_norms(net, make_kernel, x)
    np.testing.assert_allclose(sq.numpy(), ref, rtol=1e-5 if dtype == "float32" else 1e-10)
    loop = per_point_sq_grad_norms(net, make_kernel(x), path="loop")
    np.testing.assert_allclose(loop.numpy(), ref, rtol=1e-5 if dtype == "float32" else 1e-10)


def test_linear_model_closed_form():
    """f(x) = w.x + b: ||d u/d theta||^2 = ||x||^2 + 1; for a.grad u + c u + lap u: ||a + c x||^2 + c^2."""
    lin = paddle.nn.Linear(2, 1)
    x = _x(7)
    xn = x.numpy().astype(np.float64)
    a, c = np.array([0.7, -0.4]), 0.5
    for path in ("expanded", "loop"):
        out = per_point_sq_grad_norms(lin, output_kernel(x), path=path).numpy()
        np.testing.assert_allclose(out, (xn ** 2).sum(1) + 1.0, rtol=1e-6)
        res = per_point_sq_grad_norms(lin, residual_kernel(x, tuple(a), c), path=path).numpy()
        np.testing.assert_allclose(res, ((a + c * xn) ** 2).sum(1) + c ** 2, rtol=1e-6)


def test_chunks_agree_and_sampler_draws_same_points():
    net = make_net((2, 6, 5, 1))
    x = _x(11)
    whole = per_point_sq_grad_norms(net, residual_kernel(x), chunk_size=None).numpy()
    chunked = per_point_sq_grad_norms(net, residual_kernel(x), chunk_size=4).numpy()
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)

    def sampler(model):  # draws fresh points at every call, from the global paddle RNG
        return residual_kernel(paddle.rand([10, 2]) * 2 - 1)(model)

    paddle.seed(5)
    one = per_point_sq_grad_norms(net, sampler, chunk_size=None).numpy()
    after_one = paddle.rand([1]).numpy()
    paddle.seed(5)
    three = per_point_sq_grad_norms(net, sampler, chunk_size=4).numpy()
    np.testing.assert_allclose(three, one, rtol=1e-6)
    np.testing.assert_array_equal(paddle.rand([1]).numpy(), after_one)  # RNG advanced as by one call


class Sin(paddle.nn.Layer):
    def forward(self, x):
        return paddle.sin(x)


class MyNet(paddle.nn.Layer):
    def __init__(self):
        super().__init__()
        self.a = paddle.nn.Linear(2, 5)
        self.b = paddle.nn.Linear(5, 1)

    def forward(self, x):
        return self.b(paddle.sin(self.a(x)))


class ExpNet(MyNet):
    """A parameter used through paddle.exp, an operation the fast path does not record."""

    def __init__(self):
        super().__init__()
        self.log_s = self.create_parameter([5], default_initializer=paddle.nn.initializer.Constant(0.2))

    def forward(self, x):
        return self.b(paddle.sin(self.a(x) * paddle.exp(self.log_s)))


def test_any_layer_of_recorded_operations_is_fast_others_fall_back():
    x = _x(6)
    custom = MyNet()  # not a Sequential, paddle.sin as a function: every parameter use is recorded
    assert supports_expansion(custom) and not supports_expansion(lambda x: x)
    sq, path = per_point_sq_grad_norms(custom, residual_kernel(x), return_path=True)
    assert path == "expanded" and path.reason is None
    np.testing.assert_allclose(sq.numpy(), reference_sq_norms(custom, residual_kernel, x), rtol=1e-5)

    unrecorded = ExpNet()
    sq, path = per_point_sq_grad_norms(unrecorded, residual_kernel(x), return_path=True)
    assert path == "loop" and "log_s" in path.reason
    np.testing.assert_allclose(sq.numpy(), reference_sq_norms(unrecorded, residual_kernel, x), rtol=1e-5)
    with pytest.raises(ValueError, match="log_s"):
        per_point_sq_grad_norms(unrecorded, output_kernel(x), path="expanded")
    assert per_point_sq_grad_norms(custom, output_kernel(x), path="loop", return_path=True)[1] == "loop"

    class Sin2(Sin):  # registering elementwise layers is no longer needed (still accepted)
        pass

    seq = paddle.nn.Sequential(paddle.nn.Linear(2, 5), Sin2(), paddle.nn.Linear(5, 1))
    assert per_point_sq_grad_norms(seq, output_kernel(x), return_path=True)[1] == "expanded"
    register_elementwise(Sin2)
    sq, path = per_point_sq_grad_norms(seq, residual_kernel(x), return_path=True)
    assert path == "expanded"
    np.testing.assert_allclose(sq.numpy(), reference_sq_norms(seq, residual_kernel, x), rtol=1e-5)


def test_kernels_the_fast_path_cannot_map_fall_back():
    net = make_net((2, 6, 1))
    x, y = _x(5, seed=1), _x(5, seed=2)
    both = paddle.concat([x, y])

    def stacked(model):  # 2N model rows for N values: rows do not map to points
        u = model(both)
        return u[:5] - u[5:]

    def two_calls(model):  # N rows per call: pointwise, stays on the fast path
        return model(x) - model(y)

    sq, path = per_point_sq_grad_norms(net, stacked, return_path=True)
    sq2, path2 = per_point_sq_grad_norms(net, two_calls, return_path=True)
    assert (path, path2) == ("loop", "expanded") and "rows" in path.reason
    np.testing.assert_allclose(sq.numpy(), sq2.numpy(), rtol=1e-5)

    def uses_attribute(model):
        return model(x) * 0 + sum(p.sum() for p in model.parameters())

    sq, path = per_point_sq_grad_norms(net, uses_attribute, return_path=True)
    assert path == "loop" and "not record" in path.reason
    np.testing.assert_allclose(sq.numpy(), np.full(5, 25.0), rtol=1e-6)  # d(sum of the 25 params)/d theta: ones


def test_frozen_parameters_are_left_out():
    lin = paddle.nn.Linear(2, 1)
    lin.bias.stop_gradient = True
    x = _x(4)
    for path in ("expanded", "loop"):
        out = per_point_sq_grad_norms(lin, output_kernel(x), path=path).numpy()
        np.testing.assert_allclose(out, (x.numpy().astype(np.float64) ** 2).sum(1), rtol=1e-6)


@pytest.mark.parametrize("bad", [lambda m, x: m(x).tile([1, 2]), lambda m, x: m(x).sum(), lambda m, x: 3.0])
def test_non_vector_kernel_output_is_refused(bad):
    net = make_net((2, 4, 1))
    x = _x(3)
    for path in ("auto", "loop"):
        with pytest.raises(ValueError, match="'res'"):
            per_point_sq_grad_norms(net, lambda m: bad(m, x), path=path, name="res")


def test_helmholtz_net_fast_path_matches_loop():
    """Equality on the issue's setting; the speed ratio is measured by benchmarks/ntk_trace.py, not here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle.seed(0)
        net = paddle.nn.Sequential(paddle.nn.Linear(2, 50), paddle.nn.Tanh(), paddle.nn.Linear(50, 50),
                                   paddle.nn.Tanh(), paddle.nn.Linear(50, 50), paddle.nn.Tanh(),
                                   paddle.nn.Linear(50, 1))
    x = paddle.rand([256, 2]) * 2 - 1
    kernel = residual_kernel(x, a=(0.0, 0.0), c=1.0)  # Helmholtz residual with k = 1 (q does not matter)
    fast, ran = per_point_sq_grad_norms(net, kernel, return_path=True)
    loop = per_point_sq_grad_norms(net, kernel, path="loop").numpy()
    assert ran == "expanded"
    np.testing.assert_allclose(fast.numpy().sum(), loop.sum(), rtol=1e-5)
    np.testing.assert_allclose(fast.numpy(), loop, rtol=1e-4)
