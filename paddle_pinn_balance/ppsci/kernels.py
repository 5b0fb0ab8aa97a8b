r"""NTK kernels from the Solver's constraints: the residual the Solver evaluates, not written a second time.

A kernel ``kernel(model) -> Tensor[N]`` evaluates one loss term's per-point quantity :math:`f(x_p)` (see
:mod:`paddle_pinn_balance.per_point`); :func:`constraint_kernels` builds one per term from the constraints'
output expressions and points, for :class:`~paddle_pinn_balance.NTKWeighting`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import paddle

from .. import expanded as _expanded
from ..per_point import _Unsupported
from .config import _ppsci, _term_sources, _unwrap


def ntk_model(model: paddle.nn.Layer) -> paddle.nn.Layer:
    """The model to give :class:`~paddle_pinn_balance.NTKWeighting` with :func:`constraint_kernels`: the
    PaddleScience network itself (a :class:`~paddle_pinn_balance.GradNorm` wrapper is unwrapped).

    Kept for compatibility: ``NTKWeighting(model, kernels)`` with the network itself is the same. The kernels
    call the network as the Solver does (dict in, dict out), and the traces take the exact fast path on it
    (:mod:`paddle_pinn_balance.expanded` records every use of a parameter wherever the network runs; what it
    cannot record goes through the exact loop, with a warning saying why). In 0.1.0
    ``ntk_model`` gave a ``paddle.nn.Sequential`` over a plain ``ppsci.arch.MLP``'s layers, which an older fast
    path needed; on the network itself the traces are bit-equal and as fast (measured: ``design/ppsci.md``).
    """
    return _unwrap(model)


def _dataset_points(constraint) -> dict:
    loader = constraint.data_loader
    ds = getattr(loader, "dataset", loader)
    if isinstance(getattr(ds, "input", None), Mapping):
        return dict(input=dict(ds.input), weight=dict(getattr(ds, "weight", None) or {}))
    if callable(getattr(ds, "input_fn", None)):
        return dict(input_fn=ds.input_fn, weight_fn=getattr(ds, "weight_fn", None), label_fn=ds.label_fn)
    raise ValueError(f"constraint {constraint.name!r}: cannot read points from {type(ds).__name__}; "
                     "pass `points={constraint_name: {input_key: array}}`")


def _as_tensor(v, dtype):
    t = v if isinstance(v, paddle.Tensor) else paddle.to_tensor(np.asarray(v))
    return t.astype(dtype) if t.dtype != dtype and t.dtype in (paddle.float32, paddle.float64, paddle.float16) else t


class _ConstraintPiece:
    """One constraint's contribution to one loss term: ``f(x_p)`` for its label key on its points."""

    def __init__(self, cname, constraint, key, points, max_points, point_weights, dtype):
        self.cname, self.constraint, self.key = cname, constraint, key
        self.max_points, self.point_weights, self.dtype = max_points, point_weights, dtype
        src = _dataset_points(constraint) if points is None else dict(input=dict(points), weight={})
        self.input_fn = src.get("input_fn")
        self.weight_fn = src.get("weight_fn")
        self.label_fn = src.get("label_fn")
        self.fixed = None
        if self.input_fn is None:
            self.fixed = {k: self._cut(_as_tensor(v, dtype)) for k, v in src["input"].items()}
            w = src["weight"].get(key)
            self.fixed_weight = None if w is None else self._cut(_as_tensor(w, dtype))

    def _cut(self, t):
        return t if self.max_points is None or int(t.shape[0]) <= self.max_points else t[: self.max_points]

    def _inputs(self):
        if self.fixed is not None:
            return self.fixed, self.fixed_weight
        raw = self.input_fn()  # a fresh sample (global numpy RNG, never rewound: a loop after the fast path draws anew)
        inputs = {k: self._cut(_as_tensor(v, self.dtype)) for k, v in raw.items()}
        weight = None
        if self.point_weights and self.weight_fn is not None:
            w = self.weight_fn(raw).get(self.key)
            weight = None if w is None else self._cut(_as_tensor(w, self.dtype))
        return inputs, weight

    def expression(self):
        expr = self.constraint.output_expr.get(self.key)
        if expr is None:
            return None
        try:
            import sympy
        except ImportError:  # pragma: no cover
            return expr
        if isinstance(expr, sympy.Basic):  # not yet converted (the solver converts at construction)
            raise ValueError(f"constraint {self.cname!r}: output expression {self.key!r} is still a sympy "
                             "expression; build the ppsci.solver.Solver (which converts it) before the first update")
        return expr

    def __call__(self, m):
        inputs, weight = self._inputs()
        data = {}
        for k, v in inputs.items():
            v = v.detach()
            v.stop_gradient = False
            data[k] = v
        out = m(data)  # as the Solver's train_forward: the network's output dict, merged with the inputs
        if not isinstance(out, Mapping):
            raise ValueError(f"kernel {self.key!r}: the model returned a {type(out).__name__}, not a dict of outputs; "
                             "give NTKWeighting the PaddleScience network itself (dict in, dict out)")
        data.update(out)
        try:
            if self.expression() is None:
                f = out[self.key]
            else:  # as the Solver's forward: every expression of the constraint in order, on one shared dict
                # (fused derivative nodes of a later expression read what an earlier one stored in it)
                for name, expr in self.constraint.output_expr.items():
                    f = expr(data)
                    if name == self.key:
                        break
        finally:
            _ppsci().autodiff.clear()
        if self.point_weights and weight is not None:
            f = f * paddle.sqrt(weight.reshape(f.shape))
        return f.reshape([-1])


class _TermKernel:
    """``kernel(model) -> Tensor[N]``: the per-point quantity of one loss term (all its constraints' points)."""

    def __init__(self, name, pieces):
        self.name, self.pieces = name, pieces

    def __call__(self, m):
        if len(self.pieces) > 1 and _expanded._ACTIVE is not None:  # the fast path needs one model call
            names = [p.cname for p in self.pieces]
            raise _Unsupported(f"term {self.name!r} is merged from {len(names)} constraints {names} (one model call "
                               "each); give each constraint its own label key for the fast path (design/ppsci.md)")
        parts = [p(m) for p in self.pieces]
        return parts[0] if len(parts) == 1 else paddle.concat(parts)


def constraint_kernels(
    constraints: Mapping,
    model: paddle.nn.Layer,
    points: Optional[Mapping[str, Mapping]] = None,
    max_points: Optional[int] = None,
    point_weights: bool = False,
) -> dict:
    r"""NTK kernels ``{term: kernel(model) -> Tensor[N]}`` built from the solver's constraints.

    For loss term ``k`` (a label key) the kernel evaluates, on the points of every constraint whose labels
    contain ``k``, exactly what the solver's ``train_forward`` feeds the loss: the model's output dict,
    merged with the inputs, then ``constraint.output_expr[k](data_dict)`` (or the raw output ``k`` when the
    constraint has no expression for it). The label is left out: it does not depend on the parameters, so
    :math:`\partial f(x_p)/\partial\theta` and the trace are those of the residual ``f - label``.

    * Several output keys in one constraint (e.g. labels ``{"u": 0, "v": 0}``): PaddleScience gives one loss
      term per key, so there is one kernel per key, each over the constraint's points.
    * One key in several constraints (merged into one term by PaddleScience): one kernel over the union
      (concatenation) of their points, so the trace is the trace of the merged term. Such a kernel calls the
      model once per constraint and takes the exact per-point loop, not the fast path; rename the key per
      constraint to get separate terms (and the fast path).

    Points: the constraint's dataset arrays (all of them, or the first ``max_points``), fixed for the run and
    independent of the training iterator (no batch is consumed, no random state is touched). A dataset that
    samples on the fly (``ContinuousNamedArrayDataset``) draws a fresh sample at each update. ``points=
    {constraint name: {input key: array}}`` overrides the points of the named constraints.

    Args:
        constraints: the solver's ``{name: Constraint}``.
        model: the PaddleScience network (a :class:`~paddle_pinn_balance.GradNorm` wrapper is unwrapped); it
            gives the points' floating dtype.
        points: optional per-constraint input points.
        max_points: at most this many points per constraint.
        point_weights: multiply by :math:`\sqrt{w_p}` (the constraint's ``weight_dict``), the NTK of the
            weighted residual that the loss actually sees (the paper has no point weights: default False).

    A kernel is called with the PaddleScience network (dict in, dict out: a ``ValueError`` says so for any
    other model), on the fast path as on the loop. Output expressions may read the network output from their
    data dict (sympy-converted and ``lambda out: ...`` expressions) or evaluate the network themselves (e.g.
    ``ppsci.equation.Helmholtz``, which calls ``model.forward_tensor``): the recording sees every use of a
    parameter either way, so both take the fast path and give the exact traces
    (``tests/test_ppsci.py::test_expression_calling_the_network_itself_is_recorded_exactly``).
    """
    _ppsci()
    if max_points is not None and (isinstance(max_points, bool) or not isinstance(max_points, int)
                                   or max_points < 1):
        raise ValueError(f"`max_points` must be a positive integer or None; got {max_points!r}")
    points = dict(points or {})
    unknown = sorted(set(points) - set(constraints))
    if unknown:
        raise ValueError(f"`points` names {unknown} are not constraint names {list(constraints)}")
    params = list(_unwrap(model).parameters())
    dtype = params[0].dtype if params else paddle.get_default_dtype()
    kernels = {}
    for term, sources in _term_sources(constraints).items():
        pieces = [_ConstraintPiece(cname, c, term, points.get(cname), max_points, point_weights, dtype)
                  for cname, c in sources]
        kernels[term] = _TermKernel(term, pieces)
    return kernels


def _renew_kernels(balancer, solver) -> None:
    """NTK kernels built from the first stage's constraints, rebuilt on the second stage's (new objects)."""
    kernels = getattr(balancer, "kernels", None)
    if not kernels or not all(isinstance(k, _TermKernel) for k in kernels.values()):
        return
    old = {id(p.constraint) for k in kernels.values() for p in k.pieces}
    if all(id(c) in old for c in solver.constraint.values()):
        return
    first = next(iter(kernels.values())).pieces[0]
    # solver.model: the network, or paddle.DataParallel around it (whose parameters() are the network's)
    balancer.set_kernels(constraint_kernels(solver.constraint, solver.model, max_points=first.max_points,
                                            point_weights=first.point_weights))
