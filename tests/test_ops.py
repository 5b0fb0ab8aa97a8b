"""Every fast operation of the update path equals the public PaddlePaddle function it stands for, in both
of its forms (``paddle._C_ops`` and the public fallback), forward and backward."""

import numpy as np
import paddle
import pytest
from reference import DTYPE

from paddle_pinn_balance import ops

NAN, INF = float("nan"), float("inf")
OTHER = "float32" if DTYPE == "float64" else "float64"  # a floating dtype that is not the suite's


def t(a, dtype=DTYPE):
    return paddle.to_tensor(np.asarray(a, dtype=dtype))


WORKING = {name for name in ops.PRIVATE if ops._works(name)}  # private forms this Paddle's probes accept


@pytest.fixture(autouse=True, params=["private", "public"])
def form(request, monkeypatch):
    """Every test runs once with each op in its private form (where this Paddle's probe accepts it; the
    public one otherwise, as at import) and once in its public fallback."""
    if request.param == "private" and not WORKING:
        pytest.skip("no private form works on this Paddle")
    for name in ops.PRIVATE:
        private = request.param == "private" and name in WORKING
        monkeypatch.setattr(ops, "_" + name, ops.PRIVATE[name] if private else ops.PUBLIC[name])
    return request.param


def same(a, b):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert a.dtype == b.dtype and list(a.shape) == list(b.shape)


@pytest.fixture
def G():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 7)).astype(DTYPE)
    g[1, 2] = NAN
    g[2, 4] = INF
    return t(g)


def test_flatten_cat_and_copy_equal_reshape_concat():
    rng = np.random.default_rng(1)
    xs = [t(rng.standard_normal(s)) for s in ([2, 3], [4], [1, 2, 2])]
    ref = paddle.concat([x.reshape([-1]) for x in xs])
    same(ops.flatten_cat(xs), ref)
    same(ops.flatten_copy(xs), ref)
    ref_other = paddle.concat([x.astype(OTHER).reshape([-1]) for x in xs])
    same(ops.flatten_copy([x.astype(OTHER) for x in xs]), ref_other)


def test_flatten_copy_is_a_copy():
    x = t([[1.0, 2.0], [3.0, 4.0]])
    flat = ops.flatten_copy([x])
    flat.set_value(paddle.zeros_like(flat))
    np.testing.assert_array_equal(x.numpy(), [[1.0, 2.0], [3.0, 4.0]])


def test_flatten_cat_backward_equals_the_public_one():
    rng = np.random.default_rng(2)
    w = rng.standard_normal(10).astype(DTYPE)
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
    same(ops.cast(x, OTHER), x.astype(OTHER))
    assert ops.cast(x, x.dtype) is x


def test_where_expands_a_0d_condition():
    x, y = t([1.0, 2.0, 3.0]), t([4.0, 5.0, 6.0])
    same(ops.where(t([True, False, True], "bool"), x, y), paddle.where(t([True, False, True], "bool"), x, y))
    same(ops.where(paddle.to_tensor(False), x, y), y)
    same(ops.where(paddle.to_tensor(True), x, y), x)
    flags = ops.expand(paddle.to_tensor(False), [3])
    same(flags, t([False, False, False], "bool"))
    same(ops.where(flags, x, y), y)


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


def test_the_form_is_chosen_once_by_probe_and_switch(monkeypatch):
    for name in ops.PRIVATE:
        assert (name in ops.FALLBACKS) == (ops.FORCE_PUBLIC or not ops._works(name))
    def broken(*args):
        raise TypeError("signature changed")
    monkeypatch.setitem(ops.PRIVATE, "lerp", broken)
    assert not ops._works("lerp")
    monkeypatch.setitem(ops.PRIVATE, "lerp", lambda x, y, w: x)  # runs, but gives another answer
    assert not ops._works("lerp")


def test_views_like():
    xs = [t([[1.0, 2.0], [3.0, 4.0]]), t([5.0, 6.0, 7.0])]
    flat, a, b = ops.views_like(xs)
    assert list(flat.shape) == [7] and list(a.shape) == [2, 2] and list(b.shape) == [3] and flat.dtype == xs[0].dtype
    ops.assign_(xs[0], a)
    ops.assign_(xs[1], b)
    same(flat, paddle.concat([x.reshape([-1]) for x in xs]))  # writes into the views land in the vector


def test_move_buffer_and_release_set_a_gradient_aside_and_give_it_back():
    src, dst = t([[1.0, 2.0], [3.0, 4.0]]), paddle.empty([2, 2], DTYPE)
    ops.move_buffer(src, dst)
    same(dst, src)
    ops.release(dst)
    assert list(dst.shape) == [2, 2] and dst.dtype == src.dtype
    p = paddle.create_parameter([3], DTYPE)
    (p * t([1.0, 2.0, 3.0])).sum().backward()
    keep = paddle.empty([3], DTYPE)
    ops.move_buffer(p.grad, keep)
    p.clear_gradient(False)  # .grad's storage is dropped; `keep` still holds the values
    (p * 10.0).sum().backward()
    np.testing.assert_array_equal(p.grad.numpy(), [10.0, 10.0, 10.0])
    ops.move_buffer(keep, p.grad)
    ops.release(keep)
    np.testing.assert_array_equal(p.grad.numpy(), [1.0, 2.0, 3.0])
    (p * 1.0).sum().backward()  # a later backward accumulates onto what was given back
    np.testing.assert_array_equal(p.grad.numpy(), [2.0, 3.0, 4.0])


def test_stack_softmax_filled_multiply_add_():
    x, y = t([1.0, NAN, 3.0]), t([4.0, 5.0, INF])
    same(ops.stack([x, y]), paddle.stack([x, y]))
    big = t([1e6, 1.0, -3.0])  # overflow-safe: the maximum is subtracted inside
    same(ops.softmax(big), paddle.nn.functional.softmax(big))
    np.testing.assert_allclose(ops.softmax(big).numpy(), [1.0, 0.0, 0.0], atol=1e-20)
    c = ops.filled(3, 1.5, x)
    same(c, paddle.full([3], 1.5, dtype=DTYPE))
    assert ops.filled(3, 1.5, x) is c
    same(ops.filled(None, 2.0, x.astype(OTHER)), paddle.full([], 2.0, dtype=OTHER))
    same(ops.multiply(x, y), paddle.multiply(x, y))
    same(ops.multiply(x, t(2.0)), x * 2.0)
    z = t([1.0, 2.0, 3.0])
    ops.add_(z, y)
    same(z, t([1.0, 2.0, 3.0]) + y)


def _grad_of(f, arrays, w):
    xs = [t(a) for a in arrays]
    for x in xs:
        x.stop_gradient = False
    out = f(*xs)
    (out * t(w).reshape(out.shape)).sum().backward()
    return [x.grad.numpy() if x.grad is not None else None for x in xs]


_A = np.array([[0.3, -1.2, 2.0], [1.5, 0.7, -0.4]], dtype=DTYPE)
_B = np.array([[1.1, -0.2, 0.5], [-1.5, 2.7, 0.4]], dtype=DTYPE)
_u, _v = np.array([0.3, -1.2, 2.0], dtype=DTYPE), np.array([1.1, -0.2, 0.5], dtype=DTYPE)
BACKWARD = {  # name: (ours, public, inputs)
    "stack": (lambda a, b: ops.stack([a, b]), lambda a, b: paddle.stack([a, b]), [_u, _v]),
    "softmax": (ops.softmax, paddle.nn.functional.softmax, [_u]),
    "abs": (ops.abs, paddle.abs, [_A]),
    "row_sum": (ops.row_sum, lambda a: a.sum(axis=1), [_A]),
    "row_mean": (ops.row_mean, lambda a: a.mean(axis=1), [_A]),
    "row_max": (ops.row_max, lambda a: a.max(axis=1), [_A]),
    "row_norm": (ops.row_norm, lambda a: paddle.sqrt((a * a).sum(axis=1)), [_A]),
    "total": (ops.total, paddle.sum, [_u]),
    "item": (lambda a: ops.item(a, 1), lambda a: a[1], [_u]),
    "leading_columns": (lambda a: ops.leading_columns(a, 2), lambda a: a[:, :2], [_A]),
    "reshape": (lambda a: ops.reshape(a, [3, 2]), lambda a: a.reshape([3, 2]), [_A]),
    "scale": (lambda a: ops.scale(a, 2.0, 1.0), lambda a: 2.0 * a + 1.0, [_A]),
    "pow": (lambda a: ops.pow(a, 1.5), lambda a: paddle.pow(a, 1.5), [np.abs(_A)]),
    "matmul": (ops.matmul, paddle.matmul, [_A, _B.T.copy()]),
    "multiply": (ops.multiply, paddle.multiply, [_A, _B]),
    "dot": (ops.dot, paddle.dot, [_u, _v]),
    "cast": (lambda a: ops.cast(a, OTHER), lambda a: a.astype(OTHER), [_A]),
    "where": (lambda a, b: ops.where(a > b, a, b), lambda a, b: paddle.where(a > b, a, b), [_A, _B]),
    "lerp": (lambda a, b: ops.lerp(a, b, t(0.25)), lambda a, b: paddle.lerp(a, b, 0.25), [_A, _B]),
    "clip": (lambda a: ops.clip(a, -1.0, 1.0), lambda a: paddle.clip(a, -1.0, 1.0), [_A]),
    "minimum": (ops.minimum, paddle.minimum, [_A, _B]),
    "maximum": (ops.maximum, paddle.maximum, [_A, _B]),
}


@pytest.mark.parametrize("name", sorted(BACKWARD))
def test_backward_equals_the_public_one(name):
    ours, public, arrays = BACKWARD[name]
    n = int(np.prod(public(*[t(a) for a in arrays]).shape))
    w = np.linspace(-1.0, 2.0, max(n, 1)).astype(DTYPE)
    for a, b in zip(_grad_of(ours, arrays, w), _grad_of(public, arrays, w)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
