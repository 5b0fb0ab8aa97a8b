"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019): a softmax of the losses' last rates of descent."""

from __future__ import annotations

from typing import Optional, Sequence

from . import ops
from .balancer import Balancer, check_float
from .contract import Slot, ready, register


def dwa_weights(prev_losses, prev2_losses, temperature: float, eps: float = 1e-8):
    r"""DWA weights from the two earlier losses (shape ``[K]``), max-shifted:

    .. math:: r_k = \frac{L_k(t-1)}{L_k(t-2) + \epsilon}, \qquad
              \lambda_k(t) = K\,\frac{e^{r_k / T}}{\sum_i e^{r_i / T}} .
    """
    r = prev_losses / ops.scale(prev2_losses, 1.0, eps)
    return ops.scale(ops.softmax(ops.scale(r, 1.0 / temperature)), float(prev_losses.shape[0]))


@register("dwa")
class DWA(Balancer):
    r"""Dynamic Weight Average (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019,
    Sec. 3.3, arXiv 1803.10704): a term whose loss fell least over the last step gets the most weight.

    .. math:: \lambda_k(t) = \frac{K \exp(w_k(t-1)/T)}{\sum_i \exp(w_i(t-1)/T)}, \qquad
              w_k(t-1) = \frac{L_k(t-1)}{L_k(t-2)}

    where :math:`K` is the number of terms (the weights sum to :math:`K`), :math:`T` the temperature
    (``temperature``; large :math:`T` gives equal weights) and :math:`L_k(t-1)`, :math:`L_k(t-2)` the losses of
    the two previous update calls (``prev_losses``, ``prev2_losses``; the denominator gets ``eps``). Until two
    earlier losses exist every weight is 1, as the paper's :math:`w_k(t) = 1` for :math:`t = 1, 2`.

    Loss values only: no gradient is read. The paper averages each loss over an epoch; here the losses are those of
    the update calls (every ``update_freq`` steps; pass epoch-averaged losses at epoch steps to follow it exactly).

    Args:
        temperature: :math:`T` (> 0; default 2, the paper's).
        eps: added to :math:`L_k(t-2)` (default 1e-8).
        momentum, update_freq, min_weight, max_weight, loss_names, check_every: see
            :class:`~paddle_pinn_balance.balancer.Balancer`.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance.dwa import DWA
        >>> bal = DWA(temperature=1.0)
        >>> for step, res in enumerate([4.0, 2.0, 1.0]):
        ...     total = bal({"res": paddle.to_tensor(res), "bc": paddle.to_tensor(1.0)}, step)
        >>> {n: round(w, 4) for n, w in bal.weights.items()}  # 2 softmax([2/4, 1/1])
        {'res': 0.7551, 'bc': 1.2449}

    Note:
        A call with a non-finite loss skips the update: the weights and both earlier losses are kept.
        Data-parallel: the losses are averaged over the ranks first.
    """

    history = 2  # L(t-1) and L(t-2)

    def __init__(self, temperature: float = 2.0, eps: float = 1e-8, momentum: float = 0.0, update_freq: int = 1,
                 min_weight: Optional[float] = None, max_weight: Optional[float] = None,
                 loss_names: Optional[Sequence[str]] = None, check_every: int = 100):
        self.temperature = check_float("temperature", temperature, 0.0, low_open=True)
        super().__init__(loss_names=loss_names, update_freq=update_freq, momentum=momentum, min_weight=min_weight,
                         max_weight=max_weight, eps=eps, check_every=check_every)

    def state_spec(self, k):
        return {"prev_losses": Slot([k], 1.0), "prev2_losses": Slot([k], 1.0)}  # L(t-1), L(t-2)

    def update(self, losses, G, state):
        prev, prev2 = state["prev_losses"], state["prev2_losses"]
        w = dwa_weights(prev, prev2, self.temperature, self.eps)
        first = ready(state["taken"], 2)
        if first is not None:  # equal weights until two earlier losses exist
            w = ops.where(first, w, ops.filled(losses.shape[0], 1.0, losses))
        return w, {"prev_losses": losses, "prev2_losses": prev}

    def extra_repr(self):
        return f"{super().extra_repr()}, temperature={self.temperature}"
