"""Shared core of every balancer: term names, update cadence, smoothing, bounds, guards, state.

A balancer maps ``{name: scalar loss}`` and a step to the weighted total

.. math:: L = \\sum_i \\lambda_i L_i .

Methods differ only in how they turn per-term statistics into raw weight estimates
(``_update_from_gradients``, from the stacked per-term gradients this module takes once, or
``_update`` for methods with statistics of their own); everything else lives here, written once:

* names are fixed at construction (``loss_names=``) or at the first call and checked on every call;
* on a call where ``step % update_freq == 0`` and ``step`` is past the last update's step the weights are
  updated *first*, from this call's losses, so the returned total already uses them; a call that raises
  changes no state (counters, last update step, weights);
* smoothing ``lambda <- momentum * lambda + (1 - momentum) * lambda_hat`` (:meth:`_set_weights`),
  then optional ``[min_weight, max_weight]`` bounds, then a non-finite guard that keeps the previous
  weights when any new value is NaN or Inf; all on the device, without host synchronisation;
* every piece of state is a registered buffer (learned weights are parameters), including the term
  names and the method's class name (as UTF-8 bytes), the counters and the last update's step, so
  ``state_dict`` / ``set_state_dict`` resume bit-for-bit, and a checkpoint of another method, with other
  names, another number of terms, non-finite values or values outside their range is refused.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
import paddle

from . import ops
from .checkpoint import Checkpointed, _encode_names
from .checks import check_choice, check_float, check_int  # noqa: F401  (their home before checks.py)
from .contract import _RESERVED, Slot, check_contract, register
from .gradients import (
    assembled_total,
    mean_across_ranks,
    term_gradients,
    term_gradients_by_backward,
    trainable_parameters,
    world_size,
)

__all__ = ["Balancer", "BalanceWarning", "Sum"]


class BalanceWarning(RuntimeWarning, UserWarning):
    """The category of every warning this package gives (skipped updates, slow paths): filter it with
    ``warnings.simplefilter("ignore", BalanceWarning)``; the test suite turns it into an error (a test that
    expects one says so with ``pytest.warns``)."""


_FLOATS = (paddle.float16, paddle.bfloat16, paddle.float32, paddle.float64)
_FLOAT_IDS = {id(d) for d in _FLOATS}


# --------------------------------------------------------------------------- base class


class Balancer(Checkpointed, paddle.nn.Layer):
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
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(f"`loss_names` must be a list of strings; got {names!r}")
        names = tuple(names)
        if not names:
            raise ValueError("`loss_names` must not be empty")
        for n in names:
            if not isinstance(n, str) or not n or "\n" in n:
                raise ValueError(f"loss name {n!r} must be a non-empty string without newlines")
        if len(set(names)) != len(names):
            raise ValueError(f"`loss_names` has duplicates: {list(names)}")
        self._check_names(names)
        self._names = names
        self.register_buffer("names_utf8", _encode_names(names))
        self._create_state(len(names))

    def _check_names(self, names: tuple) -> None:
        """Hook: subclasses check the names against what they were built for."""

    def _state_dtype(self) -> str:
        """The dtype of the weights and the per-term state: float64 when the parameters the method reads are
        float64 (without parameters: when Paddle's default dtype is), else float32 (a float16 model keeps
        float32 weights). A checkpoint in the other dtype loads (cast)."""
        params = self._params
        if params:
            return "float64" if any(p.dtype == paddle.float64 for p in params) else "float32"
        return "float64" if paddle.get_default_dtype() == "float64" else "float32"

    def _create_state(self, k: int) -> None:
        """Create the per-term state once the number of terms ``k`` is known: the weights, the bookkeeping and
        (methods of the contract) the declared slots and the ``initialised`` counters."""
        dtype = self._state_dtype()
        if not self.learns_weights:
            self.register_buffer("lambdas", paddle.ones([k], dtype=dtype))
        self.register_buffer("scale_min", paddle.full([k], np.inf, dtype=dtype), persistable=False)
        self.register_buffer("scale_nonfinite", paddle.zeros([k], dtype=dtype), persistable=False)
        for name, slot in self._slots(k, creating=True).items():
            value = np.broadcast_to(np.asarray(slot.init), [int(n) for n in slot.shape]).copy()
            self.register_buffer(name, paddle.to_tensor(value, dtype=slot.dtype or dtype))
        if self.history:  # per term: how many earlier losses an accepted update has taken (at most `history`)
            self.register_buffer("initialised", paddle.zeros([k], dtype="int64"))

    def _slots(self, k: int, creating: bool = False) -> dict:
        """The method's declared state (:meth:`state_spec`), checked: ``{name: Slot}``."""
        spec = self.state_spec(k) if self.update is not None else {}
        for name, slot in spec.items():
            if not isinstance(slot, Slot):
                raise TypeError(f"{type(self).__name__}.state_spec: {name!r} must be a Slot; got {slot!r}")
            if name in _RESERVED or (creating and (name in self._buffers or name in self._parameters)):
                raise TypeError(f"{type(self).__name__}.state_spec: the name {name!r} is taken by the base")
        return spec

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

    def _steps_went_backwards(self, step: int, last: int) -> None:
        if self._host.get("warned_backwards"):
            return
        self._host["warned_backwards"] = True
        warnings.warn(f"{type(self).__name__}: steps went backwards (step {step} after an update at step {last}): "
                      f"no update until a step past {last}; call `restart_steps()` when a new stage counts from 0",
                      BalanceWarning, stacklevel=3)

    def restart_steps(self) -> None:
        """Forget the last update's step (weights, counters and every other state kept): for a second training
        stage whose loop counts its steps from 0 again (PaddleScience's second ``Solver``: Adam, then L-BFGS on
        the same balancer; its step 0 is then an update step). Without it, steps below the last update's do
        not update (and warn)."""
        self._host.pop("last_update_step", None)
        self._host.pop("warned_backwards", None)

    def _validate(self, losses) -> list:
        if not isinstance(losses, Mapping):
            raise ValueError(f"losses must be a mapping of name to scalar Tensor; got {type(losses).__name__}")
        if not losses:
            raise ValueError("losses must not be empty")
        if self._names is None:
            self._set_names(list(losses.keys()))
        names = self._names
        if len(losses) != len(names) or any(n not in losses for n in names):
            missing = [n for n in names if n not in losses]
            extra = [n for n in losses if n not in names]
            raise ValueError(
                f"loss names changed: missing {missing}, unexpected {extra}; expected {list(names)}"
            )
        values = []
        first = None
        mixed = False
        for n in names:
            v = losses[n]
            if not isinstance(v, paddle.Tensor):
                raise ValueError(f"loss {n!r} must be a paddle.Tensor; got {type(v).__name__}")
            dtype = v.dtype
            if dtype is not first and (first is None or dtype != first):  # `is`: dtypes are singletons, 10x faster
                if id(dtype) not in _FLOAT_IDS and dtype not in _FLOATS:
                    raise ValueError(f"loss {n!r} must be a floating-point tensor; got dtype {dtype} (a loss of an "
                                     "integer or bool dtype has no gradient)")
                if first is None:
                    first = dtype
                else:
                    mixed = True
            shape = v.shape
            if shape:
                if int(np.prod(shape)) != 1:
                    raise ValueError(f"loss {n!r} must be a scalar; got shape {list(shape)}")
                v = ops.reshape(v, [])
            values.append(v)
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
            if self.update is not None:
                self._apply_update(self._losses_now, None)
            else:
                self._update(values)
            return weighted_sum(stacked, self._weight_vector())
        params = self._params
        G = self._term_gradients(values)
        losses = ops.stack([v.detach() for v in values])
        if self.update is not None:
            extra = self._apply_update(losses, G)
        else:
            extra = self._update_from_gradients(losses, G)
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

    def _apply_update(self, losses: paddle.Tensor, G) -> None:
        """Run the method's pure :meth:`update` and keep its result, or reject all of it: the raw weights go
        through :meth:`_set_weights` (momentum, bounds, guard), and every slot the update returns is kept only
        where the guard accepted the update (``where(ok, new, old)``); the ``initialised`` counters count
        accepted updates, up to ``history``."""
        b = self._buffers  # plain dict: `Layer.__getattr__` / `__setattr__` cost microseconds a buffer
        weights = b["lambdas"] if "lambdas" in b else self._weight_vector()
        losses = ops.cast(losses, weights.dtype)
        slots = self.__dict__.get("_slot_meta")  # {name: (shape of the weights?, dtype)}, read once
        if slots is None:
            k = len(self._names)
            slots = self.__dict__["_slot_meta"] = {
                n: (list(b[n].shape) == [k], b[n].dtype) for n in self.state_spec(k)}
        state = {n: b[n] for n in slots}
        h = self._host
        state["weights"] = weights
        state["step"] = h["step"]
        known = h.get("initialised")  # every term has `history` earlier losses, as the host read it
        history = self.history
        if history:
            state["taken"] = None if known else b["initialised"]
        out = self.update(losses, G, state)
        raw, new = out[0], out[1]
        ok = self._set_weights(raw, out[2] if len(out) > 2 else None)  # one verdict, one entry per term
        for n, value in new.items():
            meta = slots.get(n)
            if meta is None:
                raise KeyError(f"{type(self).__name__}.update returned {n!r}, not a slot of its state_spec "
                               f"({sorted(slots)})")
            old = b[n]
            if value is old:
                continue
            if value.dtype is not meta[1]:
                value = ops.cast(value, meta[1])
            cond = ok if meta[0] else ops.expand(ops.reshape(ok[:1], [1] * old.ndim), old.shape)
            b[n] = ops.where(cond, value if value.stop_gradient else value.detach(), old)  # a new tensor, no graph
        if history and not known:
            taken = b["initialised"]
            b["initialised"] = ops.where(ok, paddle.clip(taken + 1, 0, history), taken)
            self._learn_initialised(b["initialised"] >= history)

    #: Methods of the contract (:mod:`paddle_pinn_balance.contract`) define these three (``update`` a method,
    #: ``history`` an int, ``state_spec`` a method); ``update = None`` marks the older hooks.
    update = None
    history = 0

    def state_spec(self, k: int) -> dict:
        """The method's state for ``k`` terms, declared once: ``{name: Slot(shape, init, dtype)}`` (none here)."""
        return {}

    def _direction(self, G: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
        """The gradient the update step's total delivers to ``self._params`` (flat): ``w^T G``.

        Gradient-surgery methods override it with their own combination of the rows of ``G``."""
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

    def _record_bad_terms(self, scale: paddle.Tensor, zeros: bool = True) -> None:
        """Track, on the device, the per-term gradient statistic ``scale`` (non-finite exactly when the
        term's gradient is, 0 exactly when it is zero): its running minimum (zero seen?) and a running sum
        of ``scale - scale`` (0, or NaN once a non-finite value was seen: IEEE addition keeps NaN, where
        Paddle's ``minimum`` / ``maximum`` drop a NaN in one argument in some versions). Every
        ``check_every`` updates they are read (one synchronisation) and a warning names the terms whose
        gradient was non-finite or zero since the last check (their weights were kept).

        ``zeros=False``: only the non-finite count (``scale`` the detached losses of a method without gradients:
        a loss of 0 is no fault)."""
        b = self._buffers
        low, bad = b["scale_min"], b["scale_nonfinite"]
        if zeros:
            scale = ops.cast(scale.detach(), low.dtype)
            b["scale_min"] = ops.minimum(low, scale)
            ops.add_(bad, scale - scale)
        else:  # `scale` detached already (the losses): 0 * x is 0, or NaN where x is non-finite
            ops.add_(bad, ops.scale(ops.cast(scale, bad.dtype), 0.0))
        self._host["since_check"] += 1
        if self.check_every and self._host["since_check"] >= self.check_every:
            self.check_terms()

    #: what the warning of :meth:`check_terms` says happened at an update with a non-finite value
    _nonfinite_effect = "those updates were skipped and the previous weights kept"

    def check_terms(self) -> dict:
        """Warn about terms whose gradient (methods without gradients: loss) was non-finite, or whose gradient
        was zero, at some update since the last check; returns ``{name: (non-finite, zero)}`` flags and
        resets them (synchronises)."""
        self._host["since_check"] = 0
        if self._names is None or not hasattr(self, "scale_min"):
            return {}
        low, bad = self.scale_min.numpy().copy(), self.scale_nonfinite.numpy().copy()  # numpy() may share memory
        self.scale_min.set_value(paddle.full_like(self.scale_min, np.inf))
        self.scale_nonfinite.set_value(paddle.zeros_like(self.scale_nonfinite))
        out = {n: (bool(np.isnan(lo) or not np.isfinite(b)), bool(lo == 0.0))
               for n, lo, b in zip(self._names, low, bad)}
        nonfinite = [n for n, c in out.items() if c[0]]
        zero = [n for n, c in out.items() if c[1]]
        if nonfinite:
            what = "gradient" if self.needs_gradients else "loss"
            warnings.warn(f"{type(self).__name__}: non-finite {what} for term(s) {nonfinite} in the last "
                          f"{self.check_every or 'few'} update(s); {self._nonfinite_effect}",
                          BalanceWarning, stacklevel=3)
        if zero:
            self._warn_zero_gradient(zero)
        return out

    def _warn_zero_gradient(self, zero: list) -> None:
        warnings.warn(f"{type(self).__name__}: term(s) {zero} have an identically zero gradient (not "
                      "connected to the parameters?); their weights were kept", BalanceWarning, stacklevel=4)

    #: Methods whose statistics read per-term parameter gradients set this, and `_params`.
    needs_gradients = False
    _params: list = []

    # A method defines one of the two update hooks (checked when its class is created):
    #
    # * ``_update_from_gradients(losses, G) -> Optional[(param, grad)]`` (with ``needs_gradients = True``):
    #   update from this call's losses (one detached vector) and the stacked per-term gradients ``G``
    #   (``[K, len(flat self._params)]``); may return a
    #   gradient the total's backward must also deliver to a parameter outside the net, scaled like the rest
    #   (GradNorm: its weights' own gradient);
    # * ``_update(values)``: update from statistics of its own (NTK traces) or from the losses alone
    #   (``self._losses_now``: this call's losses, detached, averaged over the ranks; :meth:`_set_weights` skips
    #   the update when one is non-finite and returns the per-term flag to guard the method's own state with).
    #
    # Both store raw estimates with :meth:`_set_weights`. A method with fixed weights overrides ``_total``.
    # A class that reads ``G`` (defines ``_update_from_gradients`` or overrides ``_direction``) must declare
    # ``needs_gradients = True`` in its class body (or inherit it): without it the base never takes ``G`` and
    # the hooks would silently not run. A method that reads ``G`` in some modes only declares it and sets
    # ``self.needs_gradients`` per instance (NTKWeighting).
    _UPDATE_HOOKS = ("_update_from_gradients", "_update")

    def __init_subclass__(cls, **kwargs):
        """Check the method contract when a subclass is created (``TypeError`` naming what is missing)."""
        super().__init_subclass__(**kwargs)
        if cls.update is not None:
            check_contract(cls, Balancer)
            return
        if cls._total is Balancer._total and not any(hasattr(cls, h) for h in Balancer._UPDATE_HOOKS):
            raise TypeError(f"{cls.__name__} must define `_update_from_gradients` (with needs_gradients=True) "
                            "or `_update`, or override `_total`")
        reads = [h for h, defined in (("_update_from_gradients", hasattr(cls, "_update_from_gradients")),
                                      ("_direction", cls._direction is not Balancer._direction)) if defined]
        if reads and not cls.needs_gradients:
            hooks = ", ".join(f"`{h}`" for h in reads)
            raise TypeError(f"{cls.__name__} reads per-term gradients (it defines {hooks}) but does not declare "
                            "`needs_gradients = True`; add it to the class body")
        if (cls.needs_gradients and cls._total is Balancer._total
                and not hasattr(cls, "_update_from_gradients")):
            raise TypeError(f"{cls.__name__} declares `needs_gradients = True` but defines no "
                            "`_update_from_gradients(losses, G)`")

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


def weighted_sum(stacked: paddle.Tensor, weights: paddle.Tensor) -> paddle.Tensor:
    """``sum_i w_i L_i`` (``stacked``: the losses as one vector), weights detached, in the losses' dtype. A
    product and a sum, not ``dot`` or a vector ``matmul``: a loop may differentiate the total's gradient again
    (``paddle.grad(..., create_graph=True)``, a gradient penalty), and in Paddle 3.3 ``dot`` has no second
    derivative and a 0-d ``matmul`` result added to anything fails in the add's second derivative."""
    return ops.total(ops.multiply(stacked, ops.cast(weights.detach(), stacked.dtype)))


@register("sum", build=lambda model, **kw: Sum(**kw))
class Sum(Balancer):
    """Fixed weights: ``L = sum_i lambda_i L_i`` (plain PINN training; ``lambda_i = 1`` by default).

    Args:
        loss_names: term names (or taken from the first call).
        weights: optional ``{name: weight}``; names not given keep weight 1.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import Sum
        >>> agg = Sum(weights={"bc": 10.0})
        >>> float(agg({"res": paddle.to_tensor(1.0), "bc": paddle.to_tensor(2.0)}))
        21.0
    """

    def __init__(self, loss_names: Optional[Sequence[str]] = None, weights: Optional[Mapping[str, float]] = None):
        if weights is not None and not isinstance(weights, Mapping):
            raise ValueError(f"`weights` must be a mapping of loss name to number; got {weights!r}")
        self._fixed = {k: check_float(f"weights[{k!r}]", v, 0.0) for k, v in (weights or {}).items()}
        super().__init__(loss_names=loss_names, update_freq=1)

    def _check_names(self, names):
        unknown = sorted(set(self._fixed) - set(names))
        if unknown:
            raise ValueError(f"`weights` names {unknown} are not loss names {list(names)}")

    def _create_state(self, k):
        super()._create_state(k)
        init = [self._fixed.get(n, 1.0) for n in self._names]
        self.lambdas.set_value(paddle.to_tensor(init, dtype=self.lambdas.dtype))

    def _total(self, values, update):
        return weighted_sum(ops.stack(values), self.lambdas)
