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

from typing import Sequence

import paddle

from .op_forms import _C, FORCE_PUBLIC, PRIVATE, PUBLIC, _works  # noqa: F401  (ops.PRIVATE etc. as before)

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
