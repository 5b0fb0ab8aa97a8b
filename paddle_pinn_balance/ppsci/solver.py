"""A balancer for a ``ppsci.solver.Solver``: built from the config (:func:`build_for_solver`), attached to each
Solver (:func:`attach`)."""

from __future__ import annotations

import warnings
import weakref
from typing import Mapping, Optional

import paddle

from ..balancer import Balancer, BalanceWarning
from ..config import REGISTRY, allowed_keys
from ..config import build_balancer as _core_build_balancer
from ..fixed import Sum
from ..gradnorm import GradNorm, GradNormBalancer
from .config import _unwrap, balancer_config, loss_names
from .kernels import _renew_kernels, constraint_kernels
from .log import attach_logging
from .optimizers import _check_optimizer, _join_optimizer, attach_weight_optimizer

#: Keys of a ``ntk`` config block read here (not by :class:`~paddle_pinn_balance.NTKWeighting`).
NTK_ADAPTER_KEYS = ("max_points", "fast", "point_weights")

#: learning rate of the Adam that :func:`attach` gives GradNorm's weights in an L-BFGS stage
GRADNORM_LBFGS_WEIGHT_LR = 1e-3


def build_for_solver(cfg, model: paddle.nn.Layer, constraints: Optional[Mapping] = None):
    """``(model, balancer)`` for ``ppsci.solver.Solver(model=model, loss_aggregator=balancer, ...)``.

    Args:
        cfg: the ``TRAIN.balancer`` block (``{"name": ..., **hyperparameters}``), or a whole Hydra config
            holding one, as a dict or an omegaconf ``DictConfig``. Keys are those of
            :func:`paddle_pinn_balance.build_balancer`; a ``ntk`` block also takes ``max_points``,
            ``point_weights`` (see :func:`~paddle_pinn_balance.ppsci.kernels.constraint_kernels`) and ``fast``
            (default true; false: the exact per-point loop, ``path="loop"``).
        model: the PaddleScience network.
        constraints: the solver's constraint dict. When given, ``loss_names`` defaults to
            :func:`~paddle_pinn_balance.ppsci.config.loss_names` ``(constraints)`` for every method (so its
            state, and the parameters of ``uncertainty``, exist before the optimizer is built and before a
            checkpoint loads), and ``ntk`` (``mode: trace``) gets its kernels from them.

    Returns:
        ``(model, balancer)``: the network to give the solver (``model`` itself; a
        :class:`~paddle_pinn_balance.GradNorm` wrapper given here is unwrapped; with ``grad_norm`` its balancer
        is the one returned, as it was built: its loss names are taken at the first call unless it was built
        with them) and the balancer. Build the solver's optimizer from
        :func:`~paddle_pinn_balance.ppsci.optimizers.optimizer_layers` ``(model, balancer)``:
        ``ppsci.optimizer.Adam(lr)(optimizer_layers(model, balancer))``, so that learned weights (GradNorm's
        ``loss_weights``, uncertainty's ``log_vars``) train. Learned weights are the balancer's parameters,
        saved in the solver's ``<checkpoint>.pdagg`` with the rest of its state; the ``.pdparams`` hold the
        network's parameters under the network's own names (no ``net.`` prefix): the example's
        ``mode=eval`` / ``export`` and ``pretrained_model_path`` load them into the bare network.
    """
    cfg = balancer_config(cfg)
    name = cfg.get("name")
    own = name == "grad_norm" and isinstance(model, GradNorm)  # a wrapper's balancer is kept, as it was built
    if (constraints is not None and "loss_names" not in cfg and name in REGISTRY and "loss_names" in allowed_keys(name)
            and not own):
        cfg["loss_names"] = loss_names(constraints)  # every method: state (and parameters) exist before training
    if name == "ntk":
        opts = {k: cfg.pop(k) for k in NTK_ADAPTER_KEYS if k in cfg}
        if cfg.get("mode", "trace") == "trace" and "kernels" not in cfg:
            if constraints is None:
                raise ValueError("`ntk` with mode 'trace' needs the constraints (to build its kernels) or `kernels`")
            if not bool(opts.pop("fast", True)):
                cfg.setdefault("path", "loop")  # asked for: the per-point loop, without the slow-path warning
            cfg["kernels"] = constraint_kernels(constraints, model, **opts)
        elif opts:
            raise ValueError(f"keys {sorted(opts)} apply to kernels built from constraints (ntk, mode 'trace')")
        return model, _core_build_balancer(cfg, _unwrap(model))
    if name == "grad_norm":  # the balancer, not its wrapper, goes to the solver (the wrapper keeps net.* names)
        agg = _core_build_balancer(cfg, model)
        return agg.wrapper.net, agg
    agg = _core_build_balancer(cfg, _unwrap(model))
    if type(agg) is Sum and not any(v != 1.0 for v in agg._fixed.values()):
        agg.__class__ = SolverSum  # validated and built by the core builder; the same state, ppsci's total
    return _unwrap(model), agg


class SolverSum(Sum):
    """``sum`` in the Solver: ppsci's ``mtl.Sum`` operation for operation, ``L_1 + L_2 + ...`` left to right.

    The same graph gives the same order of gradient accumulation, so a run with ``{name: sum}`` is the run
    without a balancer bit for bit (parameters, optimizer state, losses, metrics);
    :class:`~paddle_pinn_balance.Sum`'s stacked weighted sum has the same value and gradient up to the last bit
    of the accumulation. State and checkpoints are :class:`~paddle_pinn_balance.Sum`'s."""

    def _total(self, values, update):
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total


def attach(solver, balancer: Optional[Balancer] = None, every: Optional[int] = None, log: bool = True):
    """Everything a Solver needs besides ``loss_aggregator=balancer``, in one line after each ``Solver(...)``.

    1. The balancer's learned weights (GradNorm's ``loss_weights``, uncertainty's ``log_vars``) join the
       solver's optimizer where it was built from the model alone (as PaddleScience's examples build it):
       what :func:`~paddle_pinn_balance.ppsci.optimizers.optimizer_layers` would have given (``lbfgs=True``
       for an L-BFGS optimizer; an optimizer built from parameter groups gets them as a group of their own).
    2. Under L-BFGS, GradNorm's weights get an Adam of their own (``GRADNORM_LBFGS_WEIGHT_LR``,
       :func:`~paddle_pinn_balance.ppsci.optimizers.attach_weight_optimizer`) unless one is attached: held by
       L-BFGS they would collapse, the residual's weight at its floor at the first step
       (``tests/test_ppsci_lbfgs.py``).
    3. A second Solver with the same balancer (Adam, then L-BFGS) continues it: weights and every state
       (GradNorm's :math:`L_i(0)`, SoftAdapt's previous losses, NTK traces) are kept,
       :meth:`~paddle_pinn_balance.Balancer.restart_steps` lets the new Solver's ``global_step`` count from 0,
       and NTK kernels built from the first Solver's constraints are rebuilt on the second's.
    4. :func:`~paddle_pinn_balance.ppsci.log.attach_logging` (``every``; ``log=False``: not): the weights in
       the ``[Train]`` log line and the writers.

    Returns:
        the balancer.
    """
    balancer = solver.loss_aggregator if balancer is None else balancer
    if not isinstance(balancer, Balancer):
        raise ValueError(f"attach needs a paddle_pinn_balance balancer as the solver's loss_aggregator; got "
                         f"{type(balancer).__name__}")
    opt = getattr(solver, "optimizer", None)
    if opt is not None:
        lbfgs = isinstance(opt, paddle.optimizer.LBFGS)
        held = _join_optimizer(opt, _unwrap(solver.model), balancer, lbfgs)
        if lbfgs and isinstance(balancer, GradNormBalancer):
            if id(balancer.loss_weights) in held:
                warnings.warn("GradNorm's loss_weights are in the solver's L-BFGS optimizer: they follow L_grad, "
                              "not the total L-BFGS minimises, and collapse; build it from optimizer_layers(model, "
                              "balancer, lbfgs=True)", BalanceWarning, stacklevel=2)
            elif not getattr(balancer.__dict__.get("_ppsci_weight_optimizer"), "handles", None):
                attach_weight_optimizer(balancer, paddle.optimizer.Adam(GRADNORM_LBFGS_WEIGHT_LR,
                                                                        parameters=[balancer.loss_weights]))
    previous = balancer.__dict__.get("_ppsci_solver")
    if previous is not None and previous() is not None and previous() is not solver:
        balancer.restart_steps()  # a second stage: its steps count from 0 again
        _renew_kernels(balancer, solver)
    object.__setattr__(balancer, "_ppsci_solver", weakref.ref(solver))
    if log:
        attach_logging(solver, balancer, every=every)
    else:
        _check_optimizer(solver, balancer)
    return balancer
