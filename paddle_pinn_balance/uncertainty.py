"""Uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018): learned homoscedastic task variances."""

from __future__ import annotations

from typing import Optional, Sequence

import paddle

from . import ops
from .balancer import Balancer, check_float
from .contract import Slot, register
from .gradients import rank_mean_gradient


def uncertainty_total(losses, log_vars):
    r"""The uncertainty-weighted total (CVPR 2018, eq. 7, regression form, with :math:`s_j = \log\sigma_j^2`):

    .. math:: L = \sum_j \frac{L_j}{2\sigma_j^2} + \log\sigma_j = \sum_j \tfrac12 e^{-s_j} L_j + \tfrac12 s_j .

    Differentiable in both ``losses`` and ``log_vars`` (shape ``[n]``).
    """
    s = ops.cast(log_vars, losses.dtype)
    return (0.5 * paddle.exp(-s) * losses + 0.5 * s).sum()


@register("uncertainty")
class UncertaintyWeighting(Balancer):
    r"""Uncertainty weighting (Kendall et al. 2018): learnable :math:`s_j = \log\sigma_j^2`, one per term.

    .. math:: L = \sum_j \tfrac12 e^{-s_j} L_j + \tfrac12 s_j \quad (\text{CVPR 2018, eq. 7})

    where :math:`s` is the parameter ``log_vars`` (initialised to ``init_log_var``), trained by the user's
    optimizer together with the network (build it from ``model.parameters() + balancer.parameters()``).
    The total is an ordinary autograd expression of the losses and :math:`s`: ``backward()``,
    ``paddle.grad``, ``clear_grad()`` before ``backward()``, L-BFGS closures and ``GradScaler`` all see the
    exact gradient (:math:`\partial L/\partial s_j = \tfrac12(1 - e^{-s_j}L_j)`). ``weights`` reports
    :math:`\tfrac12 e^{-s_j}`.

    Args:
        loss_names: the term names. Needed at construction when the optimizer is built before the first
            call (the parameter is created with the names); else created at the first call.
        init_log_var: initial :math:`s_j` (default 0: every weight 1/2).
        check_every: every this many steps, warn naming the terms whose loss was non-finite (0: never).

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import UncertaintyWeighting
        >>> bal = UncertaintyWeighting(loss_names=["res", "bc"])
        >>> opt = paddle.optimizer.Adam(0.1, parameters=bal.parameters())
        >>> for step in range(3):
        ...     total = bal({"res": paddle.to_tensor(4.0), "bc": paddle.to_tensor(0.25)}, step)
        ...     total.backward(); opt.step(); opt.clear_grad()
        >>> bal.weights["bc"] > bal.weights["res"]
        True
        >>> {n: round(w, 4) for n, w in bal.weights.items()}  # 1 / (2 sigma^2): 0.5 e^(-0.3), 0.5 e^(0.3) after Adam
        {'res': 0.3712, 'bc': 0.6746}

    Note:
        * How it fits the method contract (:mod:`paddle_pinn_balance.contract`): it has no ``update``. Its only
          state is :math:`s`, declared in ``state_spec`` as a learned slot (a parameter the optimizer trains, not
          a buffer an update writes); its weights are derived from the parameter, and its total, which is not a
          weighted sum of detached weights (the :math:`\tfrac12 s_j` term, gradients into :math:`s`), is its own
          ``_total``. So the base's smoothing, bounds and non-finite guard do not apply (there is no update to
          smooth, bound or reject); ``update_freq`` is 1.
        * PhysicsNeMo's ``HomoscedasticUncertainty`` adds :math:`s` to the optimizer and states that L-BFGS
          does not work; here it does (one graph, tested with ``ppsci.optimizer.LBFGS``).
        * Non-finite losses: the total is a graph, so nothing can be skipped inside it; the optimizer sees
          whatever autograd gives (NaN gradients for :math:`s`, as for the network), and skipping such a
          step is the job of the loop (e.g. ``GradScaler``); a warning every ``check_every`` steps names the
          terms that were non-finite. A checkpoint with non-finite :math:`s` is
          refused by ``set_state_dict``.
        * Data-parallel: :math:`s` lives outside ``DataParallel``; its gradient is averaged over the ranks in
          the total's backward (:func:`~paddle_pinn_balance.gradients.rank_mean_gradient`), like the network's
          by the reducer, so every rank holds the same :math:`s` (tested on two ranks).
    """

    learns_weights = True

    def __init__(self, loss_names: Optional[Sequence[str]] = None, init_log_var: float = 0.0,
                 check_every: int = 100):
        self.init_log_var = check_float("init_log_var", init_log_var)
        super().__init__(loss_names=loss_names, update_freq=1, check_every=check_every)

    def state_spec(self, k):
        # s = log sigma^2, trained by the user's optimizer; in Paddle's default dtype, as paddle.nn.Linear's
        return {"log_vars": Slot([k], self.init_log_var, paddle.get_default_dtype(), learned=True)}

    def _weight_vector(self):
        return (0.5 * paddle.exp(-self.log_vars)).detach()

    #: nothing is skipped: the total is a graph
    _nonfinite_effect = ("the total and its gradients were non-finite at those steps (the total is a graph: "
                         "nothing can be skipped inside it; skip such steps in the loop)")

    def _total(self, values, update):
        stacked = ops.stack(values)
        if update:  # counted for the warning every `check_every` steps (device-side)
            self._record_bad_terms(stacked.detach(), zeros=False)
        # data-parallel: log_vars are outside DataParallel; their gradient is averaged over the ranks here
        return uncertainty_total(stacked, rank_mean_gradient(self.log_vars))

    def extra_repr(self):
        return f"{super().extra_repr()}, init_log_var={self.init_log_var}"
