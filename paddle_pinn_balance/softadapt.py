"""SoftAdapt (Heydari, Thompson, Mehmood, arXiv 1912.12355, 2019): softmax of the losses' rates of change."""

from __future__ import annotations

from typing import Optional, Sequence

import paddle

from . import ops
from .balancer import Balancer, check_choice, check_float
from .contract import Slot, pick, ready, register

VARIANTS = ("difference", "normalized", "loss_weighted", "ratio")


def softadapt_weights(losses, prev_losses, beta: float, variant: str = "difference", eps: float = 1e-8):
    r"""SoftAdapt weights from this and the previous step's losses (shape ``[n]``), max-shifted:

    * ``difference`` (the basic form): :math:`s_j = L_j(t) - L_j(t-1)`,
      :math:`w_j = e^{\beta s_j} / \sum_k e^{\beta s_k}`;
    * ``normalized`` (Sec. 3.1, normalised slopes): :math:`s_j \leftarrow s_j / (\sum_k |s_k| + \epsilon)`,
      then as above;
    * ``loss_weighted`` (Sec. 3.1, loss-weighted): :math:`w_j = L_j e^{\beta s_j} / \sum_k L_k e^{\beta s_k}`;
    * ``ratio`` (PhysicsNeMo's ``SoftAdapt``): :math:`s_j = L_j(t) / (L_j(t-1) + \epsilon)`.
    """
    if variant == "ratio":
        s = losses / ops.scale(prev_losses, 1.0, eps)
    else:
        s = losses - prev_losses
        if variant == "normalized":
            s = s / ops.scale(ops.total(ops.abs(s)), 1.0, eps)
    z = ops.scale(s, beta)
    if variant != "loss_weighted":
        return ops.softmax(z)  # max-shifted inside
    e = losses * paddle.exp(z - z.amax())  # amax: paddle.max warns on Paddle 3.2
    return e / ops.scale(ops.total(e), 1.0, eps)


@register("softadapt")
class SoftAdapt(Balancer):
    r"""SoftAdapt (Heydari et al. 2019): weights from a softmax of the losses' rates of change.

    .. math:: w_j(t) = \frac{e^{\beta s_j(t)}}{\sum_k e^{\beta s_k(t)}}, \qquad s_j(t) = L_j(t) - L_j(t-1)

    (arXiv 1912.12355, Sec. 3, equation numbers not checked; the other variants by name, see
    :func:`softadapt_weights`), where

    * ``beta``: :math:`\beta` (> 0 favours the term whose loss grows or decreases slowest; 0: equal weights);
    * ``variant``: ``difference`` (paper's basic form), ``normalized``, ``loss_weighted`` (paper), ``ratio``
      (PhysicsNeMo);
    * :math:`L(t-1)`: the losses of the previous update call (``prev_losses`` buffer).

    Weights sum to 1 as in the paper (PhysicsNeMo's sum to n). On the first call the rates are those of a
    constant loss (0 or 1), so every weight is 1/n (``loss_weighted``: :math:`L_j / \sum_k L_k`).

    Args:
        beta, variant, eps: as above (defaults 0.1, ``"difference"``, 1e-8).
        momentum, update_freq, min_weight, max_weight, loss_names, check_every: see
            :class:`~paddle_pinn_balance.balancer.Balancer`.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import SoftAdapt
        >>> bal = SoftAdapt(beta=1.0)
        >>> for step in range(3):
        ...     total = bal({"res": paddle.to_tensor(1.0 / (step + 1)), "bc": paddle.to_tensor(2.0)}, step)
        >>> bal.weights["bc"] > bal.weights["res"]
        True
        >>> {n: round(w, 4) for n, w in bal.weights.items()}  # softmax of [1/3 - 1/2, 0]: e^(-1/6) / (e^(-1/6) + 1)
        {'res': 0.4584, 'bc': 0.5416}

    Note:
        The rate of change is taken between update calls (every ``update_freq`` steps), on the minibatch
        losses of those calls; the paper uses consecutive iterations. A non-finite loss skips the update
        (weights and ``prev_losses`` kept). Data-parallel: the losses are averaged over ranks first.
    """

    def __init__(self, beta: float = 0.1, variant: str = "difference", eps: float = 1e-8, momentum: float = 0.0,
                 update_freq: int = 1, min_weight: Optional[float] = None, max_weight: Optional[float] = None,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.beta = check_float("beta", beta)
        self.variant = check_choice("variant", variant, VARIANTS)
        super().__init__(loss_names=loss_names, update_freq=update_freq, momentum=momentum, min_weight=min_weight,
                         max_weight=max_weight, eps=eps, check_every=check_every)

    history = 1  # L(t-1)

    def state_spec(self, k):
        return {"prev_losses": Slot([k], 0.0)}  # L(t-1)

    def update(self, losses, G, state):
        # a first update compares L with itself (equal rates)
        ref = pick(ready(state["taken"]), state["prev_losses"], losses)
        return softadapt_weights(losses, ref, self.beta, self.variant, self.eps), {"prev_losses": losses}

    def extra_repr(self):
        return f"{super().extra_repr()}, beta={self.beta}, variant={self.variant!r}"
