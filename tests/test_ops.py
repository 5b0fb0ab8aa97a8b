"""Every fast operation of the update path equals the public PaddlePaddle function it stands for."""

import numpy as np
import paddle
import pytest

from paddle_pinn_balance import ops

NAN, INF = float("nan"), float("inf")


def t(a, dtype="float32"):
    return paddle.to_tensor(np.asarray(a, dtype=dtype))


def same(a, b):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.dtype == b.dtype and list(a.shape) == list(b.shape)


@pytest.fixture
def G():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 7)).astype("float32")
    g[1, 2] = NAN
    g[2, 4] = INF
    return t(g)


def test_flatten_cat_and_copy_equal_reshape_concat():
    rng = np.random.default_rng(1)
    xs = [t(rng.standard_normal(s)) for s in ([2, 3], [4], [1, 2, 2])]
    ref = paddle.concat([x.reshape([-1]) for x in xs])
    same(ops.flatten_cat(xs), ref)
    same(ops.flatten_copy(xs), ref)
    ref64 = paddle.concat([x.astype("float64").reshape([-1]) for x in xs])
    same(ops.flatten_copy([x.astype("float64") for x in xs]), ref64)


def test_flatten_copy_is_a_copy():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    flat = ops.flatten_copy([x])
    flat.set_value(paddle.zeros_like(flat))
    np.testing.assert_array_equal(x.numpy(), [[1.0, 2.0], [3.0, 4.0]])


def test_flatten_cat_backward_equals_the_public_one():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(10).astype("float32")
    grads = []
    for f in (ops.flatten_cat, lambda xs: paddle.concat([x.reshape([-1]) for x in xs])):
        xs = [t(rng.standard_normal(s)) for s in ([2, 3], [4])]
        for x in xs:
            x.stop_gradient = False
        (f(xs) * t(w)).sum().backward()
        grads.append([x.grad.numpy() for x in xs])
    for a, b in zip(*grads):
        np.testing.assert_array_equal(a, b)


def test_row_reductions(G):
    np.testing.assert_allclose(ops.row_sum(G).numpy(), G.sum(axis=1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(ops.row_mean(G).numpy(), G.mean(axis=1).numpy(), rtol=1e-6)
    same(ops.row_max(G), G.max(axis=1))
    np.testing.assert_allclose(ops.row_norm(G).numpy(), paddle.sqrt((G * G).sum(axis=1)).numpy(), rtol=1e-6)
    # NaN and Inf propagate exactly as through the public reductions
    for row in (ops.row_sum(G), ops.row_mean(G), ops.row_max(paddle.abs(G)), ops.row_norm(G)):
        out = row.numpy()
        assert np.isfinite(out[0]) and np.isnan(out[1]) and np.isinf(out[2])
    same(ops.total(G[0]), G[0].sum())


def test_elementwise_ops():
    x, y = t([1.0, -2.0, NAN, 4.0]), t([0.5, 3.0, 1.0, NAN])
    same(ops.abs(x), paddle.abs(x))
    same(ops.minimum(x, y), paddle.minimum(x, y))
    same(ops.maximum(x, y), paddle.maximum(x, y))
    same(ops.sign(x), paddle.sign(x))
    same(ops.isfinite(x), paddle.isfinite(x))
    same(ops.nonzero(t([0.0, -1.0, NAN])), t([0.0, -1.0, NAN]) != 0)
    same(ops.scale(x, 2.0, 1.0), 2.0 * x + 1.0)
    same(ops.pow(paddle.abs(x), 1.5), paddle.pow(paddle.abs(x), 1.5))
    same(ops.lerp(x, y, t(0.25)), paddle.lerp(x, y, 0.25))
    same(ops.clip(x, -1.0, 2.0), paddle.clip(x, -1.0, 2.0))
    same(ops.clip(x, -np.inf, 2.0), paddle.clip(x, max=2.0))
    same(ops.dot(t([1.0, 2.0]), t([3.0, 4.0])), paddle.dot(t([1.0, 2.0]), t([3.0, 4.0])))
    m = t(np.arange(6).reshape(2, 3))
    same(ops.matmul(t([1.0, 2.0]), m), paddle.matmul(t([1.0, 2.0]), m))
    same(ops.cast(x, paddle.float64), x.astype("float64"))
    assert ops.cast(x, paddle.float32) is x


def test_where_expands_a_0d_condition():
    x, y = t([1.0, 2.0, 3.0]), t([4.0, 5.0, 6.0])
    same(ops.where(t([True, False, True], "bool"), x, y), paddle.where(t([True, False, True], "bool"), x, y))
    same(ops.where(paddle.to_tensor(False), x, y), y)
    same(ops.where(paddle.to_tensor(True), x, y), x)


def test_all_finite_slices_and_in_place_ops():
    assert bool(ops.all_finite(t([1.0, 2.0])))
    assert not bool(ops.all_finite(t([1.0, NAN])))
    assert not bool(ops.all_finite(t([INF, 2.0])))
    x = t([1.0, 2.0, 3.0])
    same(ops.item(x, 1), x[1])
    m = t(np.arange(12).reshape(3, 4))
    same(ops.leading_columns(m, 2), m[:, :2])
    assert ops.leading_columns(m, 4) is m
    same(ops.reshape(m, [4, 3]), m.reshape([4, 3]))
    dst = t([0.0, 0.0, 0.0])
    ops.assign_(x, dst)
    same(dst, x)
    z = ops.fresh_zero(x)
    assert z.shape == [] and z.dtype == x.dtype and float(z) == 0.0 and z is not ops.fresh_zero(x)
    counter = paddle.zeros([1], dtype="int64")
    ops.increment_(counter)
    ops.increment_(counter)
    assert counter.numpy().tolist() == [2]
