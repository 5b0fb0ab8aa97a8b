"""ReLoBRaLo: relative loss balancing with random look-back (Bischof & Kraus, arXiv 2110.09813, 2021)."""

from __future__ import annotations

from typing import Optional, Sequence

from . import ops
from .balancer import Balancer, check_float, check_int
from .contract import Slot, pick, ready, register

_MASK64 = (1 << 64) - 1


def lookback_draw(seed: int, step: int, expected_rho: float) -> float:
    r""":math:`\rho(t) \sim \mathrm{Bernoulli}(E[\rho])` for step ``t``: 1.0 or 0.0, a pure function of
    ``(seed, step)``.

    ``u = splitmix64(seed * 2^32 + step) / 2^64`` (Steele, Lea & Flood 2014: a counter passed through a
    64-bit finaliser, a standard counter-based generator), :math:`\rho = 1[u < E[\rho]]`. Drawn on the
    host from numbers the host has, so the draw costs no device operation and no synchronisation; keyed
    on the step, so a resumed run (or every data-parallel rank) draws the same :math:`\rho` with nothing
    to checkpoint, and a skipped update does not shift the later draws.
    """
    z = (seed * (1 << 32) + step + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return 1.0 if (z >> 11) * 2.0 ** -53 < expected_rho else 0.0


def balance_softmax(losses, ref, tau: float, eps: float):
    r""":math:`\hat w_j(t;t') = n\,\mathrm{softmax}_j\big(L_j(t) / (\tau L_j(t') + \epsilon)\big)`
    (arXiv 2110.09813 eq. 11, first line, :math:`\lambda^{bal}_i(t,t')`); the softmax subtracts the maximum
    before the exponential (overflow-safe)."""
    return ops.scale(ops.softmax(losses / ops.scale(ref, tau, eps)), float(losses.shape[0]))


def relobralo_weights(losses, init_losses, prev_losses, prev_weights, rho: float, alpha: float, tau: float,
                      eps: float = 1e-8):
    r"""One ReLoBRaLo update (arXiv 2110.09813 eq. 11, its three lines in one):

    .. math::

        w_j(t) = \alpha\big(\rho\,w_j(t-1) + (1-\rho)\,\hat w_j(t;0)\big) + (1-\alpha)\,\hat w_j(t;t-1).

    The tensors have shape ``[n]``; ``rho`` (the Bernoulli draw, 0 or 1; any number in [0, 1] mixes), ``alpha``,
    ``tau`` and ``eps`` are Python numbers. With ``rho == 1`` the look-back term :math:`\hat w(t;0)` is not
    computed (it has weight 0).
    """
    if rho == 1.0:
        hist = prev_weights
    elif rho == 0.0:
        hist = balance_softmax(losses, init_losses, tau, eps)
    else:
        hist = ops.scale(prev_weights, rho) + ops.scale(balance_softmax(losses, init_losses, tau, eps), 1.0 - rho)
    bal = balance_softmax(losses, prev_losses, tau, eps)
    return ops.lerp(bal, ops.cast(hist, bal.dtype), ops.filled(None, alpha, bal))  # (1 - alpha) bal + alpha hist


@register("relobralo")
class ReLoBRaLo(Balancer):
    r"""ReLoBRaLo (Bischof & Kraus 2021): weights from loss ratios, with a random look-back to :math:`L(0)`.

    .. math::

        w_j(t) = \alpha\big(\rho\,w_j(t-1) + (1-\rho)\,\hat w_j(t;0)\big) + (1-\alpha)\,\hat w_j(t;t-1),
        \quad \hat w_j(t;t') = n\,\mathrm{softmax}_j\Big(\frac{L_j(t)}{\tau L_j(t') + \epsilon}\Big)

    (arXiv 2110.09813 eq. 11: :math:`\lambda^{bal}`, :math:`\lambda^{hist}` and the update are its three
    lines, in the revision ar5iv renders, which writes the temperature :math:`T` and the number of terms
    :math:`m`; the Bernoulli :math:`\rho` is defined in the text after it), where

    * ``alpha``: :math:`\alpha`, the memory of the past; ``expected_rho``: :math:`E[\rho]`, with
      :math:`\rho \sim \mathrm{Bernoulli}(E[\rho])` drawn once per update; ``tau``: the temperature
      :math:`\tau`; ``eps``: :math:`\epsilon`; :math:`n` the number of terms.
    * :math:`L(0)` are the losses of the first update call and :math:`L(t-1)` those of the previous update
      call; on the first call every weight is 1.

    Loss values only: no gradient is read, a step costs what a plain step costs.

    Args:
        alpha, expected_rho, tau, eps: as above (defaults 0.95, 0.99, 1.0, 1e-8).
        seed: seed of the look-back draws: :math:`\rho(t)` is :func:`lookback_draw` of ``(seed, step)``, so a
            resumed run (same steps) draws the same :math:`\rho` sequence (the seed is saved in ``state_dict`` as
            ``lookback_seed``; loading a checkpoint restores it).
        update_freq, min_weight, max_weight, loss_names, check_every: see
            :class:`~paddle_pinn_balance.balancer.Balancer`.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import ReLoBRaLo
        >>> bal = ReLoBRaLo(seed=0)
        >>> for step in range(3):
        ...     total = bal({"res": paddle.to_tensor(1.0 / (step + 1)), "bc": paddle.to_tensor(2.0)}, step)
        >>> w = bal.weights; round(w["res"] + w["bc"], 4)
        2.0

    Note:
        * Defaults are those of PhysicsNeMo's ``RelobraloLoss`` and of ``ppsci.loss.mtl.Relobralo``
          (alpha 0.95, beta = E[rho] 0.99, tau 1, eps 1e-8); the paper tunes them per problem (the ConFIG
          experiments use E[rho] 0.999, tau 0.1). The authors' code (``rbischof/relative_balancing``,
          ``update_rules.py``) writes the same update with :math:`\epsilon = 10^{-12}` and defaults
          alpha 0.999, E[rho] 1.0, tau 1.
        * ``ppsci.loss.mtl.Relobralo`` returns the unweighted sum at step 0 and draws rho with
          ``paddle.bernoulli`` from the global generator (not saved: a resume draws other rho); it keys its
          state on ``step == 0``. Here the draw is a seeded function of the step, weights are 1 at the first
          call.
        * A call with a non-finite loss skips the update: weights, :math:`L(0)` and :math:`L(t-1)` are kept
          (the next update draws its own step's :math:`\rho`, as without the skipped call).
        * Cost: the draw is made on the host, and on a step with :math:`\rho = 1` (the usual case) the
          look-back softmax is not computed; once the host has read that every :math:`L_j(0)` is taken (one
          read, at the first update) an update is ten small device operations beyond the weighted sum.
        * Data-parallel: the losses are averaged over the ranks first, so every rank has the same weights.
    """

    def __init__(self, alpha: float = 0.95, expected_rho: float = 0.99, tau: float = 1.0, eps: float = 1e-8,
                 seed: int = 0, update_freq: int = 1, min_weight: Optional[float] = None,
                 max_weight: Optional[float] = None, loss_names: Optional[Sequence[str]] = None,
                 check_every: int = 100):
        self.alpha = check_float("alpha", alpha, 0.0, 1.0)
        self.expected_rho = check_float("expected_rho", expected_rho, 0.0, 1.0)
        self.tau = check_float("tau", tau, 0.0, low_open=True)
        self.seed = check_int("seed", seed, minimum=0)
        super().__init__(loss_names=loss_names, update_freq=update_freq, momentum=0.0, min_weight=min_weight,
                         max_weight=max_weight, eps=eps, check_every=check_every)
        self.eps = check_float("eps", eps, 0.0)

    history = 1  # L(0), then L(t-1)

    def state_spec(self, k):
        return {"init_losses": Slot([k], 1.0), "prev_losses": Slot([k], 1.0),
                "lookback_seed": Slot([1], self.seed, "int64")}

    def _check_state(self, arrays, names):
        super()._check_state(arrays, names)
        check_int("state_dict['lookback_seed']", int(arrays["lookback_seed"][0]), minimum=0)

    def _after_load(self):
        super()._after_load()
        self.seed = int(self.lookback_seed.numpy()[0])

    def update(self, losses, G, state):
        rho = lookback_draw(self.seed, state["step"], self.expected_rho)
        first = ready(state["taken"])  # None: every L(0) taken, known on the host (no flag arithmetic)
        init = pick(first, state["init_losses"], losses)  # a first update takes L(0)
        w = relobralo_weights(losses, init, state["prev_losses"], state["weights"], rho, self.alpha, self.tau,
                              self.eps)
        if first is not None:  # a term's first update gives weight 1
            w = ops.where(first, w, ops.filled(losses.shape[0], 1.0, losses))
        return w, {"prev_losses": losses, "init_losses": init}

    def extra_repr(self):
        return (f"{super().extra_repr()}, alpha={self.alpha}, expected_rho={self.expected_rho}, tau={self.tau}, "
                f"seed={self.seed}")
