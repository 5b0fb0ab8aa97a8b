r"""Per-point parameter gradients from one backward, by recording every use of every parameter.

The fast path of :func:`~paddle_pinn_balance.per_point.per_point_sq_grad_norms`. While the kernel runs (on
the model itself), every operation that takes a trainable parameter is replaced by an equal one that
*records the use*: the parameter enters as a constant (detached), and a zero "probe" tensor is added to the
use's output. One backward of :math:`\sum_p f(x_p)` with respect to the probes then gives, for every use
``k``, the adjoint :math:`G_k = \partial \sum_q f_q / \partial Z_k` of its output :math:`Z_k`; for a kernel
that is *pointwise* (row ``p`` of every tensor of the computation depends on point ``p`` only, as in
residual, boundary and initial terms of an MLP-like network), row ``p`` of :math:`G_k` is
:math:`\partial f_p / \partial Z_{k,p}`, so the chain rule gives every point's own gradient:

* matrix product ``Z = A @ W`` (``nn.Linear``, ``F.linear``, ``paddle.matmul``, ``@``):
  :math:`\partial f_p/\partial W = \sum_k a_{k,p} \otimes g_{k,p}` (an outer product per use), and
  :math:`\|\sum_k a_k\otimes g_k\|^2 = \sum_{k,l} (a_k\cdot a_l)(g_k\cdot g_l)` without forming the
  ``[in, out]`` matrix per point (the "ghost norm"); when that is dearer than the matrix, the matrix;
* elementwise ``A * w``, ``A + w``, ``A - w``, ``A / w`` with broadcasting (biases, scales, trainable
  frequencies, PirateNet's ``alpha``): the per-point gradient is ``G * A`` (or ``G``) summed over the
  broadcast dimensions of the row;
* operations on parameters alone (``1 - alpha``, ``g * v``, ``v / ||v||``: weight normalisation, random
  weight factorisation) make a *derived* tensor, tracked like a parameter; its per-point gradients are
  pulled back to the parameters by re-running the operation on per-point copies (``[rows, *shape]``).

Derivatives of the network in its inputs (``paddle.grad(u, x, create_graph=True)``) are covered: each use is
a :class:`paddle.autograd.PyLayer` whose backward is again a recorded use (``dA = dZ @ W^T``, ``dA = dZ * w``),
so the uses inside the derivative graphs (first, second, ... derivatives) are recorded as the kernel
builds them, and the per-point gradient is the sum over all of them.

Exactness is checked, not assumed, and :class:`Unsupported` (the caller falls back to the exact loop) is
raised when

* a parameter is still reachable from the kernel's values after it ran: the real parameters never enter a
  recorded use, so it was used by an operation that is not recorded (indexing, ``paddle.exp(w)``,
  ``paddle.broadcast_to(w, ...)``, ``model.parameters()``, a fused layer such as ``F.layer_norm``); the
  parameter is named;
* a use's rows are not the kernel's points (a model called on ``2N`` rows for ``N`` values);
* the adjoints are not per point: a second backward, of :math:`\sum_p r_p f_p` with fixed pseudo-random
  :math:`r_p`, must give row ``p`` of every adjoint times :math:`r_p`; it does not where the kernel or the
  model mixes points (a mean over points, batch normalisation). This check runs at the first evaluation of
  a kernel with a model (``check_points="first"``), or always, or never.

Cost: the kernel runs once (with a product, a zero probe and a sum more per use), one backward gives the
adjoints, then a few batched products per parameter: about a plain training step on the same points (see
``design/performance.md``); memory about 2.7 times a plain step's (the probes and all adjoints at once).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import paddle
from paddle.autograd import PyLayer
from paddle.base.framework import EagerParamBase

__all__ = ["Unsupported", "per_point_sq_norms"]


class Unsupported(Exception):
    """The recorded (fast) path cannot evaluate this model or kernel exactly; use the loop."""


_ORIG = {
    "matmul": paddle.matmul,
    "linear": paddle.nn.functional.linear,
    "add": paddle.add,
    "subtract": paddle.subtract,
    "multiply": paddle.multiply,
    "divide": paddle.divide,
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
]


class _Intercept:
    """Record this thread's uses of the recorded model's parameters for the duration of a kernel call.

    The recording operations are installed process-wide (``paddle.matmul``, ``add``, ``subtract``, ``multiply``,
    ``divide``, ``nn.functional.linear`` and 14 operator methods of ``paddle.base.framework.EagerParamBase``, the
    class of every Parameter) by the first recording to begin and removed when the last one ends; a call is
    recorded only when it is made by the recording thread on a parameter of the recorded model: every other call
    (another thread's, or on other tensors) passes through to what was installed when the interception began (a
    patch of another library stays in effect)."""

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


# ---------------------------------------------------------------------------- per-point squared norms

def _rows_to(ga, shape, name):
    """Per-point gradients ``[N, *shape]`` of a broadcast parameter from ``ga`` of the use's shape ``[N, *rest]``."""
    rest = list(ga.shape[1:])
    s = list(shape)
    if len(s) == len(rest) + 1:
        if s[0] != 1:
            raise Unsupported(f"parameter {name} {shape} is broadcast along the points' rows")
        s = s[1:]
    if len(s) > len(rest):
        raise Unsupported(f"parameter {name} {shape} has more dimensions than its use")
    s_pad = [1] * (len(rest) - len(s)) + s
    axes = [i + 1 for i, (n, m) in enumerate(zip(s_pad, rest)) if n == 1 and m != 1]
    if axes:
        ga = ga.sum(axis=axes, keepdim=True)
    out_shape = [ga.shape[0]] + list(shape)
    return ga if list(ga.shape) == out_shape else ga.reshape(out_shape)


def _ghost_factors(node, grads, n):
    """``U [N, K, in]``, ``V [N, K, out]`` with the per-point gradient ``sum_k U_k^T V_k`` of a matrix."""
    d_in, d_out = node.shape
    us, vs = [], []
    for a, p, transposed in node.mm:
        g = grads.get(id(p))
        if g is None:
            continue
        u, v = (g, a) if transposed else (a, g)
        if int(u.shape[0]) != n or int(v.shape[0]) != n:
            raise Unsupported(f"parameter {node.name} is used on {int(u.shape[0])} rows for {n} points")
        us.append(u.reshape([n, -1, d_in]))
        vs.append(v.reshape([n, -1, d_out]))
    if not us:
        return None
    return paddle.concat(us, axis=1), paddle.concat(vs, axis=1)


def _elementwise_rows(node, grads, n, rows):
    """Sum over the elementwise uses of the per-point gradients, rows ``rows`` (a slice), or None."""
    out = None
    for a, p, coef in node.ew:
        g = grads.get(id(p))
        if g is None:
            continue
        if len(g.shape) < 1 or int(g.shape[0]) != n:
            raise Unsupported(f"parameter {node.name} is used on {list(g.shape)} for {n} points")
        whole = rows.start == 0 and rows.stop == n
        g = g if whole else g[rows]
        if a is not None and len(a.shape) == len(g.shape) and int(a.shape[0]) == n:
            a = a if whole else a[rows]
        elif a is not None and n > 1:
            raise Unsupported(f"parameter {node.name} is multiplied by {list(a.shape)}, not one row per point")
        ga = g * a if a is not None else (g if coef == 1.0 else g * coef)
        r = _rows_to(ga, node.shape, node.name)
        out = r if out is None else out + r
    return out


CHECKS = ("first", "always", "never")
#: Where per-point gradients of a tensor are formed (``[rows, *shape]``), rows per slice are capped so that one
#: such tensor holds at most this many entries (64 MB in float32).
SLICE_ENTRIES = 2 ** 24
_CHECKED = weakref.WeakKeyDictionary()  # kernel -> WeakSet of the models it was checked with


def _needs_check(kernel, model, check_points) -> bool:
    if check_points != "first":
        return check_points == "always"
    try:
        return model not in _CHECKED.get(kernel, ())
    except TypeError:  # a kernel that cannot be weakly referenced: checked every time
        return True


def _mark_checked(kernel, model) -> None:
    try:
        _CHECKED.setdefault(kernel, weakref.WeakSet()).add(model)
    except TypeError:
        pass


def per_point_sq_norms(model, kernel, params, names, as_vector, chunk_size, check_points="first"):
    r"""``s_p = ||d f(x_p) / d theta||^2`` (shape ``[N]``) by the recorded path; raises :class:`Unsupported`.

    ``check_points``: verify with a second backward, of :math:`\sum_p r_p f_p` for fixed pseudo-random
    :math:`r_p \in [0.5, 1.5]`, that every use's adjoint is row ``p`` of the first one times :math:`r_p`,
    i.e. that the kernel and the model do not mix points (a mean over points, batch normalisation,
    attention across points): ``"first"`` at the first evaluation of each kernel with each model (the
    computation's structure is the kernel's code, the same at every update), ``"always"`` or ``"never"``.
    """
    check = _needs_check(kernel, model, check_points)
    rec = _Recorder(params, names)
    try:
        return _per_point_sq_norms(rec, model, kernel, as_vector, chunk_size, check)
    finally:
        rec.release()  # nodes and recorder refer to each other: free the probes now, not at a gc pass


def _per_point_sq_norms(rec, model, kernel, as_vector, chunk_size, check):
    with _Intercept(rec):
        f = as_vector(kernel(model))
    rec.recording = False
    n = int(f.shape[0])
    probes = [p for node in rec.order for p in [u[1] for u in node.mm] + [u[1] for u in node.ew]]
    probes = list({id(p): p for p in probes}.values())  # a linear map's probe serves its weight and bias
    bad = [list(p.shape) for p in probes if len(p.shape) < 1 or int(p.shape[0]) != n]
    if bad:
        raise Unsupported(f"a parameter is used on rows {bad[0]} for {n} points (one row per point is needed)")
    if f.stop_gradient:  # nothing trainable reaches the values
        return paddle.zeros([n], dtype=f.dtype)
    tracked = [node.tensor for node in rec.order]
    got = paddle.grad([f.sum()], probes + tracked, allow_unused=True, retain_graph=check)
    leaked = [node.name for node, g in zip(rec.order, got[len(probes):]) if g is not None]
    if leaked:
        raise Unsupported(f"parameter(s) {', '.join(leaked)} reach the kernel's values through an operation the "
                          "fast path does not record")
    live = [(p, g) for p, g in zip(probes, got[: len(probes)]) if g is not None]
    if check and live:
        _check_points(f, live, n)
    if check:
        _mark_checked(kernel, model)
    grads = {id(p): g for p, g in live}
    return _reduce(rec, grads, n, f.dtype, chunk_size)


def _check_points(f, live, n):
    r = paddle.to_tensor(np.random.default_rng(20260217).uniform(0.5, 1.5, n).astype(str(f.dtype).split(".")[-1]))
    again = paddle.grad([(f * r).sum()], [p for p, _ in live], allow_unused=True)
    errs, scales = [], []
    for (_, g), h in zip(live, again):
        expect = g * r.reshape([n] + [1] * (len(g.shape) - 1))
        errs.append((expect if h is None else h - expect).abs().amax())  # amax: paddle.max warns on 3.2
        scales.append(expect.abs().amax())
    err = paddle.stack(errs).numpy().astype(np.float64)
    scale = paddle.stack(scales).numpy().astype(np.float64)
    tol = 1e-3 if f.dtype in (paddle.float32, paddle.float16, paddle.bfloat16) else 1e-8
    rel = err / np.maximum(scale, np.finfo(np.float64).tiny)  # 0 / tiny = 0: no deviation
    worst = int(np.argmax(rel))
    if err[worst] > tol * scale[worst]:
        raise Unsupported("the kernel's values mix points (entry p depends on other rows than row p: a mean over "
                          f"points, batch normalisation, ...): relative deviation {rel[worst]:.2g}")


def _reduce(rec, grads, n, dtype, chunk_size):
    derived = [node for node in rec.order if node.inputs is not None]
    # nodes whose per-point gradients are formed (not only ghost norms): derived ones and their inputs,
    # and any tensor with an elementwise use
    full = set()
    for node in derived:
        full.add(id(node))
        full.update(id(o) for o in node.inputs if isinstance(o, _Node))
    for node in rec.order:
        if node.ew:
            full.add(id(node))
    terms = []
    factors = {}
    for node in rec.order:
        if not node.mm:
            continue
        fac = _ghost_factors(node, grads, n)
        if fac is None:
            continue
        u, v = fac
        k, d_in, d_out = int(u.shape[1]), node.shape[0], node.shape[1]
        if id(node) not in full and k * (d_in + d_out) <= d_in * d_out:
            gu = paddle.bmm(u, u.transpose([0, 2, 1]))
            gv = paddle.bmm(v, v.transpose([0, 2, 1]))
            terms.append((gu * gv).sum(axis=[1, 2]))
        else:
            factors[id(node)] = fac
            full.add(id(node))
    todo = [node for node in rec.order if id(node) in full]
    if todo:
        # rows per slice: at most chunk_size, and at most SLICE_ENTRIES entries in any formed gradient
        widest = max(int(np.prod(node.shape)) if node.shape else 1 for node in todo)
        step = min(n if chunk_size is None else chunk_size, max(1, SLICE_ENTRIES // widest))
        parts = [_full_rows(todo, derived, factors, grads, n, slice(s, min(n, s + step)), dtype)
                 for s in range(0, n, step)]
        terms.append(parts[0] if len(parts) == 1 else paddle.concat(parts))
    if not terms:
        return paddle.zeros([n], dtype=dtype)
    return (terms[0] if len(terms) == 1 else paddle.add_n(terms)).astype(dtype)


def _full_rows(todo, derived, factors, grads, n, rows, dtype):
    """Squared norms over rows ``rows`` of the parameters whose per-point gradients are formed."""
    c = rows.stop - rows.start
    whole = c == n
    acc = {}

    def add(node, t):
        acc[id(node)] = t if id(node) not in acc else acc[id(node)] + t

    for node in todo:
        fac = factors.get(id(node))
        if fac is not None:
            u, v = fac
            if not whole:
                u, v = u[rows], v[rows]
            add(node, paddle.bmm(u.transpose([0, 2, 1]), v))
        e = _elementwise_rows(node, grads, n, rows)
        if e is not None:
            add(node, e)
    for node in reversed(derived):  # pull per-point gradients of derived tensors back to their operands
        g = acc.pop(id(node), None)
        if g is None:
            continue
        ins = list({id(o): o for o in node.inputs if isinstance(o, _Node)}.values())  # w * w: one copy
        copies = {}
        for o in ins:
            t = o.value.unsqueeze(0).expand([c] + o.shape)
            t = t.clone() if t.stop_gradient else t
            t.stop_gradient = False
            copies[id(o)] = t
        out = node.replay(copies)
        pulled = paddle.grad([out], [copies[id(o)] for o in ins], grad_outputs=[g], allow_unused=True)
        for o, pg in zip(ins, pulled):
            if pg is not None:
                add(o, pg)
    terms = []
    for node in todo:
        g = acc.get(id(node))
        if g is not None and node.inputs is None:
            terms.append((g * g).reshape([c, -1]).sum(axis=1))
    if not terms:
        return paddle.zeros([c], dtype=dtype)
    return terms[0] if len(terms) == 1 else paddle.add_n(terms)
