"""NTK trace weighting (Wang, Yu & Perdikaris, J. Comput. Phys. 449, 110768, 2022, Algorithm 1)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import paddle

from . import ops
from .balancer import Balancer, BalanceWarning, check_choice, check_int
from .contract import Slot, register
from .grad_norm_ratio import grad_norm_ratio_weights
from .gradients import sum_across_ranks, trainable_parameters
from .per_point import PATHS, per_point_sq_grad_norms

MODES = ("trace", "grad_norm")
NTK_REDUCTIONS = ("sum", "mean")


def ntk_trace_weights(traces: paddle.Tensor, counts: paddle.Tensor | None = None) -> paddle.Tensor:
    r"""NTK trace weights from the per-term traces :math:`\operatorname{Tr}(K_{ii})` (shape ``[K]``):

    .. math:: \hat\lambda_i = \frac{\sum_j \operatorname{Tr}(K_{jj})}{\operatorname{Tr}(K_{ii})}
        \quad (\text{Wang, Yu, Perdikaris, JCP 2022, Sec. 6, Algorithm 1}),

    with :math:`\operatorname{Tr}(K_{ii}) = \sum_{p=1}^{N_i} \|\partial f_i(x_p)/\partial\theta\|_2^2`.
    ``counts``: the point counts :math:`N_i`; given, the traces are replaced by the means of the NTK
    diagonals :math:`\operatorname{Tr}(K_{ii})/N_i` first (jaxpi; ``NTKWeighting(reduction="mean")``, which
    passes the means directly).

    If any trace is non-finite or not positive, every weight is NaN (a caller's non-finite guard then
    keeps all weights, as :class:`NTKWeighting` does). Whole-array operations only: no host synchronisation.

    Example: traces ``[1, 3]`` give ``[4, 4/3]``; with counts ``[1, 3]`` (means ``[1, 1]``) ``[2, 2]``.
    """
    s = traces if counts is None else traces / ops.cast(counts, traces.dtype)
    w = ops.total(s) / s
    ok = ops.all_finite(s) & paddle.all(s > 0)
    return ops.where(ok, w, ops.filled(s.shape[0], math.nan, w))


@register("ntk")
class NTKWeighting(Balancer):
    r"""NTK weighting: each term's weight is the total NTK trace over the trace of its own NTK block.

    .. math::

        \operatorname{Tr}(K_{ii}) = \sum_{p=1}^{N_i} \Big\| \frac{\partial f_i(x_p)}{\partial \theta} \Big\|_2^2,
        \qquad
        \hat\lambda_i = \frac{\sum_j \operatorname{Tr}(K_{jj})}{\operatorname{Tr}(K_{ii})}
        \quad (\text{JCP 2022, Sec. 6, Algorithm 1}),

    .. math:: \lambda_i \leftarrow m\,\lambda_i + (1 - m)\,\hat\lambda_i ,

    where (:func:`ntk_trace_weights` computes the estimate)

    * :math:`f_i(x_p)`: entry ``p`` of ``kernels[i](model)``, the per-point quantity of term ``i`` (network
      output for a Dirichlet term, PDE residual for the residual term, ...), on the kernel's own points
      (fixed, or drawn by the kernel at each update; they need not be the training batch).
    * :math:`\theta`: every trainable parameter of ``model``, weights and biases.
    * ``reduction``: ``"sum"`` uses the trace (paper); ``"mean"`` uses :math:`\operatorname{Tr}(K_{ii})/N_i`,
      the mean of the NTK diagonal (jaxpi), so that the point counts do not enter the weights.
    * ``momentum``: :math:`m`; 0 overwrites the weights at each update (paper), 0.9 is jaxpi's EMA.
    * ``update_freq``: update on calls with ``step % update_freq == 0`` (100 as the authors' notebook, 1000
      in the paper).
    * ``mode="grad_norm"``: the gradient-norm proxy that several libraries call "NTK",
      :math:`\hat\lambda_i = \sum_j \|\nabla_\theta L_j\|_2 / \|\nabla_\theta L_i\|_2` from the scalar losses
      (no kernels needed). It is an approximation, not the trace: with :math:`L_i = \frac1{N}\sum_p r_p^2`,
      :math:`\|\nabla L_i\|` weighs the per-point gradients by the residuals and sums them before taking the
      norm, which by Cauchy-Schwarz is at most :math:`\frac2{N}\|r\|\sqrt{\operatorname{Tr}(K_{ii})}`.

    The traces are computed exactly without one backward per point
    (:func:`~paddle_pinn_balance.per_point.per_point_sq_grad_norms`): the kernel runs once with every use of
    a parameter recorded (affine maps, matrix products, elementwise operations, in the forward pass and in the
    derivative graphs a residual builds), and one backward for all the points gives each use's per-point
    adjoint (a second one, at a kernel's first evaluation, checks that it does not mix points;
    ``last_path == "expanded"``; :mod:`paddle_pinn_balance.expanded`): every ``ppsci.arch.MLP`` option,
    ``ModifiedMLP``, PirateNet and plain ``paddle.nn`` compositions. A parameter used in a way the recording
    does not know, or a kernel mixing points, goes through an exact per-point loop (``last_path == "loop"``,
    with a warning once per term giving the reason).

    Args:
        model: the network (a ``paddle.nn.Layer``) whose parameters the kernels differentiate.
        kernels: ``{name: kernel}`` with ``kernel(model) -> Tensor[N] or [N, 1]``, one per loss term
            (required for ``mode="trace"``). A kernel evaluates the network it is given on its points
            (``model(x)``, a PaddleScience model's dict call, ``model.forward_tensor(x)``, ...); it is called with
            ``model`` itself on both paths.
        mode: ``"trace"`` (the paper) or ``"grad_norm"`` (the approximation above).
        reduction: ``"sum"`` or ``"mean"`` (``mode="trace"`` only).
        update_freq: update cadence (default 100).
        momentum: smoothing :math:`m` in ``[0, 1)`` (default 0).
        min_weight, max_weight: optional bounds applied after smoothing.
        chunk_size: on the fast path, at most this many points per slice where per-point gradients of a
            tensor are formed (``[points, *shape]``: derived weights such as weight-normalised ones,
            elementwise parameters, layers where that is cheaper than the ghost norm), so memory about
            ``chunk_size`` times that tensor's size; slices are also capped at ``expanded.SLICE_ENTRIES``
            entries (``None``: that cap only). The kernel and its backward run once for all points either way.
        path: ``"auto"``, ``"expanded"`` (raise if the fast path does not apply) or ``"loop"``.
        loss_names: the term names, or ``None`` to take them from the first call.
        assemble: ``mode="grad_norm"`` only: the update step's total reuses the per-term gradients (no
            second backward); see :class:`~paddle_pinn_balance.balancer.Balancer`.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import NTKWeighting
        >>> _ = paddle.seed(0)
        >>> net = paddle.nn.Sequential(paddle.nn.Linear(1, 16), paddle.nn.Tanh(), paddle.nn.Linear(16, 1))
        >>> x_r = paddle.linspace(0, 1, 32).reshape([-1, 1])
        >>> x_b = paddle.to_tensor([[0.0], [1.0]])
        >>> def residual(model):  # u'' - f on the collocation points
        ...     x = x_r.detach()
        ...     x.stop_gradient = False
        ...     u = model(x)
        ...     u_x = paddle.grad(u.sum(), x, create_graph=True)[0]
        ...     u_xx = paddle.grad(u_x.sum(), x, create_graph=True)[0]
        ...     return u_xx + paddle.sin(x)
        >>> ntk = NTKWeighting(net, kernels={"res": residual, "bc": lambda m: m(x_b)}, update_freq=10)
        >>> opt = paddle.optimizer.Adam(parameters=net.parameters())
        >>> for step in range(12):
        ...     losses = {"res": residual(net).pow(2).mean(), "bc": net(x_b).pow(2).mean()}
        ...     total = ntk(losses, step)
        ...     total.backward()
        ...     opt.step()
        ...     opt.clear_grad()
        >>> ntk.last_path, sorted(ntk.traces())
        ('expanded', ['bc', 'res'])
        >>> {n: round(w, 3) for n, w in ntk.weights.items()}
        {'res': 1.704, 'bc': 2.421}

    Note:
        * The traces are kept in the ``traces_buf`` buffer (saved in ``state_dict``); ``traces()`` returns
          those of the last accepted update (a skipped update keeps them, as it keeps the weights: before the
          method contract a skipped update still stored each finite trace, and ``mode="grad_norm"`` stored finite
          norms even when the weights were rejected). A non-finite (or zero) trace skips the update: every
          weight is kept (the non-finite guard of :class:`~paddle_pinn_balance.balancer.Balancer`), with a
          warning naming the term.
        * Before the first update every weight is 1, and the weights are applied from the first call
          (PhysicsNeMo multiplies the losses by 0 until its first update). The EMA starts from 1, as jaxpi.
        * On the fast path a kernel is called once; it must be pointwise (entry ``p`` depends on row ``p`` of
          the model's input only), else it is called again for the exact loop (a sampling kernel draws new
          points then: no global random state is saved or rewound, other threads' draws are left alone). Use
          ``path="loop"`` for kernels that mix points. A kernel's values in another floating dtype than the
          model's (a float64 forcing term) are cast to the model's.
        * How the fast path records: while a kernel runs, ``paddle.matmul``, ``add``, ``subtract``, ``multiply``,
          ``divide``, ``broadcast_to``, ``expand``, ``paddle.nn.functional.linear`` and 14 operator methods of
          every Parameter (``EagerParamBase``: ``+ - * / @ **``, reflected, unary ``-``, ``norm``) are replaced
          process-wide,
          and restored when the kernel returns or raises. Only the recording thread's calls on the model's
          own parameters are recorded; every other call (another thread's, other tensors) passes through to
          what was installed when the recording began (another library's patch of ``paddle.add`` stays in
          effect). Code that replaces those functions itself *while* a kernel runs is not supported.
        * Two NTK balancers updating at once in two threads of one process crash it: Paddle's own
          ``paddle.grad(..., create_graph=True)`` is not safe in concurrent threads.
        * With ``mode="grad_norm"`` and ``reduction="sum"`` this is PaddleScience's ``NTK`` (a ratio of
          gradient norms); it is offered under that explicit name only.

    References:
        S. Wang, X. Yu, P. Perdikaris. When and why PINNs fail to train: a neural tangent kernel perspective.
        J. Comput. Phys. 449:110768, 2022.
    """

    #: ``mode="grad_norm"`` reads the per-term gradients (``G`` in :meth:`update`); each instance sets
    #: its own flag in ``__init__`` (False for ``mode="trace"``, whose statistics are the kernels' traces).
    needs_gradients = True

    def __init__(
        self,
        model: paddle.nn.Layer,
        kernels: Mapping[str, Callable] | None = None,
        mode: str = "trace",
        reduction: str = "sum",
        update_freq: int = 100,
        momentum: float = 0.0,
        min_weight: float | None = None,
        max_weight: float | None = None,
        chunk_size: int | None = 1024,
        path: str = "auto",
        loss_names: Sequence[str] | None = None,
        assemble: bool = True,
        check_every: int = 100,
    ):
        if not isinstance(model, paddle.nn.Layer):
            raise ValueError(f"`model` must be a paddle.nn.Layer; got {type(model).__name__}")
        self.mode = check_choice("mode", mode, MODES)
        self.reduction = check_choice("reduction", reduction, NTK_REDUCTIONS)
        self.path = check_choice("path", path, PATHS)
        self.chunk_size = None if chunk_size is None else check_int("chunk_size", chunk_size)
        if self.mode == "grad_norm":
            if kernels is not None:
                raise ValueError("`kernels` are not used with mode='grad_norm' (it reads the scalar losses); "
                                 "remove them, or use mode='trace'")
            if reduction != "sum":
                raise ValueError("`reduction` applies to mode='trace' only; leave it at 'sum' for mode='grad_norm'")
            kernels = {}
        else:
            if kernels is None or not isinstance(kernels, Mapping) or not kernels:
                raise ValueError("mode='trace' needs `kernels={name: kernel}` with kernel(model) -> Tensor[N] "
                                 f"for every loss term (or mode='grad_norm', an approximation); got {kernels!r}")
            for k, fn in kernels.items():
                if not isinstance(k, str) or not callable(fn):
                    raise ValueError(f"`kernels` must map loss names to callables kernel(model); got {k!r}: {fn!r}")
        self._model = [model]  # in a list: not registered as a sublayer (not saved with the balancer)
        self._kernels = dict(kernels)
        self._params = trainable_parameters(model)
        self.needs_gradients = self.mode == "grad_norm"  # grad_norm reads the per-term gradients (fast path)
        self._warned = set()
        self.last_paths: dict = {}
        super().__init__(
            loss_names=loss_names,
            update_freq=update_freq,
            momentum=momentum,
            min_weight=min_weight,
            max_weight=max_weight,
            eps=0.0,
            assemble=assemble,
            check_every=check_every,
        )

    @property
    def last_path(self) -> str | None:
        """``"expanded"`` if every kernel took the fast path at the last update, ``"loop"`` if any did not."""
        if not self.last_paths:
            return None
        return "expanded" if all(p == "expanded" for p in self.last_paths.values()) else "loop"

    def _check_names(self, names):
        if self.mode != "trace":
            return
        missing = [n for n in names if n not in self._kernels]
        if missing:
            raise ValueError(f"loss term(s) {missing} have no kernel; pass kernels={{name: kernel(model)}} for "
                             f"every loss name {list(names)}, or use mode='grad_norm' (an approximation)")
        unknown = [n for n in self._kernels if n not in names]
        if unknown:
            raise ValueError(f"`kernels` names {unknown} are not loss names {list(names)}")

    def state_spec(self, k):
        return {"traces_buf": Slot([k], 0.0)}  # the statistics of the last accepted update (inspection)

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        if np.any(arrays["traces_buf"] < 0):
            raise ValueError(f"state_dict['traces_buf'] must be >= 0 (traces, norms); got "
                             f"{arrays['traces_buf'].tolist()}")

    @property
    def kernels(self) -> dict:
        """The kernels ``{name: kernel(model)}`` (a copy; :meth:`set_kernels` replaces them)."""
        return dict(self._kernels)

    def set_kernels(self, kernels: Mapping[str, Callable]) -> None:
        """Replace the kernels (``mode="trace"``) by others for the same names, e.g. rebuilt on a second
        PaddleScience Solver's constraints; the weights and traces are kept."""
        if self.mode != "trace":
            raise ValueError("`kernels` apply to mode='trace' only")
        if not isinstance(kernels, Mapping) or sorted(kernels) != sorted(self._kernels) or not all(
                callable(fn) for fn in kernels.values()):
            raise ValueError(f"`kernels` must map the names {sorted(self._kernels)} to callables kernel(model); "
                             f"got {kernels!r}")
        self._kernels = dict(kernels)

    # ------------------------------------------------------------------ statistics -> weights

    @staticmethod
    def estimates(stats: paddle.Tensor) -> paddle.Tensor:
        """Raw weights from per-term statistics (shape ``[K]``): :func:`ntk_trace_weights`."""
        return ntk_trace_weights(stats)

    def compute_traces(self) -> paddle.Tensor:
        """Per-term traces (``reduction`` applied), shape ``[K]``, from the kernels; sets ``last_paths``."""
        out = []
        for name in self._names:
            sq, ran = per_point_sq_grad_norms(self._model[0], self._kernels[name], chunk_size=self.chunk_size,
                                              path=self.path, name=name, return_path=True)
            self.last_paths[name] = ran
            if ran == "loop" and self.path == "auto" and name not in self._warned:
                self._warned.add(name)
                reason = getattr(ran, "reason", "") or "the fast path does not apply"
                warnings.warn(f"NTKWeighting: term {name!r} uses the exact per-point loop (one backward per point): "
                              f"{reason}", BalanceWarning, stacklevel=3)
            out.append(paddle.stack([sq.sum(), paddle.full([], sq.shape[0], dtype=sq.dtype)]).astype("float64"))
        sums, counts = sum_across_ranks(paddle.stack(out)).unbind(axis=1)  # data-parallel: the union's points
        return sums if self.reduction == "sum" else sums / counts

    def update(self, losses, G, state):
        """``mode="grad_norm"`` (``G`` given): norms of the per-term gradients the base class took once (no host
        sync; the total's backward reuses them), a term with zero gradient keeps its weight, the norms are the
        guard's statistic. ``mode="trace"`` (``G`` is ``None``): the kernels' traces (one synchronisation, for
        the warning naming a bad term; the update itself costs backward passes), all-NaN weights when a trace
        is non-finite or zero, so that the guard keeps every weight. Either way ``traces_buf`` takes the
        statistics, kept with the weights when the guard rejects the update."""
        if G is not None:
            norms = ops.row_norm(self._model_columns(G)).detach()
            raw = ops.where(ops.nonzero(norms), grad_norm_ratio_weights(norms), ops.cast(state["weights"], norms.dtype))
            return raw, {"traces_buf": norms}, norms
        stats = self.compute_traces().detach()
        host = stats.numpy()
        bad = [n for n, s in zip(self._names, host) if not np.isfinite(s) or s <= 0.0]
        if bad:
            warnings.warn(f"NTKWeighting: non-finite or zero trace for term(s) {bad}; the weights are kept",
                          BalanceWarning, stacklevel=4)
        return ntk_trace_weights(stats), {"traces_buf": stats}

    # ------------------------------------------------------------------ inspection

    def traces(self) -> dict:
        """The statistics of the last accepted update as ``{name: float}`` (traces, or gradient norms with
        ``mode="grad_norm"``)."""
        if self._names is None:
            return {}
        return dict(zip(self._names, self.traces_buf.numpy().astype(np.float64).tolist()))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}, reduction={self.reduction!r}, momentum={self.momentum}"
