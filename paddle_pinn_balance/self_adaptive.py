"""Self-adaptive per-point weights (McClenny & Braga-Neto, J. Comput. Phys. 474, 111722, 2023)."""

from __future__ import annotations

from typing import Mapping

import paddle

from .balancer import check_choice, check_float, check_int

MASKS = ("polynomial", "sigmoid")


class SelfAdaptive(paddle.nn.Layer):
    r"""SA-PINN: one learnable weight per point per term, trained by gradient *ascent*.

    .. math::

        \min_\theta \max_{\lambda} \; L_k(\theta, \lambda_k) = \frac1{N_k}\sum_{i=1}^{N_k} m(\lambda_{k,i})\,
        r_{k,i}(\theta)^2 \quad \text{(McClenny \& Braga-Neto 2023, eqs. 4-6)}

    with the mask :math:`m(\lambda) = \lambda^q` (``"polynomial"``, the paper) or
    :math:`\mathrm{sigmoid}(\lambda)` (``"sigmoid"``, as PINA).

    where

    * ``points``: ``{term: N_k}``, the number of (fixed) points of each term.
    * ``mask``, ``q``: the mask and its exponent; ``init``: the initial :math:`\lambda` (the paper draws
      them uniformly; results depend on this scale, SA-PINNs#1).

    Call with per-point residuals ``{term: r [N_k] or [N_k, 1]}``; it returns scalar losses
    ``{term: L_k}`` to give to any term balancer (or to sum). The gradient reaching :math:`\lambda` is
    negated inside the graph (:math:`\lambda` enters as :math:`2\,\mathrm{sg}(\lambda) - \lambda`: same value,
    derivative :math:`-1`), so the user's own optimizer, descending, performs the ascent; this holds for
    ``backward()``, ``paddle.grad``, accumulation and a balancer's assembled total alike.

    Example:
        >>> import paddle
        >>> from paddle_pinn_balance import SelfAdaptive
        >>> sa = SelfAdaptive({"res": 4})
        >>> r = paddle.to_tensor([0.0, 1.0, 2.0, 3.0])
        >>> sa({"res": r})["res"].backward()
        >>> bool((sa.weight("res").grad.numpy() <= 0).all())  # descent on it raises the weights
        True

    Note:
        * With a balancer that reads per-term gradients, call ``balancer.add_parameters(sa.parameters())``
          so its assembled total delivers the point weights' gradient too.
        * Data-parallel training (``DataParallel`` around the network, not around this layer): each rank owns
          the weights of its own points, and their gradient is that of the rank's own loss, a mean over its
          own points: ``world_size`` times what one process on the union of the points gives them (divide
          their learning rate by ``world_size`` for the single-process trajectory). A term whose points every
          rank holds (the same points, e.g. a small boundary set) gets the same gradient on every rank, so its
          weights stay identical on every rank without communication. Checkpoints of owned weights are per
          rank. With a balancer that reads per-term gradients (``add_parameters``) the same holds: only the
          model's columns of the gradient matrix are averaged over the ranks, the point weights' stay the
          rank's own. Both are tested on two ranks (``tests/test_distributed.py``, plain sum and LRA).
        * The point count of a term is fixed; a different count raises ``ValueError``.
    """

    def __init__(self, points: Mapping[str, int], mask: str = "polynomial", q: float = 2.0, init: float = 1.0):
        super().__init__()
        if not isinstance(points, Mapping) or not points:
            raise ValueError(f"`points` must be a non-empty mapping of term name to point count; got {points!r}")
        self.mask = check_choice("mask", mask, MASKS)
        self.q = check_float("q", q, 0.0, low_open=True)
        self.names = tuple(points)
        self._lam = {}
        for i, (name, n) in enumerate(points.items()):
            n = check_int(f"points[{name!r}]", n)
            p = self.create_parameter([n], dtype=paddle.get_default_dtype(),  # as paddle.nn.Linear's
                                      default_initializer=paddle.nn.initializer.Constant(float(init)))
            self.add_parameter(f"lambda_{i}", p)
            self._lam[name] = p

    def weight(self, name: str) -> paddle.Tensor:
        """The point weights :math:`\\lambda` of term ``name`` (a parameter)."""
        return self._lam[name]

    def _mask(self, lam):
        return paddle.nn.functional.sigmoid(lam) if self.mask == "sigmoid" else lam ** self.q

    def forward(self, residuals: Mapping[str, paddle.Tensor]) -> dict:
        out = {}
        for name, r in residuals.items():
            if name not in self._lam:
                raise ValueError(f"unknown term {name!r}; SelfAdaptive was built for {list(self.names)}")
            lam = self._lam[name]
            r = r.reshape([-1])
            if r.shape[0] != lam.shape[0]:
                raise ValueError(f"term {name!r} has {r.shape[0]} points, its weights were built for "
                                 f"{lam.shape[0]}: SA-PINN points must stay fixed across steps")
            flipped = 2.0 * lam.detach() - lam  # value lam, gradient negated (ascent)
            m = self._mask(flipped).astype(r.dtype)
            out[name] = (m * r * r).mean()
        return out

    def summary(self) -> dict:
        """``{term: (min, mean, max)}`` of the point weights (synchronises; for logging)."""
        return {n: (float(p.amin()), float(p.mean()), float(p.amax())) for n, p in self._lam.items()}
