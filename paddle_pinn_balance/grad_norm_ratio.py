"""Grad-norm ratio weighting (Wang, Sankaran, Wang & Perdikaris, "An Expert's Guide to Training
Physics-informed Neural Networks", arXiv 2308.08468, 2023, Algorithm 1)."""

from __future__ import annotations

from typing import Optional, Sequence

import paddle

from . import ops
from .balancer import Balancer, check_choice
from .contract import register
from .gradients import trainable_parameters

RATIO_REDUCTIONS = ("sum", "mean")


def grad_norm_ratio_weights(norms: paddle.Tensor, reduction: str = "sum") -> paddle.Tensor:
    r"""Raw weights from per-term gradient norms :math:`n_i = \|\nabla_\theta L_i\|_2` (shape ``[K]``):

    .. math:: \hat w_i = \frac{\sum_j n_j}{n_i} \quad (\texttt{sum}, \text{Expert's Guide eq. 2.12, Alg. 1}),
        \qquad \hat w_i = \frac{\frac1K \sum_j n_j}{n_i} \quad (\texttt{mean}, \text{jaxpi, ppsci}).

    Example: ``norms = [1, 3]`` gives ``[4, 4/3]`` (sum) and ``[2, 2/3]`` (mean).
    """
    total = ops.total(norms)
    if reduction == "mean":
        total = ops.scale(total, 1.0 / norms.shape[0])
    return total / norms


@register("grad_norm_ratio")
class GradNormRatio(Balancer):
    r"""Grad-norm ratio weighting: each term's weight is the summed gradient norm over its own.

    .. math:: \hat w_i = \frac{\sum_j \|\nabla_\theta L_j\|_2}{\|\nabla_\theta L_i\|_2}, \qquad
        w_i \leftarrow m\, w_i + (1 - m)\, \hat w_i \quad (\text{Expert's Guide, Alg. 1, eqs. 2.12-2.13})

    where :math:`\theta` is every trainable parameter of ``model``, ``momentum`` is :math:`m` (0.9),
    ``update_freq`` the update interval (1000 in the paper), ``reduction="mean"`` divides the numerator by
    the number of terms (the authors' jaxpi code and ``ppsci.loss.mtl.GradNorm``; a constant factor).

    The per-term gradients are taken once per update and the returned total reuses them (no second
    backward). ``NTKWeighting(mode="grad_norm")`` is the same estimate with ``momentum=0`` and
    ``reduction="sum"`` (kept under that name for older configurations).

    Note:
        ``ppsci.loss.mtl.GradNorm`` forms the total with the old weights and updates afterwards (its step
        ``t`` uses the weights of step ``t - 1``); here the update comes first and the total of step ``t``
        uses the new weights. A term whose gradient is zero keeps its weight; a non-finite norm skips the
        update (weights kept), with a warning every ``check_every`` updates.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import GradNormRatio
        >>> _ = paddle.seed(0)
        >>> net = paddle.nn.Linear(1, 1)
        >>> bal = GradNormRatio(net, update_freq=1, momentum=0.0)
        >>> x = paddle.ones([4, 1])
        >>> total = bal({"a": net(x).mean(), "b": (3 * net(x)).mean()}, 0)
        >>> [round(w, 4) for w in bal.weights.values()]  # norms n and 3n: (4n / n, 4n / 3n)
        [4.0, 1.3333]

    References:
        S. Wang, S. Sankaran, H. Wang, P. Perdikaris. An expert's guide to training physics-informed neural
        networks. arXiv:2308.08468, 2023.
    """

    needs_gradients = True

    def __init__(self, model, reduction: str = "sum", momentum: float = 0.9, update_freq: int = 1000,
                 min_weight: Optional[float] = None, max_weight: Optional[float] = None,
                 loss_names: Optional[Sequence[str]] = None, assemble: bool = True, check_every: int = 100):
        self.reduction = check_choice("reduction", reduction, RATIO_REDUCTIONS)
        self._params = trainable_parameters(model)
        super().__init__(loss_names=loss_names, update_freq=update_freq, momentum=momentum, min_weight=min_weight,
                         max_weight=max_weight, eps=0.0, assemble=assemble, check_every=check_every)

    def update(self, losses, G, state):
        norms = ops.row_norm(self._model_columns(G)).detach()
        raw = grad_norm_ratio_weights(norms, self.reduction)
        # a term whose gradient is zero keeps its weight; the norms are the guard's per-term statistic
        return ops.where(ops.nonzero(norms), raw, ops.cast(state["weights"], norms.dtype)), {}, norms

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reduction={self.reduction!r}, momentum={self.momentum}"
