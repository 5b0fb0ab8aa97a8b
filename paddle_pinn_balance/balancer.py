"""Shared core of every balancer: term names, update cadence, smoothing, bounds, guards, gradients.

A balancer maps ``{name: scalar loss}`` and a step to the weighted total :math:`L = \\sum_i \\lambda_i L_i`.
A method is its pure ``update(losses, G, state)`` and its declared state (:mod:`paddle_pinn_balance.contract`);
everything else is written here once:

* names are fixed at construction (``loss_names=``) or at the first call and checked on every call;
* on a call where ``step % update_freq == 0`` and ``step`` is past the last update's step the weights are
  updated *first*, from this call's losses (and per-term gradients ``G``, taken once), so the returned total
  already uses them; a call that raises changes no state (counters, last update step, weights);
* smoothing ``lambda <- momentum * lambda + (1 - momentum) * lambda_hat`` (:meth:`Balancer._set_weights`), then
  optional ``[min_weight, max_weight]`` bounds, then a non-finite guard that keeps the previous weights and every
  slot when any new value is NaN or Inf; all on the device, without host synchronisation;
* the state (:class:`~paddle_pinn_balance.checkpoint.Checkpointed`) and the warnings
  (:class:`~paddle_pinn_balance.term_warnings.TermWarnings`) are the two mixins of :class:`Balancer`.
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional, Sequence

import numpy as np
import paddle

from . import ops
from .checkpoint import Checkpointed, _encode_names
from .checks import check_choice, check_float, check_int, check_loss_names, check_losses  # noqa: F401
from .contract import check_contract
from .gradients import (
    assembled_total,
    mean_across_ranks,
    term_gradients,
    term_gradients_by_backward,
    trainable_parameters,
    weighted_sum,
    world_size,
)
from .term_warnings import BalanceWarning, TermWarnings

__all__ = ["Balancer", "BalanceWarning", "weighted_sum"]




# --------------------------------------------------------------------------- base class


class Balancer(Checkpointed, TermWarnings, paddle.nn.Layer):
    """Base class: ``balancer(losses, step) -> weighted total`` (the shape of ``ppsci`` aggregators).

    Args:
        loss_names: the term names, in order. ``None`` fixes them at the first call (in the order of
            the first mapping).
        update_freq: update the weights on calls where ``step % update_freq == 0``.
        momentum: smoothing of the weights, ``lambda <- momentum * lambda + (1 - momentum) * lambda_hat``
            (0: overwrite).
        min_weight, max_weight: optional bounds applied after smoothing.
        eps: added to denominators of the statistics.
        assemble: on update steps of methods that read per-term gradients, return a total whose
            gradient is the already computed ``sum_i lambda_i dL_i/dtheta`` (no second backward). It is an
            ordinary differentiable tensor (``backward()``, ``paddle.grad``, a factor on it, a
            ``clear_grad()`` before its backward, ``DataParallel`` all behave as with the plain sum), but
            the per-term gradients are taken in the call and free the losses' graph: an update call
            consumes the losses, which cannot be differentiated again (differentiate the total). Every
            trainable tensor the losses depend on must be among the balancer's parameters (the model's,
            or given to :meth:`add_parameters`). ``False``: keep the graph and return the plain weighted
            sum (a second backward).
        check_every: every this many update steps, read the device-side counts of terms whose gradient
            was non-finite or zero and warn naming them (one synchronisation; 0: only on
            :meth:`check_terms`).

    Data-parallel training: per-term gradients (and GradNorm's losses) are averaged over the ranks
    before any statistic, so every rank computes the same weights, those of one process on all points.

    Steps: ``step`` is a non-negative integer (or ``None``: the number of earlier calls). A call updates
    when ``step % update_freq == 0`` and ``step`` is greater than the step of the last update (the same
    step again is another evaluation of that step, e.g. an L-BFGS closure: no update). A step smaller than
    the last update's is not an update step; it gives one ``BalanceWarning`` per run: a second training
    stage whose loop counts from 0 again calls :meth:`restart_steps` first (weights and every other state
    kept). The last update's step is saved in ``state_dict`` (``last_update_step``), so a resumed run does
    not update twice at one step. A call that raises (a loss of a non-floating dtype, a kernel's error)
    changes no state: it is not counted, and retrying the step updates.

    Losses: scalars of a floating dtype. Terms of mixed floating dtypes (one float64 or float16 term among
    float32 ones) are all cast to the balancer's state dtype (float64 for a float64 model, else float32).
    """

    #: PaddleScience saves the ``state_dict`` of aggregators with this flag (``*.pdagg``).
    should_persist = True
    #: Learned weights (GradNorm) set this to True and provide ``loss_weights``.
    learns_weights = False

    def __init__(
        self,
        loss_names: Optional[Sequence[str]] = None,
        update_freq: int = 1,
        momentum: float = 0.0,
        min_weight: Optional[float] = None,
        max_weight: Optional[float] = None,
        eps: float = 1e-8,
        assemble: bool = True,
        check_every: int = 100,
    ):
        super().__init__()
        if not isinstance(assemble, bool):
            raise ValueError(f"`assemble` must be true or false; got {assemble!r}")
        self.assemble = assemble
        self.check_every = check_int("check_every", check_every, minimum=0)
        # methods without per-term gradients, on each update step: the losses, detached, rank-averaged (set with
        # object.__setattr__: `paddle.nn.Layer.__setattr__` costs 6 us a call on the hot path)
        self._losses_now = None
        # host counters in a plain dict: `paddle.nn.Layer.__setattr__` costs 6 us a call on the hot path
        self._host = {"calls": 0, "since_check": 0}  # calls: mirror of `num_calls`, never read back
        self.update_freq = check_int("update_freq", update_freq)
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.min_weight = check_float("min_weight", min_weight, 0.0, optional=True)
        self.max_weight = check_float("max_weight", max_weight, 0.0, low_open=True, optional=True)
        if self.min_weight is not None and self.max_weight is not None and self.min_weight > self.max_weight:
            raise ValueError(f"`min_weight` ({min_weight}) must not exceed `max_weight` ({max_weight})")
        self.eps = check_float("eps", eps, 0.0)
        self._names: Optional[tuple] = None
        self.register_buffer("num_calls", paddle.zeros([1], dtype="int64"))
        self.register_buffer("num_updates", paddle.zeros([1], dtype="int64"))
        # -1: none yet. The host knows the step (`_host`); the buffer is written when a state dict is taken
        # (`_state_dict_impl`), not at every update (a device operation per update)
        self.register_buffer("last_update_step", paddle.full([1], -1, dtype="int64"))
        self.register_buffer("method_utf8", _encode_names([type(self).__name__]))
        if loss_names is not None:
            self._set_names(loss_names)

    # ------------------------------------------------------------------ names and state

    @property
    def loss_names(self) -> Optional[tuple]:
        return self._names

    def _set_names(self, names) -> None:
        names = check_loss_names(names)
        self._check_names(names)
        self._names = names
        self.register_buffer("names_utf8", _encode_names(names))
        self._create_state(len(names))

    def _check_names(self, names: tuple) -> None:
        """Hook: subclasses check the names against what they were built for."""

    def _weight_vector(self) -> paddle.Tensor:
        return self.lambdas

    # ------------------------------------------------------------------ the call

    def forward(self, losses: Mapping[str, paddle.Tensor], step: Optional[int] = None) -> paddle.Tensor:
        """The weighted total of this call's losses; on an update step the weights are updated first.

        One step, as the code runs it:

        1. the names and shapes are checked (``ValueError`` naming the key);
        2. the step is an *update step* when ``step % update_freq == 0``, ``step`` is greater than the last
           update's step (an L-BFGS closure calls several times per step: only the first call updates; a
           step going backwards warns once, see :meth:`restart_steps`) and gradients are enabled (a call
           under ``paddle.no_grad()``, e.g. a validation loss, only reads the weights);
        3. not an update step: the total is ``sum_i lambda_i L_i`` through the losses' graph (weights
           detached);
        4. an update step of a method with statistics of its own (NTK traces, loss-only methods): the
           statistics, then the new weights, then step 3's total with them;
        5. an update step of a method that reads per-term gradients: ``G[i] = dL_i/dtheta`` is taken once
           (one backward per term, together the cost of one backward of the sum; averaged over
           data-parallel ranks), the method turns ``G`` and the losses into weights, and the total is
           :func:`~paddle_pinn_balance.gradients.assembled_total`: value ``sum_i lambda_i L_i``, gradient
           the method's direction (``lambda^T G`` by default) for every parameter, delivered by autograd
           itself when the caller differentiates the total. With ``assemble=False`` the losses' graph is
           kept and step 3's total is returned instead (a second backward).

        Either way the caller gets an ordinary differentiable tensor: ``backward()`` (clear before or after,
        accumulated, scaled), ``paddle.grad`` and ``DataParallel`` see exactly its gradient.
        """
        values = self._validate(losses)
        h = self._host
        if step is None:
            step = h["calls"]
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"`step` must be a non-negative integer or None; got {step!r}")
        step = int(step)
        # under paddle.no_grad() (a validation loss, logging) nothing is trained: the weights are only read
        update = paddle.is_grad_enabled()
        if update:
            last = h.get("last_update_step")
            if last is not None and step <= last:
                update = False  # the same step again (an L-BFGS closure), or a step going backwards
                if step < last:
                    self._steps_went_backwards(step, last)
            else:
                update = step % self.update_freq == 0
        h["step"] = step  # the step of this call (ReLoBRaLo's look-back draw, GradNorm's renormalisation)
        self._before_call(values, update)
        total = self._total(values, update)
        # counted only now: a call that raised changed no counter, and a retry of its step updates
        h["calls"] += 1
        ops.increment_(self.num_calls)
        if update:
            h["last_update_step"] = step
            ops.increment_(self.num_updates)
        return total

    def restart_steps(self) -> None:
        """Forget the last update's step (weights, counters and every other state kept): for a second training
        stage whose loop counts its steps from 0 again (PaddleScience's second ``Solver``: Adam, then L-BFGS on
        the same balancer; its step 0 is then an update step). Without it, steps below the last update's do
        not update (and warn)."""
        self._host.pop("last_update_step", None)
        self._host.pop("warned_backwards", None)

    def _validate(self, losses) -> list:
        """This call's losses as a list of 0-d tensors in the names' order (:func:`~paddle_pinn_balance.checks.
        check_losses`); the first call fixes the names; terms of mixed floating dtypes are cast to the state's."""
        if self._names is None and isinstance(losses, Mapping) and losses:
            self._set_names(list(losses.keys()))
        values, mixed = check_losses(losses, self._names)
        if mixed:  # e.g. one float64 term among float32 ones: all in the state's dtype (differentiable casts)
            dtype = self._state_dtype()
            values = [v if v.dtype == getattr(paddle, dtype) else ops.cast(v, dtype) for v in values]
        return values

    def _before_call(self, values: list, update: bool) -> None:
        """Hook run on every call before the weights are read (GradNorm: renormalise)."""

    def _total(self, values: list, update: bool) -> paddle.Tensor:
        if not update:
            return weighted_sum(ops.stack(values), self._weight_vector())
        if not self.needs_gradients:
            stacked = ops.stack(values)
            # an overflowing (or NaN) loss skips this update whatever the method's statistics say (`_set_weights`
            # tests them with the weights); data-parallel: the ranks' mean loss is non-finite when any rank's is,
            # so every rank skips alike
            object.__setattr__(self, "_losses_now", mean_across_ranks(stacked.detach()))
            self._apply_update(self._losses_now, None)
            return weighted_sum(stacked, self._weight_vector())
        params = self._params
        G = self._term_gradients(values)
        losses = ops.stack([v.detach() for v in values])
        extra = self._apply_update(losses, G)
        w = self._weight_vector()
        if not self.assemble:
            total = weighted_sum(ops.stack(values), w)
            if extra is not None:  # a term of value 0 whose gradient with respect to `param` is `grad`
                param, grad = extra
                s = ops.total(ops.multiply(param, ops.cast(grad, param.dtype)))  # twice differentiable
                total = total + ops.cast(s - s.detach(), total.dtype)
            return total
        # every rank delivers the same (rank-averaged) gradient; DataParallel's reducer averages it again
        g = self._direction(G, w)
        if extra is None:
            return assembled_total(losses, w, g, params)
        param, grad = extra
        if world_size() == 1:  # one node: the extra leaf's gradient follows the net's
            return assembled_total(losses, w, ops.flatten_cat([g, ops.cast(grad, g.dtype)]), list(params) + [param])
        # data-parallel: its own node. In one node with the net's parameters, DataParallel's reducer reports the
        # weights "ready before" (tests/test_distributed.py, gradnorm_outside)
        zero = ops.filled(1, 0.0, losses)
        return assembled_total(losses, w, g, params) + assembled_total(zero, zero, grad, [param])

    def _apply_update(self, losses: paddle.Tensor, G) -> Optional[tuple]:
        """Run the method's pure :meth:`update` and keep its result, or reject all of it: the raw weights go
        through :meth:`_set_weights` (momentum, bounds, guard), and every slot the update returns is kept only
        where the guard accepted the update (``where(ok, new, old)``); the ``initialised`` counters count
        accepted updates, up to ``history``.

        A method whose weights are learned by the optimizer (``learns_weights``: GradNorm) returns their gradient
        instead of raw weights: nothing is smoothed, bounded or rejected (the optimizer moves the weights), its
        slots are kept as returned, and ``(weights, gradient)`` goes back to :meth:`_total`, whose total delivers
        the gradient to the weights."""
        b = self._buffers  # plain dict: `Layer.__getattr__` / `__setattr__` cost microseconds a buffer
        learned = self.learns_weights
        weights = self._weight_vector() if learned else b["lambdas"]
        losses = ops.cast(losses, weights.dtype)
        if G is not None:  # loss-only methods' losses were averaged already (`_losses_now`)
            losses = mean_across_ranks(losses)
        slots = self.__dict__.get("_slot_meta")  # {name: (shape of the weights?, dtype)}, read once
        if slots is None:
            k = len(self._names)
            slots = self.__dict__["_slot_meta"] = {
                n: (list(b[n].shape) == [k], b[n].dtype) for n in self.state_spec(k) if n in b}
        state = {n: b[n] for n in slots}
        h = self._host
        state["weights"] = weights
        state["step"] = h["step"]
        known = h.get("initialised")  # every term has its earlier losses, as the host read it
        history, flags = self.history, self.taken_slot
        if history:
            state["taken"] = None if known else b["initialised"]
        elif flags is not None:
            state["taken"] = None if known else b[flags]
        out = self.update(losses, G, state)
        raw, new = out[0], out[1]
        scale = out[2] if len(out) > 2 else None
        if learned:
            self._keep_slots(new, slots, None)
            if scale is not None:
                self._record_bad_terms(scale)
            if flags is not None and not known:
                self._learn_initialised(b[flags])
            return weights, raw
        ok = self._set_weights(raw, scale)  # one verdict, one entry per term
        self._keep_slots(new, slots, ok)
        if history and not known:
            taken = b["initialised"]
            b["initialised"] = ops.where(ok, paddle.clip(taken + 1, 0, history), taken)
            self._learn_initialised(b["initialised"] >= history)
        return None

    #: Methods of the contract (:mod:`paddle_pinn_balance.contract`) define ``update``, ``history``, ``state_spec``;
    #: ``update = None``: a fixed total (``_total`` overridden: Sum, uncertainty) or, until converted, surgery.
    update = None
    history = 0
    #: a method that decides per term when its first loss is taken (GradNorm: the first finite, positive one)
    #: keeps bool flags in a slot of this name: ``state["taken"]`` is that slot (``None`` once all are set, as
    #: the host learns after an update), without the base's counters (``history`` 0)
    taken_slot: Optional[str] = None

    def state_spec(self, k: int) -> dict:
        """The method's state for ``k`` terms, declared once: ``{name: Slot(shape, init, dtype)}`` (none here)."""
        return {}

    def _direction(self, G: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
        """The gradient the update step's total delivers to ``self._params`` (flat): ``w^T G``.

        Direction methods (:class:`~paddle_pinn_balance.surgery.Surgery`) deliver their update's direction."""
        return ops.matmul(ops.cast(w.detach(), G.dtype), G)

    def add_parameters(self, params) -> None:
        """Trainable tensors outside the model that the losses depend on (self-adaptive point weights, a
        learnable PDE coefficient): the update step's total delivers their gradient too (without them,
        the per-term backward passes would leave their ``.grad`` unweighted), and the statistics ignore
        them (they are the last columns of ``G``). Call before the first update step."""
        if not self.needs_gradients:
            return  # the total goes through the losses' graph: every leaf gets its gradient from autograd
        extra = trainable_parameters(params)
        ids = {id(p) for p in self._params}
        if "_n_model" not in self.__dict__:
            self._n_model = sum(int(np.prod(p.shape)) for p in self._params)
        self._params = list(self._params) + [p for p in extra if id(p) not in ids]

    def _term_gradients(self, values: list) -> paddle.Tensor:
        """``G`` (``[len(values), params]``) of ``values`` with respect to ``self._params``: per-term backward
        passes (``.grad`` restored) on one process with ``assemble``, ``paddle.grad`` otherwise (keeping the
        graph for the plain sum's backward when not assembling; no reducer traffic data-parallel); then
        averaged over the ranks: the gradient on all ranks' points, the same on every rank."""
        if not self.assemble:
            G = term_gradients(values, self._params, retain_graph=True)
        elif world_size() == 1:
            G = term_gradients_by_backward(values, self._params, self.__dict__.setdefault("_grad_scratch", {}))
        else:
            G = term_gradients(values, self._params, retain_graph=False)
        return self._mean_across_ranks(G)

    def _mean_across_ranks(self, G: paddle.Tensor) -> paddle.Tensor:
        """``G`` averaged over the data-parallel ranks in the model's columns; the columns of
        :meth:`add_parameters` stay the rank's own (self-adaptive point weights: each rank owns its points'
        weights, which get the gradient of the rank's own loss, as without a gradient-reading balancer)."""
        n = self.__dict__.get("_n_model")
        if world_size() == 1 or n is None or n == G.shape[1]:
            return mean_across_ranks(G)
        return paddle.concat([mean_across_ranks(G[:, :n]), G[:, n:]], axis=1)

    def _model_columns(self, G: paddle.Tensor) -> paddle.Tensor:
        """The columns of ``G`` that belong to the model (all but those of :meth:`add_parameters`)."""
        n = self.__dict__.get("_n_model")
        return G if n is None else ops.leading_columns(G, n)

    #: Methods whose statistics read per-term parameter gradients set this, and `_params`.
    needs_gradients = False
    _params: list = []

    def __init_subclass__(cls, **kwargs):
        """Check the method contract when a subclass is created (:func:`~paddle_pinn_balance.contract.
        check_contract`: ``TypeError`` naming what is missing)."""
        super().__init_subclass__(**kwargs)
        check_contract(cls, Balancer)

    def _set_weights(self, raw: paddle.Tensor, scale: Optional[paddle.Tensor] = None) -> paddle.Tensor:
        """``lambda <- m lambda + (1 - m) lambda_hat``, then bounds; skipped whole if any new value, any
        term's gradient statistic or (methods without per-term gradients) any loss of the call is non-finite.

        ``scale``: the per-term gradient statistic (non-finite exactly when the term's gradient is; a term
        whose estimate was replaced by its current weight still counts), also for the non-finite /
        zero-gradient bookkeeping.

        The weights become a new tensor (the ``lambdas`` buffer is rebound, not written in place): a total an
        earlier call returned and the caller has not differentiated yet keeps the weights it was built with.

        Returns the verdict as a bool vector, one (equal) entry per term: methods keep their own state with it
        (``where(ok, new, old)``), so a skipped update leaves all of it as it was.
        """
        b = self._buffers  # plain dict: `Layer.__getattr__` / `__setattr__` cost microseconds a buffer
        old = b["lambdas"]
        new = ops.cast(raw.detach(), old.dtype)
        if self.momentum != 0.0:
            new = ops.lerp(old, new, ops.filled(None, 1.0 - self.momentum, old))
        new = self._clip(new)
        if scale is not None:
            # a sum is non-finite when either addend is (an Inf gradient entry gives a finite estimate of 0 in
            # max / (lambda * Inf), which must not be taken)
            ok = ops.all_finite(new + ops.cast(scale.detach(), new.dtype))
        elif self._losses_now is not None:
            # one product tests weights and losses: non-finite when any of either is (0 * Inf is NaN; a -Inf
            # loss can give finite softmax weights); it overflows only where the weighted total does
            ok = ops.isfinite(ops.dot(new, ops.cast(self._losses_now, new.dtype)))
        else:
            ok = ops.all_finite(new)
        ok = ops.expand(ok, new.shape)
        b["lambdas"] = ops.where(ok, new, old)
        if scale is not None:
            self._record_bad_terms(scale)
        elif self._losses_now is not None:
            self._record_bad_terms(self._losses_now, zeros=False)
        return ok

    def _clip(self, w: paddle.Tensor) -> paddle.Tensor:
        if self.min_weight is None and self.max_weight is None:
            return w
        return ops.clip(w, -math.inf if self.min_weight is None else self.min_weight,
                        math.inf if self.max_weight is None else self.max_weight)

    # ------------------------------------------------------------------ inspection (may synchronise)

    @property
    def weights(self) -> dict:
        """Current weights as ``{name: float}`` (synchronises; for logging and inspection)."""
        if self._names is None:
            return {}
        w = self._weight_vector().numpy().astype(np.float64).tolist()
        return dict(zip(self._names, w))

    def extra_repr(self) -> str:
        return f"loss_names={list(self._names) if self._names else None}, update_freq={self.update_freq}"

    # host-side counters, read without synchronising (hooks around a call: the PaddleScience adapters)

    @property
    def call_count(self) -> int:
        """Calls so far (the host's copy of the ``num_calls`` buffer): the step a call without ``step`` takes."""
        return self._host["calls"]

    @property
    def last_update_at(self) -> Optional[int]:
        """The step of the last update (the host's copy of the ``last_update_step`` buffer); ``None`` before the
        first update and after :meth:`restart_steps`."""
        return self._host.get("last_update_step")
