"""The two forms of every operation of :mod:`paddle_pinn_balance.ops`: a private one (``paddle._C_ops``, 3-7 us a
call) and a public one (the documented Paddle API), each with a probe on tiny tensors; :mod:`~paddle_pinn_balance.ops`
chooses one per name at import (the private form where it exists and its probe equals the public form's).

``PRIVATE`` and ``PUBLIC`` map each name to its form; ``FORCE_PUBLIC`` is ``PADDLE_PINN_BALANCE_PUBLIC_OPS=1``.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import paddle

__all__ = ["FORCE_PUBLIC", "PRIVATE", "PUBLIC"]

FORCE_PUBLIC = os.environ.get("PADDLE_PINN_BALANCE_PUBLIC_OPS", "").strip() not in ("", "0")
_C = getattr(paddle, "_C_ops", None)

PRIVATE: dict = {}
PUBLIC: dict = {}
_PROBES: dict = {}


def _pair(public: Callable, probe: Callable):
    """Register the decorated function as the private form of ``public``'s name; ``probe(f)`` runs a form
    on tiny tensors and returns what to compare."""

    def deco(private: Callable) -> Callable:
        name = public.__name__.lstrip("_").removeprefix("public_")
        PRIVATE[name], PUBLIC[name], _PROBES[name] = private, public, probe
        return private

    return deco


def _t(*a, dtype="float32"):
    return paddle.to_tensor(np.asarray(a, dtype=dtype))


# ---------------------------------------------------------------------------- public forms


def _public_flatten_cat(tensors):
    return paddle.concat([t if len(t.shape) == 1 else paddle.reshape(t, [-1]) for t in tensors])


def _split_views(flat, tensors):
    views, offset = [], 0
    for t in tensors:
        n = int(np.prod(t.shape)) if len(t.shape) else 1
        views.append(flat[offset:offset + n].reshape(list(t.shape)))
        offset += n
    return views


def _public_views_like(tensors):
    flat = paddle.empty([sum(int(np.prod(t.shape)) if len(t.shape) else 1 for t in tensors)], tensors[0].dtype)
    return [flat] + _split_views(flat, tensors)


def _public_flatten_copy(tensors):
    return paddle.concat([paddle.reshape(t.detach(), [-1]) for t in tensors])


def _public_stack(tensors):
    return paddle.stack(list(tensors), 0)


def _public_abs(x):
    return paddle.abs(x)


def _public_full(shape, value, dtype, place):
    return paddle.full(shape, value, dtype=dtype)


def _public_not_equal(x, y):
    return paddle.not_equal(x, y)


def _public_matmul(x, y):
    return paddle.matmul(x, y)


def _public_total(x):
    return paddle.sum(x)


def _public_row_max(x):
    return paddle.amax(x, axis=1)  # paddle.max warns once per process on Paddle 3.2 ("Non compatible API")


def _public_sqrt(x):
    return paddle.sqrt(x)


def _public_item(x, i):
    return x[i]


def _public_leading_columns(x, n):
    return x if x.shape[1] == n else x[:, :n]


def _public_reshape(x, shape):
    return paddle.reshape(x, list(shape))


def _public_scale(x, factor, bias=0.0):
    return paddle.scale(x, factor, bias, bias_after_scale=True)


def _public_pow(x, exponent):
    return paddle.pow(x, exponent)


def _public_sign(x):
    return paddle.sign(x)


def _public_isfinite(x):
    return paddle.isfinite(x)


def _public_multiply(x, y):
    return paddle.multiply(x, y)


def _public_add_(x, y):
    x.add_(y)


def _public_dot(x, y):
    return paddle.dot(x, y)


def _public_cast(x, dtype):
    return x if x.dtype == dtype else paddle.cast(x, dtype)


def _public_where(cond, x, y):
    if len(cond.shape) != len(x.shape):
        cond = paddle.expand(cond, x.shape)
    return paddle.where(cond, x, y)


def _public_expand(x, shape):
    return paddle.expand(x, list(shape))


def _public_softmax(x):
    return paddle.nn.functional.softmax(x, axis=-1)


def _public_lerp(x, y, weight):
    return paddle.lerp(x, y, weight)


def _public_clip(x, low, high):
    return paddle.clip(x, low, high)


def _public_minimum(x, y):
    return paddle.minimum(x, y)


def _public_maximum(x, y):
    return paddle.maximum(x, y)


def _public_all_finite(x):
    return paddle.all(paddle.isfinite(x))


def _public_assign_(src, dst):
    paddle.assign(src, output=dst)


def _public_increment_(x):
    paddle.increment(x, 1.0)


def _public_move_buffer(src, dst):
    paddle.assign(src if list(src.shape) == list(dst.shape) else paddle.reshape(src, dst.shape), output=dst)


def _public_release(x):
    return None


# ---------------------------------------------------------------------------- private forms and probes

_XS = lambda: [_t(1.0, 2.0, 3.0, 4.0).reshape([2, 2]), _t(5.0, 6.0)]  # noqa: E731
_M = lambda: _t(1.0, -2.0, 3.0, -4.0, 5.0, 6.0).reshape([2, 3])  # noqa: E731
_V = lambda: _t(1.0, -2.0, float("nan"), 4.0)  # noqa: E731
_W = lambda: _t(0.5, 3.0, 1.0, 2.0)  # noqa: E731


def _in_place(fn_args):
    def probe(f):
        args = fn_args()
        f(*args)
        return args[0]

    return probe


@_pair(_public_flatten_cat, lambda f: f(_XS()))
def _c_flatten_cat(tensors):
    return _C.concat([t if len(t.shape) == 1 else _C.reshape(t, [-1]) for t in tensors], 0)


@_pair(_public_views_like, lambda f: [list(v.shape) for v in f(_XS())])
def _c_views_like(tensors):
    views, flat = _C.coalesce_tensor(list(tensors), tensors[0].dtype, False, False, False, 0.0, False, 0, -1, [], [])
    return [flat] + list(views)


@_pair(_public_flatten_copy, lambda f: f(_XS()))
def _c_flatten_copy(tensors):
    return _C.coalesce_tensor(list(tensors), tensors[0].dtype, True, False, False, 0.0, False, 0, -1, [], [])[1]


@_pair(_public_stack, lambda f: f([_V(), _W()]))
def _c_stack(tensors):
    return _C.stack(list(tensors), 0)


@_pair(_public_abs, lambda f: f(_V()))
def _c_abs(x):
    return _C.abs(x)


@_pair(_public_full, lambda f: f([2], 1.5, paddle.float32, _V().place))
def _c_full(shape, value, dtype, place):
    return _C.full(shape, value, dtype, place)


@_pair(_public_not_equal, lambda f: f(_V(), _t(0.0)))
def _c_not_equal(x, y):
    return _C.not_equal(x, y)


@_pair(_public_matmul, lambda f: f(_M(), _t(1.0, 2.0, 3.0)))
def _c_matmul(x, y):
    return _C.matmul(x, y, False, False)


@_pair(_public_total, lambda f: f(_W()))
def _c_total(x):
    return _C.sum(x, [], None, False)


@_pair(_public_row_max, lambda f: f(_M()))
def _c_row_max(x):
    return _C.max(x, [1], False)


@_pair(_public_sqrt, lambda f: f(_W()))
def _c_sqrt(x):
    return _C.sqrt(x)


@_pair(_public_item, lambda f: f(_W(), 1))
def _c_item(x, i):
    return _C.slice(x, [0], [i], [i + 1], [1], [0])


@_pair(_public_leading_columns, lambda f: f(_M(), 2))
def _c_leading_columns(x, n):
    return x if x.shape[1] == n else _C.slice(x, [1], [0], [n], [1], [])


@_pair(_public_reshape, lambda f: f(_M(), [3, 2]))
def _c_reshape(x, shape):
    return _C.reshape(x, list(shape))


@_pair(_public_scale, lambda f: f(_V(), 2.0, 1.0))
def _c_scale(x, factor, bias=0.0):
    return _C.scale(x, factor, bias, True)


@_pair(_public_pow, lambda f: f(_W(), 1.5))
def _c_pow(x, exponent):
    return _C.pow(x, exponent)


@_pair(_public_sign, lambda f: f(_V()))
def _c_sign(x):
    return _C.sign(x)


@_pair(_public_isfinite, lambda f: f(_V()))
def _c_isfinite(x):
    return _C.isfinite(x)


@_pair(_public_multiply, lambda f: f(_V(), _t(2.0).reshape([])))
def _c_multiply(x, y):
    return _C.multiply(x, y)


@_pair(_public_add_, _in_place(lambda: (_W(), _V())))
def _c_add_(x, y):
    _C.add_(x, y)


@_pair(_public_dot, lambda f: f(_V(), _W()))
def _c_dot(x, y):
    return _C.dot(x, y)


@_pair(_public_cast, lambda f: [f(_V(), paddle.float64), f(_V(), "float64")])  # Paddle < 3.2: no str dtype
def _c_cast(x, dtype):
    return x if x.dtype == dtype else _C.cast(x, dtype)


@_pair(_public_where, lambda f: [f(paddle.to_tensor(True), _V(), _W()),
                                 f(_t(True, False, True, False, dtype="bool"), _V(), _W())])
def _c_where(cond, x, y):
    if len(cond.shape) != len(x.shape):
        cond = _C.expand(cond, x.shape)
    return _C.where(cond, x, y)


@_pair(_public_expand, lambda f: f(paddle.to_tensor(True), [3]))
def _c_expand(x, shape):
    return _C.expand(x, list(shape))


@_pair(_public_softmax, lambda f: [f(_W()), f(_t(1e6, 1.0, -3.0))])
def _c_softmax(x):
    return _C.softmax(x, -1)


@_pair(_public_lerp, lambda f: f(_V(), _W(), _t(0.25).reshape([])))
def _c_lerp(x, y, weight):
    return _C.lerp(x, y, weight)


@_pair(_public_clip, lambda f: f(_V(), -1.0, 2.0))
def _c_clip(x, low, high):
    return _C.clip(x, low, high)


@_pair(_public_minimum, lambda f: f(_V(), _W()))
def _c_minimum(x, y):
    return _C.minimum(x, y)


@_pair(_public_maximum, lambda f: f(_V(), _W()))
def _c_maximum(x, y):
    return _C.maximum(x, y)


@_pair(_public_all_finite, lambda f: [f(_V()), f(_W())])
def _c_all_finite(x):
    return _C.all(_C.isfinite(x), [], False)


@_pair(_public_assign_, lambda f: (lambda s, d: (f(s, d), d)[1])(_W(), _V()))
def _c_assign_(src, dst):
    _C.assign_out_(src, dst)


@_pair(_public_increment_, _in_place(lambda: (paddle.zeros([1], dtype="int64"),)))
def _c_increment_(x):
    _C.increment_(x, 1.0)


@_pair(_public_move_buffer, lambda f: (lambda s, d: (f(s, d), d)[1])(_W().reshape([2, 2]), paddle.empty([4])))
def _c_move_buffer(src, dst):
    src._share_buffer_to(dst)  # dst's storage becomes src's (dst keeps its shape): no copy


@_pair(_public_release, lambda f: f(_W()))
def _c_release(x):
    x._clear_data()  # drops the storage, keeps shape and dtype


def _equal(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, paddle.Tensor):
        return (isinstance(b, paddle.Tensor) and a.dtype == b.dtype and list(a.shape) == list(b.shape)
                and np.array_equal(a.numpy(), b.numpy(), equal_nan=True))
    return a == b


def _works(name: str) -> bool:
    """The private form exists and, on the probe's tiny tensors, equals the public form."""
    if _C is None:
        return False
    try:
        probe = _PROBES[name]
        return _equal(probe(PRIVATE[name]), probe(PUBLIC[name]))
    except Exception:  # a missing operator or a changed signature
        return False
