"""The Solver's optimizer and the balancer's learned weights: what to build it from, and GradNorm under L-BFGS.

Learned weights (GradNorm's ``loss_weights``, uncertainty's ``log_vars``) are the balancer's parameters: the
solver's optimizer must hold them (:func:`optimizer_layers`), except GradNorm's under L-BFGS, which follow
their own objective and take an optimizer of their own (:func:`attach_weight_optimizer`).
"""

from __future__ import annotations

import warnings

import paddle

from ..balancer import Balancer, BalanceWarning
from ..gradnorm import GradNorm, GradNormBalancer

# ---------------------------------------------------------------------------- Paddle's optimizer internals
# Paddle (3.0 to 3.3) has no public accessor for the parameters an optimizer steps, nor for adding one. The
# adapter reads and extends them here only. `_param_groups` is what `step()` and `clear_grad()` read: for an
# optimizer built from a list of parameters it is that list itself (the same object as `_parameter_list` and
# L-BFGS's `_params`, so extending it in place is seen by all three); for parameter groups, a list of dicts
# (copies of the ones given: extending `_parameter_list[0]["params"]` would not be stepped).


def _groups(optimizer) -> list:
    groups = getattr(optimizer, "_param_groups", None)
    if not isinstance(groups, list):
        raise ValueError(f"cannot read the parameters of {type(optimizer).__name__} (a paddle.optimizer.Optimizer "
                         "keeps them in `_param_groups`)")
    return groups


def _held_parameters(optimizer) -> list:
    """The parameters ``optimizer`` steps, flattened over its parameter groups."""
    return [p for g in _groups(optimizer) for p in (g["params"] if isinstance(g, dict) else [g])]


def _add_parameters(optimizer, params) -> None:
    """Have ``optimizer`` step ``params`` too: appended (in place) to its list of parameters, or, for an optimizer
    built from parameter groups, to its first group, with that group's learning rate and weight decay set on
    them as Paddle's ``_add_param_group`` sets them (calling it after construction fails for Adam: its
    defaults lack ``weight_decay`` and ``grad_clip``)."""
    params = list(params)
    if not params:
        return
    groups = _groups(optimizer)
    if groups and isinstance(groups[0], dict):
        if isinstance(optimizer, paddle.optimizer.LBFGS):  # it steps its last group only (`_params`)
            raise ValueError("paddle.optimizer.LBFGS with parameter groups: build it from "
                             "optimizer_layers(model, balancer, lbfgs=True)")
        first = groups[0]
        decay = first.get("weight_decay")
        for p in params:
            p.regularizer = paddle.regularizer.L2Decay(decay) if isinstance(decay, float) else decay
            p.optimize_attr["learning_rate"] = first.get("learning_rate", 1.0)
        first["params"].extend(params)
    else:
        groups.extend(params)


# ---------------------------------------------------------------------------- which layers


def optimizer_layers(model: paddle.nn.Layer, balancer: Balancer, lbfgs: bool = False) -> tuple:
    """The layers to build the solver's optimizer from: ``ppsci.optimizer.Adam(lr)(optimizer_layers(model, b))``.

    ``model``, ``balancer``: what :func:`~paddle_pinn_balance.ppsci.solver.build_for_solver` returned. Every
    trainable tensor comes once (ppsci's optimizers concatenate ``parameters()`` of the layers, so
    ``(wrapper, balancer)`` would list GradNorm's weights twice):

    * ``grad_norm``: ``(model, balancer)``: the network and ``loss_weights``. With ``lbfgs=True``:
      ``(model,)`` only; GradNorm's weights follow their own objective :math:`L_\\mathrm{grad}`, not the
      total that L-BFGS minimises, so give them a first-order optimizer of their own with
      :func:`attach_weight_optimizer` (without it they stay at their values).
    * ``uncertainty``: ``(model, balancer)``: the network and ``log_vars`` (the total is one objective of both,
      so L-BFGS takes both too).
    * every other method: ``(model,)`` (no parameters of its own).

    Raises ``ValueError`` for a balancer with learned weights whose names (hence parameters) are not known
    yet: pass the constraints (or ``loss_names``) to
    :func:`~paddle_pinn_balance.ppsci.solver.build_for_solver`.
    """
    if not isinstance(balancer, Balancer):
        raise ValueError(f"optimizer_layers needs a paddle_pinn_balance balancer; got {type(balancer).__name__}")
    if balancer.learns_weights and balancer.loss_names is None and not balancer.parameters():
        raise ValueError(f"{type(balancer).__name__} has no parameters yet (its loss names are unknown): build it "
                         "with the constraints (build_for_solver(cfg, model, constraints)) or `loss_names`")
    if isinstance(model, GradNorm):  # a wrapper given to the solver by hand (it holds the weights itself)
        if model.aggregator is not balancer:
            raise ValueError("`model` is a GradNorm wrapper of another balancer")
        return (model.net,) if lbfgs else (model,)
    own = {id(p) for p in model.parameters()}
    extra = [p for p in balancer.parameters() if id(p) not in own]
    if lbfgs and isinstance(balancer, GradNormBalancer):
        return (model,)
    return (model, balancer) if extra else (model,)


def _join_optimizer(optimizer, model, balancer, lbfgs: bool) -> set:
    """What :func:`optimizer_layers` would have given joins ``optimizer`` (each tensor once); returns the ids held."""
    held = {id(p) for p in _held_parameters(optimizer)}
    extra = []
    for layer in optimizer_layers(model, balancer, lbfgs=lbfgs):
        for p in layer.parameters():
            if id(p) not in held:
                held.add(id(p))
                extra.append(p)
    _add_parameters(optimizer, extra)
    return held


def _check_optimizer(solver, balancer) -> None:
    """A ``BalanceWarning`` naming the balancer's learned weights that the solver's optimizer does not hold."""
    opt = getattr(solver, "optimizer", None)
    if opt is None:
        return
    if isinstance(balancer, GradNormBalancer) and isinstance(opt, paddle.optimizer.LBFGS):
        return  # by design: GradNorm's weights take attach_weight_optimizer under L-BFGS
    held = {id(q) for q in _held_parameters(opt)}
    missing = [p.name for p in balancer.parameters() if not p.stop_gradient and id(p) not in held]
    if missing:
        warnings.warn(f"{type(balancer).__name__}'s learned weights {missing} are not in the solver's optimizer: "
                      "they stay at their initial values. Build it from optimizer_layers(model, balancer), e.g. "
                      "ppsci.optimizer.Adam(lr)(balance.optimizer_layers(model, balancer))", BalanceWarning,
                      stacklevel=3)


# ---------------------------------------------------------------------------- GradNorm's weights under L-BFGS


class _WeightOptimizer:
    """Steps GradNorm's weights with their own optimizer once per solver step (see attach_weight_optimizer)."""

    def __init__(self, balancer, optimizer):
        self.balancer, self.optimizer = balancer, optimizer
        self.pending = None  # (step, dL_grad/dw) of the last update step, not applied yet
        self.handles = []

    def grad_hook(self, grad):  # runs when a backward delivers the weight gradient (update calls only)
        self.pending = (self.balancer.last_update_at, grad.detach().clone())
        return None

    def pre_hook(self, layer, inputs):
        b = self.balancer
        step = inputs[1] if len(inputs) > 1 and inputs[1] is not None else b.call_count
        if self.pending is None or int(step) == self.pending[0]:
            return None  # nothing to apply, or another evaluation of the same step (L-BFGS closure)
        w, grad = b.loss_weights, self.pending[1]
        self.pending = None
        w.clear_gradient(False)
        w.grad = grad.astype(w.dtype)
        self.optimizer.step()
        self.optimizer.clear_grad(set_to_zero=False)
        b.renormalise()  # sum w = T before this step reads them (as after the solver's own optimizer step)
        return None

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_weight_optimizer(balancer: Balancer, optimizer) -> _WeightOptimizer:
    """Train GradNorm's ``loss_weights`` with their own optimizer, once per solver step (L-BFGS in the Solver).

    For a solver optimizer that must not hold the weights (L-BFGS, built from ``optimizer_layers(model,
    balancer, lbfgs=True)``): ``optimizer`` is a first-order Paddle optimizer over ``[balancer.loss_weights]``
    only, e.g. ``paddle.optimizer.Adam(0.01, parameters=[balancer.loss_weights])``. The gradient of
    :math:`L_\\mathrm{grad}` that the update call's total delivers (the first closure evaluation of a step)
    is kept, and ``optimizer.step()`` is applied to it at the first aggregator call of the next step,
    followed by GradNorm's renormalisation: every closure evaluation of one L-BFGS step sees the same
    weights, and step ``t + 1`` uses the weights stepped from step ``t``'s :math:`L_\\mathrm{grad}`, as with
    a first-order solver optimizer holding them. The step pending after the last training step is not
    applied (nor saved: a resumed run starts without it; the optimizer's own state is not checkpointed).

    Returns:
        A handle (``handle.remove()`` detaches it).
    """
    if not isinstance(balancer, GradNormBalancer):
        raise ValueError(f"attach_weight_optimizer applies to GradNorm's balancer; got {type(balancer).__name__}")
    w = balancer.loss_weights
    try:
        flat = _held_parameters(optimizer)
    except ValueError:
        flat = []
    if len(flat) != 1 or flat[0] is not w:
        raise ValueError("`optimizer` must hold exactly `balancer.loss_weights` (parameters=[balancer.loss_weights])")
    hook = _WeightOptimizer(balancer, optimizer)
    hook.handles = [w.register_hook(hook.grad_hook), balancer.register_forward_pre_hook(hook.pre_hook)]
    object.__setattr__(balancer, "_ppsci_weight_optimizer", hook)  # attach() leaves it in place
    return hook
