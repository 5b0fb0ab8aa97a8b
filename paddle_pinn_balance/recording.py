"""The recording half of the NTK fast path (:mod:`paddle_pinn_balance.expanded`): each use of a parameter becomes
a recorded use (the parameter as a constant plus a zero probe, a :class:`paddle.autograd.PyLayer` whose backward is
again a recorded use), and :class:`_Intercept` installs the recording operations while a kernel runs.

What is replaced, and for whom: ``paddle.matmul``, ``add``, ``subtract``, ``multiply``, ``divide``,
``broadcast_to``, ``expand``, ``paddle.nn.functional.linear`` and 14 operator methods of ``EagerParamBase`` (the
class of every Parameter: ``+ - * / @ **``, reflected, unary ``-``, ``norm``), process-wide, from the first
recording's start to the last one's end; only the recording thread's calls on the recorded model's parameters
are recorded, every other call passes through to what was installed when the interception began.
"""

from __future__ import annotations

import threading

import paddle
from paddle.autograd import PyLayer
from paddle.base.framework import EagerParamBase

__all__ = ["Unsupported"]


class Unsupported(Exception):
    """The recorded (fast) path cannot evaluate this model or kernel exactly; use the loop."""


_ORIG = {
    "matmul": paddle.matmul,
    "linear": paddle.nn.functional.linear,
    "add": paddle.add,
    "subtract": paddle.subtract,
    "multiply": paddle.multiply,
    "divide": paddle.divide,
    "broadcast_to": paddle.broadcast_to,
    "expand": paddle.expand,
}
_matmul = _ORIG["matmul"]
_LOCAL = threading.local()  # .rec: the _Recorder of this thread's kernel call in progress (other threads: none)
_LOCK = threading.Lock()
#: while any thread records: {"count": recordings in progress, "methods": ..., "functions": ...}, what was installed
#: when the first began (restored when the last ends, and what every call that is not recorded passes through to)
_ACTIVE = None
_PASS = {}  # name -> the function or Parameter method installed when the interception began


class _Node:
    """A tracked tensor: a trainable parameter, or a function of parameters (and constants) only."""

    __slots__ = ("rec", "tensor", "value", "shape", "name", "inputs", "replay", "mm", "ew")

    def __init__(self, rec, tensor, value, name, inputs=None, replay=None):
        self.rec, self.tensor, self.value, self.name = rec, tensor, value, name
        self.shape = list(value.shape)
        self.inputs, self.replay = inputs, replay  # derived: operand nodes / constants and the batched re-run
        self.mm = []  # matrix-product uses: (a, probe, transposed)
        self.ew = []  # elementwise uses: (a or None for a sum, probe, coefficient)


def _probe(z):
    p = paddle.zeros_like(z)
    p.stop_gradient = False
    return p


def _sum_to(d, shape):
    """``d`` summed over the dimensions it was broadcast along from ``shape``."""
    shape = list(shape)
    if list(d.shape) == shape:
        return d
    lead = len(d.shape) - len(shape)
    if lead > 0:
        d = d.sum(axis=list(range(lead)))
    axes = [i for i, (n, m) in enumerate(zip(shape, d.shape)) if n == 1 and m != 1]
    if axes:
        d = d.sum(axis=axes, keepdim=True)
    return d.reshape(shape)


class _MatmulUse(PyLayer):
    """``a @ W`` (``a @ W^T`` when transposed) with ``W`` a constant; its backward is again a recorded use."""

    @staticmethod
    def forward(ctx, a, node, transposed):
        ctx.node, ctx.transposed = node, transposed
        return _matmul(a, node.value, transpose_y=transposed)

    @staticmethod
    def backward(ctx, g):
        return _matmul_use(ctx.node, g, not ctx.transposed)


class _MulUse(PyLayer):
    """``a * w`` (broadcast) with ``w`` a constant; its backward is again a recorded use."""

    @staticmethod
    def forward(ctx, a, node):
        ctx.node, ctx.shape = node, list(a.shape)
        return a * node.value

    @staticmethod
    def backward(ctx, g):
        return _sum_to(_mul_use(ctx.node, g), ctx.shape)


def _matmul_use(node, a, transposed, probe=True):
    if not node.rec.recording:  # the final backward: plain products
        return _matmul(a, node.value, transpose_y=transposed)
    if len(a.shape) < 2 or len(node.shape) != 2:
        raise Unsupported(f"a matrix product of {list(a.shape)} rows with parameter {node.name} "
                          f"{node.shape}: only [rows, ..., in] @ [in, out] is recorded")
    z = _MatmulUse.apply(a, node, transposed)
    if not probe:
        return z
    p = _probe(z)
    node.mm.append((a.detach(), p, transposed))
    return z + p


def _mul_use(node, a):
    if not node.rec.recording:
        return a * node.value
    z = _MulUse.apply(a, node)
    p = _probe(z)
    node.ew.append((a.detach(), p, 1.0))
    return z + p


def _add_use(node, a, coef):
    z = a + node.value if coef > 0 else a - node.value
    p = _probe(z)
    node.ew.append((None, p, coef))
    return z + p


# ---------------------------------------------------------------------------- operations on parameters only

def _aligned(t, shape, rank):
    """A per-row copy ``[rows, *shape]`` reshaped for broadcasting against rank-``rank`` operands."""
    return t.reshape([t.shape[0]] + [1] * (rank - len(shape)) + list(shape))


_BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
}


class _Recorder:
    def __init__(self, params, names):
        self.nodes = {}  # id(tensor) -> _Node (tensors are held by their nodes: ids stay unique)
        self.order = []
        self.recording = True
        for p in params:
            self._add(_Node(self, p, p.detach(), names.get(id(p), p.name)))

    def release(self):
        """Break the node <-> recorder cycles (the probes and values they hold are freed at once)."""
        for node in self.order:
            node.rec = node.inputs = node.replay = None
            node.mm, node.ew = [], []
        self.nodes, self.order = {}, []

    def _add(self, node):
        self.nodes[id(node.tensor)] = node
        self.order.append(node)
        return node

    def node(self, t):
        return self.nodes.get(id(t)) if isinstance(t, paddle.Tensor) else None

    def derived(self, compute, operands, replay, what):
        """A tracked tensor computed from tracked tensors and constants: ``compute(*values)``."""
        values = [o.value if isinstance(o, _Node) else o for o in operands]
        value = compute(*values).detach()
        tensor = EagerParamBase.from_tensor(value)  # a Parameter (its operations are intercepted too); shares value
        names = ", ".join(o.name for o in operands if isinstance(o, _Node))
        return self._add(_Node(self, tensor, value, f"{what}({names})", operands, replay)).tensor

    def _derived_binary(self, op, left, right):
        fn = _BINARY[op]
        operands = [self.node(left) or left, self.node(right) or right]
        out_rank = len(fn(*[o.value if isinstance(o, _Node) else o for o in operands]).shape)

        def replay(batched):
            args = []
            for o in operands:
                if isinstance(o, _Node):
                    args.append(_aligned(batched[id(o)], o.shape, out_rank))
                elif isinstance(o, paddle.Tensor):
                    args.append(o.reshape([1] + [1] * (out_rank - len(o.shape)) + list(o.shape)))
                else:
                    args.append(o)
            return fn(*args)

        return self.derived(fn, operands, replay, op)

    def binary(self, op, left, right):
        """``left <op> right`` where at least one operand is tracked."""
        nl, nr = self.node(left), self.node(right)
        if op == "matmul":
            if nl is not None or nr is None:
                raise Unsupported(f"a parameter ({(nl or nr).name}) on the left of a matrix product")
            return _matmul_use(nr, left, False)
        if nl is not None and nr is not None:
            return self._derived_binary(op, left, right)
        node, other = (nl, right) if nl is not None else (nr, left)
        if not isinstance(other, paddle.Tensor):
            if isinstance(other, (int, float)) and not isinstance(other, bool):
                return self._derived_binary(op, left, right)
            raise Unsupported(f"parameter {node.name} combined with a {type(other).__name__}")
        if other.stop_gradient and paddle.broadcast_shape(list(other.shape), node.shape) == node.shape:
            return self._derived_binary(op, left, right)  # a constant shaped like the parameter (a mask, ...)
        # a row-wise use: `other` holds one row per point
        if op == "add":
            return _add_use(node, other, 1.0)
        if op == "sub":
            return _add_use(node, -other, 1.0) if nl is not None else _add_use(node, other, -1.0)
        if op == "mul":
            return _mul_use(node, other)
        if op == "div":
            if nl is not None:  # w / A = (1 / A) * w
                return _mul_use(node, 1.0 / other)
            return _mul_use(self.node(self._derived_binary("div", 1.0, node.tensor)), other)
        raise Unsupported(f"parameter {node.name} in a `{op}` with the points' rows")

    def unary(self, what, node, compute, batched_fn):
        return self.derived(compute, [node], lambda b: batched_fn(b[id(node)]), what)

    def linear(self, x, weight, bias):
        nw, nb = self.node(weight), self.node(bias)
        if self.node(x) is not None:
            raise Unsupported("a parameter as the input of a linear map")
        z = _matmul_use(nw, x, False, probe=False) if nw is not None else _ORIG["matmul"](x, weight)
        p = _probe(z)
        if nw is not None:
            nw.mm.append((x.detach(), p, False))
        z = z + p
        if bias is not None:
            if nb is not None:
                z = z + nb.value
                nb.ew.append((None, p, 1.0))
            else:
                z = z + bias
        return z


# ---------------------------------------------------------------------------- interception

def _recorder(*tensors):
    """This thread's recording if one of ``tensors`` is tracked by it, else ``None`` (other threads' calls, and
    calls on tensors that are not parameters of the recorded model, pass through)."""
    rec = getattr(_LOCAL, "rec", None)
    if rec is not None:
        for t in tensors:
            if isinstance(t, paddle.Tensor) and id(t) in rec.nodes:
                return rec
    return None


def _dunder(name, op, reflected):
    def method(self, other):
        rec = _recorder(self, other)
        if rec is not None:
            return rec.binary(op, other, self) if reflected else rec.binary(op, self, other)
        return _PASS[name](self, other)

    method.__name__ = name
    return method


def _function(key, op):
    def fn(x, y, *args, **kwargs):
        rec = _recorder(x, y)
        if rec is not None and not args and not kwargs.get("out") and kwargs.get("alpha", 1) == 1 \
                and kwargs.get("rounding_mode") is None:
            return rec.binary(op, x, y)
        return _PASS[key](x, y, *args, **kwargs)

    return fn


def _patched_matmul(x, y, transpose_x=False, transpose_y=False, name=None, **kwargs):
    rec = _recorder(x, y)
    if rec is not None and not kwargs.get("out"):
        if transpose_x or _recorder(x) is not None:
            raise Unsupported("paddle.matmul with a parameter on the left or a transposed left operand")
        n = rec.node(y)
        return _matmul_use(n, x, bool(transpose_y))
    return _PASS["matmul"](x, y, transpose_x=transpose_x, transpose_y=transpose_y, name=name, **kwargs)


def _broadcast(key):
    def fn(x, shape, name=None):
        """``paddle.broadcast_to(w, [rows, ...])`` of a parameter (ppsci's ``Stan``) is ``ones * w``: recorded
        as an elementwise use whose per-point gradient is the adjoint summed over the broadcast axes."""
        rec = _recorder(x)
        if rec is None:
            return _PASS[key](x, shape, name=name)
        node = rec.node(x)
        ones = paddle.ones(_ORIG[key](paddle.zeros([1] * len(node.shape), node.value.dtype), shape).shape,
                           node.value.dtype)
        return _mul_use(node, ones)

    return fn


def _patched_linear(x, weight, bias=None, name=None):
    rec = _recorder(weight, bias, x)
    if rec is not None:
        return rec.linear(x, weight, bias)
    return _PASS["linear"](x, weight, bias, name)


def _neg(self):
    rec = _recorder(self)
    if rec is None:
        return _PASS["__neg__"](self)
    return rec.unary("neg", rec.node(self), lambda v: -v, lambda b: -b)


def _norm(self, p=None, axis=None, keepdim=False, *args, **kwargs):
    rec = _recorder(self)
    if rec is None or args or kwargs.get("out") is not None or kwargs.get("dtype") is not None:
        return _PASS["norm"](self, p, axis, keepdim, *args, **kwargs)
    node = rec.node(self)
    rank = len(node.shape)
    if isinstance(axis, int):
        axes = [(axis % rank) + 1]
    elif axis is None:
        axes = list(range(1, rank + 1))
    else:
        raise Unsupported(f"norm of parameter {node.name} over axes {axis}")
    if p in (None, "fro", 2, 2.0):
        def batched(b):
            return paddle.sqrt((b * b).sum(axis=axes, keepdim=keepdim))
    elif isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
        def batched(b):
            return (paddle.abs(b) ** p).sum(axis=axes, keepdim=keepdim) ** (1.0 / p)
    else:
        raise Unsupported(f"{p}-norm of parameter {node.name}")

    def compute(v):
        return batched(v.unsqueeze(0)).squeeze(0)

    return rec.unary("norm", node, compute, batched)


_DUNDERS = {
    "__add__": ("add", False), "__radd__": ("add", True), "__sub__": ("sub", False), "__rsub__": ("sub", True),
    "__mul__": ("mul", False), "__rmul__": ("mul", True), "__truediv__": ("div", False),
    "__rtruediv__": ("div", True), "__matmul__": ("matmul", False), "__rmatmul__": ("matmul", True),
    "__pow__": ("pow", False), "__rpow__": ("pow", True),
}
_METHODS = {name: _dunder(name, op, refl) for name, (op, refl) in _DUNDERS.items()}
_METHODS["__neg__"] = _neg
_METHODS["norm"] = _norm
_FUNCTIONS = [
    (paddle.nn.functional, "linear", _patched_linear),
    (paddle, "matmul", _patched_matmul),
    (paddle, "add", _function("add", "add")),
    (paddle, "subtract", _function("subtract", "sub")),
    (paddle, "multiply", _function("multiply", "mul")),
    (paddle, "divide", _function("divide", "div")),
    (paddle, "broadcast_to", _broadcast("broadcast_to")),
    (paddle, "expand", _broadcast("expand")),
]


class _Intercept:
    """Record this thread's uses of the recorded model's parameters for the duration of a kernel call.

    The recording operations are installed process-wide (``paddle.matmul``, ``add``, ``subtract``, ``multiply``,
    ``divide``, ``broadcast_to``, ``expand``, ``nn.functional.linear`` and 14 operator methods of
    ``paddle.base.framework.EagerParamBase``, the class of every Parameter) by the first recording to begin and
    removed when the last one ends; a call is recorded only when it is made by the recording thread on a
    parameter of the recorded model: every other call (another thread's, or on other tensors) passes through to
    what was installed when the interception began (a patch of another library stays in effect)."""

    def __init__(self, rec):
        self.rec = rec

    def __enter__(self):
        global _ACTIVE
        if getattr(_LOCAL, "rec", None) is not None:
            raise Unsupported("a kernel evaluated inside another kernel's fast-path evaluation")
        with _LOCK:
            if _ACTIVE is None:
                methods = {n: EagerParamBase.__dict__.get(n) for n in _METHODS}
                functions = [(mod, n, getattr(mod, n)) for mod, n, _ in _FUNCTIONS]
                _PASS.clear()
                _PASS.update({n: getattr(EagerParamBase, n) for n in _METHODS})
                _PASS.update({n: fn for _, n, fn in functions})
                try:
                    for n, fn in _METHODS.items():
                        setattr(EagerParamBase, n, fn)
                    for mod, n, fn in _FUNCTIONS:
                        setattr(mod, n, fn)
                except BaseException:
                    _restore(methods, functions)
                    raise
                _ACTIVE = {"count": 0, "methods": methods, "functions": functions}
            _ACTIVE["count"] += 1
        _LOCAL.rec = self.rec
        return self

    def __exit__(self, *exc):
        global _ACTIVE
        _LOCAL.rec = None
        with _LOCK:
            _ACTIVE["count"] -= 1
            if _ACTIVE["count"] == 0:
                _restore(_ACTIVE["methods"], _ACTIVE["functions"])
                _ACTIVE = None
        return False


def _restore(methods, functions) -> None:
    for n, old in methods.items():
        if old is not None:
            setattr(EagerParamBase, n, old)
        elif n in EagerParamBase.__dict__:
            delattr(EagerParamBase, n)
    for mod, n, old in functions:
        setattr(mod, n, old)
