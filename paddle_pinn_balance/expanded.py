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
  broadcast dimensions of the row; ``paddle.broadcast_to`` / ``paddle.expand`` of a parameter to the
  points' rows (PaddleScience's ``Stan`` activation) is the use ``ones * w``;
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
  ``model.parameters()``, a fused layer such as ``F.layer_norm``); the parameter is named;
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

import weakref

import numpy as np
import paddle

from . import recording as _recording
from .recording import Unsupported, _Intercept, _Node, _Recorder

__all__ = ["Unsupported", "per_point_sq_norms"]


def __getattr__(name):
    """``expanded._ACTIVE``: the recording of *this thread's* kernel call in progress, or ``None``
    (``ppsci/kernels.py`` asks whether the fast path is evaluating its kernel; the recording itself lives in
    :mod:`~paddle_pinn_balance.recording`, per thread)."""
    if name == "_ACTIVE":
        return getattr(_recording._LOCAL, "rec", None)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
