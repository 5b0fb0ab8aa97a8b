"""ReLoBRaLo: relative loss balancing with random look-back (Bischof & Kraus, arXiv 2110.09813, 2021)."""

from __future__ import annotations

from typing import Optional, Sequence

import paddle

from . import ops
from .balancer import Balancer, check_float, check_int
from .gradients import mean_across_ranks

_PM_MOD, _PM_MUL = 2147483647, 48271  # Park-Miller generator: every product fits in int64 exactly


def balance_softmax(losses, ref, tau: float, eps: float):
    r""":math:`\hat w_j(t;t') = n\,\mathrm{softmax}_j\big(L_j(t) / (\tau L_j(t') + \epsilon)\big)`
    (the balancing term of arXiv 2110.09813; equation number not checked),
    max-shifted before the exponential (overflow-safe)."""
    z = losses / (tau * ref + eps)
    e = paddle.exp(z - z.max())
    return losses.shape[0] * e / e.sum()


def relobralo_weights(losses, init_losses, prev_losses, prev_weights, rho, alpha: float, tau: float,
                      eps: float = 1e-8):
    r"""One ReLoBRaLo update (arXiv 2110.09813, the update rule; equation numbers not checked):

    .. math::

        w_j(t) = \alpha\big(\rho\,w_j(t-1) + (1-\rho)\,\hat w_j(t;0)\big) + (1-\alpha)\,\hat w_j(t;t-1).

    All arguments are tensors of shape ``[n]`` except ``rho`` (0-d, 0 or 1) and the floats.
    """
    hist = rho * prev_weights + (1.0 - rho) * balance_softmax(losses, init_losses, tau, eps)
    return alpha * hist + (1.0 - alpha) * balance_softmax(losses, prev_losses, tau, eps)


class ReLoBRaLo(Balancer):
    r"""ReLoBRaLo (Bischof & Kraus 2021): weights from loss ratios, with a random look-back to :math:`L(0)`.

    .. math::

        w_j(t) = \alpha\big(\rho\,w_j(t-1) + (1-\rho)\,\hat w_j(t;0)\big) + (1-\alpha)\,\hat w_j(t;t-1),
        \quad \hat w_j(t;t') = n\,\mathrm{softmax}_j\Big(\frac{L_j(t)}{\tau L_j(t') + \epsilon}\Big)

    (arXiv 2110.09813, its update rule; equation numbers not checked against the paper), where

    * ``alpha``: :math:`\alpha`, the memory of the past; ``expected_rho``: :math:`E[\rho]`, with
      :math:`\rho \sim \mathrm{Bernoulli}(E[\rho])` drawn once per update; ``tau``: the temperature
      :math:`\tau`; ``eps``: :math:`\epsilon`; :math:`n` the number of terms.
    * :math:`L(0)` are the losses of the first update call and :math:`L(t-1)` those of the previous update
      call; on the first call every weight is 1.

    Loss values only: no gradient is read, a step costs what a plain step costs.

    Args:
        alpha, expected_rho, tau, eps: as above (defaults 0.95, 0.99, 1.0, 1e-8).
        seed: seed of the look-back draws (a Park-Miller generator whose state is the ``rng_state``
            buffer, saved in ``state_dict``: a resumed run draws the same :math:`\rho` sequence).
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
          experiments use E[rho] 0.999, tau 0.1).
        * ``ppsci.loss.mtl.Relobralo`` returns the unweighted sum at step 0 and draws rho with
          ``paddle.bernoulli`` from the global generator (not saved: a resume draws other rho); it keys its
          state on ``step == 0``. Here the draw is seeded and checkpointed, weights are 1 at the first call.
        * A call with a non-finite loss skips the update: weights, :math:`L(0)`, :math:`L(t-1)` and the
          generator are all kept.
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

    def _create_state(self, k):
        super()._create_state(k)
        self.register_buffer("init_losses", paddle.ones([k], dtype="float32"))
        self.register_buffer("prev_losses", paddle.ones([k], dtype="float32"))
        self.register_buffer("initialised", paddle.zeros([1], dtype="int64"))
        self.register_buffer("rng_state", paddle.to_tensor([self.seed % (_PM_MOD - 1) + 1], dtype="int64"))

    def _extra_state_shapes(self, k):
        return {"init_losses": [k], "prev_losses": [k], "initialised": [1], "rng_state": [1]}

    def _draw_rho(self):
        """Next state of the generator and rho = 1[u < E[rho]] with u uniform in (0, 1) (device-side)."""
        state = paddle.remainder(self.rng_state * _PM_MUL, paddle.full([1], _PM_MOD, dtype="int64"))
        u = state.astype("float64") / float(_PM_MOD)
        return state, (u < self.expected_rho).astype("float32").reshape([])

    def _update(self, values):
        with paddle.no_grad():
            L = mean_across_ranks(ops.cast(ops.stack([v.detach() for v in values]), "float32"))
            ok = self._losses_finite
            first = self.initialised.reshape([]) == 0
            state, rho = self._draw_rho()
            init = ops.where(first, L, self.init_losses)
            w = relobralo_weights(L, init, self.prev_losses, self.lambdas, rho, self.alpha, self.tau, self.eps)
            w = ops.where(first, paddle.ones_like(w), w)
            self._set_weights(w)  # skipped (weights kept) on non-finite losses
            ops.assign_(ops.where(ok, init, self.init_losses), self.init_losses)
            ops.assign_(ops.where(ok, L, self.prev_losses), self.prev_losses)
            keep = ok.reshape([1])
            ops.assign_(ops.where(keep, state, self.rng_state), self.rng_state)
            ops.assign_(ops.where(keep, paddle.ones_like(self.initialised), self.initialised), self.initialised)

    def extra_repr(self):
        return (f"{super().extra_repr()}, alpha={self.alpha}, expected_rho={self.expected_rho}, tau={self.tau}, "
                f"seed={self.seed}")
