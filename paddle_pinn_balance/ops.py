"""The tensor operations of the update path, dispatched through ``paddle._C_ops``.

On the small networks of PINNs a balanced step costs per-operation overhead, not arithmetic: the public
functions spend 5-40 us each in Python argument checks and broadcasting before the kernel runs
(``paddle.where`` 22 us, ``paddle.lerp`` 29 us, ``paddle.assign(x, output=)`` 14 us, a reshape 15 us on
this project's 2-core machine), and an update step calls a few dozen of them. ``paddle._C_ops`` runs the
same kernels, with the same autograd, in 3-7 us. Only what the hot path needs is here, for the shapes it
is given (no broadcasting of conditions; one place to change if Paddle renames an operator);
``tests/test_ops.py`` checks each against the public function, forward and backward.
"""

from __future__ import annotations

from typing import Sequence

import paddle
from paddle import _C_ops as _C


def flatten_cat(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """The tensors flattened and concatenated into one vector (``paddle.concat([t.reshape([-1]), ...])``);
    differentiable."""
    return _C.concat([_C.reshape(t, [-1]) for t in tensors], 0)


def views_like(tensors: Sequence[paddle.Tensor]) -> list:
    """``[flat, view_1, ...]``: a new vector of the tensors' total size (uninitialised) and views into it
    shaped like each tensor (one operation)."""
    views, flat = _C.coalesce_tensor(list(tensors), tensors[0].dtype, False, False, False, 0.0, False, 0, -1, [], [])
    return [flat] + list(views)


def flatten_copy(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """:func:`flatten_cat` as one copying operation, for tensors of one dtype that need no gradient."""
    return _C.coalesce_tensor(list(tensors), tensors[0].dtype, True, False, False, 0.0, False, 0, -1, [], [])[1]


def flatten_copy_views(tensors: Sequence[paddle.Tensor]) -> list:
    """``[flat, view_1, ...]``: :func:`flatten_copy` of the tensors and views into that copy shaped like each
    tensor (one copying operation)."""
    views, flat = _C.coalesce_tensor(list(tensors), tensors[0].dtype, True, False, False, 0.0, False, 0, -1, [], [])
    return [flat] + list(views)


def stack(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """``paddle.stack(tensors)`` along a new first axis."""
    return _C.stack(list(tensors), 0)


def abs(x: paddle.Tensor) -> paddle.Tensor:  # noqa: A001 (the operator's name)
    return _C.abs(x)


_CONSTANTS: dict = {}


def filled(n, value: float, like: paddle.Tensor) -> paddle.Tensor:
    """A cached constant: ``[value] * n`` (``n=None``: a 0-d tensor) in ``like``'s dtype and place. Never
    written to."""
    key = (n, value, like.dtype, str(like.place))
    v = _CONSTANTS.get(key)
    if v is None:
        v = _CONSTANTS[key] = _C.full([] if n is None else [n], value, like.dtype, like.place)
    return v


def fresh_zero(like: paddle.Tensor) -> paddle.Tensor:
    """A new 0-d tensor of value 0 in ``like``'s dtype and place."""
    return _C.full([], 0.0, like.dtype, like.place)


def nonzero(x: paddle.Tensor) -> paddle.Tensor:
    """``x != 0`` elementwise (NaN is nonzero)."""
    return _C.not_equal(x, filled(None, 0.0, x))


def row_sum(x: paddle.Tensor) -> paddle.Tensor:
    """``x.sum(axis=1)`` of a matrix, as a product with a vector of ones (a matrix-vector product costs a
    quarter of Paddle's CPU row reduction; NaN and Inf propagate the same way)."""
    return _C.matmul(x, filled(x.shape[1], 1.0, x), False, False)


def row_mean(x: paddle.Tensor) -> paddle.Tensor:
    """``x.mean(axis=1)`` of a matrix, as :func:`row_sum`."""
    return _C.matmul(x, filled(x.shape[1], 1.0 / x.shape[1], x), False, False)


def total(x: paddle.Tensor) -> paddle.Tensor:
    """The sum of all entries (0-d), for short vectors (one entry per term)."""
    return _C.sum(x, [], None, False)


def row_max(x: paddle.Tensor) -> paddle.Tensor:
    """``x.max(axis=1)`` (NaN propagates)."""
    return _C.max(x, [1], False)


def row_norm(x: paddle.Tensor) -> paddle.Tensor:
    """``sqrt((x * x).sum(axis=1))``, the 2-norm of each row."""
    return _C.sqrt(row_sum(_C.multiply(x, x)))


def item(x: paddle.Tensor, i: int) -> paddle.Tensor:
    """``x[i]`` of a vector, as a 0-d tensor."""
    return _C.slice(x, [0], [i], [i + 1], [1], [0])


def leading_columns(x: paddle.Tensor, n: int) -> paddle.Tensor:
    """``x[:, :n]`` of a matrix (``x`` itself when it has ``n`` columns)."""
    return x if x.shape[1] == n else _C.slice(x, [1], [0], [n], [1], [])


def reshape(x: paddle.Tensor, shape: Sequence[int]) -> paddle.Tensor:
    return _C.reshape(x, list(shape))


def scale(x: paddle.Tensor, factor: float, bias: float = 0.0) -> paddle.Tensor:
    """``factor * x + bias`` (Python numbers)."""
    return _C.scale(x, factor, bias, True)


def pow(x: paddle.Tensor, exponent: float) -> paddle.Tensor:  # noqa: A001 (the operator's name)
    """``x ** exponent`` for a Python number ``exponent``."""
    return _C.pow(x, exponent)


def sign(x: paddle.Tensor) -> paddle.Tensor:
    return _C.sign(x)


def isfinite(x: paddle.Tensor) -> paddle.Tensor:
    return _C.isfinite(x)


def matmul(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    return _C.matmul(x, y, False, False)


def multiply(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise product (``y`` may be 0-d)."""
    return _C.multiply(x, y)


def add_(x: paddle.Tensor, y: paddle.Tensor) -> None:
    """``x += y`` in place."""
    _C.add_(x, y)


def dot(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Inner product of two vectors (a 0-d tensor)."""
    return _C.dot(x, y)


def cast(x: paddle.Tensor, dtype) -> paddle.Tensor:
    """``x`` in ``dtype`` (``x`` itself when it already is)."""
    return x if x.dtype == dtype else _C.cast(x, dtype)


def where(cond: paddle.Tensor, x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """``paddle.where`` for a condition of the shape of ``x`` and ``y``, or a 0-d condition (expanded)."""
    if len(cond.shape) != len(x.shape):
        cond = _C.expand(cond, x.shape)
    return _C.where(cond, x, y)


def lerp(x: paddle.Tensor, y: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``x + weight * (y - x)`` (``weight``: a 0-d tensor of ``x``'s dtype)."""
    return _C.lerp(x, y, weight)


def clip(x: paddle.Tensor, low: float, high: float) -> paddle.Tensor:
    """``paddle.clip`` with finite float bounds (pass +-inf for a missing one)."""
    return _C.clip(x, low, high)


def minimum(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise minimum (NaN propagates)."""
    return _C.minimum(x, y)


def maximum(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise maximum (NaN propagates)."""
    return _C.maximum(x, y)


def all_finite(x: paddle.Tensor) -> paddle.Tensor:
    """A 0-d bool tensor: every entry of ``x`` is finite."""
    return _C.all(_C.isfinite(x), [], False)


def assign_(src: paddle.Tensor, dst: paddle.Tensor) -> None:
    """Copy ``src`` into ``dst`` in place (``paddle.assign(src, output=dst)``); ``src`` must be detached."""
    _C.assign_out_(src, dst)


def increment_(x: paddle.Tensor) -> None:
    """``x += 1`` in place, for a one-element counter."""
    _C.increment_(x, 1.0)
