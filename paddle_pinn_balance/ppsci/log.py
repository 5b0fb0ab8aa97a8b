"""The balancer's weights (and NTK traces, GradNorm's :math:`L_\\mathrm{grad}`) in the Solver's training log."""

from __future__ import annotations

from typing import Optional

from ..balancer import Balancer
from .config import _ppsci
from .optimizers import _check_optimizer


class _LogHook:
    def __init__(self, solver, balancer, every, prefix):
        self.solver, self.balancer, self.every, self.prefix = solver, balancer, every, prefix

    def _is_log_step(self, step: int) -> bool:
        s = self.solver
        nxt = step + 1  # the solver increments global_step after the aggregator call, then logs
        every = self.every if self.every is not None else s.log_freq
        return nxt % every == 0 or nxt == 1 or nxt == getattr(s, "max_steps", -1)

    def scalars(self) -> dict:
        b = self.balancer
        out = {f"{self.prefix}/{k}": v for k, v in b.weights.items()}
        if callable(getattr(b, "traces", None)):
            stat = "ntk_trace" if getattr(b, "mode", "trace") == "trace" else "grad_norm"
            out.update({f"{stat}/{k}": v for k, v in b.traces().items()})
        if hasattr(b, "last_grad_norm_loss"):
            out["gradnorm_loss"] = float(b.last_grad_norm_loss.numpy())
        return out

    def __call__(self, layer, inputs, output):
        step = inputs[1] if len(inputs) > 1 and inputs[1] is not None else getattr(self.solver, "global_step", 0)
        if not self._is_log_step(int(step)):
            return None
        misc = _ppsci().utils.misc
        info = self.solver.train_output_info
        for key, value in self.scalars().items():
            meter = misc.AverageMeter(key, ".5g")
            meter.update(float(value))
            info[key] = meter  # printed in the log line and written as train/<key> by the solver's writers
        return None


def attach_logging(solver, balancer: Optional[Balancer] = None, every: Optional[int] = None,
                   prefix: str = "weight"):
    """Put the balancer's weights in the solver's training log and writers, named by loss term.

    At the solver's log steps (``global_step % log_freq == 0``, the first and the last step; or every
    ``every`` steps) the entries ``<prefix>/<term>`` (the weights applied at that step), plus
    ``ntk_trace/<term>`` for :class:`~paddle_pinn_balance.NTKWeighting` and ``gradnorm_loss`` for GradNorm,
    are added to ``solver.train_output_info``: the solver prints them in its ``[Train]`` line and writes them
    as ``train/<key>`` to its VisualDL / WandB / TensorBoard writer. Nothing is patched: it is a forward
    post-hook on the balancer, and it reads (synchronises) only at those steps.

    A second call for the same balancer (a second Solver: Adam, then L-BFGS) replaces the first one's hook.
    It also checks, once, that the solver's optimizer holds the balancer's learned weights (GradNorm's
    ``loss_weights``, uncertainty's ``log_vars``): a ``BalanceWarning`` names them where it does not (the
    optimizer was built from the model instead of
    :func:`~paddle_pinn_balance.ppsci.optimizers.optimizer_layers`), since they would silently stay at their
    initial values. GradNorm's weights under L-BFGS are the exception
    (:func:`~paddle_pinn_balance.ppsci.optimizers.attach_weight_optimizer`).

    Returns:
        The hook handle (``handle.remove()`` detaches it).
    """
    balancer = solver.loss_aggregator if balancer is None else balancer
    if not isinstance(balancer, Balancer):
        raise ValueError(f"attach_logging needs a paddle_pinn_balance balancer; got {type(balancer).__name__}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"`every` must be a positive integer or None; got {every!r}")
    _check_optimizer(solver, balancer)
    old = balancer.__dict__.get("_ppsci_log_handle")
    if old is not None:
        old.remove()
    handle = balancer.register_forward_post_hook(_LogHook(solver, balancer, every, prefix))
    object.__setattr__(balancer, "_ppsci_log_handle", handle)
    return handle
