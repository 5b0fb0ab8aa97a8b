"""Learning-rate annealing (Wang, Teng & Perdikaris, SIAM J. Sci. Comput. 43(5), 2021)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import paddle

from . import ops
from .balancer import Balancer, BalanceWarning, check_choice, check_float, check_int
from .contract import register
from .gradients import PARAM_SUBSETS, trainable_parameters, weights_first

# --------------------------------------------------------------------------- LRA's gradient statistics


class Segments:
    """Which flat-gradient entries belong to which parameter tensor, with whole-array reductions."""

    def __init__(self, params: Sequence[paddle.Tensor]):
        self.sizes = [int(np.prod(p.shape)) for p in params]
        n, s = sum(self.sizes), len(self.sizes)
        mean = np.zeros([n, s], dtype=np.float32)
        start = 0
        for j, size in enumerate(self.sizes):
            mean[start:start + size, j] = 1.0 / size
            start += size
        self._mean = paddle.to_tensor(mean)
        self._count = paddle.to_tensor((mean > 0).astype(np.float32))

    def _matrix(self, m: paddle.Tensor, dtype) -> paddle.Tensor:
        return m if m.dtype == dtype else m.astype(dtype)

    def mean(self, a: paddle.Tensor) -> paddle.Tensor:
        """Per-segment mean of ``a`` (``[K, P]`` -> ``[K, S]``)."""
        return paddle.matmul(a, self._matrix(self._mean, a.dtype))

    def sum(self, a: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(a, self._matrix(self._count, a.dtype))

    def max(self, a: paddle.Tensor) -> paddle.Tensor:
        """Per-segment max of ``a`` (``[K, P]`` -> ``[K, S]``; ``paddle.amax`` on column slices: ``paddle.max``
        and ``paddle.split`` warn at their first call on Paddle 3.2)."""
        ends = np.cumsum(self.sizes).tolist()
        return paddle.stack([paddle.amax(a[:, e - n:e], axis=1) for n, e in zip(self.sizes, ends)], axis=1)


STATISTICS = ("max", "mean", "norm")
REDUCTIONS = ("flat", "layer_mean", "layer_max_ratio")


def ratio_statistics(G: paddle.Tensor, stat: str, reduction: str, segments: Segments) -> tuple:
    """``(numerator, denominator)`` statistics of each row of ``G``, sharing one pass over ``|G|``.

    * ``stat="max"``: ``max |g|`` over ``mean |g|``; ``"mean"``: ``mean |g|`` over ``mean |g|``;
      ``"norm"``: ``||g||_2`` over ``||g||_2``.
    * ``reduction="flat"``: over all entries; ``"layer_mean"``: means (norms) per parameter tensor, then
      their mean (the max of per-tensor maxima is the global max); ``"layer_max_ratio"``: per parameter
      tensor, shape ``[K, S]`` (the caller takes the max of the ratios).
    """
    per_layer = reduction == "layer_max_ratio"
    if stat == "norm":
        if reduction == "flat":
            v = ops.row_norm(G)
        else:
            v = paddle.sqrt(segments.sum(G * G))
            v = v if per_layer else ops.row_mean(v)
        return v, v
    A = ops.abs(G)
    if reduction == "flat":
        den = ops.row_mean(A)
    else:
        den = segments.mean(A)
        den = den if per_layer else ops.row_mean(den)
    if stat == "mean":
        return den, den
    return (segments.max(A) if per_layer else ops.row_max(A)), den


#: variant -> (current lambda inside the denominator, weight of the new estimate)
VARIANTS = {"siam": (True, 0.1), "arxiv": (False, 0.9)}

#: Settings of the authors' code (Helmholtz2D_model_tf.py, Klein_Gordon_model_tf.py).
PRESETS = {
    "wang2021_code": dict(variant="siam", statistic="max", params="weights", reduction="layer_mean", update_freq=10),
}

_DEFAULTS = dict(variant="siam", statistic="max", params="all", reduction="flat", update_freq=10)


def lra_estimates(G: paddle.Tensor, lambdas: paddle.Tensor, ref, free: Optional[paddle.Tensor] = None,
                  variant: str = "siam", statistic: str = "max", reduction: str = "flat",
                  segments: Optional[Segments] = None, eps: float = 1e-8) -> tuple:
    r"""Learning-rate annealing estimates :math:`\hat\lambda` from the stacked per-term gradients.

    ``G``: ``[K, P]``, row ``i`` is :math:`\nabla_\theta L_i` over the selected parameters; ``lambdas``: the
    current weights ``[K]``; ``ref``: the row of the reference (PDE residual) term :math:`L_r` (an int), or
    an int64 tensor of rows (several references: the numerator is the max of their statistics,
    NeuralPDE.jl); ``free``: bool ``[K]``, the annealed terms (``None``: every row not in ``ref``).
    With :math:`|\cdot|` elementwise, :math:`\overline{\,\cdot\,}` the mean over the entries, and
    :math:`\lambda_i \ge 0` (so :math:`|\nabla(\lambda_i L_i)| = \lambda_i |\nabla L_i|`):

    * ``variant="siam"`` (SIAM J. Sci. Comput. 2021, eqs. 2.30-2.31, Algorithm 2.1):

      .. math:: \hat\lambda_i = \frac{\max_\theta |\nabla_\theta L_r|}
                                    {\lambda_i\, \overline{|\nabla_\theta L_i|} + \epsilon}

    * ``variant="arxiv"`` (arXiv:2001.04536v1, eqs. 40-42, Algorithm 1), no :math:`\lambda_i` inside:

      .. math:: \hat\lambda_i = \frac{\max_\theta |\nabla_\theta L_r|}{\overline{|\nabla_\theta L_i|} + \epsilon}

    * the authors' code (preset ``"wang2021_code"``: ``siam``, ``max``, ``G`` restricted to the weight
      matrices :math:`W_1..W_S`, ``reduction="layer_mean"``; Helmholtz2D_model_tf.py,
      Klein_Gordon_model_tf.py, no equation number: Algorithm 2.1 as coded):

      .. math:: \hat\lambda_i = \frac{\max_\ell \max |\nabla_{W_\ell} L_r|}
                {\lambda_i\, \frac1S \sum_{\ell=1}^S \overline{|\nabla_{W_\ell} L_i|} + \epsilon}

    * ``reduction="layer_max_ratio"`` (the authors' lid-driven cavity script), over the layers the term
      reaches: :math:`\hat\lambda_i = \max_\ell\, \max|\nabla_{W_\ell} L_r| /
      (\lambda_i \overline{|\nabla_{W_\ell} L_i|} + \epsilon)` (``arxiv``: without :math:`\lambda_i`).
    * ``statistic="mean"`` (PhysicsNeMo's code) puts :math:`\overline{|\nabla L_r|}` in the numerator,
      ``statistic="norm"`` uses :math:`\|\nabla L_r\|_2` over :math:`\|\nabla L_i\|_2`
      (:func:`~paddle_pinn_balance.lr_annealing.ratio_statistics`).

    ``segments`` (a :class:`~paddle_pinn_balance.lr_annealing.Segments` of the parameter tensors behind the
    columns of ``G``) is needed by the ``layer_*`` reductions. The smoothing
    :math:`\lambda_i \leftarrow (1-\alpha)\lambda_i + \alpha\hat\lambda_i` (:math:`\alpha` 0.1 for
    ``siam``, 0.9 for ``arxiv``) is not part of this function (:class:`LRAnnealing` applies it).

    Returns ``(lambda_hat, den)``: the estimates ``[K]`` and each term's denominator statistic ``[K]``
    (:math:`\overline{|\nabla L_i|}`; for ``layer_max_ratio`` its sum over the layers). Reference terms,
    and terms whose denominator is 0 (gradient identically zero), get their current weight. When no
    reference term has a gradient (the numerator is 0: a detached or constant residual) every estimate is
    NaN: the estimates would all be 0, and :class:`LRAnnealing` skips such an update. A NaN or Inf
    entry in ``G`` makes ``den`` of its row non-finite; the estimate may still be finite
    (:math:`\max / \infty = 0`), so a caller must check both (:class:`LRAnnealing` skips the update).
    Whole-array operations only: no host synchronisation.

    Example: ``G = [[3, 4], [0, 1]]``, ``ref=0``, ``lambdas = [1, 2]``: the numerator is
    :math:`\max(3, 4) = 4`, the denominator :math:`(0 + 1)/2 = 0.5`, so ``siam`` gives
    :math:`4 / (2 \cdot 0.5) = 4` and ``arxiv`` :math:`4 / 0.5 = 8` for the second term (``eps=0``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)}; got {variant!r}")
    if reduction != "flat" and segments is None:
        raise ValueError(f"reduction={reduction!r} needs `segments` (the parameter tensors behind G's columns)")
    lambda_inside = VARIANTS[variant][0]
    num, den = ratio_statistics(G, statistic, reduction, segments)
    k = G.shape[0]
    if isinstance(ref, numbers.Integral):
        num = ops.item(num, int(ref))
        if free is None:
            free = paddle.arange(k) != int(ref)
    else:
        ref = ref.reshape([-1]) if isinstance(ref, paddle.Tensor) else paddle.to_tensor(list(ref), dtype="int64")
        num = paddle.index_select(num, ref, axis=0).amax(axis=0)  # max over reference terms (paddle.max warns on 3.2)
        if free is None:
            free = (paddle.arange(k).unsqueeze(1) != ref.unsqueeze(0)).all(axis=1)
    current = ops.cast(lambdas, G.dtype)
    if reduction == "layer_max_ratio":
        lam = current.unsqueeze(1)
        connected = den != 0  # per layer: a layer the term does not reach gives no ratio
        hat = num / ((lam * den if lambda_inside else den) + eps)
        hat = paddle.where(connected, hat, paddle.zeros_like(hat)).amax(axis=1)
        den = den.sum(axis=1)
    else:
        hat = num / ((current * den if lambda_inside else den) + eps)
    # NaN != 0 is True: a non-finite gradient reaches the estimate and the caller skips the update
    out = ops.where(free & ops.nonzero(den), hat, current)
    # no reference gradient (detached, constant): every estimate would be 0, the collapse of all weights; NaN
    # instead, so that the caller skips the update
    has_ref = paddle.any(ops.nonzero(num))
    return out + ops.where(has_ref, ops.filled(None, 0.0, out), ops.filled(None, math.nan, out)), den


@register("lr_annealing")
class LRAnnealing(Balancer):
    r"""Learning-rate annealing: weights from the residual's largest gradient over each term's mean gradient.

    .. math::

        \hat\lambda_i = \frac{\max_{r \in \mathrm{ref}} \max_\theta |\nabla_\theta L_r|}
                             {\overline{|\nabla_\theta (\lambda_i L_i)|} + \epsilon}
        \quad (\texttt{siam}, \text{SIAM eqs. 2.30-2.31, Alg. 2.1}), \qquad
        \hat\lambda_i = \frac{\max_{r} \max_\theta |\nabla_\theta L_r|}{\overline{|\nabla_\theta L_i|} + \epsilon}
        \quad (\texttt{arxiv}, \text{arXiv:2001.04536v1 eqs. 40-42}),

    .. math:: \lambda_i \leftarrow (1 - \alpha)\,\lambda_i + \alpha\,\hat\lambda_i ,

    with the reference terms' weights fixed at 1. With the parameters frozen and
    :math:`R_i = \max|\nabla L_r| / \overline{|\nabla L_i|}`, ``siam`` converges to :math:`\sqrt{R_i}`
    (its estimate is :math:`R_i/\lambda_i`) and ``arxiv`` to :math:`R_i`.

    where

    * ``ref``: the residual term(s) :math:`L_r`; several (``ref=["res_u", "res_v"]``) take the max of
      their statistics (NeuralPDE.jl).
    * ``variant``: ``"siam"`` (lambda inside, :math:`\alpha = 0.1`) or ``"arxiv"`` (no lambda,
      :math:`\alpha = 0.9`); ``alpha`` overrides the variant's :math:`\alpha`. ``momentum`` is the same
      setting under the name every other balancer uses for its smoothing rate: ``momentum = 1 - alpha``
      (give one of the two).
    * ``statistic``: numerator ``"max"`` (paper), ``"mean"`` (PhysicsNeMo's code:
      :math:`\overline{|\nabla L_r|}/\overline{|\nabla L_i|}`), or ``"norm"``
      (:math:`\|\nabla L_r\|_2/\|\nabla L_i\|_2`).
    * ``params``: ``"all"`` trainable parameters, or ``"weights"`` (weight matrices only; the authors' code).
    * ``reduction``: ``"flat"`` (over all entries), ``"layer_mean"`` (denominator = mean over parameter
      tensors of the per-tensor means, as the authors' code), or ``"layer_max_ratio"``
      (:math:`\max_\ell\, \max|\nabla_{W_\ell} L_r| / \overline{|\nabla_{W_\ell} \lambda_i L_i|}`, the
      authors' lid-driven cavity script).
    * ``eps``: added to every denominator (:math:`\epsilon`).
    * ``preset="wang2021_code"``: exactly the authors' Helmholtz / Klein-Gordon code: ``siam``, ``max``,
      weights only, ``layer_mean``, every 10 steps from step 0. Explicit arguments override a preset.

    Args:
        model: the ``paddle.nn.Layer`` whose parameters the losses depend on (or a list of parameters).
        ref: name(s) of the reference (PDE residual) term(s).
        update_freq: update on calls with ``step % update_freq == 0`` (default 10, as the paper).
        min_weight, max_weight: optional bounds (mean-based weights are known to collapse towards 0).
        loss_names: the term names, or ``None`` to take them from the first call.
        assemble: see :class:`~paddle_pinn_balance.balancer.Balancer` (default: an update step costs no
            second backward).

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import LRAnnealing
        >>> _ = paddle.seed(0)
        >>> net = paddle.nn.Sequential(paddle.nn.Linear(1, 8), paddle.nn.Tanh(), paddle.nn.Linear(8, 1))
        >>> lra = LRAnnealing(net, ref="res", update_freq=10)
        >>> x = paddle.rand([16, 1])
        >>> for step in range(20):
        ...     u = net(x)
        ...     total = lra({"res": (u ** 2).mean(), "bc": (net(paddle.zeros([1, 1])) - 1).pow(2).mean()}, step)
        ...     total.backward()
        >>> sorted(lra.weights)
        ['bc', 'res']
        >>> {n: round(w, 3) for n, w in lra.weights.items()}
        {'res': 1.0, 'bc': 0.86}

    Note:
        * The math is :func:`lra_estimates` (the smoothing is the base class's ``momentum = 1 - alpha``).
          On an update step the base class takes the stacked per-term gradients ``G`` once, over all
          trainable parameters (the statistics read the columns of the ``params`` subset): with
          ``assemble=True`` on one process by one ``backward()`` per term into ``.grad``, copied out row by
          row, ``.grad`` restored as it was found and the graph freed
          (:func:`~paddle_pinn_balance.gradients.term_gradients_by_backward`; together about the cost of
          one backward of the sum), and the returned total's backward delivers :math:`\lambda^T G` without
          a second backward; with ``assemble=False`` or data-parallel, with ``paddle.grad``
          (:func:`~paddle_pinn_balance.gradients.term_gradients`). On other steps the call costs a
          weighted sum only.
        * ``eps`` is not in the paper (it guards tiny denominators). A term whose gradient is identically
          zero (not connected to the selected parameters) keeps its weight instead of getting
          ``max / eps``; non-finite estimates skip the whole update (the previous weights are kept).
        * A reference term without gradient (detached, or constant) would give every other term the
          estimate 0 and drive its weight to 0: such an update is skipped (every weight kept), and the
          warning every ``check_every`` updates names the reference term.

    References:
        S. Wang, Y. Teng, P. Perdikaris. Understanding and mitigating gradient flow pathologies in
        physics-informed neural networks. SIAM J. Sci. Comput. 43(5):A3055-A3081, 2021.
    """

    def __init__(
        self,
        model,
        ref: Union[str, Sequence[str]] = "res",
        variant: Optional[str] = None,
        alpha: Optional[float] = None,
        momentum: Optional[float] = None,
        statistic: Optional[str] = None,
        params: Optional[str] = None,
        reduction: Optional[str] = None,
        update_freq: Optional[int] = None,
        min_weight: Optional[float] = None,
        max_weight: Optional[float] = None,
        eps: float = 1e-8,
        preset: Optional[str] = None,
        loss_names: Optional[Sequence[str]] = None,
        assemble: bool = True,
        check_every: int = 100,
    ):
        chosen = dict(_DEFAULTS)
        if preset is not None:
            chosen.update(PRESETS[check_choice("preset", preset, list(PRESETS))])
        given = dict(variant=variant, statistic=statistic, params=params, reduction=reduction, update_freq=update_freq)
        chosen.update({k: v for k, v in given.items() if v is not None})
        self.variant = check_choice("variant", chosen["variant"], list(VARIANTS))
        self.statistic = check_choice("statistic", chosen["statistic"], STATISTICS)
        self.params = check_choice("params", chosen["params"], PARAM_SUBSETS)
        self.reduction = check_choice("reduction", chosen["reduction"], REDUCTIONS)
        self.preset = preset
        default_alpha = VARIANTS[self.variant][1]
        if alpha is not None and momentum is not None:
            raise ValueError(f"give `alpha` (the paper's name: the new estimate's share) or `momentum` "
                             f"(= 1 - alpha, the old weight's share, as every other balancer names it), not both; "
                             f"got alpha={alpha!r}, momentum={momentum!r}")
        if momentum is not None:
            alpha = 1.0 - check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.alpha = default_alpha if alpha is None else check_float("alpha", alpha, 0.0, 1.0, low_open=True)
        if isinstance(ref, str):
            ref = [ref]
        if not isinstance(ref, Sequence) or not ref or not all(isinstance(r, str) for r in ref):
            raise ValueError(f"`ref` must be a loss name or a non-empty list of loss names; got {ref!r}")
        if len(set(ref)) != len(ref):
            raise ValueError(f"`ref` has duplicates: {list(ref)}")
        self.ref = tuple(ref)
        stat_params = trainable_parameters(model, self.params)
        # all trainable parameters (the total's gradient), those the statistics read first (plain lists:
        # not registered, not saved)
        self._params = weights_first(trainable_parameters(model, "all"), stat_params)
        self._n_stat = sum(int(np.prod(p.shape)) for p in stat_params)
        self._segments = Segments(stat_params)
        super().__init__(
            loss_names=loss_names,
            update_freq=check_int("update_freq", chosen["update_freq"]),
            momentum=1.0 - self.alpha,
            min_weight=min_weight,
            max_weight=max_weight,
            eps=eps,
            assemble=assemble,
            check_every=check_every,
        )

    def _check_names(self, names):
        unknown = [r for r in self.ref if r not in names]
        if unknown:
            raise ValueError(f"`ref` names {unknown} are not loss names {list(names)}")
        self._ref_position = names.index(self.ref[0])
        self._ref_index = paddle.to_tensor([names.index(r) for r in self.ref], dtype="int64")
        self._free = paddle.to_tensor([n not in self.ref for n in names])  # the annealed terms

    def estimates(self, G: paddle.Tensor, lambdas: paddle.Tensor) -> tuple:
        """:func:`lra_estimates` with this balancer's settings: ``(lambda_hat, den)`` from ``G`` (``[K, P]``,
        the columns of the selected parameters)."""
        ref = self._ref_position if len(self.ref) == 1 else self._ref_index
        return lra_estimates(G, lambdas, ref, self._free, self.variant, self.statistic, self.reduction,
                             self._segments, self.eps)

    def _clip(self, w):
        """Bounds apply to the annealed weights only: the reference terms keep weight 1."""
        if self.min_weight is None and self.max_weight is None:
            return w
        return paddle.where(self._free, super()._clip(w), w)

    def _bounded_terms(self, names):
        return [n not in self.ref for n in names]

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        if np.any(arrays["lambdas"] <= 0):  # the siam estimate divides by the weight
            raise ValueError(f"state_dict['lambdas'] must be positive; got {arrays['lambdas'].tolist()}")

    def _warn_zero_gradient(self, zero):
        refs = [n for n in zero if n in self.ref]
        if refs:
            warnings.warn(f"LRAnnealing: reference term(s) {refs} had an identically zero gradient (detached, or "
                          "constant?): an update where no reference term had a gradient was skipped and every "
                          "weight kept (its estimates would all be 0)", BalanceWarning, stacklevel=4)
        others = [n for n in zero if n not in self.ref]
        if others:
            super()._warn_zero_gradient(others)

    needs_gradients = True

    def update(self, losses, G, state):
        """The contract's update: :meth:`estimates` from the columns of the ``params`` subset; the denominators
        are the guard's per-term statistic (non-finite exactly when the term's gradient is)."""
        hat, den = self.estimates(ops.leading_columns(G, self._n_stat), state["weights"])
        return hat, {}, den
