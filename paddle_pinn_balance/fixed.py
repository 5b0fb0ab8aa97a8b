"""Fixed weights: :class:`Sum`, the plain weighted sum of the losses (the baseline every method is compared with)."""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import paddle

from . import ops
from .balancer import Balancer, weighted_sum
from .checks import check_float
from .contract import register

__all__ = ["Sum"]


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

    def _set_names(self, names):
        super()._set_names(names)
        init = [self._fixed.get(n, 1.0) for n in self._names]
        self.lambdas.set_value(paddle.to_tensor(init, dtype=self.lambdas.dtype))

    def _total(self, values, update):
        return weighted_sum(ops.stack(values), self.lambdas)
