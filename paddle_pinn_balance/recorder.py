"""Recording a diagnosis from a training loop, a balancer or a ``ppsci.solver.Solver``, without changing it.

:class:`Diagnosis` takes each term's gradient with ``paddle.grad(L_i, params, retain_graph=True)`` before the
balancer sees the losses: ``.grad``, the optimizer, the random generators and the graph the balancer then
differentiates are untouched, so a run with recording is bit for bit the run without it
(``tests/test_diagnose.py`` compares parameters and weights). Kernels (``{term: kernel(model) -> [N]}``, as
:class:`~paddle_pinn_balance.NTKWeighting` takes them) add each block's exact NTK trace (all ``N`` points,
:func:`~paddle_pinn_balance.per_point.per_point_sq_grad_norms`) and the eigenvalues of the block on
``ntk_points`` of its points (one ``paddle.grad`` per point). The global random states are never saved or
rewound (another thread may own them): a kernel that draws random numbers advances them, and then the run with
recording differs from the run without it; kernels on fixed points (the benchmarks', PaddleScience's) do not.
The statistics and the verdict are :mod:`paddle_pinn_balance.diagnose`; the pictures
:mod:`paddle_pinn_balance.diagnose_plots`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

import numpy as np
import paddle

from . import diagnose as dg
from .balancer import check_int
from .gradients import trainable_parameters
from .per_point import _as_vector, per_point_sq_grad_norms

__all__ = ["Diagnosis", "attach_diagnosis"]


def _numpy(t) -> np.ndarray:
    return np.asarray(t.numpy(), dtype=np.float64)


class Diagnosis:
    """Records, at chosen steps, what the pictures of :mod:`paddle_pinn_balance.diagnose` show.

    In a loop of your own, call it with the losses before the balancer, or let it wrap the balancer::

        diag = Diagnosis(model, every=100)                 # or steps=[0, 500, 1000]
        for step in range(iters):
            losses = {"res": ..., "bc": ...}
            diag(losses, step)                             # records at the chosen steps; returns None
            total = balancer(losses, step)                 # (or: total = Diagnosis(model, balancer=b)(losses, step))
            ...
        print(diag.verdict()["text"]); diag.report("diagnosis/")

    Args:
        model: the network whose trainable parameters the terms are differentiated by (a ``paddle.nn.Layer``).
        balancer: optional; called after recording, its result returned; its weights are recorded.
        steps: the steps to record (an iterable of ints), or ``every``: record when ``step % every == 0``.
            Default ``every=100``.
        kernels: optional ``{term: kernel(model) -> Tensor[N]}`` (per-point quantities, as NTKWeighting takes);
            default the balancer's own kernels (``ntk``), if any.
        ntk_points: points per block whose kernel matrix is formed for the eigenvalues (evenly spaced among
            the kernel's points); 0 records traces only.
        names: the terms to record (default all, in the losses' order); ``ref``: the term the others are
            compared with (default ``"res"`` if present, else the first).
    """

    def __init__(self, model, balancer=None, steps: Iterable[int] | None = None, every: int | None = None,
                 kernels: Mapping | None = None, ntk_points: int = 64, names=None, ref: str | None = None):
        if not isinstance(model, paddle.nn.Layer):
            raise ValueError(f"`model` must be a paddle.nn.Layer; got {type(model).__name__}")
        if steps is not None and every is not None:
            raise ValueError("give `steps` or `every`, not both")
        self.steps = None if steps is None else {check_int("steps", int(s), 0) for s in steps}
        self.every = None if steps is not None else check_int("every", 100 if every is None else every, 1)
        self.ntk_points = check_int("ntk_points", ntk_points, 0)
        self.model, self.balancer = model, balancer
        if kernels is None and balancer is not None:
            kernels = getattr(balancer, "kernels", None) or None
        if kernels is not None and not isinstance(kernels, Mapping):
            raise ValueError(f"`kernels` must map term names to kernel(model) callables; got {type(kernels).__name__}")
        self.kernels = dict(kernels) if kernels else None
        self.names, self.ref = (None if names is None else list(names)), ref
        self.params = trainable_parameters(model)
        pnames = {id(p): n for n, p in model.named_parameters()}
        self.param_names = [pnames.get(id(p), f"param{i}") for i, p in enumerate(self.params)]
        self.layers = [i for i, p in enumerate(self.params) if len(p.shape) >= 2] or list(range(len(self.params)))
        self.records: list = []

    def due(self, step: int) -> bool:
        """Whether ``step`` is one of the recorded steps."""
        return int(step) in self.steps if self.steps is not None else int(step) % self.every == 0

    def __call__(self, losses: Mapping, step: int = 0):
        if self.due(step):
            self.record(losses, int(step))
        if self.balancer is None:
            return None
        total = self.balancer(losses, step)
        if self.records and self.records[-1]["step"] == int(step):
            self.records[-1]["weights"] = {k: float(v) for k, v in self.balancer.weights.items()}
        return total

    # ---------------------------------------------------------------- recording

    def _term_gradients(self, values) -> list:
        rows = []
        for v in values:
            if v.stop_gradient:
                grads = [None] * len(self.params)
            else:
                grads = paddle.grad([v], self.params, retain_graph=True, allow_unused=True)
            rows.append([np.zeros(p.shape, dtype=np.float64) if g is None else _numpy(g)
                         for g, p in zip(grads, self.params)])
        return rows

    def record(self, losses: Mapping, step: int) -> dict:
        """Record the statistics of ``losses`` (a ``{term: scalar loss}`` mapping) at ``step``; returns the record."""
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError("`losses` must be a non-empty mapping {term name: scalar loss}")
        names = self.names or list(losses)
        missing = [n for n in names if n not in losses]
        if missing:
            raise ValueError(f"the losses have no term(s) {missing}; they have {list(losses)}")
        ref = self.ref or dg.reference_term(names)
        if ref not in names:
            raise ValueError(f"`ref` {ref!r} is not a term; terms: {names}")
        per_term = self._term_gradients([losses[n] for n in names])
        G = np.stack([np.concatenate([g.ravel() for g in row]) for row in per_term])
        norms = dg.grad_norms(G)
        k = names.index(ref)
        layers = []
        for li in self.layers:
            blocks = [row[li] for row in per_term]
            edges = dg.histogram_edges(blocks)
            counts, zeros = zip(*(dg.log_histogram(b, edges) for b in blocks))
            layers.append({"name": self.param_names[li], "shape": list(self.params[li].shape),
                           "edges": edges.tolist(), "counts": {n: c.tolist() for n, c in zip(names, counts)},
                           "zeros": dict(zip(names, zeros)), "norm": {n: float(np.linalg.norm(b))
                                                                      for n, b in zip(names, blocks)}})
        rec = {"step": int(step), "terms": names, "ref": ref,
               "loss": {n: float(losses[n].numpy()) for n in names}, "weights": None,
               "grad_norm": dict(zip(names, norms.tolist())),
               "log10_ratio": dict(zip(names, dg.log_scale_ratios(norms, k).tolist())),
               "mean_abs": {n: float(np.abs(G[i]).mean()) for i, n in enumerate(names)},
               "lra_estimate": dict(zip(names, dg.lra_estimates(G, k).tolist())),
               "cosine": dg.cosines(G).tolist(), "layers": layers,
               "ntk": self._ntk() if self.kernels else None}
        self.records.append(rec)
        return rec

    def _ntk(self) -> dict:
        out = {"trace": {}, "points": {}, "subset": {}, "eigenvalues": {}, "subset_trace": {}}
        for name, kernel in self.kernels.items():
            sq = per_point_sq_grad_norms(self.model, kernel, name=name)
            out["trace"][name] = float(sq.sum().numpy())
            out["points"][name] = int(sq.shape[0])
            if self.ntk_points:
                eig, m = self._spectrum(name, kernel)
                out["eigenvalues"][name], out["subset"][name] = eig.tolist(), m
                out["subset_trace"][name] = float(eig.sum())
        ref = self.ref if self.ref in out["trace"] else dg.reference_term(list(out["trace"]))
        traces = np.array(list(out["trace"].values()))
        ratios = dg.log_scale_ratios(traces, list(out["trace"]).index(ref))
        out["ref"], out["log10_trace_ratio"] = ref, dict(zip(out["trace"], ratios.tolist()))
        return out

    def _spectrum(self, name, kernel) -> tuple:
        f = _as_vector(kernel(self.model), name)
        n = int(f.shape[0])
        idx = np.unique(np.linspace(0, n - 1, min(n, self.ntk_points)).round().astype(int))
        rows = []
        for j, p in enumerate(idx):
            grads = paddle.grad([f[int(p)]], self.params, retain_graph=j < len(idx) - 1, allow_unused=True)
            rows.append(np.concatenate([np.zeros(q.shape).ravel() if g is None else _numpy(g).ravel()
                                        for g, q in zip(grads, self.params)]))
        return dg.kernel_spectrum(np.stack(rows)), len(idx)

    # ---------------------------------------------------------------- reading

    def summary(self) -> dict:
        """:func:`~paddle_pinn_balance.diagnose.summarize` of the records."""
        return dg.summarize(self.records)

    def verdict(self, thresholds: Mapping | None = None) -> dict:
        """:func:`~paddle_pinn_balance.diagnose.verdict` of the records."""
        return dg.verdict(self.summary(), thresholds)

    def to_dict(self, **extra) -> dict:
        """Everything plotted: the records, their summary and the verdict (``diagnosis.json``)."""
        return dict(extra, summary=self.summary(), verdict=self.verdict(), records=self.records)

    def report(self, out: str, title: str | None = None, plots: bool = True, dpi: int = 80, **extra) -> list:
        """Write ``diagnosis.json``, ``diagnosis.md`` and the PNGs into ``out``; returns the written paths."""
        from .diagnose_plots import markdown, plot_all

        os.makedirs(out, exist_ok=True)
        data = self.to_dict(title=title, **extra)
        files = plot_all(data, out, dpi=dpi) if plots else []
        data["plots"] = [os.path.basename(f) for f in files]
        path = os.path.join(out, "diagnosis.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=True)
        md = os.path.join(out, "diagnosis.md")
        with open(md, "w", encoding="utf-8") as f:
            f.write(markdown(data))
        return [path, md, *files]


class _Wrapped:
    """Stands in for an aggregator whose ``__call__`` takes no hooks (PaddleScience's ``mtl.Sum``)."""

    def __init__(self, diag, inner):
        self._diag, self._inner = diag, inner

    def __call__(self, losses, step=0):
        self._diag(losses, step)
        return self._inner(losses, step)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def attach_diagnosis(solver, steps: Iterable[int] | None = None, every: int | None = None,
                     kernels: Mapping | None = None, ntk_points: int = 64) -> Diagnosis:
    """Record a :class:`Diagnosis` inside a ``ppsci.solver.Solver``, hooked in the way
    :func:`~paddle_pinn_balance.ppsci.attach_logging` is: a forward pre-hook on ``solver.loss_aggregator`` (a
    balancer or any aggregator layer) takes the losses and ``global_step`` before the aggregator, so training is
    unchanged. PaddleScience's
    default ``mtl.Sum`` takes no hooks: it is wrapped instead (``diag.remove()`` puts it back).

    ``kernels``: e.g. :func:`~paddle_pinn_balance.ppsci.constraint_kernels` ``(constraints, model)``; default
    the balancer's own (``ntk``). Returns the diagnosis: ``solver.train()``, then ``diag.report(out)``.
    """
    agg = solver.loss_aggregator
    from .gradnorm import GradNorm

    model = solver.model.net if isinstance(solver.model, GradNorm) else solver.model  # GradNorm's wrapper: its net
    diag = Diagnosis(model, steps=steps, every=every, ntk_points=ntk_points,
                     kernels=kernels if kernels is not None else getattr(agg, "kernels", None))
    if isinstance(agg, paddle.nn.Layer) and type(agg).__call__ is paddle.nn.Layer.__call__:
        handle = agg.register_forward_pre_hook(lambda layer, inputs: diag(
            inputs[0], inputs[1] if len(inputs) > 1 and inputs[1] is not None else solver.global_step))

        def remove():
            handle.remove()
    else:
        solver.loss_aggregator = _Wrapped(diag, agg)

        def remove():
            solver.loss_aggregator = agg
    diag.remove = remove
    return diag
