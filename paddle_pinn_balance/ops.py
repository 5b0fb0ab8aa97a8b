"""The tensor operations of the update path, dispatched through ``paddle._C_ops`` where that is safe.

On the small networks of PINNs a balanced step costs per-operation overhead, not arithmetic: the public
functions spend 5-40 us each in Python argument checks and broadcasting before the kernel runs
(``paddle.where`` 22 us, ``paddle.lerp`` 29 us, ``paddle.assign(x, output=)`` 14 us, a reshape 15 us on
this project's 2-core machine), and an update step calls a few dozen of them. ``paddle._C_ops`` runs the
same kernels, with the same autograd, in 3-7 us. Only what the hot path needs is here, for the shapes it
is given (no broadcasting of conditions).

Every operation has two forms: a private one (``paddle._C_ops``) and a public one (the documented Paddle
API). The form is chosen once, at import: the private form is used only if it exists and, called on a tiny
tensor, gives exactly what the public form gives (a renamed operator or a changed signature falls back to
the public form). ``PADDLE_PINN_BALANCE_PUBLIC_OPS=1`` forces the public forms everywhere. ``PRIVATE`` and
``PUBLIC`` map each name to its form; ``FALLBACKS`` lists the names that run in their public form.
``tests/test_ops.py`` checks both forms against the public Paddle functions, forward and backward.

What differs between the supported Paddle versions (3.0.0 - 3.3.1, measured): before 3.2 the private
``cast`` takes no ``str`` dtype (its probe passes one: ``cast`` runs in its public form there); on 3.0 two
equal ``Place`` objects compare unequal (the constant cache of :func:`filled` keys by ``str(place)``); on 3.2
``paddle.max`` warns at its first call (the public ``row_max`` is ``paddle.amax``).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import paddle

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


_CHOSEN = {name: PUBLIC[name] if FORCE_PUBLIC or not _works(name) else PRIVATE[name] for name in PRIVATE}
FALLBACKS = sorted(name for name, f in _CHOSEN.items() if f is PUBLIC[name])
_NAMES = ("flatten_cat", "views_like", "flatten_copy", "stack", "abs",
          "full", "not_equal", "matmul", "total", "row_max", "sqrt", "item", "leading_columns", "reshape", "scale",
          "pow", "sign", "isfinite", "multiply", "add_", "dot", "cast", "where", "expand", "softmax", "lerp", "clip",
          "minimum", "maximum", "all_finite", "assign_", "increment_", "move_buffer", "release")
(_flatten_cat, _views_like, _flatten_copy, _stack, _abs, _full, _not_equal,
 _matmul, _total, _row_max, _sqrt, _item, _leading_columns, _reshape, _scale, _pow, _sign, _isfinite,
 _multiply, _add_, _dot, _cast, _where, _expand, _softmax, _lerp, _clip, _minimum, _maximum, _all_finite,
 _assign_, _increment_, _move_buffer, _release) = (_CHOSEN[n] for n in _NAMES)


# ---------------------------------------------------------------------------- the operations


def flatten_cat(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """The tensors flattened and concatenated into one vector (``paddle.concat([t.reshape([-1]), ...])``);
    differentiable."""
    return _flatten_cat(tensors)


def views_like(tensors: Sequence[paddle.Tensor]) -> list:
    """``[flat, view_1, ...]``: a new vector of the tensors' total size (uninitialised) and views into it
    shaped like each tensor (one operation)."""
    return _views_like(tensors)


def flatten_copy(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """:func:`flatten_cat` as one copying operation, for tensors of one dtype that need no gradient."""
    return _flatten_copy(tensors)


def stack(tensors: Sequence[paddle.Tensor]) -> paddle.Tensor:
    """``paddle.stack(tensors)`` along a new first axis."""
    return _stack(tensors)


def abs(x: paddle.Tensor) -> paddle.Tensor:  # noqa: A001 (the operator's name)
    return _abs(x)


_CONSTANTS: dict = {}


def filled(n, value: float, like: paddle.Tensor) -> paddle.Tensor:
    """A cached constant: ``[value] * n`` (``n=None``: a 0-d tensor) in ``like``'s dtype and place. Never
    written to."""
    key = (n, value, like.dtype, str(like.place))  # "Place(cpu)": equal places are unequal objects on Paddle 3.0
    v = _CONSTANTS.get(key)
    if v is None:
        v = _CONSTANTS[key] = _full([] if n is None else [n], value, like.dtype, like.place)
    return v


def fresh_zero(like: paddle.Tensor) -> paddle.Tensor:
    """A new 0-d tensor of value 0 in ``like``'s dtype and place."""
    return _full([], 0.0, like.dtype, like.place)


def nonzero(x: paddle.Tensor) -> paddle.Tensor:
    """``x != 0`` elementwise (NaN is nonzero)."""
    return _not_equal(x, filled(None, 0.0, x))


def row_sum(x: paddle.Tensor) -> paddle.Tensor:
    """``x.sum(axis=1)`` of a matrix, as a product with a vector of ones (a matrix-vector product costs a
    quarter of Paddle's CPU row reduction; NaN and Inf propagate the same way)."""
    return _matmul(x, filled(x.shape[1], 1.0, x))


def row_mean(x: paddle.Tensor) -> paddle.Tensor:
    """``x.mean(axis=1)`` of a matrix, as :func:`row_sum`."""
    return _matmul(x, filled(x.shape[1], 1.0 / x.shape[1], x))


def total(x: paddle.Tensor) -> paddle.Tensor:
    """The sum of all entries (0-d), for short vectors (one entry per term)."""
    return _total(x)


def row_max(x: paddle.Tensor) -> paddle.Tensor:
    """``x.max(axis=1)`` (NaN propagates)."""
    return _row_max(x)


def row_norm(x: paddle.Tensor) -> paddle.Tensor:
    """``sqrt((x * x).sum(axis=1))``, the 2-norm of each row."""
    return _sqrt(row_sum(_multiply(x, x)))


def item(x: paddle.Tensor, i: int) -> paddle.Tensor:
    """``x[i]`` of a vector, as a 0-d tensor."""
    return _item(x, i)


def leading_columns(x: paddle.Tensor, n: int) -> paddle.Tensor:
    """``x[:, :n]`` of a matrix (``x`` itself when it has ``n`` columns)."""
    return _leading_columns(x, n)


def reshape(x: paddle.Tensor, shape: Sequence[int]) -> paddle.Tensor:
    return _reshape(x, shape)


def scale(x: paddle.Tensor, factor: float, bias: float = 0.0) -> paddle.Tensor:
    """``factor * x + bias`` (Python numbers)."""
    return _scale(x, factor, bias)


def pow(x: paddle.Tensor, exponent: float) -> paddle.Tensor:  # noqa: A001 (the operator's name)
    """``x ** exponent`` for a Python number ``exponent``."""
    return _pow(x, exponent)


def sign(x: paddle.Tensor) -> paddle.Tensor:
    return _sign(x)


def isfinite(x: paddle.Tensor) -> paddle.Tensor:
    return _isfinite(x)


def matmul(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    return _matmul(x, y)


def multiply(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise product (``y`` may be 0-d)."""
    return _multiply(x, y)


def add_(x: paddle.Tensor, y: paddle.Tensor) -> None:
    """``x += y`` in place."""
    _add_(x, y)


def dot(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Inner product of two vectors (a 0-d tensor)."""
    return _dot(x, y)


def cast(x: paddle.Tensor, dtype) -> paddle.Tensor:
    """``x`` in ``dtype`` (``x`` itself when it already is)."""
    return _cast(x, dtype)


def where(cond: paddle.Tensor, x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """``paddle.where`` for a condition of the shape of ``x`` and ``y``, or a 0-d condition (expanded)."""
    return _where(cond, x, y)


def expand(x: paddle.Tensor, shape: Sequence[int]) -> paddle.Tensor:
    """``x`` broadcast to ``shape`` (a 0-d flag to one per term, for several :func:`where` on one condition)."""
    return _expand(x, shape)


def softmax(x: paddle.Tensor) -> paddle.Tensor:
    """``paddle.nn.functional.softmax`` along the last axis (the maximum is subtracted inside: overflow-safe)."""
    return _softmax(x)


def lerp(x: paddle.Tensor, y: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``x + weight * (y - x)`` (``weight``: a 0-d tensor of ``x``'s dtype)."""
    return _lerp(x, y, weight)


def clip(x: paddle.Tensor, low: float, high: float) -> paddle.Tensor:
    """``paddle.clip`` with finite float bounds (pass +-inf for a missing one)."""
    return _clip(x, low, high)


def minimum(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise minimum. NaN handling is ``paddle.minimum``'s, which drops a NaN in one argument in some
    Paddle versions: do not rely on it to propagate NaN (the base class tracks non-finite values by a sum)."""
    return _minimum(x, y)


def maximum(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """Elementwise maximum; NaN handling as :func:`minimum` (not to be relied on)."""
    return _maximum(x, y)


def all_finite(x: paddle.Tensor) -> paddle.Tensor:
    """A 0-d bool tensor: every entry of ``x`` is finite."""
    return _all_finite(x)


def assign_(src: paddle.Tensor, dst: paddle.Tensor) -> None:
    """Copy ``src`` into ``dst`` in place (``paddle.assign(src, output=dst)``); ``src`` must be detached."""
    _assign_(src, dst)


def increment_(x: paddle.Tensor) -> None:
    """``x += 1`` in place, for a one-element counter."""
    _increment_(x)


def move_buffer(src: paddle.Tensor, dst: paddle.Tensor) -> None:
    """``dst`` takes ``src``'s values in its own shape (``dst`` of ``src``'s size and dtype; a flat ``dst`` reads
    ``src`` flattened). The private form shares ``src``'s storage with ``dst`` (a pointer, no copy), so ``src``
    must not be written afterwards: it moves a buffer out of a ``.grad`` about to be cleared, or into one
    (``p.grad`` as the target updates the gradient itself). The public form copies (``paddle.assign``)."""
    _move_buffer(src, dst)


def release(x: paddle.Tensor) -> None:
    """Drop ``x``'s storage (its shape and dtype stay), so a holder of :func:`move_buffer` keeps no memory
    alive; a no-op in the public form."""
    _release(x)
